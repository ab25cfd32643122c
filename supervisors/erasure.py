"""Catalog row 15 wired from config: the erasure saga and its HTTP door.

:func:`build_erasure` makes the saga's child ``erasure_saga`` (``[erasure]``, mailbox
``[mailboxes.monitor]``, row 15's detector; the backbone's pool, Redis cache and
JetStream client; the blob store of ``[uploads] blob_root``; the recordings'
``[recordings] path``) and :class:`ErasureApi`, mounted at ``/v1/erasures``::

    POST /v1/erasures          {"tenant_id": uuid, "patient_id": str, "identifiers"?: [str]}
      200 {"receipt": {...}, "signature": hex}       the signed receipt of the run
    POST /v1/erasures/receipt  {"tenant_id": uuid, "patient_id": str}
      200 {"receipt", "signature"} | 404 no erasure of that patient

A patient id travels in a body, never in a path (paths reach access logs). Other
answers: 400 ``invalid_request``, 405, 413, 422 ``rejected``, 503 ``unavailable``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, Final

import msgspec
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from actors.erasure_saga import (
    ROW,
    Erase,
    ErasureMessage,
    ErasureSaga,
    GetReceipt,
    Receipt,
    load_receipt_key,
)
from config import TriageConfig
from config.catalog import module_path
from engine.actor import ActorRef, Overflow, actor_child
from engine.detectors import CountInWindowDetector
from engine.errors import ActorError, LoadShed, TriageError
from engine.supervisor import ChildSpec, Restart
from providers.asgi import BodyTooLarge, ClientDisconnected, read_body, send_json, serve_scope
from providers.blobstore import LocalBlobStore

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

    from engine.runtime import Runtime
    from supervisors.backbone import Backbone

__all__ = ["ERASURE_MODULES", "ERASURE_ROW", "ErasureApi", "ErasureWiring", "build_erasure"]

MAILBOX: Final = "monitor"
PATH: Final = "/v1/erasures"
ERASURE_ROW: Final = ROW
ERASURE_MODULES: Final = frozenset({module_path(ErasureSaga.__module__)})

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class _EraseBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tenant_id: uuid.UUID
    patient_id: Text
    identifiers: Annotated[list[Text], msgspec.Meta(max_length=32)] = msgspec.field(
        default_factory=list
    )


class _ReceiptBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tenant_id: uuid.UUID
    patient_id: Text


_erase = msgspec.json.Decoder(_EraseBody)
_receipt = msgspec.json.Decoder(_ReceiptBody)


class ErasureApi:
    """The ASGI app of ``POST /v1/erasures`` and ``POST /v1/erasures/receipt``."""

    def __init__(
        self, ref: ActorRef[ErasureMessage], *, timeout_s: float | None, max_body_bytes: int = 16384
    ) -> None:
        self.ref = ref
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await serve_scope(scope, receive, send, self._http)

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        path = scope["path"].rstrip("/")
        if path not in (PATH, PATH + "/receipt"):
            await _answer(send, 404, {"error": "not_found", "message": "no such path"})
            return
        if scope["method"] != "POST":
            await _answer(send, 405, {"error": "method_not_allowed", "message": "use POST"})
            return
        try:
            body = await read_body(receive, max_bytes=self.max_body_bytes)
        except BodyTooLarge as exc:
            await _answer(send, 413, {"error": "payload_too_large", "message": str(exc)})
            return
        except ClientDisconnected:
            return
        status, answer = await self._serve(path, body)
        await _answer(send, status, answer)

    async def _serve(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        message: ErasureMessage
        try:
            if path == PATH:
                e = _erase.decode(body)
                message = Erase(
                    tenant_id=e.tenant_id,
                    patient_id=e.patient_id,
                    identifiers=tuple(e.identifiers),
                )
            else:
                r = _receipt.decode(body)
                message = GetReceipt(tenant_id=r.tenant_id, patient_id=r.patient_id)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return 400, {"error": "invalid_request", "message": str(exc)}
        try:
            answer = await self.ref.ask(message, timeout_s=self.timeout_s)
        except (ActorError, LoadShed) as exc:
            return 503, {"error": "unavailable", "message": str(exc)}
        if isinstance(answer, TriageError | Exception):
            return 422, {"error": "rejected", "message": f"{type(answer).__name__}: {answer}"}
        if answer is None:
            return 404, {"error": "not_found", "message": "no erasure of that patient"}
        assert isinstance(answer, Receipt)
        return 200, {"receipt": answer.body, "signature": answer.signature}


async def _answer(send: ASGISendCallable, status: int, body: Mapping[str, Any]) -> None:
    extra = [(b"allow", b"POST")] if status == 405 else []
    await send_json(send, status, msgspec.json.encode(body), extra_headers=extra)


@dataclass(frozen=True, slots=True)
class ErasureWiring:
    spec: ChildSpec
    ref: ActorRef[ErasureMessage]
    mounts: Mapping[str, ASGIFramework]


def build_erasure(
    config: TriageConfig,
    runtime: Runtime,
    backbone: Backbone,
    *,
    shutdown_s: float,
    detector: CountInWindowDetector | None,
    severity: str = "ticket",
) -> ErasureWiring:
    """The saga's child and its HTTP door (nothing runs yet)."""
    section = config.erasure
    key = load_receipt_key(section)
    registry = runtime.metrics.registry if runtime.metrics is not None else None
    mailbox = config.mailboxes[MAILBOX]
    spec, ref = actor_child(
        ErasureSaga.name,
        partial(
            ErasureSaga,
            backbone.pool,
            section,
            key=key,
            redis=backbone.redis.client if backbone.redis is not None else None,
            blobs=LocalBlobStore(config.uploads.blob_root, fsync=config.uploads.fsync),
            recordings_incoming=config.recordings.path,
            jetstream=backbone.nats,
            detector=detector,
            registry=registry,
            events=runtime.events,
            clock=runtime.clock,
            severity=severity,
        ),
        capacity=mailbox.capacity,
        overflow=Overflow(mailbox.overflow),
        restart=Restart.PERMANENT,
        shutdown_s=shutdown_s,
        deadlines=runtime.deadlines,
        metrics=runtime.metrics,
    )
    api = ErasureApi(ref, timeout_s=section.ask_timeout_s, max_body_bytes=section.max_body_bytes)
    return ErasureWiring(spec=spec, ref=ref, mounts={PATH: api})
