"""The emulator base, served for real on loopback: faults, counts, receipts, down/up, HTTP/2."""

from __future__ import annotations

import socket
from functools import partial

import httpx
import pytest
import trio

from providers.emulators.base import (
    Emulator,
    EmulatorServer,
    ReceiptPost,
    Request,
    Response,
    StoredMessage,
    serve_emulator,
)

TIMEOUT_S = 0.5


class ToyEmulator(Emulator):
    """POST /send?ref=R with header Idempotency-Key; GET /msg?ref=R. Receipts are JSON."""

    async def handle(self, request: Request) -> Response | None:
        if request.method == "POST" and request.path == "/send":
            ref = request.query_one("ref") or ""
            key = request.headers.get("idempotency-key")

            def accept() -> tuple[StoredMessage, Response]:
                message = StoredMessage(
                    provider_ref=self.next_id("T"),
                    reference=ref,
                    idempotency_key=key,
                    recipient="r",
                    body=request.body.decode(),
                    status="accepted",
                    accepted_at=self.clock(),
                )
                return message, Response.json(200, {"id": message.provider_ref})

            return await self.take_send(request, key=key, accept=accept)
        if request.method == "GET" and request.path == "/msg":
            message = self.messages.get(request.query_one("ref") or "")
            if message is None:
                return Response.json(404, {})
            return Response.json(200, {"id": message.provider_ref})
        return Response.json(404, {})

    def receipt_for(self, message: StoredMessage, state: str) -> ReceiptPost | None:
        if self.receipt_url is None:
            return None
        body = f'{{"id": "{message.provider_ref}", "state": "{state}"}}'.encode()
        return ReceiptPost(self.receipt_url, {"content-type": "application/json"}, body)


class Sink(Emulator):
    """A receipt receiver: records every POST body, answers ``answer``."""

    def __init__(self) -> None:
        super().__init__("sink")
        self.bodies: list[bytes] = []
        self.answer = 204

    async def handle(self, request: Request) -> Response | None:
        self.bodies.append(request.body)
        return Response(self.answer)


async def send(
    client: httpx.AsyncClient, server: EmulatorServer, key: str, ref: str
) -> httpx.Response:
    return await client.post(
        f"{server.url}/send", params={"ref": ref}, headers={"Idempotency-Key": key}, content=b"hi"
    )


async def test_accepts_counts_and_sees_duplicates() -> None:
    toy = ToyEmulator("toy", auto_receipts=False)
    async with serve_emulator(toy) as server, httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        assert (await send(client, server, "k1", "t:1")).status_code == 200
        assert (await send(client, server, "k2", "t:2")).status_code == 200
        assert toy.duplicates() == 0
        assert (await send(client, server, "k1", "t:1")).status_code == 200
        assert toy.accepted == {"k1": 2, "k2": 1}
        assert toy.duplicates() == 1
        assert set(toy.messages) == {"t:1", "t:2"}
        stats = (await client.get(f"{server.url}/_emulator/stats")).json()
        assert stats["requests"] == 3
        assert stats["accepted"] == 3
        assert stats["duplicates"] == 1


async def test_injected_status_records_nothing() -> None:
    toy = ToyEmulator("toy", auto_receipts=False)
    async with serve_emulator(toy) as server, httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        toy.set_faults(status=503)
        answer = await send(client, server, "k1", "t:1")
        assert answer.status_code == 503
        assert toy.requests == {"k1": 1}
        assert not toy.accepted
        assert not toy.messages


async def test_faults_over_the_control_routes_and_remaining() -> None:
    toy = ToyEmulator("toy", auto_receipts=False)
    async with serve_emulator(toy) as server, httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        put = await client.put(
            f"{server.url}/_emulator/faults", json={"status": 500, "remaining": 2}
        )
        assert put.status_code == 200
        assert toy.faults.status == 500
        assert [(await send(client, server, f"k{i}", f"t:{i}")).status_code for i in range(3)] == [
            500,
            500,
            200,
        ]
        assert toy.stats()["faults"]["status"] is None  # cleared itself after two sends
        bad = await client.put(f"{server.url}/_emulator/faults", json={"status": "soon"})
        assert bad.status_code == 400
        unknown = await client.put(f"{server.url}/_emulator/faults", json={"explode": True})
        assert unknown.status_code == 400
        toy.set_faults(status=502)
        assert (await client.delete(f"{server.url}/_emulator/faults")).status_code == 200
        assert toy.faults.status is None


