"""Body pushes grouped into batches and sent over one persistent WebSocket per peer."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from functools import partial
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import WSCloseCode, WSMsgType

from raftmail.node.peer_wire import (AUTH_HEADER, STREAM_CLAIM, STREAM_ROUTE, STREAM_STORED, _ANSWER_SIZE,
                                     _REQUEST_ID, _STREAM_CLOSE_TIMEOUT, _STREAM_HEARTBEAT,
                                     _STREAM_RECONNECT_INTERVAL, _off_loop_if_large)

if TYPE_CHECKING:
    from raftmail.node.peer_client import PeerClient

log = logging.getLogger("raftmail.node.peers")  # one logger for the whole peer channel


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
