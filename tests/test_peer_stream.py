"""Peer body stream: batches over one WebSocket per peer, between real aiohttp servers."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from pathlib import Path
from typing import Iterable

import aiohttp
import pytest
from aiohttp import web

from raftmail.node.peer_client import PeerClient
from raftmail.node.peer_wire import AUTH_HEADER, PeerCrypto, STREAM_CLAIM, STREAM_MAX_IN_PROGRESS, STREAM_ROUTE
from test_peers import (
    CLUSTER,
    NEWSLETTER,
    SECRET,
    CountingStore,
    PeerNode,
    StalledPeer,
    campaign_body,
    dead_address,
    digest_of,
    run,
    sealed_batch,
    wait_for,
)

pytestmark = pytest.mark.timeout(30)

ID = struct.Struct(">Q")


def stream_url(node: PeerNode) -> str:
    return f"http://{node.address}{STREAM_ROUTE}"


def auth(crypto: PeerCrypto, claim: bytes = STREAM_CLAIM) -> dict[str, str]:
    return {AUTH_HEADER: crypto.seal_text(claim)}


def own_tasks() -> set[asyncio.Task]:
    """Tasks still alive besides the test itself and the frozen test peer's handlers."""
    return {
        task for task in asyncio.all_tasks() - {asyncio.current_task()}
        if not task.get_coro().__qualname__.startswith("StalledPeer.")
    }