async def test_hang_before_accept_times_out_with_nothing_taken() -> None:
    toy = ToyEmulator("toy", auto_receipts=False)
    async with serve_emulator(toy) as server, httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        toy.set_faults(hang_before_accept=True)
        with pytest.raises(httpx.ReadTimeout):
            await send(client, server, "k1", "t:1")
        assert toy.requests == {"k1": 1}
        assert not toy.accepted


async def test_hang_after_accept_times_out_with_the_message_taken() -> None:
    toy = ToyEmulator("toy", auto_receipts=False)
    async with serve_emulator(toy) as server, httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        toy.set_faults(hang_after_accept=True)
        with pytest.raises(httpx.ReadTimeout):
            await send(client, server, "k1", "t:1")
        assert toy.accepted == {"k1": 1}
        assert "t:1" in toy.messages


async def test_reset_after_accept_drops_the_connection_without_an_answer() -> None:
    toy = ToyEmulator("toy", auto_receipts=False)
    async with serve_emulator(toy) as server, httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        toy.set_faults(reset_after_accept=True)
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await send(client, server, "k1", "t:1")
        assert toy.accepted == {"k1": 1}
        toy.clear_faults()
        assert (await send(client, server, "k2", "t:2")).status_code == 200


async def test_rate_limit_answers_429_with_retry_after() -> None:
    toy = ToyEmulator("toy", auto_receipts=False)
    async with serve_emulator(toy) as server, httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        toy.set_faults(rate_limit_per_s=0.001, retry_after_s=7)
        assert (await send(client, server, "k1", "t:1")).status_code == 200
        limited = await send(client, server, "k2", "t:2")
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "7"
        assert toy.accepted == {"k1": 1}


async def test_go_down_refuses_and_come_up_serves_the_same_port() -> None:
    toy = ToyEmulator("toy", auto_receipts=False)
    async with serve_emulator(toy) as server, httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        url = server.url
        assert (await send(client, server, "k1", "t:1")).status_code == 200
        await server.go_down()
        assert not server.is_up
        with pytest.raises(httpx.ConnectError):
            await send(client, server, "k2", "t:2")
        await server.come_up()
        assert server.url == url
        assert (await send(client, server, "k3", "t:3")).status_code == 200
        assert toy.accepted == {"k1": 1, "k3": 1}


async def test_go_down_drops_a_request_in_flight() -> None:
    toy = ToyEmulator("toy", auto_receipts=False)
    async with serve_emulator(toy) as server, httpx.AsyncClient(timeout=5) as client:
        toy.set_faults(hang_before_accept=True)
        async with trio.open_nursery() as nursery:

            async def doomed() -> None:
                with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                    await send(client, server, "k1", "t:1")

            nursery.start_soon(doomed)
            await toy.wait_until(lambda: bool(toy.requests))
            await server.go_down()


async def test_serves_http2_with_prior_knowledge() -> None:
    toy = ToyEmulator("toy", auto_receipts=False)
    async with (
        serve_emulator(toy) as server,
        httpx.AsyncClient(http1=False, http2=True, timeout=TIMEOUT_S) as client,
    ):
        answer = await send(client, server, "k1", "t:1")
        assert answer.status_code == 200
        assert answer.http_version == "HTTP/2"
        assert toy.accepted == {"k1": 1}
        toy.set_faults(reset_after_accept=True)
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await send(client, server, "k2", "t:2")
        assert toy.accepted == {"k1": 1, "k2": 1}


async def test_receipts_delivered_paused_and_flooded() -> None:
    sink = Sink()
    async with serve_emulator(sink) as sink_server:
        toy = ToyEmulator("toy", receipt_url=f"{sink_server.url}/dlr")
        async with serve_emulator(toy) as server, httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            assert (await send(client, server, "k1", "t:1")).status_code == 200
            await toy.wait_until(lambda: toy.receipts_sent == 1)
            assert sink.bodies == [b'{"id": "T00000001", "state": "delivered"}']

            toy.set_faults(receipts_paused=True)
            assert (await send(client, server, "k2", "t:2")).status_code == 200
            await trio.sleep(0.1)
            assert len(sink.bodies) == 1  # held while paused
            toy.clear_faults()
            await toy.wait_until(lambda: toy.receipts_sent == 2)
            assert sink.bodies[1] == b'{"id": "T00000002", "state": "delivered"}'

            assert await toy.emit_receipt("t:1", "failed") == 204
            assert sink.bodies[2] == b'{"id": "T00000001", "state": "failed"}'

            sink.answer = 429
            result = await toy.flood(20, rate_per_s=1000)
            assert result.sent == 20
            assert result.statuses == {429: 20}
            assert len(sink.bodies) == 23


