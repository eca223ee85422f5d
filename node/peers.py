"""Peer channel for message bodies.

Before a submission's metadata is proposed to Raft, the intake node pushes the body to its
peers; a node missing a body later fetches it by hash. Both go over plain HTTP on each node's
admin address, with every payload sealed (AES-GCM) under a key derived from the cluster secret,
so only cluster members can store, read, or even ask for bodies.

Pushes are grouped like a group commit: a body pushed while earlier batches are still on their
way waits for the next batch, and each batch is sealed once and sent to every peer. Under
load the crypto and thread-hop cost is paid per batch instead of per body; when the channel is
idle a body goes out at once, alone, with no added latency.

Batches travel over one persistent WebSocket per peer (GET /peer/stream): a message costs a
fraction of an HTTP request's parsing and bookkeeping on both ends. Each message is an 8-byte
request id and a sealed batch; the answer is the id and one status byte.

Every request is authenticated from its headers before anything else is read, the number served
at once is capped, and each sealed header and batch is accepted once: a captured one replayed
within its freshness window is refused.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import itertools
import logging
import struct
import time
from functools import partial
from typing import Any, Callable, Iterable, Sequence, TypeVar

import aiohttp
import msgpack
from aiohttp import WSCloseCode, WSMsgType, web
from raftmail.consensus.seal import ReplayGuard, SealError, Sealer, derive_key, sealed_size
from raftmail.node.bodies import BodyStore, is_digest

log = logging.getLogger(__name__)
_T = TypeVar("_T")

PURPOSE = b"raftmail peer channel v2"
AUTH_HEADER = "X-Raftmail-Auth"
BODY_ROUTE = "/peer/bodies/{digest}"  # GET: fetch one body by hash
STREAM_ROUTE = "/peer/stream"  # GET + WebSocket upgrade: a stream of sealed batches
STREAM_CLAIM = b"STREAM " + STREAM_ROUTE.encode("ascii")  # what the stream's auth header seals
DEFAULT_TOKEN_TTL = 300.0
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
DEFAULT_MAX_BACKGROUND_PUSHES = 256
DEFAULT_MAX_BATCH_BYTES = 4 * 2**20
DEFAULT_MAX_BATCH_ITEMS = 256
DEFAULT_MAX_BATCHES_IN_FLIGHT = 4
DEFAULT_MAX_QUEUED_PUSHES = 1024
# Sealed batches still going to slow peers after every push() returned: bounded in bytes too,
# since each may be a 10 MiB body ([cluster] max_background_push_bytes).
DEFAULT_MAX_BACKGROUND_BYTES = 64 * 2**20
# Peer requests (body fetches and streams) served at once ([cluster] max_peer_requests).
DEFAULT_MAX_PEER_REQUESTS = 64
# Tokens remembered for replay checks: a few minutes of a busy cluster's peer traffic.
DEFAULT_REPLAY_ENTRIES = 65536
# A refused peer request is logged at most this often per source address (the rest counted).
_REFUSAL_LOG_INTERVAL = 10.0
_MAX_LOGGED_SOURCES = 1024
_READ_CHUNK = 1 << 16
# msgpack framing of one [digest, body] pair: array header, str8 header + 64 hex, bin32 header.
_ITEM_OVERHEAD = 1 + 2 + 64 + 5
_BATCH_OVERHEAD = 5  # the outer array32 header
_MAX_CLOCK_SKEW = 60.0  # a token stamped further ahead than this is refused
# Sealing, opening and hashing this much is tens of microseconds: cheaper on the event loop
# than a thread hand-off. Bigger payloads go to a thread so the loop never stalls on them.
_INLINE_CRYPTO_BYTES = 64 * 1024
# Stream framing: request id, then the sealed batch; the answer is the id and a status byte.
_REQUEST_ID = struct.Struct(">Q")
STREAM_STORED = 1
STREAM_REFUSED = 0
_ANSWER_SIZE = _REQUEST_ID.size + 1
# Batches of one stream stored at once; when all are busy the server stops reading, so a
# fast client is slowed by TCP flow control instead of piling up tasks.
STREAM_MAX_IN_PROGRESS = 8
# Pings on an idle stream, so a peer that vanished without a FIN is noticed and dropped.
_STREAM_HEARTBEAT = 20.0
# A dead peer is dialled at most this often; pushes in between are answered "no" at once.
_STREAM_RECONNECT_INTERVAL = 0.5
# How long a close handshake may take before the connection is simply dropped.
_STREAM_CLOSE_TIMEOUT = 1.0
# Peer addresses change with membership; streams beyond this many are closed, oldest use first.
_MAX_PEER_STREAMS = 64


class PeerAuthError(Exception):
    """A sealed token was forged, sealed under another key, malformed, or expired."""


class PeerCrypto:
    """Seals and opens peer-channel payloads under the cluster's peer-channel key (AES-GCM,
    consensus/seal.py; a Fernet token cost 35x more CPU), with a freshness bound on opening and,
    for what a peer sends us, a refusal of any token its endpoint has seen before (replays)."""

    VERSION = 0x51  # 0x50: the key came from the secret through HKDF alone

    def __init__(self, secret: str, cluster_name: str) -> None:
        if not secret:
            raise ValueError("the peer channel needs a non-empty cluster secret")
        # The cluster name salts the slow step, so clusters sharing a secret share no key.
        key = derive_key(secret, cluster_name, PURPOSE)
        self._sealer = Sealer(key, version=self.VERSION, purpose=PURPOSE)

    def seal(self, data: bytes) -> bytes:
        return self._sealer.seal(data, int(time.time()))

    def seal_text(self, data: bytes) -> str:
        """A sealed token as text, for an HTTP header; open() takes it back as a str."""
        return base64.urlsafe_b64encode(self.seal(data)).decode("ascii")

    def open(self, token: bytes | str, *, ttl: float = DEFAULT_TOKEN_TTL,
             replays: ReplayGuard | None = None) -> bytes:
        """The plaintext of *token* (bytes, or the text form from seal_text) if it was sealed
        under this cluster's key at most *ttl* seconds ago; PeerAuthError otherwise. With
        *replays*, a token that guard has seen before is refused too."""
        try:
            if isinstance(token, str):
                token = base64.urlsafe_b64decode(token.encode("ascii"))
        except (TypeError, ValueError) as exc:
            raise PeerAuthError("peer token is not base64") from exc
        try:
            stamp, plain = self._sealer.open(token)
        except SealError as exc:
            raise PeerAuthError(f"peer token rejected: {exc} (wrong cluster secret?)") from None
        now = time.time()
        if stamp + ttl < now or stamp > now + _MAX_CLOCK_SKEW:
            raise PeerAuthError("peer token expired or from the future")
        if replays is not None and not replays.first_use(token, stamp, now):
            raise PeerAuthError("peer token replayed")
        return plain


def batch_sealed_limit(max_body_bytes: int, max_batch_bytes: int, max_batch_items: int) -> int:
    """Largest sealed batch on the wire: a full batch, or one body bigger than a batch alone."""
    plain = max(max_body_bytes, max_batch_bytes) + max_batch_items * _ITEM_OVERHEAD
    return sealed_size(plain + _BATCH_OVERHEAD)


def pack_batch(bodies: Iterable[tuple[str, bytes]]) -> bytes:
    """The plaintext of a batch: msgpack [[digest, body], ...]."""
    return msgpack.packb([[digest, data] for digest, data in bodies], use_bin_type=True)


def unpack_batch(plain: bytes) -> list[tuple[str, bytes]] | None:
    """The [digest, body] pairs of a batch, or None if it is not one (or a digest is malformed)."""
    try:
        entries = msgpack.unpackb(plain, raw=False)
    except Exception:  # msgpack raises several types for bad input; all mean "not a batch"
        return None
    if not isinstance(entries, list):
        return None
    out: list[tuple[str, bytes]] = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2):
            return None
        digest, data = entry
        if not (is_digest(digest) and isinstance(data, bytes)):
            return None
        out.append((digest, data))
    return out


def _body_url(peer: str, digest: str) -> str:
    return f"http://{peer}/peer/bodies/{digest}"


async def _read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole stream, or None as soon as it exceeds *limit* bytes."""
    buf = bytearray()
    async for chunk in stream.iter_chunked(_READ_CHUNK):
        buf += chunk
        if len(buf) > limit:
            return None
    return bytes(buf)


