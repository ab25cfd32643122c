"""The one request decoder: every field checked once, while decoding, with the config's bounds."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from actors.dispatch_request import (
    DispatchLimits,
    InvalidField,
    InvalidIdempotencyKey,
    InvalidJson,
    MissingIdempotencyKey,
    RequestBody,
    RequestDecoder,
)
from config.schema import DispatchConfig
from providers.channel import ChannelName

TENANT = "6f1c2f1e-4a8b-4c36-9d76-0e4f7a1b2c3d"
LIMITS = DispatchLimits.of(DispatchConfig(max_template_chars=8, max_data_fields=2))
DECODER = RequestDecoder(LIMITS)


def body(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "tenant_id": TENANT,
        "channel": "sms",
        "template": "remind",
        "recipient": "+15551234567",
        "data": {"time": "10:30"},
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def test_the_limits_come_from_the_dispatch_config() -> None:
    config = DispatchConfig(max_template_chars=8, max_data_fields=2)
    assert LIMITS.max_template_chars == config.max_template_chars == 8
    assert LIMITS.max_key_chars == config.max_key_chars
    with pytest.raises(InvalidField) as long:
        DECODER.build(idempotency_key="k", **body(template="t" * 9))
    assert long.value.field == "template"
    DECODER.build(idempotency_key="k", **body(template="t" * 8))
    with pytest.raises(InvalidField) as many:
        DECODER.build(idempotency_key="k", **body(data={"a": "1", "b": "2", "c": "3"}))
    assert many.value.field == "data"


def test_a_command_takes_its_key_from_the_body_or_the_header() -> None:
    def command(**changes: Any) -> bytes:
        return msgspec.json.encode(body(**changes))

    assert DECODER.decode_command(command(idempotency_key="a"), None).idempotency_key == "a"
    assert DECODER.decode_command(command(idempotency_key="a"), "a").idempotency_key == "a"
    assert DECODER.decode_command(command(idempotency_key=None), "h").idempotency_key == "h"
    assert DECODER.decode_command(command(), "h").idempotency_key == "h"
    with pytest.raises(InvalidIdempotencyKey) as differ:
        DECODER.decode_command(command(idempotency_key="a"), "b")
    assert differ.value.field == "idempotency_key"
    with pytest.raises(MissingIdempotencyKey) as missing:
        DECODER.decode_command(command(), None)
    assert missing.value.field == "Idempotency-Key"
    with pytest.raises(InvalidIdempotencyKey):
        DECODER.decode_command(command(idempotency_key="k" * (LIMITS.max_key_chars + 1)), None)


def test_http_refuses_a_key_in_the_body_even_null() -> None:
    for value in ("k", None):
        with pytest.raises(InvalidField) as caught:
            DECODER.decode_http(msgspec.json.encode(body(idempotency_key=value)), "k")
        assert caught.value.field == "idempotency_key"


def test_decode_and_build_make_the_same_request() -> None:
    decoded = DECODER.decode_http(msgspec.json.encode(body(tenant_id=TENANT.upper())), "k")
    built = DECODER.build(idempotency_key="k", **body(tenant_id=TENANT.upper()))
    assert decoded == built
    assert decoded.tenant_id == TENANT and decoded.channel is ChannelName.SMS


def test_not_json_and_the_bare_body_type() -> None:
    with pytest.raises(InvalidJson):
        DECODER.decode(b"{nope")
    with pytest.raises(msgspec.ValidationError):  # only a decoder's subclass has the bounds
        msgspec.json.decode(msgspec.json.encode(body()), type=RequestBody)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"recipient": "+1555\x00"}, "recipient"),
        ({"channel": "push", "recipient": "apns:"}, "recipient"),
        ({"template": "ab\n"}, "template"),
        ({"template_version": 2**31}, "template_version"),
        ({"data": {"time": "1\x00"}}, "data.time"),
        ({"data": {"time": 1}}, "data[...]"),
        ({"data": {"\x00": "1"}}, "data"),
        ({"extra": 1}, "extra"),
        ({"recipient": ...}, "recipient"),
    ],
)
def test_every_refusal_names_its_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidField) as caught:
        DECODER.decode_http(msgspec.json.encode(body(**change)), "k")
    assert caught.value.field == field
