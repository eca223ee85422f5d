"""The peer channel's server side: the routes other nodes push bodies to and fetch them from."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable

from aiohttp import WSCloseCode, WSMsgType, web

from raftmail.consensus.seal import ReplayGuard
from raftmail.node.bodies import BodyStore, is_digest
from raftmail.node.peer_wire import (AUTH_HEADER, BODY_ROUTE, DEFAULT_MAX_BATCH_BYTES,
                                     DEFAULT_MAX_BATCH_ITEMS, DEFAULT_MAX_PEER_REQUESTS,
                                     DEFAULT_REPLAY_ENTRIES, DEFAULT_TOKEN_TTL, PeerAuthError, PeerCrypto,
                                     STREAM_CLAIM, STREAM_MAX_IN_PROGRESS, STREAM_REFUSED, STREAM_ROUTE,
                                     STREAM_STORED, _MAX_CLOCK_SKEW, _MAX_LOGGED_SOURCES,
                                     _REFUSAL_LOG_INTERVAL, _REQUEST_ID, _STREAM_CLOSE_TIMEOUT,
                                     _STREAM_HEARTBEAT, _off_loop_if_large, batch_sealed_limit, unpack_batch)

log = logging.getLogger("raftmail.node.peers")  # one logger for the whole peer channel


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
