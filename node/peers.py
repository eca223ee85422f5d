"""Peer channel for message bodies.

Before a submission's metadata is proposed to Raft, the intake node pushes the body to its
peers; a node missing a body later fetches it by hash. Both go over plain HTTP on each node's
admin address, with every payload sealed by Fernet under a key derived from the cluster secret,
so only cluster members can store, read, or even ask for bodies.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
from typing import Callable, Iterable, Sequence

import aiohttp
from aiohttp import web
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from raftmail.node.bodies import BodyStore, is_digest

log = logging.getLogger(__name__)

PURPOSE = b"raftmail peer channel v1"
AUTH_HEADER = "X-Raftmail-Auth"
BODY_ROUTE = "/peer/bodies/{digest}"
DEFAULT_TOKEN_TTL = 300.0
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
DEFAULT_MAX_BACKGROUND_PUSHES = 256
_READ_CHUNK = 1 << 16


class PeerAuthError(Exception):
    """A sealed token was forged, sealed under another key, malformed, or expired."""


class PeerCrypto:
    """Seals and opens peer-channel payloads with a key derived from the cluster secret."""

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
        self._fernet = Fernet(base64.urlsafe_b64encode(hkdf.derive(secret.encode("utf-8"))))

    def seal(self, data: bytes) -> bytes:
        return self._fernet.encrypt(data)

    def open(self, token: bytes, *, ttl: float = DEFAULT_TOKEN_TTL) -> bytes:
        try:
            if isinstance(token, str):
                token = token.encode("ascii")
            return self._fernet.decrypt(token, ttl=ttl)
        except (InvalidToken, TypeError, ValueError) as exc:
            raise PeerAuthError("peer token rejected") from exc


def sealed_size(plain_size: int) -> int:
    """Length of the Fernet token sealing *plain_size* bytes: the wire limit for a body."""
    # version(1) + timestamp(8) + iv(16) + PKCS7-padded ciphertext + hmac(32), base64url.
    raw = 1 + 8 + 16 + (plain_size // 16 + 1) * 16 + 32
    return 4 * math.ceil(raw / 3)


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


# -- server side ---------------------------------------------------------------------------


def add_peer_routes(
    app: web.Application,
    store: BodyStore,
    crypto: PeerCrypto,
    *,
    max_body_bytes: int,
    on_auth_failure: Callable[[str], None] | None = None,
) -> None:
    """Serve PUT/GET /peer/bodies/{digest} on *app*.

    The request body is streamed with its own limit, so the app's client_max_size does not
    need to be raised for large bodies.
    """
    max_sealed = sealed_size(max_body_bytes)

    def refuse(request: web.Request, why: str) -> web.Response:
        peer_ip = request.remote or "unknown"
        log.warning("peer request from %s refused: %s", peer_ip, why)
        if on_auth_failure is not None:
            try:
                on_auth_failure(peer_ip)
            except Exception:
                log.exception("on_auth_failure callback failed")
        return web.Response(status=403, text="forbidden\n")

    async def put_body(request: web.Request) -> web.Response:
        digest = request.match_info["digest"]
        if request.content_length is not None and request.content_length > max_sealed:
            return web.Response(status=413, text="body too large\n")
        token = await _read_limited(request.content, max_sealed)
        if token is None:
            return web.Response(status=413, text="body too large\n")
        try:
            data = await asyncio.to_thread(crypto.open, token)
        except PeerAuthError:
            return refuse(request, f"bad sealed body for PUT {digest[:80]!r}")
        if not is_digest(digest):
            return web.Response(status=400, text="malformed digest\n")
        if len(data) > max_body_bytes:
            return web.Response(status=413, text="body too large\n")
        try:
            await asyncio.to_thread(store.put_verified, digest, data)
        except ValueError:
            return web.Response(status=400, text="body does not match digest\n")
        except OSError:
            log.exception("storing pushed body %s failed", digest)
            return web.Response(status=500, text="storage error\n")
        return web.Response(status=204)

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
        sealed = await asyncio.to_thread(crypto.seal, data)
        return web.Response(status=200, body=sealed, content_type="application/octet-stream")

    app.router.add_put(BODY_ROUTE, put_body)
    app.router.add_get(BODY_ROUTE, get_body)


# -- client side ---------------------------------------------------------------------------


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
    ) -> None:
        self._crypto = crypto
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._fetch_timeout = aiohttp.ClientTimeout(total=fetch_timeout)
        self._max_body_bytes = max_body_bytes
        self._max_background = max_background_pushes
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[bool]] = set()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    @property
    def background_pushes(self) -> int:
        """Pushes still running after their push() call returned."""
        return len(self._background)

    async def close(self) -> None:
        """Cancel leftover background pushes and close the HTTP session."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- push ------------------------------------------------------------------------------

    async def push(
        self, digest: str, data: bytes, peers: Sequence[str], need: int, timeout: float
    ) -> int:
        """Send the body to every peer; return the acks gathered once *need* arrived, all
        peers answered, or *timeout* passed. Unfinished pushes carry on in the background."""
        if not is_digest(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        targets = list(dict.fromkeys(peers))
        if not targets:
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        sealed = await asyncio.to_thread(self._crypto.seal, data)
        session = self._http()
        pending = {
            asyncio.create_task(self._put_one(session, peer, digest, sealed)) for peer in targets
        }
        acks = 0
        try:
            while pending and acks < need:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                done, pending = await asyncio.wait(
                    pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                acks += sum(1 for task in done if _acked(task))
        finally:
            # Also on cancellation of the caller: the body should still reach every peer.
            self._adopt(pending)
        return acks

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
            log.info("dropped %d background body pushes (limit %d)", dropped, self._max_background)

    async def _put_one(
        self, session: aiohttp.ClientSession, peer: str, digest: str, sealed: bytes
    ) -> bool:
        try:
            async with session.put(
                _body_url(peer, digest),
                data=sealed,
                headers={"Content-Type": "application/octet-stream"},
                timeout=self._timeout,
            ) as resp:
                if resp.status == 204:
                    return True
                log.debug("push of body %s to %s answered %d", digest, peer, resp.status)
                return False
        except Exception as exc:  # network trouble of any kind is just a missing ack
            log.debug("push of body %s to %s failed: %r", digest, peer, exc)
            return False

    # -- probe -----------------------------------------------------------------------------

    async def probe(self, peer: str) -> int:
        """Does `peer` share our secret? An authenticated GET of a body nobody stores: 404 (or 200)
        says yes, 403 says it refused our secret, 0 that it did not answer."""
        digest = hashlib.sha256(b"raftmail peer probe").hexdigest()
        auth = self._crypto.seal(b"GET " + digest.encode("ascii")).decode("ascii")
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
        auth = self._crypto.seal(b"GET " + digest.encode("ascii")).decode("ascii")
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
            data = await asyncio.to_thread(self._open_body, token, digest)
        except PeerAuthError:
            log.warning("peer %s sent body %s sealed under a different key", peer, digest)
            return None
        if data is None:
            log.warning("peer %s sent a body that does not match %s", peer, digest)
        return data

    def _open_body(self, token: bytes, digest: str) -> bytes | None:
        # Decrypting and hashing a large body is CPU work; it runs off the event loop.
        data = self._crypto.open(token)
        return data if hashlib.sha256(data).hexdigest() == digest else None


def _acked(task: asyncio.Task[bool]) -> bool:
    return not task.cancelled() and task.result()
