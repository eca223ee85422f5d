"""Peer body channel: sealed push/fetch between real aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import time
from pathlib import Path
from typing import Awaitable, Callable, Iterable

import aiohttp
import pytest
from aiohttp import web

from raftmail.consensus.seal import MAX_PEER_KEYS
from raftmail.node.bodies import BodyStore
from raftmail.consensus.seal import sealed_size
from raftmail.node.peer_client import PeerClient
from raftmail.node.peer_server import add_peer_routes
from raftmail.node.peer_wire import AUTH_HEADER, PeerAuthError, PeerCrypto, STREAM_ROUTE, batch_sealed_limit, pack_batch, unpack_batch

pytestmark = pytest.mark.timeout(30)

SECRET = "correct horse battery staple"
CLUSTER = "raftmail-test"
NEWSLETTER = b"Subject: Weekly digest\r\n\r\n" + b"Top stories this week.\r\n" * 200


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sealed_batch(crypto: PeerCrypto, bodies: list[tuple[str, bytes]]) -> bytes:
    return crypto.seal(pack_batch(bodies))


def campaign_body(i: int) -> bytes:
    return b"Subject: Offer %d\r\n\r\n" % i + os.urandom(512 + 37 * i)


class CountingStore(BodyStore):
    """A real body store that also counts the batches written into it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, fsync=False)
        self.batches = 0

    def put_many_verified(self, items: Iterable[tuple[str, bytes]]) -> None:
        self.batches += 1
        super().put_many_verified(items)