async def _off_loop_if_large(size: int, fn: Callable[..., _T], *args: Any) -> _T:
    """fn(*args): inline for a small payload of *size* bytes, in a thread for a large one."""
    if size <= _INLINE_CRYPTO_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


# -- server side ---------------------------------------------------------------------------


def add_peer_routes(
    app: web.Application,
    store: BodyStore,
    crypto: PeerCrypto,
    *,
    max_body_bytes: int,
    on_auth_failure: Callable[[str], None] | None = None,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
    max_requests: int = DEFAULT_MAX_PEER_REQUESTS,
    replay_entries: int = DEFAULT_REPLAY_ENTRIES,
) -> None:
    """Serve GET /peer/stream (a WebSocket of sealed batches) and GET /peer/bodies/{digest}
    on *app*, at most *max_requests* at once (streams count while they are open).

    *max_batch_bytes* and *max_batch_items* must be at least the pushing PeerClient's, or its
    full batches are refused as too large.
    """
    max_sealed = batch_sealed_limit(max_body_bytes, max_batch_bytes, max_batch_items)
    streams: set[web.WebSocketResponse] = set()
    active = 0  # peer requests being served now
    # Every sealed header and batch this endpoint accepted within the tokens' freshness window.
    replays = ReplayGuard(DEFAULT_TOKEN_TTL + _MAX_CLOCK_SKEW, replay_entries)
    last_logged: collections.OrderedDict[str, tuple[float, int]] = collections.OrderedDict()

    def note_refusal(peer_ip: str, why: str) -> None:
        # Logged once per interval and source; a flood from one address cannot fill the log.
        now = time.monotonic()
        logged_at, quiet = last_logged.get(peer_ip, (float("-inf"), 0))
        if now - logged_at >= _REFUSAL_LOG_INTERVAL:
            more = f" ({quiet} more refused since the last warning)" if quiet else ""
            log.warning("peer request from %s refused: %s%s", peer_ip, why, more)
            last_logged[peer_ip] = (now, 0)
        else:
            last_logged[peer_ip] = (logged_at, quiet + 1)
        last_logged.move_to_end(peer_ip)
        while len(last_logged) > _MAX_LOGGED_SOURCES:
            last_logged.popitem(last=False)
        if on_auth_failure is not None:
            try:
                on_auth_failure(peer_ip)
            except Exception:
                log.exception("on_auth_failure callback failed")

    def refuse(request: web.Request, why: str) -> web.Response:
        note_refusal(request.remote or "unknown", why)
        return web.Response(status=403, text="forbidden\n")

    def authorized(request: web.Request, claim: bytes, what: str) -> web.Response | None:
        """None if the request carries a fresh, unused auth header sealing *claim*, else a 403.
        Only headers are looked at: nothing of the request body has been read yet."""
        header = request.headers.get(AUTH_HEADER)
        if header is None:
            return refuse(request, f"{what} without {AUTH_HEADER}")
        try:
            sealed_claim = crypto.open(header, replays=replays)
        except PeerAuthError as exc:
            return refuse(request, f"bad {AUTH_HEADER} for {what} ({exc})")
        if sealed_claim != claim:
            return refuse(request, f"{AUTH_HEADER} does not match {what}")
        return None

    def busy() -> web.Response | None:
        if active >= max_requests:
            return web.Response(status=503, text="too many peer requests\n", headers={"Retry-After": "1"})
        return None

    def receive(token: bytes) -> tuple[int, str]:
        """Open, check and store one batch: (HTTP status, reason). One thread hop in all."""
        bodies = unpack_batch(crypto.open(token, replays=replays))
        if bodies is None:
            return 400, "malformed batch or digest"
        if any(len(data) > max_body_bytes for _, data in bodies):
            return 413, "body too large"
        try:
            store.put_many_verified(bodies)
        except ValueError:
            return 400, "body does not match digest"
        except OSError:
            log.exception("storing a pushed batch of %d bodies failed", len(bodies))
            return 500, "storage error"
        return 204, ""

    async def store_batch(token: bytes, peer_ip: str) -> tuple[int, str]:
        """The one path from a sealed batch to the store: (HTTP status, reason); 204 means every
        body in it is stored durably."""
        try:
            return await asyncio.to_thread(receive, token)
        except PeerAuthError:
            note_refusal(peer_ip, "bad sealed batch")
            return 403, "forbidden"

    async def answer(ws: web.WebSocketResponse, message: bytes, peer_ip: str) -> None:
        status, why = await store_batch(message[_REQUEST_ID.size :], peer_ip)
        if status != 204:
            log.debug("streamed batch from %s refused: %d %s", peer_ip, status, why)
        reply = message[: _REQUEST_ID.size] + bytes(
            (STREAM_STORED if status == 204 else STREAM_REFUSED,)
        )
        try:
            await ws.send_bytes(reply)
        except Exception as exc:  # the client went away: it counts the batch as unacked
            log.debug("answer to %s on a closed stream: %r", peer_ip, exc)

    async def stream(request: web.Request) -> web.StreamResponse:
        nonlocal active
        refused = busy() or authorized(request, STREAM_CLAIM, "stream")
        if refused is not None:
            return refused
        active += 1
        try:
            return await serve_stream(request)
        finally:
            active -= 1

    async def serve_stream(request: web.Request) -> web.StreamResponse:
        peer_ip = request.remote or "unknown"
        ws = web.WebSocketResponse(
            max_msg_size=max_sealed + _REQUEST_ID.size + 1,  # aiohttp's limit is exclusive
            autoping=True,
            heartbeat=_STREAM_HEARTBEAT,
            timeout=_STREAM_CLOSE_TIMEOUT,
            compress=False,  # sealed batches do not compress
        )
        await ws.prepare(request)
        streams.add(ws)
        slots = asyncio.Semaphore(STREAM_MAX_IN_PROGRESS)
        working: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            working.discard(task)
            slots.release()

        try:
            while True:
                await slots.acquire()  # no reading while every slot is busy
                msg = await ws.receive()
                if msg.type is WSMsgType.BINARY and len(msg.data) > _REQUEST_ID.size:
                    task = asyncio.create_task(answer(ws, msg.data, peer_ip))
                    working.add(task)
                    task.add_done_callback(done)
                    continue
                slots.release()
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break
                if msg.type is WSMsgType.ERROR:
                    log.debug("stream from %s failed: %r", peer_ip, msg.data)
                    break
                log.warning("stream from %s sent a %s message: closing it", peer_ip,
                            msg.type.name)
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"binary batches only")
                break
        finally:
            streams.discard(ws)
            # Batches already handed to a thread finish storing; only their answers are lost.
            for task in list(working):
                task.cancel()
            if working:
                await asyncio.gather(*working, return_exceptions=True)
        return ws

    async def close_streams(_app: web.Application) -> None:
        # Open streams would otherwise hold graceful shutdown for its whole timeout.
        await asyncio.gather(
            *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"node shutting down")
              for ws in list(streams)),
            return_exceptions=True,
        )

    async def get_body(request: web.Request) -> web.Response:
        nonlocal active
        digest = request.match_info["digest"]
        # The token names the digest, so a captured header cannot be replayed for another body.
        refused = busy() or authorized(request, b"GET " + digest.encode("utf-8", "replace"),
                                       f"GET {digest[:80]!r}")
        if refused is not None:
            return refused
        active += 1
        try:
            return await serve_body(digest)
        finally:
            active -= 1

    async def serve_body(digest: str) -> web.Response:
        if not is_digest(digest):
            return web.Response(status=400, text="malformed digest\n")
        data = await asyncio.to_thread(store.get, digest)
        if data is None:
            return web.Response(status=404, text="no such body\n")
        sealed = await _off_loop_if_large(len(data), crypto.seal, data)
        return web.Response(status=200, body=sealed, content_type="application/octet-stream")

    app.router.add_get(STREAM_ROUTE, stream)
    app.router.add_get(BODY_ROUTE, get_body)
    app.on_shutdown.append(close_streams)


