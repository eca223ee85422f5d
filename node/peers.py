"""Peer channel for message bodies.

Before a submission's metadata is proposed to Raft, the intake node pushes the body to its
peers; a node missing a body later fetches it by hash. Both go over plain HTTP on each node's
admin address, with every payload sealed (AES-GCM) under a key derived from the cluster secret,
so only cluster members can store, read, or even ask for bodies.

Pushes are grouped like a group commit: a body pushed while earlier batches are still on their
way waits for the next batch, and each batch is sealed once and sent as one PUT per peer. Under
load the HTTP, crypto and thread-hop cost is paid per batch instead of per body; when the
channel is idle a body goes out at once, alone, with no added latency.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import logging
import time
from functools import partial
from typing import Any, Callable, Iterable, Sequence, TypeVar

import aiohttp
import msgpack
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from raftmail.consensus.seal import SealError, Sealer, sealed_size
from raftmail.node.bodies import BodyStore, is_digest

log = logging.getLogger(__name__)
_T = TypeVar("_T")

PURPOSE = b"raftmail peer channel v1"
AUTH_HEADER = "X-Raftmail-Auth"
BODY_ROUTE = "/peer/bodies/{digest}"  # GET: fetch one body by hash
BATCH_ROUTE = "/peer/bodies"  # PUT: store a sealed batch of bodies
DEFAULT_TOKEN_TTL = 300.0
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
DEFAULT_MAX_BACKGROUND_PUSHES = 256
DEFAULT_MAX_BATCH_BYTES = 4 * 2**20
DEFAULT_MAX_BATCH_ITEMS = 256
DEFAULT_MAX_BATCHES_IN_FLIGHT = 4
DEFAULT_MAX_QUEUED_PUSHES = 1024
_READ_CHUNK = 1 << 16
# msgpack framing of one [digest, body] pair: array header, str8 header + 64 hex, bin32 header.
_ITEM_OVERHEAD = 1 + 2 + 64 + 5
_BATCH_OVERHEAD = 5  # the outer array32 header
_MAX_CLOCK_SKEW = 60.0  # a token stamped further ahead than this is refused
# Sealing, opening and hashing this much is tens of microseconds: cheaper on the event loop
# than a thread hand-off. Bigger payloads go to a thread so the loop never stalls on them.
_INLINE_CRYPTO_BYTES = 64 * 1024


class PeerAuthError(Exception):
    """A sealed token was forged, sealed under another key, malformed, or expired."""


class PeerCrypto:
    """Seals and opens peer-channel payloads with a key derived from the cluster secret (AES-GCM,
    consensus/seal.py; a Fernet token cost 35x more CPU), with a freshness bound on opening."""

    VERSION = 0x50

    def __init__(self, secret: str, cluster_name: str) -> None:
        if not secret:
            raise ValueError("the peer channel needs a non-empty cluster secret")
        binding = PURPOSE + b"\x00cluster=" + cluster_name.encode("utf-8")
        # Binding both salt and info to the cluster and purpose keeps this key distinct from
        # any other key derived from the same secret, and from other clusters sharing a secret.
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=hashlib.sha256(binding).digest(),
            info=binding,
        )
        self._sealer = Sealer(hkdf.derive(secret.encode("utf-8")), version=self.VERSION, purpose=PURPOSE)

    def seal(self, data: bytes) -> bytes:
        return self._sealer.seal(data, int(time.time()))

    def seal_text(self, data: bytes) -> str:
        """A sealed token as text, for an HTTP header; open() takes it back as a str."""
        return base64.urlsafe_b64encode(self.seal(data)).decode("ascii")

    def open(self, token: bytes | str, *, ttl: float = DEFAULT_TOKEN_TTL) -> bytes:
        """The plaintext of *token* (bytes, or the text form from seal_text) if it was sealed
        under this cluster's key at most *ttl* seconds ago; PeerAuthError otherwise."""
        try:
            if isinstance(token, str):
                token = base64.urlsafe_b64decode(token.encode("ascii"))
        except (TypeError, ValueError) as exc:
            raise PeerAuthError("peer token is not base64") from exc
        try:
            stamp, plain = self._sealer.open(token)
        except SealError as exc:
            raise PeerAuthError(f"peer token rejected: {exc}") from None
        now = time.time()
        if stamp + ttl < now or stamp > now + _MAX_CLOCK_SKEW:
            raise PeerAuthError("peer token expired or from the future")
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


