"""Loopback emulators of the outside vendors, speaking their real wire formats."""

from providers.emulators.base import (
    Emulator,
    EmulatorServer,
    FaultPlan,
    FloodResult,
    ReceiptPost,
    Request,
    Response,
    StoredMessage,
    serve_emulator,
)
from providers.emulators.sms import GhasiEmulator, TwilioEmulator

__all__ = [
    "Emulator",
    "EmulatorServer",
    "FaultPlan",
    "FloodResult",
    "GhasiEmulator",
    "ReceiptPost",
    "Request",
    "Response",
    "StoredMessage",
    "TwilioEmulator",
    "serve_emulator",
]