async def test_receipts_to_a_dead_receiver_count_as_unanswered() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    toy = ToyEmulator("toy", receipt_url=f"http://127.0.0.1:{dead_port}/dlr", auto_receipts=False)
    async with serve_emulator(toy) as server, httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        await send(client, server, "k1", "t:1")
        assert await toy.emit_receipt("t:1") == 0
        assert toy.receipt_statuses == {0: 1}
        with pytest.raises(KeyError):
            await toy.emit_receipt("t:nope")


async def test_the_app_runs_under_plain_hypercorn_with_lifespan() -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    toy = ToyEmulator("toy", auto_receipts=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.errorlog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, toy, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]  # ASGI typed loosely
        assert binds == [f"http://127.0.0.1:{port}"]
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            answer = await client.post(
                f"http://127.0.0.1:{port}/send",
                params={"ref": "t:1"},
                headers={"Idempotency-Key": "k"},
            )
        assert answer.status_code == 200
        stop.set()
    assert toy.accepted == {"k": 1}


async def test_control_route_emits_a_receipt() -> None:
    sink = Sink()
    async with serve_emulator(sink) as sink_server:
        toy = ToyEmulator("toy", receipt_url=f"{sink_server.url}/dlr", auto_receipts=False)
        async with serve_emulator(toy) as server, httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            await send(client, server, "k1", "t:1")
            answer = await client.post(
                f"{server.url}/_emulator/receipts", json={"reference": "t:1", "state": "failed"}
            )
            assert answer.json() == {"receiver_status": 204}
            assert sink.bodies == [b'{"id": "T00000001", "state": "failed"}']
            missing = await client.post(
                f"{server.url}/_emulator/receipts", json={"reference": "t:9"}
            )
            assert missing.status_code == 404


async def test_a_refused_automatic_receipt_is_sent_again_like_a_gateway_does() -> None:
    sink = Sink()
    sink.answer = 503
    async with serve_emulator(sink) as sink_server:
        toy = ToyEmulator("toy", receipt_url=f"{sink_server.url}/dlr")
        toy.receipt_attempts, toy.receipt_retry_s = 3, 0.05
        async with serve_emulator(toy) as server, httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            await send(client, server, "k1", "t:1")
            await toy.wait_until(lambda: toy.receipts_sent == 2)
            sink.answer = 200  # the receiver is back: the third try lands, no fourth
            await toy.wait_until(lambda: toy.receipts_sent == 3)
            await trio.sleep(0.3)
            assert toy.receipt_statuses == {503: 2, 200: 1} and toy.receipt_retries == 2
            assert len(sink.bodies) == 3


async def test_dropped_receipts_are_lost_but_the_status_moves_on_and_forget_forgets() -> None:
    sink = Sink()
    async with serve_emulator(sink) as sink_server:
        toy = ToyEmulator("toy", receipt_url=f"{sink_server.url}/dlr")
        async with serve_emulator(toy) as server, httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            put = await client.put(
                f"{server.url}/_emulator/faults", json={"receipts_dropped": True}
            )
            assert put.status_code == 200 and put.json()["receipts_dropped"] is True
            await send(client, server, "k1", "t:1")
            await toy.wait_until(lambda: toy.receipts_dropped == 1)
            # Delivered as far as the vendor knows (a status query sees it), never posted.
            assert toy.messages["t:1"].status == "delivered"
            assert sink.bodies == [] and toy.receipts_sent == 0 and toy.receipt_retries == 0
            stats = (await client.get(f"{server.url}/_emulator/stats")).json()
            assert stats["receipts_dropped"] == 1
            assert (await client.get(f"{server.url}/msg", params={"ref": "t:1"})).status_code == 200
            toy.forget("t:1")  # the vendor's records of it are gone
            assert (await client.get(f"{server.url}/msg", params={"ref": "t:1"})).status_code == 404
            assert "T00000001" not in toy.by_provider_ref
            with pytest.raises(KeyError):
                toy.forget("t:1")
