"""The peer channel's wire format: keys and sealing, batch framing, limits. (The channel as a whole:
peer_server.py serves it, peer_stream.py and peer_client.py use it.)


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
import logging
import struct
import time
from typing import Any, Callable, Iterable, TypeVar

import aiohttp
import msgpack

from raftmail.consensus.seal import ReplayGuard, SealError, Sealer, derive_key, sealed_size
from raftmail.node.bodies import is_digest

log = logging.getLogger("raftmail.node.peers")  # one logger for the whole peer channel
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
