"""A signed receipt's timestamp is a finite Unix time inside the window, or the receipt is
refused as stale (401): ``nan``, ``inf`` and garbage included, at the parser and at the door."""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping, Sequence

import pytest
import trio.testing

from actors.dlr_ingress import Parser
from providers.channel import Receipt
from providers.ghasi import parse_ghasi_receipt
from providers.receipts import BadSignature, StaleReceipt, signed_at
from tests.actors.test_dlr_ingress import Sink, make_ingress, pool_stats, running

SECRET = "dlr-secret"
NOW = 1_700_000_000.0
TOLERANCE_S = 300.0
BODY = b'{"message_id":"GH1","client_ref":"t1:d1","status":"delivered","error_code":null}'

#: Stamps that are no finite Unix time, as a provider (or a forger holding the secret
#: of a replayed receipt) could put them in the header.
NOT_A_TIME = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e999", "soon", " ", "0x10"]


def signed(stamp: str, body: bytes = BODY, secret: str = SECRET) -> dict[str, str]:
    """Ghasi's headers for ``body``, correctly signed over ``stamp``."""
    mac = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-Ghasi-Timestamp": stamp, "X-Ghasi-Signature": mac}


# -- the check itself --------------------------------------------------------------------


@pytest.mark.parametrize("stamp", [*NOT_A_TIME, ""])
def test_a_stamp_that_is_no_finite_time_is_stale(stamp: str) -> None:
    with pytest.raises(StaleReceipt, match="is not a finite Unix time") as caught:
        signed_at("ghasi", stamp, now=NOW, tolerance_s=TOLERANCE_S)
    assert isinstance(caught.value, BadSignature)  # answered as one: 401


def test_the_window_is_inclusive_and_exact() -> None:
    assert signed_at("ghasi", str(NOW), now=NOW, tolerance_s=TOLERANCE_S) == NOW
    assert signed_at("ghasi", "1700000300", now=NOW, tolerance_s=TOLERANCE_S) == NOW + 300
    assert signed_at("ghasi", "1699999700", now=NOW, tolerance_s=TOLERANCE_S) == NOW - 300
    for stamp in ("1700000300.001", "1699999699.999"):
        with pytest.raises(StaleReceipt, match="outside"):
            signed_at("ghasi", stamp, now=NOW, tolerance_s=TOLERANCE_S)


@pytest.mark.parametrize(
    ("now", "tolerance_s"), [(math.nan, 300.0), (NOW, math.nan), (NOW, math.inf), (math.inf, 300.0)]
)
def test_a_window_that_is_not_finite_admits_nothing(now: float, tolerance_s: float) -> None:
    with pytest.raises(StaleReceipt):
        signed_at("ghasi", str(NOW), now=now, tolerance_s=tolerance_s)


@pytest.mark.parametrize("stamp", NOT_A_TIME)
def test_the_ghasi_parser_refuses_a_signed_receipt_whose_stamp_is_no_time(stamp: str) -> None:
    with pytest.raises(StaleReceipt):
        parse_ghasi_receipt(signed(stamp), BODY, secret=SECRET, now=NOW, tolerance_s=TOLERANCE_S)
    # The same receipt stamped with a real time is read (the refusal is the stamp's).
    receipt = parse_ghasi_receipt(
        signed("1700000000"), BODY, secret=SECRET, now=NOW, tolerance_s=TOLERANCE_S
    )
    assert (receipt.client_ref, receipt.occurred_at) == ("d1", NOW)


# -- at the DLR ingress ------------------------------------------------------------------


def ghasi_parser() -> Parser:
    def parse(url: str, headers: Mapping[str, str], body: bytes) -> Sequence[Receipt]:
        return [parse_ghasi_receipt(headers, body, secret=SECRET, now=NOW, tolerance_s=TOLERANCE_S)]

    return parse


@pytest.mark.parametrize("stamp", ["nan", "inf", "-inf", "soon", "1e999"])
async def test_the_ingress_answers_401_and_applies_nothing(stamp: str) -> None:
    sink = Sink()
    ingress = make_ingress(sink, dlr_parsers={"ghasi": ghasi_parser()})
    async with running(ingress) as client:
        refused = await client.post("/webhooks/dlr/ghasi", content=BODY, headers=signed(stamp))
        await trio.testing.wait_all_tasks_blocked()
        pool = pool_stats(ingress)
        assert (refused.status_code, refused.json()["error"]) == (401, "bad_signature")
        assert refused.json()["provider"] == "ghasi"
        assert "finite Unix time" in refused.json()["message"]
        assert sink.calls == 0 and sink.batches == []
        assert (pool.queue_depth, pool.applied_receipts) == (0, 0)
        assert ingress.statistics().refused == 1

        # The door works: the same receipt with a real stamp is applied.
        accepted = await client.post(
            "/webhooks/dlr/ghasi", content=BODY, headers=signed("1700000000")
        )
        await trio.testing.wait_all_tasks_blocked()
    assert (accepted.status_code, accepted.json()) == (200, {"accepted": 1})
    assert sink.refs == ["d1"]