def _batch_url(peer: str) -> str:
    return f"http://{peer}{BATCH_ROUTE}"


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
) -> None:
    """Serve PUT /peer/bodies (a sealed batch) and GET /peer/bodies/{digest} on *app*.

    The request body is streamed with its own limit, so the app's client_max_size does not
    need to be raised for large bodies. *max_batch_bytes* and *max_batch_items* must be at
    least the pushing PeerClient's, or its full batches are refused as too large.
    """
    max_sealed = batch_sealed_limit(max_body_bytes, max_batch_bytes, max_batch_items)

    def refuse(request: web.Request, why: str) -> web.Response:
        peer_ip = request.remote or "unknown"
        log.warning("peer request from %s refused: %s", peer_ip, why)
        if on_auth_failure is not None:
            try:
                on_auth_failure(peer_ip)
            except Exception:
                log.exception("on_auth_failure callback failed")
        return web.Response(status=403, text="forbidden\n")

    def receive(token: bytes) -> tuple[int, str]:
        """Open, check and store one batch: (HTTP status, reason). One thread hop in all."""
        bodies = unpack_batch(crypto.open(token))
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

    async def put_batch(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > max_sealed:
            return web.Response(status=413, text="batch too large\n")
        token = await _read_limited(request.content, max_sealed)
        if token is None:
            return web.Response(status=413, text="batch too large\n")
        try:
            status, why = await asyncio.to_thread(receive, token)
        except PeerAuthError:
            return refuse(request, "bad sealed batch")
        if status == 204:
            return web.Response(status=204)
        return web.Response(status=status, text=why + "\n")

    async def get_body(request: web.Request) -> web.Response:
        digest = request.match_info["digest"]
        header = request.headers.get(AUTH_HEADER)
        if header is None:
            return refuse(request, f"GET {digest[:80]!r} without {AUTH_HEADER}")
        try:
            claim = crypto.open(header)
        except PeerAuthError:
            return refuse(request, f"bad {AUTH_HEADER} for GET {digest[:80]!r}")
        # The token names the digest, so a captured header cannot be replayed for another body.
        if claim != b"GET " + digest.encode("utf-8", "replace"):
            return refuse(request, f"{AUTH_HEADER} does not match GET {digest[:80]!r}")
        if not is_digest(digest):
            return web.Response(status=400, text="malformed digest\n")
        data = await asyncio.to_thread(store.get, digest)
        if data is None:
            return web.Response(status=404, text="no such body\n")
        sealed = await _off_loop_if_large(len(data), crypto.seal, data)
        return web.Response(status=200, body=sealed, content_type="application/octet-stream")

    app.router.add_put(BATCH_ROUTE, put_batch)
    app.router.add_get(BODY_ROUTE, get_body)


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
    """Bodies sealed together and PUT to every peer; each peer's 204 acks them all."""

    def __init__(self, pushes: list[_Push], peers: int) -> None:
        self.pushes = pushes
        self.peers = peers
        self.acks = 0
        self.answered = 0
        self.waiting = len(pushes)  # push() calls that have not returned yet
        self.requests: set[asyncio.Task[bool]] = set()
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
            session = client._http()
            for peer in self.peers:
                task = asyncio.create_task(
                    client._put_batch(session, peer, sealed, len(batch.pushes))
                )
                task.add_done_callback(partial(_answered, batch))
                batch.requests.add(task)
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
        self._client._adopt(task for task in batch.requests if not task.done())
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
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
        max_batches_in_flight: int = DEFAULT_MAX_BATCHES_IN_FLIGHT,
        max_queued_pushes: int = DEFAULT_MAX_QUEUED_PUSHES,
    ) -> None:
        if min(max_batch_items, max_batches_in_flight, max_queued_pushes) < 1:
            raise ValueError("batch, in-flight and queue limits must be at least 1")
        self._crypto = crypto
        # Per request: a batch PUT to a dead or frozen peer gives up after this long.
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._fetch_timeout = aiohttp.ClientTimeout(total=fetch_timeout)
        self._max_body_bytes = max_body_bytes
        self._max_background = max_background_pushes
        self.max_batch_bytes = max_batch_bytes
        self.max_batch_items = max_batch_items
        self.max_batches_in_flight = max_batches_in_flight
        self.max_queued_pushes = max_queued_pushes
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[bool]] = set()
        self._batchers: dict[tuple[str, ...], _Batcher] = {}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    @property
    def background_pushes(self) -> int:
        """Batch requests to a peer still running after every push() waiting on them returned."""
        return len(self._background)

    async def close(self) -> None:
        """Answer waiting pushes, cancel leftover requests and close the HTTP session."""
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

    def _adopt(self, tasks: Iterable[asyncio.Task[bool]]) -> None:
        dropped = 0
        for task in tasks:
            if len(self._background) >= self._max_background:
                task.cancel()
                dropped += 1
                continue
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        if dropped:
            # Peers that miss a body fetch it by hash when they need it; this only costs latency.
            log.info("dropped %d background batch pushes (limit %d)", dropped,
                     self._max_background)

    async def _put_batch(
        self, session: aiohttp.ClientSession, peer: str, sealed: bytes, count: int
    ) -> bool:
        try:
            async with session.put(
                _batch_url(peer),
                data=sealed,
                headers={"Content-Type": "application/octet-stream"},
                timeout=self._timeout,
            ) as resp:
                if resp.status == 204:
                    return True
                log.debug("push of %d bodies to %s answered %d", count, peer, resp.status)
                return False
        except Exception as exc:  # network trouble of any kind is just a missing ack
            log.debug("push of %d bodies to %s failed: %r", count, peer, exc)
            return False

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
