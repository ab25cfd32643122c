"""The dispatch request: one type, validated once, by decoding, with the limits from config.

Every door builds the dispatcher's :class:`SubmitRequest` through one
:class:`RequestDecoder`, made once at wiring time from :class:`DispatchLimits`
(the ``[dispatch]`` config):

* HTTP: :meth:`RequestDecoder.decode_http` (the body, the ``Idempotency-Key`` header);
* NATS: :meth:`RequestDecoder.decode_command` (the body may carry ``idempotency_key``);
* in-process callers (tests, benches): :meth:`RequestDecoder.build`, the same rules
  through :func:`msgspec.convert`.

The decoder's body type is a :class:`RequestBody` whose fields are re-declared at
wiring time as ``Annotated`` types carrying ``msgspec.Meta`` bounds, so msgspec
itself refuses, with the JSON path of the culprit::

    field               rule (limits from [dispatch])
    tenant_id           a UUID (canonicalised)
    channel             sms | push | email
    template            1..max_template_chars of [A-Za-z0-9_.-]
    template_version    null or 1..MAX_TEMPLATE_VERSION (PostgreSQL's integer)
    recipient           1..max_recipient_chars, no NUL; shaped for the channel
                        (E.164 for sms, fcm:<token> / apns:<token> for push, an address
                        for email) -- a cross-field check, in __post_init__
    data                at most max_data_fields; names 1..max_field_name_chars of
                        [A-Za-z_][A-Za-z0-9_]*; values strings of at most
                        max_value_chars without NUL (in __post_init__, to name the
                        field: ``data.<name>``)
    unknown fields      refused

The key has its one rule, :func:`check_idempotency_key` (``max_key_chars``).
Every refusal is an :class:`InvalidRequest` naming the field -- :class:`InvalidField`
(400 ``invalid_field``) for the body, :class:`MissingIdempotencyKey` /
:class:`InvalidIdempotencyKey` for the key (:mod:`actors.answers`); bytes that are not
JSON are :class:`InvalidJson`. The dispatcher trusts a :class:`SubmitRequest`: it
checks nothing of its shape again.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, cast

import msgspec

from engine.errors import Rejected, TriageError
from providers.channel import ChannelName
from providers.db.dispatches import MAX_TEMPLATE_VERSION
from providers.push_feedback import push_platform

if TYPE_CHECKING:
    from config.schema import DispatchConfig

__all__ = [
    "DispatchLimits",
    "InvalidField",
    "InvalidIdempotencyKey",
    "InvalidJson",
    "InvalidRequest",
    "MissingIdempotencyKey",
    "RequestBody",
    "RequestDecoder",
    "SubmitRequest",
    "check_idempotency_key",
]


# -- errors ---------------------------------------------------------------------------------


class InvalidRequest(TriageError):
    """A request field is malformed; nothing was written (answers: :mod:`actors.answers`).

    ``field`` names the culprit (None: the body as a whole, e.g. not an object).
    """

    def __init__(self, field: str | None, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field is not None else problem)
        self.field = field
        self.problem = problem


class InvalidField(InvalidRequest):
    """The body failed validation (400 ``invalid_field``, ``field`` when one is to blame)."""


class InvalidJson(InvalidRequest):
    """The body is not JSON at all (400 ``invalid_json``)."""

    def __init__(self, problem: str) -> None:
        super().__init__(None, problem)


class MissingIdempotencyKey(InvalidRequest):
    """The request carries no ``Idempotency-Key``."""

    def __init__(self, field: str = "idempotency_key") -> None:
        super().__init__(field, "the Idempotency-Key header is required")


class InvalidIdempotencyKey(InvalidRequest):
    """The ``Idempotency-Key`` is too long or not printable ASCII."""

    def __init__(self, problem: str, field: str = "idempotency_key") -> None:
        super().__init__(field, problem)


_KEY = re.compile(r"[\x20-\x7e]+")  # visible ASCII and the space


def check_idempotency_key(
    value: str | None, *, max_length: int, field: str = "idempotency_key"
) -> str:
    """The one rule for an ``Idempotency-Key``, at every door: 1..``max_length`` visible
    ASCII characters or spaces, not starting or ending with a space (what a header
    carries unmangled). :class:`MissingIdempotencyKey` / :class:`InvalidIdempotencyKey`
    naming ``field`` (the doors: the header; in-process: the request's field)."""
    if value is None or value == "":
        raise MissingIdempotencyKey(field)
    if len(value) > max_length:
        raise InvalidIdempotencyKey(f"{len(value)} characters long; at most {max_length}", field)
    if _KEY.fullmatch(value) is None or value != value.strip():
        raise InvalidIdempotencyKey("printable ASCII without leading or trailing spaces", field)
    return value


# -- limits and the types -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DispatchLimits:
    """Bounds on request fields (the ``[dispatch]`` config)."""

    max_key_chars: int
    max_template_chars: int
    max_recipient_chars: int
    max_data_fields: int
    max_field_name_chars: int
    max_value_chars: int

    @classmethod
    def of(cls, config: DispatchConfig) -> DispatchLimits:
        """The limits ``[dispatch]`` sets."""
        return cls(
            max_key_chars=config.max_key_chars,
            max_template_chars=config.max_template_chars,
            max_recipient_chars=config.max_recipient_chars,
            max_data_fields=config.max_data_fields,
            max_field_name_chars=config.max_field_name_chars,
            max_value_chars=config.max_value_chars,
        )


class SubmitRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The one dispatch request type, whichever door it came through (HTTP, NATS, tests).

    Made by a :class:`RequestDecoder` (which validated every field); the dispatcher
    trusts it. ``tenant_id`` is the canonical UUID text.
    """

    tenant_id: str
    idempotency_key: str
    channel: ChannelName
    recipient: str
    template: str
    template_version: int | None = None
    data: dict[str, str] = msgspec.field(default_factory=dict)


_E164: Final = re.compile(r"\+[1-9][0-9]{6,14}")
_EMAIL: Final = re.compile(r"[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\"]+")
#: msgspec searches a ``pattern``: anchored with ``\A`` / ``\Z`` (``$`` would pass a "\n").
_TEMPLATE_PATTERN: Final = r"\A[A-Za-z0-9_.\-]+\Z"
_FIELD_PATTERN: Final = r"\A[A-Za-z_][A-Za-z0-9_]*\Z"
_NO_NUL_PATTERN: Final = r"\A[^\x00]*\Z"  # PostgreSQL text cannot hold a NUL


class RequestBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A dispatch body as the doors decode it (the key aside).

    Only a :class:`RequestDecoder`'s subclass of it is decoded: that one re-declares
    the fields with the configured bounds and sets :attr:`limits`. ``__post_init__``
    holds the checks a field's type cannot state: the recipient's shape for the
    channel, and the ``data`` values (to name the field, ``data.<name>``).
    """

    limits: ClassVar[DispatchLimits | None] = None

    tenant_id: uuid.UUID
    channel: ChannelName
    template: str
    recipient: str
    template_version: int | None = None
    data: dict[str, str] = msgspec.field(default_factory=dict)
    #: The NATS command's own key (null: none, the header's); HTTP refuses it.
    idempotency_key: str | msgspec.UnsetType | None = msgspec.UNSET

    def __post_init__(self) -> None:
        limits = type(self).limits
        if limits is None:
            raise TypeError("decode a RequestBody through a RequestDecoder")
        recipient = self.recipient
        if self.channel is ChannelName.SMS and _E164.fullmatch(recipient) is None:
            raise InvalidField("recipient", "not an E.164 number (+ and 7 to 15 digits)")
        if self.channel is ChannelName.PUSH:
            try:
                push_platform(recipient)
            except Rejected as exc:
                raise InvalidField("recipient", str(exc)) from exc
        if self.channel is ChannelName.EMAIL and _EMAIL.fullmatch(recipient) is None:
            raise InvalidField("recipient", "not an email address")
        for name, value in self.data.items():
            if len(value) > limits.max_value_chars:
                raise InvalidField(f"data.{name}", f"at most {limits.max_value_chars} characters")
            if "\x00" in value:  # PostgreSQL's jsonb cannot hold it
                raise InvalidField(f"data.{name}", "a NUL character")


def _body_type(limits: DispatchLimits) -> type[RequestBody]:
    """:class:`RequestBody` with every field bounded by ``limits`` (built at wiring time)."""
    template = Annotated[
        str,
        msgspec.Meta(min_length=1, max_length=limits.max_template_chars, pattern=_TEMPLATE_PATTERN),
    ]
    recipient = Annotated[
        str,
        msgspec.Meta(min_length=1, max_length=limits.max_recipient_chars, pattern=_NO_NUL_PATTERN),
    ]
    version = Annotated[int, msgspec.Meta(ge=1, le=MAX_TEMPLATE_VERSION)]
    name = Annotated[
        str,
        msgspec.Meta(min_length=1, max_length=limits.max_field_name_chars, pattern=_FIELD_PATTERN),
    ]
    data = Annotated[dict[name, str], msgspec.Meta(max_length=limits.max_data_fields)]
    fields: list[tuple[str, Any, Any]] = [
        ("template", template, msgspec.NODEFAULT),
        ("recipient", recipient, msgspec.NODEFAULT),
        ("template_version", version | None, None),
        ("data", data, msgspec.field(default_factory=dict)),
    ]
    body = msgspec.defstruct(
        "RequestBody",
        fields,
        bases=(RequestBody,),
        module=__name__,
        namespace={"limits": limits},
        frozen=True,
        kw_only=True,
        forbid_unknown_fields=True,
    )
    return cast("type[RequestBody]", body)


_AT_PATH: Final = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_KEY_IN: Final = re.compile(r" - at `key` in `\$\.?(?P<path>[^`]*)`$")
_NAMED: Final = re.compile(r"field `(?P<name>[^`]+)`")


def _field_of(message: str) -> str | None:
    """The field msgspec's message names (``$.data[...]`` -> ``data[...]``), if any."""
    key_in = _KEY_IN.search(message)
    if key_in is not None:  # a bad key of an object: the object is to blame
        return key_in.group("path") or None
    at = _AT_PATH.search(message)
    if at is not None:
        path = at.group("path")
        named = _NAMED.search(message)
        if named is not None:  # a nested object missing or refusing a field
            return f"{path}.{named.group('name')}" if path else named.group("name")
        return path or None
    named = _NAMED.search(message)
    return named.group("name") if named is not None else None


class RequestDecoder:
    """Makes :class:`SubmitRequest` s: decodes (or converts) and validates, once.

    Built once, at wiring time, from ``limits``; shared by both doors. Every
    method raises an :class:`InvalidRequest` naming the field, from the msgspec
    error when there is one.
    """

    __slots__ = ("_decoder", "body_type", "limits")

    def __init__(self, limits: DispatchLimits) -> None:
        self.limits = limits
        self.body_type = _body_type(limits)
        self._decoder = msgspec.json.Decoder(self.body_type)

    def check_key(self, value: str | None, *, field: str = "Idempotency-Key") -> str:
        """:func:`check_idempotency_key` with ``max_key_chars`` (a door checks the header
        before it reads the body: the cheaper refusal first)."""
        return check_idempotency_key(value, max_length=self.limits.max_key_chars, field=field)

    def decode_http(self, data: bytes, idempotency_key: str) -> SubmitRequest:
        """The request of ``POST /v1/dispatches``: ``data`` and the ``Idempotency-Key``
        header, already passed through :meth:`check_key`. A key in the body is refused."""
        body = self.decode(data)
        if body.idempotency_key is not msgspec.UNSET:
            raise InvalidField(
                "idempotency_key", "unknown field: the key goes in the Idempotency-Key header"
            )
        return self.request(body, idempotency_key)

    def decode_command(self, data: bytes, header_key: str | None) -> SubmitRequest:
        """The request of a NATS command: the body's ``idempotency_key`` or the header's
        (both present: they must agree)."""
        body = self.decode(data)
        own = body.idempotency_key
        if own is msgspec.UNSET or own is None:
            key = self.check_key(header_key)
        else:
            if header_key is not None and header_key != own:
                raise InvalidIdempotencyKey(
                    "the Idempotency-Key header and the idempotency_key field differ",
                    "idempotency_key",
                )
            key = self.check_key(own)
        return self.request(body, key)

    def build(self, *, idempotency_key: str, **fields: object) -> SubmitRequest:
        """A request made in-process, through the same rules (``msgspec.convert``)."""
        key = self.check_key(idempotency_key, field="idempotency_key")
        try:
            body = msgspec.convert(fields, self.body_type)
        except msgspec.ValidationError as exc:
            raise InvalidField(_field_of(str(exc)), str(exc)) from exc
        return self.request(body, key)

    def decode(self, data: bytes) -> RequestBody:
        """The validated body in ``data``: :class:`InvalidJson` or :class:`InvalidField`."""
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise InvalidField(_field_of(str(exc)), str(exc)) from exc
        except msgspec.DecodeError as exc:
            raise InvalidJson(f"the body is not JSON: {exc}") from exc

    @staticmethod
    def request(body: RequestBody, idempotency_key: str) -> SubmitRequest:
        """The request of a validated ``body`` and a checked key."""
        return SubmitRequest(
            idempotency_key=idempotency_key,
            tenant_id=str(body.tenant_id),
            channel=body.channel,
            template=body.template,
            recipient=body.recipient,
            template_version=body.template_version,
            data=body.data,
        )
