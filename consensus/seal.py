"""AES-GCM sealing under a key derived from the cluster secret: the Raft port's frames and the
peer channel's bodies both use it, each under its own master key.

Nonces never repeat under one key: each process (and each fork child) seals under its own
subkey, HKDF(master key, a random 16-byte salt), with a counter as the nonce. The salt travels in
the token's header; a receiver derives the sender's subkey from it and caches it (bounded, and only
once a token authenticated). The header, timestamp included, is the associated data.
Token: version(1) | timestamp(8) | salt(16) | nonce(12) | ciphertext | tag(16).
"""
from __future__ import annotations

import itertools
import os
import struct
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HEADER = struct.Struct(">BQ16s12s")  # version, timestamp, salt, nonce
TAG_SIZE = 16
MAX_PEER_KEYS = 64  # cached subkeys of senders; peers restart, so old salts age out


class SealError(Exception):
    """A token that is not ours: malformed, another version, forged, or sealed under another key."""


class Sealer:
    """Seals and opens tokens under one master key; thread-safe and fork-safe."""

    def __init__(self, master: bytes, *, version: int, purpose: bytes) -> None:
        self._master = master
        self._version = version
        self._purpose = purpose
        self._peer_keys: dict[bytes, AESGCM] = {}
        self._lock = threading.Lock()
        self._rekey()

    def _rekey(self) -> None:
        # Also after a fork: parent and child must not continue one counter under one subkey.
        self._pid = os.getpid()
        self._salt = os.urandom(16)
        self._mine = AESGCM(self._subkey(self._salt))
        self._nonces = itertools.count()
        self._peer_keys[self._salt] = self._mine

    def _subkey(self, salt: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                    info=self._purpose + b" subkey").derive(self._master)

    def seal(self, data: bytes, stamp: int) -> bytes:
        with self._lock:  # a nonce is handed out once, whichever thread seals
            if self._pid != os.getpid():
                self._rekey()
            key, salt, counter = self._mine, self._salt, next(self._nonces)
        header = HEADER.pack(self._version, max(0, stamp), salt, counter.to_bytes(12, "big"))
        return header + key.encrypt(header[-12:], data, header)

    def open(self, token: bytes) -> tuple[int, bytes]:
        """(timestamp, plaintext) of a token sealed under our master key; SealError otherwise."""
        size = HEADER.size
        if len(token) < size + TAG_SIZE or token[0] != self._version:
            raise SealError("not a token of this kind")
        _, stamp, salt, nonce = HEADER.unpack_from(token)
        known = self._peer_keys.get(salt)
        key = known if known is not None else AESGCM(self._subkey(salt))
        try:
            # memoryview: the ciphertext is not copied out of a large token.
            plain = key.decrypt(nonce, memoryview(token)[size:], memoryview(token)[:size])
        except InvalidTag:
            raise SealError("token failed authentication") from None
        if known is None:  # only authenticated senders are cached
            with self._lock:
                if len(self._peer_keys) >= MAX_PEER_KEYS:
                    self._peer_keys.pop(next(iter(self._peer_keys)), None)
                self._peer_keys[salt] = key
        return stamp, plain


def sealed_size(plain_size: int) -> int:
    """Length of the token sealing *plain_size* bytes."""
    return HEADER.size + plain_size + TAG_SIZE