# -- client side ---------------------------------------------------------------------------


class _Push:
    """One push() call's body, waiting in a queue and then riding in a batch."""

    __slots__ = ("digest", "data", "need", "woken", "batch", "refused")

    def __init__(self, digest: str, data: bytes, need: int, woken: asyncio.Future[None]) -> None:
        self.digest = digest
        self.data = data
        self.need = need
        self.woken = woken  # resolved once push() has its answer
        self.batch: _Batch | None = None
        self.refused = False  # left out of its batch by the client's own checks

    @property
    def acks(self) -> int:
        if self.batch is None or self.refused:
            return 0
        return self.batch.acks

    def wake(self) -> None:
        if not self.woken.done():
            self.woken.set_result(None)


class _Batch:
    """Bodies sealed together and sent to every peer; each peer's "stored" acks them all."""

    def __init__(self, pushes: list[_Push], peers: int) -> None:
        self.pushes = pushes
        self.peers = peers
        self.acks = 0
        self.answered = 0
        self.waiting = len(pushes)  # push() calls that have not returned yet
        self.requests: set[asyncio.Task[bool]] = set()
        self.sealed_bytes = 0  # size of the one sealed copy its requests share
        self.started = False  # requests created (or nothing to send)
        self.settled = False  # in-flight slot given back
        for push in pushes:
            push.batch = self

    def answered_by(self, acked: bool) -> None:
        self.answered += 1
        if acked:
            self.acks += 1
        everyone = self.answered >= self.peers
        for push in self.pushes:
            if everyone or self.acks >= push.need:
                push.wake()

    def wake_all(self) -> None:
        for push in self.pushes:
            push.wake()