class PeerNode:
    """One node's peer endpoint: a body store served on an ephemeral 127.0.0.1 port."""

    def __init__(
        self, root: Path, crypto: PeerCrypto, max_body_bytes: int = 1 << 20,
        store: CountingStore | None = None, **batch_limits: int,
    ) -> None:
        self.store = store if store is not None else CountingStore(root)
        self.auth_failures: list[str] = []
        self.batch_puts = 0  # PUT requests that reached this node (the route is gone: 405)
        self.stream_opens = 0  # stream upgrade requests that reached this node
        self.app = web.Application(middlewares=[self._count])
        add_peer_routes(
            self.app,
            self.store,
            crypto,
            max_body_bytes=max_body_bytes,
            on_auth_failure=self.auth_failures.append,
            **batch_limits,
        )
        self.runner = web.AppRunner(self.app)
        self.address = ""

    async def start(self) -> "PeerNode":
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.address = f"127.0.0.1:{port}"
        return self

    @property
    def batches(self) -> int:
        """Batches that reached the store over the stream."""
        return self.store.batches

    async def stop(self) -> None:
        await self.runner.cleanup()

    @web.middleware
    async def _count(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.method == "PUT":
            self.batch_puts += 1
        elif request.path == STREAM_ROUTE:
            self.stream_opens += 1
        return await handler(request)


async def stream_answers(http: aiohttp.ClientSession, node: PeerNode, crypto: PeerCrypto,
                         tokens: list[bytes]) -> list[int]:
    """Send sealed batches over one stream; the answer byte of each (1 stored, 0 refused)."""
    from raftmail.node.peer_wire import STREAM_CLAIM
    frame = struct.Struct(">Q")
    url = f"http://{node.address}{STREAM_ROUTE}"
    async with http.ws_connect(url, headers={AUTH_HEADER: crypto.seal_text(STREAM_CLAIM)}) as ws:
        for i, token in enumerate(tokens):
            await ws.send_bytes(frame.pack(i) + token)
        answers = {}
        for _ in tokens:
            data = await ws.receive_bytes(timeout=5.0)
            answers[frame.unpack(data[:8])[0]] = data[8]
    return [answers[i] for i in range(len(tokens))]


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


class StalledPeer:
    """Accepts connections and never answers: a frozen node."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.address = ""

    async def start(self) -> "StalledPeer":
        self._server = await asyncio.start_server(self._hang, "127.0.0.1", 0)
        self.address = "127.0.0.1:%d" % self._server.sockets[0].getsockname()[1]
        return self

    async def _hang(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self.connected.set()
        await asyncio.Event().wait()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        await self._server.wait_closed()


async def wait_for(cond: Callable[[], bool], deadline_s: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before deadline")
        await asyncio.sleep(0.02)


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro_fn())


# -- crypto --------------------------------------------------------------------------------


def test_crypto_round_trip() -> None:
    crypto = PeerCrypto(SECRET, CLUSTER)
    token = crypto.seal(NEWSLETTER)
    assert NEWSLETTER not in token
    assert crypto.open(token) == NEWSLETTER
    # Another instance from the same secret and cluster derives the same key.
    assert PeerCrypto(SECRET, CLUSTER).open(token) == NEWSLETTER


def test_crypto_rejects_other_secret_other_cluster_and_garbage() -> None:
    token = PeerCrypto(SECRET, CLUSTER).seal(NEWSLETTER)
    with pytest.raises(PeerAuthError):
        PeerCrypto("another secret", CLUSTER).open(token)
    with pytest.raises(PeerAuthError):
        PeerCrypto(SECRET, "another-cluster").open(token)
    with pytest.raises(PeerAuthError):
        PeerCrypto(SECRET, CLUSTER).open(b"not a token")
    # Any flipped bit fails: version, timestamp, salt, nonce (the header is associated data),
    # ciphertext, tag.
    for i in (0, 5, 20, 40, len(token) // 2, len(token) - 1):
        tampered = bytearray(token)
        tampered[i] ^= 0x01
        with pytest.raises(PeerAuthError):
            PeerCrypto(SECRET, CLUSTER).open(bytes(tampered))
    with pytest.raises(PeerAuthError):
        PeerCrypto(SECRET, CLUSTER).open(token[:-1])
    with pytest.raises(PeerAuthError):
        PeerCrypto(SECRET, CLUSTER).open("not base64 at all!")


def test_crypto_expired_token() -> None:
    crypto = PeerCrypto(SECRET, CLUSTER)
    token = crypto.seal(b"GET x")
    # Timestamps have one-second resolution; a negative ttl is already expired.
    with pytest.raises(PeerAuthError):
        crypto.open(token, ttl=-2)


def test_crypto_refuses_tokens_from_the_past_or_future(monkeypatch: pytest.MonkeyPatch) -> None:
    crypto = PeerCrypto(SECRET, CLUSTER)
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now - 301)
    old = crypto.seal(b"GET x")
    monkeypatch.setattr(time, "time", lambda: now + 120)
    future = crypto.seal(b"GET x")
    monkeypatch.setattr(time, "time", lambda: now)
    for token in (old, future):
        with pytest.raises(PeerAuthError):
            crypto.open(token)
    assert crypto.open(old, ttl=400) == b"GET x"


def test_crypto_nonces_never_repeat_and_senders_have_their_own_subkeys() -> None:
    a, b = PeerCrypto(SECRET, CLUSTER), PeerCrypto(SECRET, CLUSTER)
    headers = [t[: 1 + 8 + 16 + 12] for t in (a.seal(b"x") for _ in range(1000))]
    assert len({h[-12:] for h in headers}) == 1000  # counter nonces under one salt
    assert len({h[9:25] for h in headers}) == 1
    other = b.seal(b"x")
    assert other[9:25] != headers[0][9:25]  # another process: another salt, so another subkey
    assert a.open(other) == b"x"
    assert b.open(a.seal(b"x")) == b"x"


def test_crypto_takes_a_new_subkey_in_a_forked_child(monkeypatch: pytest.MonkeyPatch) -> None:
    crypto = PeerCrypto(SECRET, CLUSTER)
    parent = crypto.seal(b"x")
    pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: pid + 1)
    child = crypto.seal(b"x")
    assert child[9:25] != parent[9:25]
    assert crypto.open(parent) == crypto.open(child) == b"x"


def test_crypto_caches_only_a_bounded_number_of_authenticated_senders() -> None:
    crypto = PeerCrypto(SECRET, CLUSTER)
    senders = [PeerCrypto(SECRET, CLUSTER) for _ in range(MAX_PEER_KEYS + 10)]
    for sender in senders:
        assert crypto.open(sender.seal(b"hi")) == b"hi"
    assert len(crypto._sealer._peer_keys) <= MAX_PEER_KEYS
    forged = bytearray(senders[0].seal(b"hi"))
    forged[9:25] = os.urandom(16)  # an unknown salt that fails authentication
    with pytest.raises(PeerAuthError):
        crypto.open(bytes(forged))
    assert bytes(forged[9:25]) not in crypto._sealer._peer_keys


def test_crypto_text_form_for_headers() -> None:
    crypto = PeerCrypto(SECRET, CLUSTER)
    text = crypto.seal_text(b"GET abc")
    assert text.isascii() and "\n" not in text
    assert crypto.open(text) == b"GET abc"


def test_crypto_requires_secret() -> None:
    with pytest.raises(ValueError):
        PeerCrypto("", CLUSTER)


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1000, 65536])
def test_sealed_size_matches_tokens(size: int) -> None:
    assert len(PeerCrypto(SECRET, CLUSTER).seal(b"x" * size)) == sealed_size(size)


# -- push and fetch ------------------------------------------------------------------------


def test_push_to_two_peers_need_two(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        a = await PeerNode(tmp_path / "a", crypto).start()
        b = await PeerNode(tmp_path / "b", crypto).start()
        client = PeerClient(crypto)
        try:
            digest = digest_of(NEWSLETTER)
            acks = await client.push(digest, NEWSLETTER, [a.address, b.address], 2, 5.0)
            assert acks == 2
            for node in (a, b):
                assert node.store.get(digest) == NEWSLETTER
                assert (node.store.root / digest[:2] / digest).read_bytes() == NEWSLETTER
            # Pushing again is idempotent and still acked.
            assert await client.push(digest, NEWSLETTER, [a.address, b.address], 2, 5.0) == 2
        finally:
            await client.close()
            await a.stop()
            await b.stop()

    run(main)


def test_push_returns_early_and_finishes_in_background(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        nodes = [await PeerNode(tmp_path / f"n{i}", crypto).start() for i in range(3)]
        client = PeerClient(crypto)
        try:
            digest = digest_of(NEWSLETTER)
            acks = await client.push(digest, NEWSLETTER, [n.address for n in nodes], 1, 5.0)
            assert 1 <= acks <= 3
            await wait_for(lambda: all(n.store.has(digest) for n in nodes))
            await wait_for(lambda: client.background_pushes == 0)
            assert all(n.store.get(digest) == NEWSLETTER for n in nodes)
        finally:
            await client.close()
            for n in nodes:
                await n.stop()

    run(main)


def test_push_to_dead_port_is_not_acked(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        live = await PeerNode(tmp_path / "live", crypto).start()
        client = PeerClient(crypto, timeout=2.0)
        try:
            digest = digest_of(NEWSLETTER)
            acks = await client.push(digest, NEWSLETTER, [dead_address(), live.address], 2, 5.0)
            assert acks == 1
            assert live.store.get(digest) == NEWSLETTER
            assert await client.push(digest, NEWSLETTER, [dead_address()], 1, 5.0) == 0
        finally:
            await client.close()
            await live.stop()

    run(main)


def test_push_times_out_with_acks_so_far(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        live = await PeerNode(tmp_path / "live", crypto).start()
        stalled = await StalledPeer().start()
        client = PeerClient(crypto, timeout=20.0)
        try:
            digest = digest_of(NEWSLETTER)
            began = time.monotonic()
            acks = await client.push(digest, NEWSLETTER, [stalled.address, live.address], 2, 0.5)
            assert acks == 1
            assert time.monotonic() - began < 5.0
            assert stalled.connected.is_set()
            # The stalled push keeps going in the background until close() cancels it.
            assert client.background_pushes == 1
        finally:
            await client.close()
            assert client.background_pushes == 0
            await stalled.stop()
            await live.stop()

    run(main)


def test_background_pushes_are_bounded(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        stalled = [await StalledPeer().start() for _ in range(3)]
        addrs = [s.address for s in stalled]
        client = PeerClient(crypto, timeout=20.0, max_background_pushes=2)
        try:
            acks = await client.push(digest_of(NEWSLETTER), NEWSLETTER, addrs, 1, 0.2)
            assert acks == 0
            assert client.background_pushes == 2
        finally:
            await client.close()
            for s in stalled:
                await s.stop()

    run(main)


def test_fetch_from_peer_that_has_it(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        empty = await PeerNode(tmp_path / "empty", crypto).start()
        holder = await PeerNode(tmp_path / "holder", crypto).start()
        digest = holder.store.put(NEWSLETTER)
        client = PeerClient(crypto)
        try:
            got = await client.fetch(digest, [dead_address(), empty.address, holder.address])
            assert got == NEWSLETTER
        finally:
            await client.close()
            await empty.stop()
            await holder.stop()

    run(main)


def test_fetch_returns_none_when_nobody_has_it(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        a = await PeerNode(tmp_path / "a", crypto).start()
        b = await PeerNode(tmp_path / "b", crypto).start()
        a.store.put(b"some other body")
        client = PeerClient(crypto)
        try:
            assert await client.fetch(digest_of(NEWSLETTER), [a.address, b.address]) is None
            assert await client.fetch(digest_of(NEWSLETTER), []) is None
        finally:
            await client.close()
            await a.stop()
            await b.stop()

    run(main)


def test_fetch_rejects_body_that_does_not_match(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        digest = digest_of(NEWSLETTER)

        async def liar(request: web.Request) -> web.Response:
            return web.Response(body=crypto.seal(b"a different body"))

        app = web.Application()
        app.router.add_get("/peer/bodies/{digest}", liar)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        liar_addr = "127.0.0.1:%d" % runner.addresses[0][1]
        honest = await PeerNode(tmp_path / "honest", crypto).start()
        honest.store.put(NEWSLETTER)
        client = PeerClient(crypto)
        try:
            assert await client.fetch(digest, [liar_addr]) is None
            assert await client.fetch(digest, [liar_addr, honest.address]) == NEWSLETTER
        finally:
            await client.close()
            await runner.cleanup()
            await honest.stop()

    run(main)


# -- batching ------------------------------------------------------------------------------


def test_concurrent_pushes_share_requests(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        a = await PeerNode(tmp_path / "a", crypto).start()
        b = await PeerNode(tmp_path / "b", crypto).start()
        client = PeerClient(crypto)
        bodies = [campaign_body(i) for i in range(50)]
        try:
            acks = await asyncio.gather(
                *(client.push(digest_of(x), x, [a.address, b.address], 2, 5.0) for x in bodies)
            )
            assert acks == [2] * 50
            for node in (a, b):
                assert 1 <= node.batches <= 5, node.batches
                assert node.stream_opens == 1 and node.batch_puts == 0
                for x in bodies:
                    path = node.store.root / digest_of(x)[:2] / digest_of(x)
                    assert path.read_bytes() == x
                assert node.store.stats() == (50, sum(map(len, bodies)))
        finally:
            await client.close()
            await a.stop()
            await b.stop()

    run(main)


def test_sustained_pushes_group_while_batches_are_in_flight(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        a = await PeerNode(tmp_path / "a", crypto).start()
        b = await PeerNode(tmp_path / "b", crypto).start()
        client = PeerClient(crypto, max_batches_in_flight=2)
        sessions, rounds = 16, 8
        results: list[int] = []

        async def session(k: int) -> None:
            # Each session pushes its next body only after the previous one was acked, like
            # an SMTP client waiting for the reply to its DATA.
            for r in range(rounds):
                x = campaign_body(k * rounds + r)
                results.append(await client.push(digest_of(x), x, [a.address, b.address], 1, 5.0))

        try:
            await asyncio.gather(*(session(k) for k in range(sessions)))
            total = sessions * rounds
            assert len(results) == total and all(1 <= acks <= 2 for acks in results)
            await wait_for(lambda: a.store.stats()[0] == b.store.stats()[0] == total)
            await wait_for(lambda: client.background_pushes == 0)
            for node in (a, b):
                assert node.batches <= total // 3, node.batches
        finally:
            await client.close()
            await a.stop()
            await b.stop()

    run(main)


def test_idle_push_is_not_delayed(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        a = await PeerNode(tmp_path / "a", crypto).start()
        b = await PeerNode(tmp_path / "b", crypto).start()
        client = PeerClient(crypto)
        try:
            for i in range(3):
                x = campaign_body(i)
                began = time.monotonic()
                assert await client.push(digest_of(x), x, [a.address, b.address], 2, 5.0) == 2
                assert time.monotonic() - began < 0.5
                # Alone on an idle channel: one batch per push, nothing held back.
                assert a.batches == b.batches == i + 1
        finally:
            await client.close()
            await a.stop()
            await b.stop()

    run(main)


def test_batch_limits_split_batches_and_big_body_goes_alone(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        node = await PeerNode(tmp_path / "n", crypto).start()
        client = PeerClient(crypto, max_batch_bytes=4096, max_batch_items=3)
        big = os.urandom(10_000)
        small = [campaign_body(i) for i in range(7)]  # each well under 4096 / 3 bytes
        mid = [os.urandom(1500) for _ in range(4)]  # two fit in 4096 bytes, three do not
        try:
            first = [big] + small
            acks = await asyncio.gather(
                *(client.push(digest_of(x), x, [node.address], 1, 5.0) for x in first)
            )
            assert acks == [1] * len(first)
            # [big], [s0 s1 s2], [s3 s4 s5], [s6]: all four in flight at once.
            assert node.batches == 4
            acks = await asyncio.gather(
                *(client.push(digest_of(x), x, [node.address], 1, 5.0) for x in mid)
            )
            assert acks == [1] * len(mid)
            assert node.batches == 4 + 2
            for x in first + mid:
                assert node.store.get(digest_of(x)) == x
        finally:
            await client.close()
            await node.stop()

    run(main)


def test_refused_body_does_not_cost_its_batch_mates(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        node = await PeerNode(tmp_path / "n", crypto).start()
        client = PeerClient(crypto, max_body_bytes=2048)
        good = campaign_body(1)
        oversize = os.urandom(4096)
        try:
            acks = await asyncio.gather(
                client.push(digest_of(good), good, [node.address], 1, 5.0),
                client.push(digest_of(NEWSLETTER), b"substituted body", [node.address], 1, 5.0),
                client.push(digest_of(oversize), oversize, [node.address], 1, 5.0),
            )
            assert acks == [1, 0, 0]
            assert node.batches == 1
            assert node.store.stats() == (1, len(good))
        finally:
            await client.close()
            await node.stop()

    run(main)


def test_slow_peer_does_not_stall_the_pipeline(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        live = await PeerNode(tmp_path / "live", crypto).start()
        stalled = await StalledPeer().start()
        client = PeerClient(crypto, timeout=20.0, max_batches_in_flight=1,
                            max_background_pushes=4)
        try:
            began = time.monotonic()
            for i in range(10):  # more batches than slots or background room
                x = campaign_body(i)
                assert await client.push(digest_of(x), x, [stalled.address, live.address],
                                         1, 5.0) == 1
            assert time.monotonic() - began < 3.0
            assert live.store.stats()[0] == 10
            # The frozen peer's requests wait in the background, never more than the bound.
            assert client.background_pushes == 4
        finally:
            await client.close()
            assert client.background_pushes == 0
            await stalled.stop()
            await live.stop()

    run(main)


def test_full_queue_answers_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        stalled = await StalledPeer().start()
        client = PeerClient(crypto, timeout=20.0, max_batches_in_flight=1, max_queued_pushes=1)
        bodies = [campaign_body(i) for i in range(3)]
        try:
            in_flight = asyncio.create_task(
                client.push(digest_of(bodies[0]), bodies[0], [stalled.address], 1, 20.0)
            )
            await asyncio.wait_for(stalled.connected.wait(), 5.0)
            queued = asyncio.create_task(
                client.push(digest_of(bodies[1]), bodies[1], [stalled.address], 1, 20.0)
            )
            await asyncio.sleep(0)  # one loop step: the task above enqueues its body
            assert not queued.done()
            began = time.monotonic()
            acks = await client.push(digest_of(bodies[2]), bodies[2], [stalled.address], 1, 20.0)
            assert acks == 0
            assert time.monotonic() - began < 0.5
            assert not in_flight.done() and not queued.done()
            # close() answers the pushes still waiting instead of leaving them hanging.
            await client.close()
            assert await asyncio.wait_for(in_flight, 5.0) == 0
            assert await asyncio.wait_for(queued, 5.0) == 0
        finally:
            await client.close()
            await stalled.stop()

    run(main)


def test_batch_pack_round_trip_and_wire_limit() -> None:
    bodies = [(digest_of(x), x) for x in (b"", NEWSLETTER, os.urandom(70_000))]
    plain = pack_batch(bodies)
    assert unpack_batch(plain) == bodies
    crypto = PeerCrypto(SECRET, CLUSTER)
    # A full batch of maximal items fits under the wire limit the server enforces.
    full = [(digest_of(b"%d" % i), b"y" * 16) for i in range(8)]
    assert len(crypto.seal(pack_batch(full))) <= batch_sealed_limit(0, 16 * 8, 8)
    lone = [(digest_of(b"z"), b"z" * 70_000)]
    assert len(crypto.seal(pack_batch(lone))) <= batch_sealed_limit(70_000, 4096, 8)
    assert len(crypto.seal(pack_batch(lone))) > batch_sealed_limit(60_000, 4096, 8)


# -- refusals ------------------------------------------------------------------------------


def test_server_with_other_secret_refuses(tmp_path: Path) -> None:
    async def main() -> None:
        ours = PeerCrypto(SECRET, CLUSTER)
        theirs = PeerCrypto("a different secret", CLUSTER)
        foreign = await PeerNode(tmp_path / "foreign", theirs).start()
        foreign.store.put(NEWSLETTER)
        digest = digest_of(NEWSLETTER)
        client = PeerClient(ours)
        try:
            other = b"Subject: hello\r\n\r\nhi\r\n"
            assert await client.push(digest_of(other), other, [foreign.address], 1, 5.0) == 0
            assert not foreign.store.has(digest_of(other))
            assert foreign.auth_failures == ["127.0.0.1"]
            assert await client.fetch(digest, [foreign.address]) is None
            assert foreign.auth_failures == ["127.0.0.1", "127.0.0.1"]

            url = f"http://{foreign.address}/peer/bodies/{digest}"
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await stream_answers(http, foreign, ours, [sealed_batch(ours, [(digest_of(other), other)])])
                assert refused.value.status == 403
                assert not foreign.store.has(digest_of(other))
                async with http.get(url) as resp:
                    assert resp.status == 403
                auth = ours.seal_text(b"GET " + digest.encode())
                async with http.get(url, headers={AUTH_HEADER: auth}) as resp:
                    assert resp.status == 403
                assert len(foreign.auth_failures) == 5
        finally:
            await client.close()
            await foreign.stop()

    run(main)


def test_get_auth_token_is_bound_to_the_digest(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        node = await PeerNode(tmp_path / "n", crypto).start()
        digest = node.store.put(NEWSLETTER)
        other = digest_of(b"other")
        url = f"http://{node.address}/peer/bodies/{digest}"
        try:
            async with aiohttp.ClientSession() as http:
                wrong = crypto.seal_text(b"GET " + other.encode())
                async with http.get(url, headers={AUTH_HEADER: wrong}) as resp:
                    assert resp.status == 403
                right = crypto.seal_text(b"GET " + digest.encode())
                async with http.get(url, headers={AUTH_HEADER: right}) as resp:
                    assert resp.status == 200
                    assert crypto.open(await resp.read()) == NEWSLETTER
            assert node.auth_failures == ["127.0.0.1"]
        finally:
            await node.stop()

    run(main)


def test_too_large_body_gets_413(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        node = await PeerNode(tmp_path / "small", crypto, max_body_bytes=1024).start()
        big = os.urandom(4096)
        fine = b"Subject: small\r\n\r\nfits\r\n"
        client = PeerClient(crypto)
        try:
            async with aiohttp.ClientSession() as http:
                # One body over the limit refuses the whole batch, its batch-mate included.
                batch = sealed_batch(crypto, [(digest_of(fine), fine), (digest_of(big), big)])
                assert await stream_answers(http, node, crypto, [batch]) == [0]
            assert await client.push(digest_of(big), big, [node.address], 1, 5.0) == 0
            assert node.store.stats() == (0, 0)
            # At the limit exactly, the body is accepted.
            fits = os.urandom(1024)
            assert await client.push(digest_of(fits), fits, [node.address], 1, 5.0) == 1
        finally:
            await client.close()
            await node.stop()

    run(main)


def test_the_old_put_route_is_gone_and_answers_before_any_body_is_read(tmp_path: Path) -> None:
    """PUT /peer/bodies read up to a whole sealed batch (about 10 MiB) before it checked
    anything. It is gone: the answer comes from the headers alone, with the body never sent."""
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        node = await PeerNode(tmp_path / "n", crypto).start()
        host, port = node.address.split(":")
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"PUT /peer/bodies HTTP/1.1\r\nHost: x\r\nContent-Length: 10485760\r\n"
                         b"Content-Type: application/octet-stream\r\n\r\n")
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 5.0)  # no body bytes were sent
            assert status.split()[1] in (b"404", b"405"), status
            writer.close()
            await writer.wait_closed()
            assert node.store.stats() == (0, 0) and node.store.batches == 0
        finally:
            await node.stop()

    run(main)


def test_body_not_matching_digest_gets_400(tmp_path: Path) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        node = await PeerNode(tmp_path / "n", crypto).start()
        claimed = digest_of(NEWSLETTER)
        client = PeerClient(crypto)
        try:
            async with aiohttp.ClientSession() as http:
                substituted = [(claimed, b"substituted body")]
                # One bad pair refuses the batch: the honest body in it is not stored either.
                honest = b"Subject: honest\r\n\r\nhi\r\n"
                mixed = [(digest_of(honest), honest), (claimed, b"substituted body")]
                malformed = [(digest_of(honest), honest), ("Z" * 64, NEWSLETTER)]
                tokens = [sealed_batch(crypto, b) for b in (substituted, mixed, malformed)]
                tokens += [crypto.seal(junk) for junk in (b"\xc1not msgpack", b"\x91\x01", b"\x81\xa1a\x01")]
                assert await stream_answers(http, node, crypto, tokens) == [0] * len(tokens)
            assert await client.push(claimed, b"substituted body", [node.address], 1, 5.0) == 0
            assert node.store.stats() == (0, 0)
            assert node.auth_failures == []
        finally:
            await client.close()
            await node.stop()

    run(main)


def test_background_pushes_are_bounded_in_bytes(tmp_path: Path) -> None:
    """Each background request holds its batch's sealed copy (up to a 10 MiB body): past
    max_background_bytes the requests of a further batch are cancelled, not kept."""
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        stalled = [await StalledPeer().start() for _ in range(2)]
        addrs = [s.address for s in stalled]
        body = os.urandom(300_000)
        client = PeerClient(crypto, timeout=20.0, max_background_bytes=500_000)
        try:
            assert await client.push(digest_of(body), body, addrs, 1, 0.2) == 0
            assert client.background_pushes == 2  # both peers' requests share one sealed copy
            assert 300_000 < client.background_bytes < 301_000
            other = os.urandom(300_000)
            assert await client.push(digest_of(other), other, addrs, 1, 0.2) == 0
            assert client.background_pushes == 2 and client.background_bytes < 301_000
        finally:
            await client.close()
            for s in stalled:
                await s.stop()
        assert client.background_bytes == 0

    run(main)


def test_a_replayed_batch_or_header_is_refused(tmp_path: Path) -> None:
    """A captured sealed batch (or stream header) sent again within its freshness window is
    refused: each is accepted once."""
    async def main() -> None:
        from raftmail.node.peer_wire import STREAM_CLAIM
        crypto = PeerCrypto(SECRET, CLUSTER)
        node = await PeerNode(tmp_path / "n", crypto).start()
        body = b"Subject: once\r\n\r\nonly once\r\n"
        batch = sealed_batch(crypto, [(digest_of(body), body)])
        try:
            async with aiohttp.ClientSession() as http:
                assert await stream_answers(http, node, crypto, [batch]) == [1]
                node.store.delete(digest_of(body))
                assert await stream_answers(http, node, crypto, [batch]) == [0]  # replayed
                assert not node.store.has(digest_of(body))
                header = {AUTH_HEADER: crypto.seal_text(STREAM_CLAIM)}
                url = f"http://{node.address}{STREAM_ROUTE}"
                async with http.ws_connect(url, headers=header):
                    pass
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    async with http.ws_connect(url, headers=header):
                        pass
                assert refused.value.status == 403
        finally:
            await node.stop()

    run(main)


def test_peer_requests_served_at_once_are_capped(tmp_path: Path) -> None:
    async def main() -> None:
        from raftmail.node.peer_wire import STREAM_CLAIM
        crypto = PeerCrypto(SECRET, CLUSTER)
        node = await PeerNode(tmp_path / "n", crypto, max_requests=2).start()
        url = f"http://{node.address}{STREAM_ROUTE}"
        try:
            async with aiohttp.ClientSession() as http:
                first = await http.ws_connect(url, headers={AUTH_HEADER: crypto.seal_text(STREAM_CLAIM)})
                second = await http.ws_connect(url, headers={AUTH_HEADER: crypto.seal_text(STREAM_CLAIM)})
                with pytest.raises(aiohttp.WSServerHandshakeError) as busy:
                    await http.ws_connect(url, headers={AUTH_HEADER: crypto.seal_text(STREAM_CLAIM)})
                assert busy.value.status == 503
                await first.close()
                third = None
                deadline = time.monotonic() + 5.0
                while third is None:  # the server frees the slot once it has seen the close
                    try:
                        third = await http.ws_connect(url, headers={AUTH_HEADER: crypto.seal_text(STREAM_CLAIM)})
                    except aiohttp.WSServerHandshakeError:
                        assert time.monotonic() < deadline, "slot never freed"
                        await asyncio.sleep(0.05)
                for ws in (second, third):
                    await ws.close()
        finally:
            await node.stop()

    run(main)


def test_refused_peer_requests_are_logged_once_per_interval_per_source(tmp_path: Path, caplog) -> None:
    async def main() -> None:
        crypto = PeerCrypto(SECRET, CLUSTER)
        node = await PeerNode(tmp_path / "n", crypto).start()
        url = f"http://{node.address}/peer/bodies/{digest_of(NEWSLETTER)}"
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(50):
                    async with http.get(url) as resp:
                        assert resp.status == 403
        finally:
            await node.stop()
        assert len(node.auth_failures) == 50  # every one counted ...

    with caplog.at_level("WARNING", logger="raftmail.node.peers"):
        run(main)
    warnings = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # ... one logged
