"""The peer channel's client: push a body to a majority, fetch one by hash, probe a peer."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
from typing import Sequence

import aiohttp
from raftmail.consensus.seal import sealed_size
from raftmail.node.bodies import is_digest
from raftmail.node.peer_wire import (AUTH_HEADER, DEFAULT_MAX_BACKGROUND_BYTES, DEFAULT_MAX_BACKGROUND_PUSHES,
                                     DEFAULT_MAX_BATCHES_IN_FLIGHT, DEFAULT_MAX_BATCH_BYTES,
                                     DEFAULT_MAX_BATCH_ITEMS, DEFAULT_MAX_BODY_BYTES,
                                     DEFAULT_MAX_QUEUED_PUSHES, PeerAuthError, PeerCrypto, _MAX_PEER_STREAMS,
                                     _body_url, _off_loop_if_large, _read_limited, pack_batch)
from raftmail.node.peer_stream import (_Batcher, _PeerStream, _Push)

log = logging.getLogger("raftmail.node.peers")  # one logger for the whole peer channel


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