class _Batcher:
    """Queue and flush pipeline for one list of peers."""

    def __init__(self, client: "PeerClient", peers: tuple[str, ...]) -> None:
        self._client = client
        self.peers = peers
        self._queue: collections.deque[_Push] = collections.deque()
        self._in_flight: set[_Batch] = set()
        self._senders: set[asyncio.Task[None]] = set()
        self._flush_scheduled = False

    @property
    def idle(self) -> bool:
        return not self._queue and not self._in_flight and not self._flush_scheduled

    def enqueue(self, push: _Push) -> bool:
        """Queue *push* for the next batch; False if the queue is full."""
        if len(self._queue) >= self._client.max_queued_pushes:
            return False
        self._queue.append(push)
        self._schedule_flush()
        return True

    def forget(self, push: _Push) -> None:
        """push() is returning: its body leaves the queue, or its batch may be settled."""
        batch = push.batch
        if batch is None:
            # Never sent: the caller has its answer (a refusal), so nothing will refer to
            # this body; a peer that ever needs it fetches it by hash.
            try:
                self._queue.remove(push)
            except ValueError:
                pass
        else:
            batch.waiting -= 1
            if batch.waiting == 0 and batch.started:
                self._settle(batch)
        self._retire_if_idle()

    def _schedule_flush(self) -> None:
        # call_soon, not a direct start: pushes made in the same loop iteration (a burst of
        # sessions finishing DATA together) then share the first batch.
        if self._flush_scheduled or len(self._in_flight) >= self._client.max_batches_in_flight:
            return
        self._flush_scheduled = True
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._queue and len(self._in_flight) < self._client.max_batches_in_flight:
            batch = _Batch(self._take(), len(self.peers))
            self._in_flight.add(batch)
            task = asyncio.create_task(self._send(batch))
            self._senders.add(task)
            task.add_done_callback(self._senders.discard)
        self._retire_if_idle()  # every push may have given up before the flush ran

    def _take(self) -> list[_Push]:
        """The next batch off the queue: at most max_batch_items and max_batch_bytes of bodies,
        except that a body bigger than max_batch_bytes goes alone."""
        first = self._queue.popleft()
        pushes, size = [first], len(first.data)
        limit_items, limit_bytes = self._client.max_batch_items, self._client.max_batch_bytes
        while self._queue and len(pushes) < limit_items:
            size += len(self._queue[0].data)
            if size > limit_bytes:
                break
            pushes.append(self._queue.popleft())
        return pushes

    async def _send(self, batch: _Batch) -> None:
        client = self._client
        sealed: bytes | None = None
        try:
            size = sum(len(push.data) for push in batch.pushes)
            sealed, refused = await _off_loop_if_large(size, client._seal_batch, batch.pushes)
            for i in refused:
                batch.pushes[i].refused = True
                batch.pushes[i].wake()
        except Exception:
            log.exception("sealing a batch of %d bodies failed", len(batch.pushes))
        finally:
            # Also on cancellation (close()): nobody may be left waiting on this batch.
            if sealed is None:
                batch.wake_all()
        if sealed is not None:
            for peer in self.peers:
                task = asyncio.create_task(client._put_batch(peer, sealed, len(batch.pushes)))
                task.add_done_callback(partial(_answered, batch))
                batch.requests.add(task)
            batch.sealed_bytes = len(sealed)
        batch.started = True
        if batch.waiting == 0:
            self._settle(batch)

    def _settle(self, batch: _Batch) -> None:
        """Every waiter of *batch* has its answer: free its slot so the next batch can go,
        and leave its unfinished requests to the client's bounded background set."""
        if batch.settled:
            return
        batch.settled = True
        self._in_flight.discard(batch)
        self._client._adopt([task for task in batch.requests if not task.done()], batch.sealed_bytes)
        batch.requests.clear()
        batch.pushes = []  # background requests hold the sealed copy; the bodies can go
        if self._queue:
            self._schedule_flush()
        self._retire_if_idle()

    def _retire_if_idle(self) -> None:
        if self.idle:
            self._client._retire(self)

    def close(self) -> list[asyncio.Task]:
        """Wake every waiter and cancel all work; the tasks to await."""
        for push in self._queue:
            push.wake()
        self._queue.clear()
        tasks: list[asyncio.Task] = list(self._senders)
        for batch in list(self._in_flight):
            batch.wake_all()
            tasks.extend(batch.requests)
        for task in tasks:
            task.cancel()
        return tasks


