"""Recording ingest wired from config: the actor (row 20) and its HTTP door.

:func:`build_recordings` makes the ingest's child (``[recordings]``, its retry
profile ``[retries.<recordings.retry>]``, mailbox ``[mailboxes.recordings]``, row
20's detector) and :class:`RecordingApi`, mounted at ``/v1/recordings``::

    POST /v1/recordings
    {"tenant_id": uuid, "recording_id": str, "path": str, "session_id"?: str}
      202 {"recording_id", "status": "pending", "new": bool}

``path`` is relative to ``[recordings] path``. Other answers: 400
``invalid_request``, 404, 405, 413, 422 ``rejected`` (e.g. an unknown tenant), 503
``unavailable``. The recorder (or whatever sees a recording finish) calls it; a
recording registered twice is one recording.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final

import msgspec
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from actors.recording_ingest import (
    ROW,
    DbRecordingStore,
    Ingest,
    RecordingIngest,
    RecordingIngestMessage,
    is_retryable,
    recording_ingest_child,
)
from config import ConfigProblem, TriageConfig, engine_kwargs
from config.catalog import module_path
from config.preflight import problem
from engine.actor import ActorRef
from engine.detectors import CountInWindowDetector
from engine.errors import ActorError, LoadShed, ProviderError
from engine.retry import RetryPolicy
from providers.asgi import BodyTooLarge, ClientDisconnected, read_body, send_json, serve_scope

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

    from engine.runtime import Runtime
    from engine.supervisor import ChildSpec
    from supervisors.backbone import Backbone

__all__ = [
    "MAILBOX",
    "RECORDING_MODULES",
    "RECORDING_ROW",
    "RecordingApi",
    "RecordingWiring",
    "build_recordings",
    "recording_problems",
    "retry_policy",
]

MAILBOX: Final = "recordings"
PATH: Final = "/v1/recordings"
RECORDING_ROW: Final = ROW
RECORDING_MODULES: Final = frozenset({module_path(RecordingIngest.__module__)})

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class _IngestBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tenant_id: uuid.UUID
    recording_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    path: Text
    session_id: Text | None = None


_decoder = msgspec.json.Decoder(_IngestBody)


class RecordingApi:
    """The ASGI app of ``POST {path}``; holds no state."""

    def __init__(
        self,
        ref: ActorRef[RecordingIngestMessage],
        *,
        timeout_s: float,
        max_body_bytes: int,
        path: str = PATH,
    ) -> None:
        self.ref = ref
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self.path = path.rstrip("/")

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await serve_scope(scope, receive, send, self._http)

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["path"].rstrip("/") != self.path:
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
        status, answer = await self._ingest(body)
        await _answer(send, status, answer)

    async def _ingest(self, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            request = _decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return 400, {"error": "invalid_request", "message": str(exc)}
        message = Ingest(
            tenant_id=request.tenant_id, recording_id=request.recording_id, path=request.path,
            session_id=request.session_id,
        )  # fmt: skip
        try:
            answer = await self.ref.ask(message, timeout_s=self.timeout_s)
        except (ActorError, LoadShed) as exc:
            return 503, {"error": "unavailable", "message": str(exc)}
        if isinstance(answer, ProviderError):
            return 503, {"error": "unavailable", "message": str(answer)}
        if isinstance(answer, Exception):
            return 422, {"error": "rejected", "message": f"{type(answer).__name__}: {answer}"}
        return 202, {"recording_id": request.recording_id, "status": "pending", "new": answer}


async def _answer(send: ASGISendCallable, status: int, body: Mapping[str, Any]) -> None:
    extra = [(b"allow", b"POST")] if status == 405 else []
    await send_json(send, status, msgspec.json.encode(body), extra_headers=extra)


@dataclass(frozen=True, slots=True)
class RecordingWiring:
    spec: ChildSpec
    ref: ActorRef[RecordingIngestMessage]
    mounts: Mapping[str, ASGIFramework]


def recording_problems(config: TriageConfig, source: str) -> list[ConfigProblem]:
    """The ingest's lease, which must outlast its retry budget, and its mailbox profile,
    which must exist and wait (its tasks report back through it: a refused report would
    crash the actor)."""
    problems: list[ConfigProblem] = []
    retry = config.retries.get(config.recordings.retry)
    if retry is not None and config.recordings.lease_s <= retry.time_budget_s:
        problems.append(
            problem(
                source, "$.recordings.lease_s",
                f"must exceed the retry budget ([retries.{config.recordings.retry}]"
                f" time_budget_s = {retry.time_budget_s}): another replica would claim a"
                " recording still being retried",
            )
        )  # fmt: skip
    return problems + _mailbox_problems(config, source)


def _mailbox_problems(config: TriageConfig, source: str) -> list[ConfigProblem]:
    mailbox = config.mailboxes.get(MAILBOX)
    if mailbox is None:
        return [
            problem(
                source, f"$.mailboxes.{MAILBOX}",
                f"missing required profile [mailboxes.{MAILBOX}] (the recording ingest uses it)",
            )
        ]  # fmt: skip
    if mailbox.overflow != "wait":
        return [
            problem(
                source, f"$.mailboxes.{MAILBOX}.overflow",
                f"must be 'wait', got {mailbox.overflow!r} (ingest tasks report through it)",
            )
        ]  # fmt: skip
    return []


def retry_policy(config: TriageConfig, runtime: Runtime | None = None) -> RetryPolicy:
    """``[retries.<recordings.retry>]``, retrying denied and missing recordings only."""
    name = config.recordings.retry
    extra: dict[str, Any] = {}
    if runtime is not None:
        extra = {"chance": runtime.chance.fork(name), "metrics": runtime.metrics}
    return RetryPolicy(
        name, **engine_kwargs(config.retries[name]), is_transient=is_retryable, **extra
    )


def build_recordings(
    config: TriageConfig,
    runtime: Runtime,
    backbone: Backbone,
    *,
    detector: CountInWindowDetector | None,
    shutdown_s: float,
) -> RecordingWiring:
    """The ingest's child and its API (nothing runs yet)."""
    registry = runtime.metrics.registry if runtime.metrics is not None else None
    spec, ref = recording_ingest_child(
        store=DbRecordingStore(backbone.pool.asyncpg_pool), config=config.recordings,
        retry=retry_policy(config, runtime), mailbox=config.mailboxes[MAILBOX],
        shutdown_s=shutdown_s, detector=detector, registry=registry, events=runtime.events,
        clock=runtime.clock, deadlines=runtime.deadlines, metrics=runtime.metrics,
    )  # fmt: skip
    api = RecordingApi(
        ref,
        timeout_s=config.recordings.ask_timeout_s,
        max_body_bytes=config.recordings.max_body_bytes,
    )
    return RecordingWiring(spec=spec, ref=ref, mounts={PATH: api})
