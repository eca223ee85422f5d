"""DKIM keyed by the sending domain: per-brand keys, RSA and Ed25519 side by side, the default
entry, parent-domain alignment, and keys rewritten in place."""
from __future__ import annotations

import os
from pathlib import Path

import dkim
import pytest

from raftmail.node.config_types import DkimSection
from raftmail.node.dkim import DkimKeyring, dns_record, load_signing_key, new_private_key_pem

pytestmark = pytest.mark.timeout(60)


def message(sender: str) -> bytes:
    return (f"From: Shop <{sender}>\r\nTo: reader@example.org\r\nSubject: Spring\r\n"
            "Message-ID: <m1@x>\r\n\r\nHello reader\r\n").encode()


class Dns:
    """TXT records by name, as dkimpy's dnsfunc asks for them."""

    def __init__(self) -> None:
        self.records: dict[bytes, bytes] = {}

    def publish(self, domain: str, selector: str, key_file: Path) -> None:
        name, value = dns_record(domain, selector, load_signing_key(key_file.read_bytes()))
        self.records[name.encode() + b"."] = value.encode()

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        return self.records.get(name)


def key(tmp_path: Path, name: str, algorithm: str) -> Path:
    path = tmp_path / f"{name}.pem"
    path.write_bytes(new_private_key_pem(algorithm))
    return path


def signatures(signed: bytes, dns: Dns) -> list[tuple[bytes, bytes, bytes, bool]]:
    """(d=, s=, a=, verifies) of every DKIM-Signature, in order."""
    d = dkim.DKIM(signed)
    found = []
    for idx in range(signed.count(b"DKIM-Signature:")):
        try:
            ok = bool(d.verify(idx=idx, dnsfunc=dns))
        except Exception:  # dkimpy raises for some failures (body hash, a key of the wrong kind)
            ok = False
        f = d.signature_fields
        found.append((f[b"d"], f[b"s"], f[b"a"], ok))
    return found


@pytest.fixture
def brands(tmp_path: Path) -> tuple[DkimKeyring, Dns]:
    dns = Dns()
    entries = [DkimSection("brand-one.example", "r2026", key(tmp_path, "one-rsa", "rsa"), default=True),
               DkimSection("brand-one.example", "e2026", key(tmp_path, "one-ed", "ed25519"), default=True),
               DkimSection("brand-two.example", "s1", key(tmp_path, "two", "ed25519"))]
    for e in entries:
        dns.publish(e.domain, e.selector, e.key_file)
    return DkimKeyring(entries), dns


def test_each_brand_is_signed_by_its_own_domain_rsa_and_ed25519(brands) -> None:
    ring, dns = brands
    one = message("news@brand-one.example")
    signed = ring.sign(one) + one
    assert signatures(signed, dns) == [(b"brand-one.example", b"r2026", b"rsa-sha256", True),
                                       (b"brand-one.example", b"e2026", b"ed25519-sha256", True)]
    two = message("hello@brand-two.example")
    assert signatures(ring.sign(two) + two, dns) == [(b"brand-two.example", b"s1", b"ed25519-sha256", True)]
    # Tampering breaks every signature.
    tampered = signed.replace(b"Hello reader", b"Hello victim")
    assert [ok for *_, ok in signatures(tampered, dns)] == [False, False]


def test_subdomains_align_with_their_parent_and_others_get_the_default(brands) -> None:
    ring, dns = brands
    sub = message("news@mail.brand-two.example")  # relaxed alignment: a parent's key fits
    assert [s[:2] for s in signatures(ring.sign(sub) + sub, dns)] == [(b"brand-two.example", b"s1")]
    other = message("x@unrelated.example")  # no entry of its own: the default domain's keys
    assert [s[:2] for s in signatures(ring.sign(other) + other, dns)] == [
        (b"brand-one.example", b"r2026"), (b"brand-one.example", b"e2026")]
    lookalike = message("x@notbrand-two.example")  # a suffix, not a parent domain
    assert [s[0] for s in signatures(ring.sign(lookalike) + lookalike, dns)] == [b"brand-one.example"] * 2
    without_default = DkimKeyring([DkimSection("brand-two.example", "s1", ring.entries_for("brand-two.example")[0].key_file.path)])
    assert without_default.sign(other) == b""


def test_a_rewritten_key_file_is_used_and_a_broken_one_is_not(tmp_path: Path) -> None:
    path = key(tmp_path, "k", "ed25519")
    ring = DkimKeyring([DkimSection("brand.example", "s1", path)])
    dns = Dns()
    dns.publish("brand.example", "s1", path)
    msg = message("a@brand.example")
    assert signatures(ring.sign(msg) + msg, dns)[0][3]
    # A new key in the same file (same selector): signed with it from the next message on.
    path.write_bytes(new_private_key_pem("rsa"))
    os.utime(path, ns=(1, 2))  # a different mtime even within the clock's resolution
    assert signatures(ring.sign(msg) + msg, dns)[0][3] is False
    dns.publish("brand.example", "s1", path)
    assert signatures(ring.sign(msg) + msg, dns)[0][2:] == (b"rsa-sha256", True)
    # Half written: the key read before stays in use.
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nMIIE")
    assert signatures(ring.sign(msg) + msg, dns)[0][2:] == (b"rsa-sha256", True)


def test_keys_of_another_kind_are_refused() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(ValueError, match="RSA or Ed25519"):
        load_signing_key(ec_key)