def _answered(batch: _Batch, task: asyncio.Task[bool]) -> None:
    batch.answered_by(not task.cancelled() and task.result())


class _PeerStream:
    """The one WebSocket to a peer that carries our batches, dialled on first use and again
    after it drops; answers are matched to requests by id, so many batches share it."""

    def __init__(self, client: "PeerClient", peer: str, max_pending: int) -> None:
        self._client = client
        self.peer = peer
        self._max_pending = max_pending
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[aiohttp.ClientWebSocketResponse | None] | None = None
        self._pending: dict[int, asyncio.Future[bool]] = {}
        self._ids = itertools.count()
        self._last_dial = float("-inf")
        self._closed = False

    async def put(self, sealed: bytes, timeout: float) -> bool:
        """Send one sealed batch; True once the peer says it stored it durably. False on any
        trouble, on refusal, or after *timeout* seconds; never raises except on cancellation."""
        try:
            async with asyncio.timeout(timeout):
                ws = await self._connected()
                if ws is None:
                    return False
                if len(self._pending) >= self._max_pending:
                    log.info("stream to %s has %d requests pending: not sending", self.peer,
                             len(self._pending))
                    return False
                request_id = next(self._ids)
                answer = asyncio.get_running_loop().create_future()
                self._pending[request_id] = answer
                try:
                    await ws.send_bytes(_REQUEST_ID.pack(request_id) + sealed)
                    return await answer
                finally:
                    self._pending.pop(request_id, None)
        except TimeoutError:
            log.debug("push to %s timed out after %.1fs", self.peer, timeout)
            return False
        except Exception as exc:  # network trouble of any kind is just a missing ack
            log.debug("push to %s failed: %r", self.peer, exc)
            return False

    async def _connected(self) -> aiohttp.ClientWebSocketResponse | None:
        ws = self._ws
        if ws is not None and not ws.closed:
            return ws
        if self._closed:
            return None
        if self._connecting is None:
            loop = asyncio.get_running_loop()
            if loop.time() - self._last_dial < _STREAM_RECONNECT_INTERVAL:
                return None
            self._last_dial = loop.time()
            self._connecting = asyncio.create_task(self._dial())
        # Shielded: one waiter giving up must not cancel the dial the others are waiting on.
        ws = await asyncio.shield(self._connecting)
        if ws is None or ws.closed or ws is not self._ws:
            return None
        return ws

    async def _dial(self) -> aiohttp.ClientWebSocketResponse | None:
        client = self._client
        try:
            ws = await asyncio.wait_for(
                client._http().ws_connect(
                    f"http://{self.peer}{STREAM_ROUTE}",
                    headers={AUTH_HEADER: client._crypto.seal_text(STREAM_CLAIM)},
                    autoping=True,
                    heartbeat=_STREAM_HEARTBEAT,
                    max_msg_size=_ANSWER_SIZE + 1,  # aiohttp's limit is exclusive
                    timeout=aiohttp.ClientWSTimeout(ws_close=_STREAM_CLOSE_TIMEOUT),
                ),
                client._push_timeout,
            )
        except Exception as exc:
            log.debug("stream to %s failed to open: %r", self.peer, exc)
            self._last_dial = asyncio.get_running_loop().time()  # the interval runs from here
            return None
        finally:
            self._connecting = None
        if self._closed:  # close() ran while the handshake finished
            await ws.close(code=WSCloseCode.GOING_AWAY)
            return None
        self._ws = ws
        self._reader = asyncio.create_task(self._read(ws))
        return ws

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        code = WSCloseCode.OK
        try:
            while True:
                msg = await ws.receive()
                if msg.type is not WSMsgType.BINARY:
                    if msg.type is WSMsgType.ERROR:
                        log.debug("stream to %s failed: %r", self.peer, msg.data)
                    elif msg.type not in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                        log.warning("stream to %s sent a %s message", self.peer, msg.type.name)
                        code = WSCloseCode.POLICY_VIOLATION
                    break
                data = msg.data
                if len(data) != _ANSWER_SIZE:
                    log.warning("stream to %s sent a malformed answer", self.peer)
                    code = WSCloseCode.POLICY_VIOLATION
                    break
                (request_id,) = _REQUEST_ID.unpack_from(data)
                answer = self._pending.get(request_id)
                if answer is not None and not answer.done():
                    answer.set_result(data[-1] == STREAM_STORED)
        finally:
            self._drop(ws)  # also on cancellation: close() then closes the socket
        if not ws.closed:
            await ws.close(code=code)

    def _drop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """*ws* is gone: every request on it is answered "no"; the next put dials again."""
        if self._ws is not ws:
            return
        self._ws = None
        self._reader = None
        pending, self._pending = self._pending, {}
        for answer in pending.values():
            if not answer.done():
                answer.set_result(False)

    async def close(self) -> None:
        """Answer every pending request "no", stop dialling and reading, close the socket."""
        self._closed = True
        ws = self._ws
        tasks = [t for t in (self._connecting, self._reader) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        ws = ws or self._ws  # a dial may have finished while we waited
        if ws is not None:
            self._drop(ws)
            await ws.close(code=WSCloseCode.GOING_AWAY)


class PeerClient:
    """Pushes bodies to peers and fetches missing ones; network failures are never raised."""

    def __init__(
        self,
        crypto: PeerCrypto,
        *,
        timeout: float = 10.0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        fetch_timeout: float = 5.0,
        max_background_pushes: int = DEFAULT_MAX_BACKGROUND_PUSHES,
        max_background_bytes: int = DEFAULT_MAX_BACKGROUND_BYTES,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
        max_batches_in_flight: int = DEFAULT_MAX_BATCHES_IN_FLIGHT,
        max_queued_pushes: int = DEFAULT_MAX_QUEUED_PUSHES,
    ) -> None:
        if min(max_batch_items, max_batches_in_flight, max_queued_pushes) < 1:
            raise ValueError("batch, in-flight and queue limits must be at least 1")
        self._crypto = crypto
        # Per batch and peer: dialling plus the answer; a dead or frozen peer is given up on
        # after this long.
        self._push_timeout = timeout
        self._fetch_timeout = aiohttp.ClientTimeout(total=fetch_timeout)
        self._max_body_bytes = max_body_bytes
        self._max_background = max_background_pushes
        self._max_background_bytes = max_background_bytes
        self._background_bytes = 0  # sealed copies held by background requests (one per batch)
        self.max_batch_bytes = max_batch_bytes
        self.max_batch_items = max_batch_items
        self.max_batches_in_flight = max_batches_in_flight
        self.max_queued_pushes = max_queued_pushes
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[bool]] = set()
        self._batchers: dict[tuple[str, ...], _Batcher] = {}
        # One stream per peer address, least recently used first.
        self._streams: collections.OrderedDict[str, _PeerStream] = collections.OrderedDict()
        self._closing_streams: set[asyncio.Task[None]] = set()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    @property
    def background_pushes(self) -> int:
        """Batch requests to a peer still running after every push() waiting on them returned."""
        return len(self._background)

    async def close(self) -> None:
        """Answer waiting pushes, cancel leftover requests, close the peer streams and the
        HTTP session."""
        batchers = list(self._batchers.values())
        self._batchers.clear()
        tasks: list[asyncio.Task] = []
        for batcher in batchers:
            tasks.extend(batcher.close())
        background = list(self._background)
        for task in background:
            task.cancel()
        tasks.extend(background)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._background.clear()
        streams = list(self._streams.values())
        self._streams.clear()
        closing = [asyncio.create_task(stream.close()) for stream in streams]
        closing.extend(self._closing_streams)
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)
        self._closing_streams.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- push ------------------------------------------------------------------------------

    async def push(
        self, digest: str, data: bytes, peers: Sequence[str], need: int, timeout: float
    ) -> int:
        """Send the body to every peer; return the acks gathered once *need* arrived, all
        peers answered, or *timeout* passed. Requests already sent carry on in the background.

        The body joins the next batch to these peers. If that queue is full, the answer is 0
        at once: the channel is saturated, and intake turns that into a 451 (try again later)
        instead of letting work pile up behind a slow peer.
        """
        if not is_digest(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        targets = tuple(sorted(set(peers)))
        if not targets:
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        batcher = self._batchers.get(targets)
        if batcher is None:
            batcher = self._batchers[targets] = _Batcher(self, targets)
        item = _Push(digest, data, need, loop.create_future())
        if not batcher.enqueue(item):
            log.info("body push queue to %s is full (%d): not waiting", ",".join(targets),
                     self.max_queued_pushes)
            return 0
        try:
            remaining = deadline - loop.time()
            if remaining > 0:
                await asyncio.wait({item.woken}, timeout=remaining)
            return item.acks
        finally:
            batcher.forget(item)

    def _retire(self, batcher: _Batcher) -> None:
        # Peer lists change with membership; an idle batcher is dropped and made anew on use.
        if self._batchers.get(batcher.peers) is batcher:
            del self._batchers[batcher.peers]

    def _seal_batch(self, pushes: Sequence[_Push]) -> tuple[bytes | None, list[int]]:
        """Seal the bodies of a batch once for all peers. Bodies a peer
        would refuse are left out, so one bad body cannot cost its batch-mates their acks;
        returns the sealed batch (None if nothing is left) and the indexes left out."""
        refused: list[int] = []
        bodies: list[tuple[str, bytes]] = []
        for i, push in enumerate(pushes):
            if len(push.data) > self._max_body_bytes:
                log.warning("body %s is larger than %d bytes: not pushed", push.digest,
                            self._max_body_bytes)
                refused.append(i)
            elif hashlib.sha256(push.data).hexdigest() != push.digest:
                log.error("body pushed as %s does not match its digest: not pushed", push.digest)
                refused.append(i)
            else:
                bodies.append((push.digest, push.data))
        if not bodies:
            return None, refused
        return self._crypto.seal(pack_batch(bodies)), refused

    @property
    def background_bytes(self) -> int:
        """Bytes of sealed batches that background requests still hold."""
        return self._background_bytes

    def _adopt(self, tasks: list[asyncio.Task[bool]], sealed_bytes: int) -> None:
        """Let one batch's unfinished requests (sharing one sealed copy of *sealed_bytes*) run
        on in the background, as many as the count limit leaves room for and only if the copy
        fits the byte limit; the others are cancelled."""
        room = self._max_background - len(self._background)
        if self._background_bytes + sealed_bytes > self._max_background_bytes:
            room = 0
        kept, dropped = tasks[:max(0, room)], tasks[max(0, room):]
        for task in dropped:
            task.cancel()
        if dropped:
            # Peers that miss a body fetch it by hash when they need it; this only costs latency.
            log.info("dropped %d background batch pushes of %d bytes (limits %d requests, %d bytes)",
                     len(dropped), sealed_bytes, self._max_background, self._max_background_bytes)
        if not kept:
            return
        self._background_bytes += sealed_bytes
        left = len(kept)

        def finished(task: asyncio.Task[bool]) -> None:
            nonlocal left
            self._background.discard(task)
            left -= 1
            if left == 0:  # the last request holding the sealed copy let go of it
                self._background_bytes -= sealed_bytes
        for task in kept:
            self._background.add(task)
            task.add_done_callback(finished)

    async def _put_batch(self, peer: str, sealed: bytes, count: int) -> bool:
        acked = await self._stream(peer).put(sealed, self._push_timeout)
        if not acked:
            log.debug("push of %d bodies to %s not acked", count, peer)
        return acked

    def _stream(self, peer: str) -> _PeerStream:
        stream = self._streams.get(peer)
        if stream is not None:
            self._streams.move_to_end(peer)
            return stream
        # A request is pending only while its batch is in flight or adopted in the background,
        # so a stream fed by one batcher never reaches this; past it a put is answered "no".
        max_pending = self.max_batches_in_flight + self._max_background
        stream = self._streams[peer] = _PeerStream(self, peer, max_pending)
        if len(self._streams) > _MAX_PEER_STREAMS:
            # A departed member's stream; its pushes, if any, are answered "no".
            _, oldest = self._streams.popitem(last=False)
            task = asyncio.create_task(oldest.close())
            self._closing_streams.add(task)
            task.add_done_callback(self._closing_streams.discard)
        return stream

    # -- probe -----------------------------------------------------------------------------

    async def probe(self, peer: str) -> int:
        """Does `peer` share our secret? An authenticated GET of a body nobody stores: 404 (or 200)
        says yes, 403 says it refused our secret, 0 that it did not answer."""
        digest = hashlib.sha256(b"raftmail peer probe").hexdigest()
        auth = self._crypto.seal_text(b"GET " + digest.encode("ascii"))
        try:
            async with self._http().get(_body_url(peer, digest), headers={AUTH_HEADER: auth},
                                        timeout=self._fetch_timeout) as resp:
                return resp.status
        except Exception:
            return 0

    # -- fetch -----------------------------------------------------------------------------

    async def fetch(self, digest: str, peers: Sequence[str]) -> bytes | None:
        """The body with *digest* from the first peer that has it (verified), else None."""
        if not is_digest(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        session = self._http()
        for peer in dict.fromkeys(peers):
            data = await self._get_one(session, peer, digest)
            if data is not None:
                return data
        return None

    async def _get_one(
        self, session: aiohttp.ClientSession, peer: str, digest: str
    ) -> bytes | None:
        max_sealed = sealed_size(self._max_body_bytes)
        auth = self._crypto.seal_text(b"GET " + digest.encode("ascii"))
        try:
            async with session.get(
                _body_url(peer, digest), headers={AUTH_HEADER: auth}, timeout=self._fetch_timeout
            ) as resp:
                if resp.status != 200:
                    log.debug("fetch of body %s from %s answered %d", digest, peer, resp.status)
                    return None
                if resp.content_length is not None and resp.content_length > max_sealed:
                    log.warning("peer %s offered body %s larger than the limit", peer, digest)
                    return None
                token = await _read_limited(resp.content, max_sealed)
        except Exception as exc:  # network trouble of any kind: try the next peer
            log.debug("fetch of body %s from %s failed: %r", digest, peer, exc)
            return None
        if token is None:
            log.warning("peer %s sent body %s larger than the limit", peer, digest)
            return None
        try:
            data = await _off_loop_if_large(len(token), self._open_body, token, digest)
        except PeerAuthError:
            log.warning("peer %s sent body %s sealed under a different key", peer, digest)
            return None
        if data is None:
            log.warning("peer %s sent a body that does not match %s", peer, digest)
        return data

    def _open_body(self, token: bytes, digest: str) -> bytes | None:
        data = self._crypto.open(token)
        return data if hashlib.sha256(data).hexdigest() == digest else None
