"""A real clamd for the tests: Debian's clamav-daemon, with the signatures the tests ship.

``clamd_server`` (session) starts :class:`providers.embedded_clamd.EmbeddedClamd`
with ``tests/data/clamd`` as its database directory: the EICAR test file's hash
(``Triage.Test.EICAR``) and a body pattern (``Triage.Test.Pattern``, the bytes of
:data:`TEST_PATTERN`). There is no freshclam offline, so these are the only
signatures it knows. A machine without clamd FAILS these tests with the command
that installs it: nothing is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest

from providers.embedded_clamd import EmbeddedClamd, find_clamd

__all__ = ["EICAR", "SIGNATURES", "TEST_PATTERN", "clamd_or_fail"]

SIGNATURES: Final = Path(__file__).parent / "data" / "clamd"
#: The EICAR standard antivirus test file (68 bytes), matched by its hash.
EICAR: Final = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
#: Bytes that the shipped body signature finds anywhere in a stream.
TEST_PATTERN: Final = b"TRIAGE-SCANNER-TEST-PATTERN-7f3a"
#: clamd's StreamMaxLength in the tests' clamd: small, so the size-limit answer is testable.
STREAM_MAX_BYTES: Final = 1024 * 1024


def clamd_or_fail(**kwargs: object) -> EmbeddedClamd:
    """A new (not yet started) clamd with the shipped signatures, or a failed test."""
    if find_clamd() is None:
        pytest.fail(
            "clamd is not installed: the scanner tests need a real one "
            "(Debian: apt-get install -y clamav-daemon; .ci/run installs it)",
            pytrace=False,
        )
    return EmbeddedClamd(database=SIGNATURES, stream_max_bytes=STREAM_MAX_BYTES, **kwargs)  # type: ignore[arg-type]  # keywords pass through
