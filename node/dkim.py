"""DKIM signing keyed by the sending domain: each brand's mail is signed with its own key, so it
aligns with its `From:` domain for DMARC.

`[[delivery.dkim]]` entries name a signing domain (d=), a selector (s=) and a key file; the key's
type picks the algorithm (RSA: rsa-sha256; Ed25519: ed25519-sha256, RFC 8463). A message is signed
with every entry of the most specific domain that is its From: domain or a parent of it (relaxed
alignment), so two entries of one domain (an RSA and an Ed25519 key) give two signatures, which is
how RFC 8463 asks Ed25519 to be deployed. Entries marked `default` sign mail whose From: domain
has no entry of its own.

Keys are read from their files again when a file changes (mtime or size), and a file that does not
hold a valid key leaves the key read before in use, so a key being rewritten is never used half
written. A new selector needs a new entry: `SIGHUP` makes a node read its `[[delivery.dkim]]`
entries again (node/runtime.py), without a restart.
"""
from __future__ import annotations

import base64
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from raftmail.node.config_types import DkimSection
from raftmail.node.content import from_domain
from raftmail.node.message import _header_fields, _line_ending, _split_header_block

log = logging.getLogger(__name__)

# Headers the DKIM signature covers when present (RFC 8058 requires the two List-Unsubscribe ones).
DKIM_HEADERS: tuple[bytes, ...] = (
    b"from",
    b"subject",
    b"date",
    b"message-id",
    b"to",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"feedback-id",
)
RSA_ALGORITHM = b"rsa-sha256"
ED25519_ALGORITHM = b"ed25519-sha256"
MIN_RSA_BITS = 1024  # receivers ignore shorter keys (RFC 8301); 2048 is what keygen makes


@dataclass(frozen=True)
class SigningKey:
    """A private key as dkimpy takes it, its algorithm, and the public half for DNS."""

    algorithm: bytes
    private: bytes  # PKCS#1 PEM (RSA) or the base64 of the 32-byte seed (Ed25519)
    public_txt: str  # the p= value of the DNS record


def load_signing_key(pem: bytes) -> SigningKey:
    """Parse a PEM private key (RSA in PKCS#1 or PKCS#8, Ed25519 in PKCS#8); ValueError otherwise."""
    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits: receivers ignore keys under {MIN_RSA_BITS}")
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return SigningKey(RSA_ALGORITHM, private, base64.b64encode(public).decode())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return SigningKey(ED25519_ALGORITHM, base64.b64encode(seed), base64.b64encode(public).decode())
    raise ValueError(f"a DKIM key must be RSA or Ed25519, not {type(key).__name__}")


def dns_record(domain: str, selector: str, key: SigningKey) -> tuple[str, str]:
    """The TXT record that publishes `key`: (name, value)."""
    kind = "rsa" if key.algorithm == RSA_ALGORITHM else "ed25519"
    return f"{selector}._domainkey.{domain}", f"v=DKIM1; k={kind}; p={key.public_txt}"


def new_private_key_pem(algorithm: str, rsa_bits: int = 2048) -> bytes:
    """A new private key in PKCS#8 PEM: "rsa" or "ed25519"."""
    if algorithm == "rsa":
        key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = rsa.generate_private_key(65537, rsa_bits)
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"algorithm must be rsa or ed25519, got {algorithm!r}")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class _KeyFile:
    """One key file, read again when it changes; a bad rewrite keeps the key read before."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None
        self.key = self._read(first=True)

    def _read(self, first: bool = False) -> SigningKey:
        st = os.stat(self.path)
        self._seen = (st.st_mtime_ns, st.st_size)
        try:
            return load_signing_key(self.path.read_bytes())
        except (OSError, ValueError, TypeError) as e:
            if first:
                raise ValueError(f"{self.path}: {e}") from None
            log.error("DKIM key %s changed but does not hold a valid key (%s): still signing with the "
                      "key read before", self.path, e)
            return self.key

    def current(self) -> SigningKey:
        try:
            st = os.stat(self.path)
        except OSError as e:
            if self._seen is not None:
                log.error("DKIM key %s cannot be read (%s): still signing with the key read before",
                          self.path, e.strerror)
                self._seen = None
            return self.key
        if (st.st_mtime_ns, st.st_size) != self._seen:
            self.key = self._read()
        return self.key


@dataclass(frozen=True)
class _Entry:
    domain: str
    selector: str
    key_file: _KeyFile
    default: bool


class DkimKeyring:
    """Signs each rendered copy with the keys of its From: domain (see the module's docstring)."""

    def __init__(self, entries: Sequence[DkimSection]) -> None:
        self._entries = [_Entry(e.domain, e.selector, _KeyFile(e.key_file), e.default) for e in entries]

    def entries_for(self, sender_domain: str) -> list[_Entry]:
        """Every entry of the most specific domain that is `sender_domain` or a parent of it;
        else the default entries."""
        best = [e for e in self._entries if sender_domain == e.domain or sender_domain.endswith("." + e.domain)]
        if best:
            longest = max(len(e.domain) for e in best)
            return [e for e in best if len(e.domain) == longest]
        return [e for e in self._entries if e.default]

    def sign(self, message: bytes) -> bytes:
        """The DKIM-Signature headers for `message` (each folded, ending with its line ending);
        b"" when no entry applies."""
        header_lines, _ = _split_header_block(message)
        present = Counter(name for name, _ in _header_fields(header_lines) if name in DKIM_HEADERS)
        if not present[b"from"]:
            # RFC 5322 requires one, DMARC aligns on it, and receivers refuse mail without it.
            raise ValueError("cannot DKIM-sign a message without a From header")
        crlf = _to_crlf(message)  # the signature covers the bytes as they go over SMTP
        entries = self.entries_for(from_domain(crlf))
        if not entries:
            return b""
        eol = _line_ending(message)
        # Each present instance is listed once so a duplicated header stays covered.
        include = [name for name in DKIM_HEADERS for _ in range(present[name])]
        signatures = []
        for e in entries:
            key = e.key_file.current()
            signatures.append(dkimpy.sign(crlf, e.selector.encode(), e.domain.encode(), key.private,
                                          canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=key.algorithm,
                                          include_headers=include, linesep=eol))
        return b"".join(signatures)


def _to_crlf(message: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", message)