def test_many_pushes_share_one_stream_connection(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        node = await PeerNode(tmp_path / "n", crypto).start()
        client = PeerClient(crypto)
        bodies = [campaign_body(i) for i in range(200)]
        try:
            for x in bodies[:100]:  # one at a time: every push is a batch of its own
                assert await client.push(digest_of(x), x, [node.address], 1, 5.0) == 1
            acks = await asyncio.gather(
                *(client.push(digest_of(x), x, [node.address], 1, 5.0) for x in bodies[100:])
            )
            assert acks == [1] * 100
            assert node.stream_opens == 1
            assert node.batch_puts == 0  # the client never falls back to PUT
            assert 100 < node.batches <= 200
            for x in bodies:
                assert node.store.get(digest_of(x)) == x
        finally:
            await client.close()
            await node.stop()
        assert not own_tasks()  # close() left no reader or dial behind

    run(main)


def test_concurrent_pushes_are_matched_to_their_own_answers(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        # The peers refuse bodies over 2 KB that the client itself would send: those batches
        # are answered "refused" in the middle of the accepted ones.
        a = await PeerNode(tmp_path / "a", crypto, max_body_bytes=2048).start()
        b = await PeerNode(tmp_path / "b", crypto, max_body_bytes=2048).start()
        # One body per batch and room for all 50 at once: 50 requests in flight on each stream.
        client = PeerClient(crypto, max_batch_items=1, max_batches_in_flight=50)
        bodies = [os.urandom(4096 if i % 7 == 3 else 500 + i) for i in range(50)]
        try:
            acks = await asyncio.gather(
                *(client.push(digest_of(x), x, [a.address, b.address], 2, 10.0) for x in bodies)
            )
            assert acks == [0 if len(x) > 2048 else 2 for x in bodies]
            for node in (a, b):
                assert node.stream_opens == 1
                assert node.batches == sum(len(x) <= 2048 for x in bodies)
                for x in bodies:
                    assert node.store.get(digest_of(x)) == (x if len(x) <= 2048 else None)
        finally:
            await client.close()
            await a.stop()
            await b.stop()

    run(main)


def test_wrong_secret_is_refused_before_the_upgrade(tmp_path: Path) -> None:
    async def main() -> None:
        ours = PeerCrypto(SECRET, CLUSTER)
        theirs = PeerCrypto("a different secret", CLUSTER)
        node = await PeerNode(tmp_path / "n", ours).start()
        try:
            async with aiohttp.ClientSession() as http:
                refusals = [
                    {},  # no header
                    auth(theirs),  # sealed under another key
                    auth(ours, b"GET " + digest_of(NEWSLETTER).encode()),  # another claim
                    {AUTH_HEADER: "not a token"},
                ]
                for headers in refusals:
                    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                        await http.ws_connect(stream_url(node), headers=headers)
                    assert err.value.status == 403
                async with http.get(stream_url(node), headers=auth(theirs)) as resp:
                    assert resp.status == 403
            assert node.auth_failures == ["127.0.0.1"] * 5
            # A client with the wrong secret gets no ack and nothing is stored.
            client = PeerClient(theirs)
            try:
                assert await client.push(digest_of(NEWSLETTER), NEWSLETTER,
                                         [node.address], 1, 5.0) == 0
            finally:
                await client.close()
            assert node.auth_failures == ["127.0.0.1"] * 6
            assert node.store.stats() == (0, 0)
        finally:
            await node.stop()

    run(main)


def test_raw_stream_framing_and_refusals(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        node = await PeerNode(tmp_path / "n", crypto).start()
        body = campaign_body(1)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(stream_url(node), headers=auth(crypto)) as ws:
                    good = sealed_batch(crypto, [(digest_of(body), body)])
                    bad_key = sealed_batch(PeerCrypto("other", CLUSTER), [(digest_of(body), body)])
                    lying = sealed_batch(crypto, [(digest_of(NEWSLETTER), body)])
                    await ws.send_bytes(ID.pack(2**64 - 1) + good)
                    await ws.send_bytes(ID.pack(7) + bad_key)
                    await ws.send_bytes(ID.pack(0) + lying)
                    answers = {}
                    for _ in range(3):
                        data = await ws.receive_bytes(timeout=5.0)
                        assert len(data) == 9
                        answers[ID.unpack(data[:8])[0]] = data[8]
                    assert answers == {2**64 - 1: 1, 7: 0, 0: 0}
                    assert node.auth_failures == ["127.0.0.1"]  # counted like a bad PUT
                # Text and too-short messages are protocol violations.
                for bad in ("hello", b"\x00" * 8):
                    async with http.ws_connect(stream_url(node), headers=auth(crypto)) as ws:
                        if isinstance(bad, str):
                            await ws.send_str(bad)
                        else:
                            await ws.send_bytes(bad)
                        msg = await ws.receive(timeout=5.0)
                        assert msg.type == aiohttp.WSMsgType.CLOSE
                        assert msg.data == aiohttp.WSCloseCode.POLICY_VIOLATION
            assert node.store.stats() == (1, len(body))
        finally:
            await node.stop()

    run(main)


def test_oversize_message_closes_the_stream(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        node = await PeerNode(tmp_path / "n", crypto, max_body_bytes=1024,
                              max_batch_bytes=2048, max_batch_items=4).start()
        big = os.urandom(8192)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(stream_url(node), headers=auth(crypto)) as ws:
                    await ws.send_bytes(ID.pack(1) + sealed_batch(crypto, [(digest_of(big), big)]))
                    msg = await ws.receive(timeout=5.0)
                    assert msg.type == aiohttp.WSMsgType.CLOSE
                    assert msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            # The client's own push of it is simply not acked, and the next one works.
            client = PeerClient(crypto)
            try:
                assert await client.push(digest_of(big), big, [node.address], 1, 5.0) == 0
                small = campaign_body(2)
                await asyncio.sleep(0.6)  # the reconnect interval
                assert await client.push(digest_of(small), small, [node.address], 1, 5.0) == 1
            finally:
                await client.close()
            assert node.store.stats() == (1, len(small))
        finally:
            await node.stop()

    run(main)


class SlowStore(CountingStore):
    """A real store whose writes take a while; records how many ran at once."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def put_many_verified(self, items: Iterable[tuple[str, bytes]]) -> None:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(0.05)
            super().put_many_verified(items)
        finally:
            with self._lock:
                self.running -= 1


def test_server_stores_a_bounded_number_of_batches_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        slow = SlowStore(tmp_path / "n")
        node = await PeerNode(tmp_path / "n", crypto, store=slow).start()
        bodies = [campaign_body(i) for i in range(3 * STREAM_MAX_IN_PROGRESS)]
        try:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(stream_url(node), headers=auth(crypto)) as ws:
                    for i, x in enumerate(bodies):  # all sent at once, none answered yet
                        await ws.send_bytes(ID.pack(i) + sealed_batch(crypto, [(digest_of(x), x)]))
                    got = set()
                    for _ in bodies:
                        data = await ws.receive_bytes(timeout=10.0)
                        assert data[8] == 1
                        got.add(ID.unpack(data[:8])[0])
                    assert got == set(range(len(bodies)))
            assert 1 < slow.most <= STREAM_MAX_IN_PROGRESS
            assert slow.stats()[0] == len(bodies)
        finally:
            await node.stop()

    run(main)


def test_peer_restart_reconnects_the_stream(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        node = await PeerNode(tmp_path / "n", crypto).start()
        port = int(node.address.rsplit(":", 1)[1])
        client = PeerClient(crypto, timeout=2.0)
        try:
            for i in range(5):
                x = campaign_body(i)
                assert await client.push(digest_of(x), x, [node.address], 1, 5.0) == 1
            began = time.monotonic()
            await node.stop()  # closes the open stream instead of waiting for it
            assert time.monotonic() - began < 2.0

            # Down: no ack, and no hanging.
            x = campaign_body(10)
            began = time.monotonic()
            assert await client.push(digest_of(x), x, [node.address], 1, 5.0) == 0
            assert time.monotonic() - began < 3.0

            # Back on the same port and store: pushes are acked again on a new stream.
            node = PeerNode(tmp_path / "n", crypto)
            await node.runner.setup()
            await web.TCPSite(node.runner, "127.0.0.1", port).start()
            node.address = f"127.0.0.1:{port}"

            async def acked() -> int:
                y = campaign_body(20)
                return await client.push(digest_of(y), y, [node.address], 1, 5.0)

            deadline = time.monotonic() + 5.0
            while await acked() != 1:
                assert time.monotonic() < deadline, "stream did not come back"
                await asyncio.sleep(0.1)
            later = [campaign_body(i) for i in range(30, 40)]
            for y in later:
                assert await client.push(digest_of(y), y, [node.address], 1, 5.0) == 1
            assert node.stream_opens == 1
            for y in later:
                assert node.store.get(digest_of(y)) == y
        finally:
            await client.close()
            await node.stop()
        assert not own_tasks()

    run(main)


def test_dead_peer_is_not_hammered_and_push_does_not_hang(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        client = PeerClient(crypto, timeout=2.0)
        dead = dead_address()
        try:
            began = time.monotonic()
            results = [await client.push(digest_of(x), x, [dead], 1, 1.0)
                       for x in (campaign_body(i) for i in range(20))]
            assert results == [0] * 20
            assert time.monotonic() - began < 2.0  # refused at once, then answered at once
        finally:
            await client.close()
        assert not own_tasks()

    run(main)


def test_frozen_peer_times_out_and_close_does_not_hang(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        stalled = await StalledPeer().start()
        client = PeerClient(crypto, timeout=20.0)
        try:
            began = time.monotonic()
            x = campaign_body(1)
            assert await client.push(digest_of(x), x, [stalled.address], 1, 0.5) == 0
            assert time.monotonic() - began < 2.0
            assert stalled.connected.is_set()
        finally:
            began = time.monotonic()
            await client.close()
            assert time.monotonic() - began < 3.0
            assert client.background_pushes == 0
            await stalled.stop()
        assert not own_tasks()

    run(main)


def test_close_ends_the_server_side_stream(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        node = await PeerNode(tmp_path / "n", crypto).start()
        client = PeerClient(crypto)
        try:
            x = campaign_body(1)
            assert await client.push(digest_of(x), x, [node.address], 1, 5.0) == 1
            handlers = node.runner.server.connections  # open HTTP connections on the server
            assert len(handlers) == 1
            await client.close()
            await wait_for(lambda: len(node.runner.server.connections) == 0, 5.0)
        finally:
            await client.close()
            await node.stop()
        assert not own_tasks()

    run(main)
