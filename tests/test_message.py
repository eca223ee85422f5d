"""Per-recipient rendering: header replacement, byte-exact bodies, List-Unsubscribe, Feedback-ID, DKIM."""

import base64
import re

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from raftmail.node.config_types import DkimSection
from raftmail.node.dkim import DkimKeyring
from raftmail.node.message import (
    recipient_message_id,
    render_for_recipient,
)

pytestmark = pytest.mark.timeout(60)


def keyring(tmp_path, key_pem: bytes, default: bool = False) -> DkimKeyring:
    path = tmp_path / f"key-{len(list(tmp_path.iterdir()))}.pem"
    path.write_bytes(key_pem)
    return DkimKeyring([DkimSection(DOMAIN, SELECTOR, path, default)])

DOMAIN = "news.example.com"
SELECTOR = "rm2024"
UNSUB_URL = "https://news.example.com/u/AbCd"

BODY_LINES = [
    b"Return-Path: <old-bounce@elsewhere.example>",
    b"From: Shop <shop@news.example.com>",
    b"To: reader@example.org",
    b"message-id:",
    b"  <folded-old-id@elsewhere.example>",
    b"Subject: Weekly",
    b"\tdeals",
    b"List-Unsubscribe: <https://old.example/unsub>,",
    b" <mailto:old@example>",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=old.example; s=x;",
    b"\tb=AAAA",
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000",
    b"MIME-Version: 1.0",
    b"",
    b"Hello reader,",
    b"Message-ID: <not-a-header-it-is-body@x>",
    b".a line starting with a dot",
    b"",
    b"  trailing spaces kept   ",
    b"",
]


def submitted(eol: bytes) -> bytes:
    return eol.join(BODY_LINES)


def header_block(message: bytes) -> bytes:
    return re.split(rb"\r?\n\r?\n", message, maxsplit=1)[0]


def body_after_headers(message: bytes, eol: bytes) -> bytes:
    return message[message.index(eol + eol) :]


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def txt_record_for(key: rsa.RSAPrivateKey) -> bytes:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def dnsfunc_for(key: rsa.RSAPrivateKey):
    looked_up: list[bytes] = []

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        looked_up.append(name)
        if name == f"{SELECTOR}._domainkey.{DOMAIN}.".encode():
            return txt_record_for(key)
        return None

    dnsfunc.looked_up = looked_up  # type: ignore[attr-defined]
    return dnsfunc


def pem(key, fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def test_message_id_is_stable_and_well_formed() -> None:
    mid = recipient_message_id("sub-7f3a", 42, DOMAIN)
    assert mid == "<sub-7f3a.42.rm@news.example.com>"
    assert recipient_message_id("sub-7f3a", 42, DOMAIN) == mid
    assert recipient_message_id("sub-7f3a", 43, DOMAIN) != mid


@pytest.mark.parametrize(
    ("sid", "index", "domain"),
    [("has space", 1, DOMAIN), ("a<b", 1, DOMAIN), ("ok", -1, DOMAIN), ("ok", 1, "bad domain"), ("ok", 1, "")],
)
def test_message_id_rejects_unsafe_parts(sid: str, index: int, domain: str) -> None:
    with pytest.raises(ValueError):
        recipient_message_id(sid, index, domain)


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_headers_prepended_in_order_and_old_ones_removed(eol: bytes) -> None:
    out = render_for_recipient(
        submitted(eol),
        recipient="reader@example.org",
        message_id="<sub.1.rm@news.example.com>",
        unsubscribe_url=UNSUB_URL,
    )
    lines = header_block(out).split(eol)
    assert lines[:3] == [
        b"Message-ID: <sub.1.rm@news.example.com>",
        b"List-Unsubscribe: <https://news.example.com/u/AbCd>",
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click",
    ]
    headers = header_block(out)
    for gone in (b"old-bounce", b"folded-old-id", b"old.example", b"mailto:old", b"b=AAAA", b"DKIM-Signature"):
        assert gone not in headers
    assert headers.lower().count(b"message-id:") == 1
    assert b"return-path:" not in headers.lower()  # only the final delivery adds one (RFC 5321 4.4)
    # Other headers, including their folded continuation lines, are kept untouched and in order.
    assert lines[3:] == [
        b"From: Shop <shop@news.example.com>",
        b"To: reader@example.org",
        b"Subject: Weekly",
        b"\tdeals",
        b"Date: Mon, 01 Jan 2024 10:00:00 +0000",
        b"MIME-Version: 1.0",
    ]
    assert body_after_headers(out, eol) == body_after_headers(submitted(eol), eol)


def test_crlf_and_lf_are_kept_as_submitted() -> None:
    crlf = render_for_recipient(
        submitted(b"\r\n"), recipient="r@y.example", message_id="<m@x.example>",
        unsubscribe_url=UNSUB_URL,
    )
    lf = render_for_recipient(
        submitted(b"\n"), recipient="r@y.example", message_id="<m@x.example>",
        unsubscribe_url=UNSUB_URL,
    )
    assert re.search(rb"(?<!\r)\n", crlf) is None
    assert b"\r" not in lf
    assert crlf.replace(b"\r\n", b"\n") == lf


def test_without_unsubscribe_url_no_list_headers() -> None:
    out = render_for_recipient(
        submitted(b"\r\n"), recipient="r@y.example", message_id="<m@x.example>"
    )
    assert out.startswith(b"Message-ID: <m@x.example>\r\nFrom: ")
    assert b"list-unsubscribe" not in out.lower()


def test_message_without_body_separator_or_headers() -> None:
    only_headers = b"From: a@x.example\r\nSubject: s\r\n"
    out = render_for_recipient(only_headers, recipient="r@y", message_id="<m@x>")
    assert out == b"Message-ID: <m@x>\r\n" + only_headers
    no_headers = b"\nbody only\n"
    out = render_for_recipient(no_headers, recipient="r@y", message_id="<m@x>")
    assert out == b"Message-ID: <m@x>\n" + no_headers


def test_body_bytes_are_not_reencoded() -> None:
    raw = (
        b"From: a@x.example\r\nContent-Type: text/plain; charset=latin-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xe9 \xff\x00 bytes\r\nno final newline"
    )
    out = render_for_recipient(raw, recipient="r@y", message_id="<m@x>")
    assert out.endswith(raw[raw.index(b"\r\n\r\n") :])


@pytest.mark.parametrize("field", ["message_id", "unsubscribe_url", "unsubscribe_mailto", "feedback_id"])
def test_header_injection_is_refused(field: str) -> None:
    values = dict(recipient="r@y", message_id="<m@x>", unsubscribe_url=UNSUB_URL, unsubscribe_mailto="u1@u.example",
                  feedback_id="c:x")
    values[field] = values[field] + "\r\nBcc: victim@example.org"
    with pytest.raises(ValueError):
        render_for_recipient(submitted(b"\r\n"), **values)


def test_mailto_and_feedback_id_headers() -> None:
    out = render_for_recipient(submitted(b"\r\n").replace(b"MIME-Version", b"Feedback-ID: theirs:1\r\nMIME-Version"),
                               recipient="r@y.example", message_id="<m@x>", unsubscribe_url=UNSUB_URL,
                               unsubscribe_mailto="uabc@unsub.example", feedback_id="spring:acme")
    lines = header_block(out).split(b"\r\n")
    assert lines[1:4] == [b"List-Unsubscribe: <https://news.example.com/u/AbCd>, <mailto:uabc@unsub.example>",
                          b"List-Unsubscribe-Post: List-Unsubscribe=One-Click", b"Feedback-ID: spring:acme"]
    assert b"theirs" not in out
    # mailto alone is no one-click (RFC 8058 needs an HTTPS URI)
    only_mailto = render_for_recipient(submitted(b"\r\n"), recipient="r@y.example", message_id="<m@x>",
                                       unsubscribe_mailto="uabc@unsub.example")
    assert b"List-Unsubscribe: <mailto:uabc@unsub.example>\r\n" in only_mailto
    assert b"List-Unsubscribe-Post" not in only_mailto


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "lf"])
@pytest.mark.parametrize(
    "key_format",
    [serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8],
    ids=["pkcs1", "pkcs8"],
)
def test_dkim_signature_verifies_and_covers_list_unsubscribe(rsa_key, eol, key_format, tmp_path) -> None:
    signer = keyring(tmp_path, pem(rsa_key, key_format))
    out = render_for_recipient(
        submitted(eol),
        recipient="reader@example.org",
        message_id="<sub.1.rm@news.example.com>",
        unsubscribe_url=UNSUB_URL,
        dkim=signer,
    )
    assert out.startswith(b"DKIM-Signature: ")
    assert out.count(b"DKIM-Signature:") == 1
    after_signature = re.split(eol + rb"(?=\S)", out, maxsplit=1)[1]
    assert after_signature.startswith(b"Message-ID: ")
    if eol == b"\n":
        assert b"\r" not in out
    dnsfunc = dnsfunc_for(rsa_key)
    assert dkim.verify(out, dnsfunc=dnsfunc)
    assert dnsfunc.looked_up == [f"{SELECTOR}._domainkey.{DOMAIN}.".encode()]
    signature = dkim.DKIM(out)
    signature.verify(dnsfunc=dnsfunc)
    signed = [h.strip().lower() for h in signature.signature_fields[b"h"].split(b":")]
    assert {b"from", b"subject", b"date", b"message-id", b"to", b"list-unsubscribe", b"list-unsubscribe-post"} == set(signed)
    assert signature.signature_fields[b"c"] == b"relaxed/relaxed"
    assert signature.signature_fields[b"a"] == b"rsa-sha256"


def test_dkim_detects_tampering_with_list_unsubscribe(rsa_key, tmp_path) -> None:
    signer = keyring(tmp_path, pem(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL))
    out = render_for_recipient(
        submitted(b"\r\n"), recipient="reader@example.org",
        message_id="<m@news.example.com>", unsubscribe_url=UNSUB_URL, dkim=signer,
    )
    tampered = out.replace(UNSUB_URL.encode(), b"https://evil.example/u/AbCd")
    assert tampered != out
    assert not dkim.verify(tampered, dnsfunc=dnsfunc_for(rsa_key))
    body_tampered = out.replace(b"Hello reader", b"Hello victim")
    assert not dkim.verify(body_tampered, dnsfunc=dnsfunc_for(rsa_key))


def test_dkim_signs_only_headers_present(rsa_key, tmp_path) -> None:
    signer = keyring(tmp_path, pem(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL))
    plain = b"From: a@news.example.com\r\nSubject: hi\r\n\r\nbody\r\n"
    out = render_for_recipient(plain, recipient="r@y", message_id="<m@x>", dkim=signer)
    signature = dkim.DKIM(out)
    assert signature.verify(dnsfunc=dnsfunc_for(rsa_key))
    signed = {h.strip().lower() for h in signature.signature_fields[b"h"].split(b":")}
    assert signed == {b"from", b"subject", b"message-id"}


def test_dkim_refuses_message_without_from_and_an_ec_key(rsa_key, tmp_path) -> None:
    signer = keyring(tmp_path, pem(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL))
    with pytest.raises(ValueError):
        signer.sign(b"Subject: no from\r\n\r\nbody\r\n")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError):
        keyring(tmp_path, pem(ec_key, serialization.PrivateFormat.PKCS8))


def test_seven_bit_copy_re_encodes_8bit_parts_and_signs_again(rsa_key, tmp_path) -> None:
    from email import message_from_bytes, policy

    from raftmail.node.message import seven_bit_copy
    html = "<p>Grüße — très bien</p>\n"
    text = "Grüße — très bien\n"
    submitted_8bit = (
        "From: Shop <shop@news.example.com>\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="b1"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n'
        "--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        f"{text}\r\n--b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        f"{html}\r\n--b1--\r\n").replace("\n", "\r\n").replace("\r\r\n", "\r\n").encode()
    signer = keyring(tmp_path, pem(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL))
    copy = render_for_recipient(submitted_8bit, recipient="r@example.org", message_id="<m@x>", dkim=signer)
    out = seven_bit_copy(copy, signer)
    assert out.isascii() and out.count(b"DKIM-Signature:") == 1
    assert dkim.verify(out, dnsfunc=dnsfunc_for(rsa_key))
    parsed = message_from_bytes(out, policy=policy.default)
    assert parsed["Content-Transfer-Encoding"] == "7bit"
    parts = [p for p in parsed.walk() if not p.is_multipart()]
    assert [p["Content-Transfer-Encoding"] for p in parts] == ["quoted-printable"] * 2
    assert [p.get_content().replace("\r\n", "\n") for p in parts] == [text, html]
    with pytest.raises(ValueError, match="header holds 8-bit"):
        seven_bit_copy("From: a@news.example.com\r\nSubject: Grüße\r\n\r\nx\r\n".encode(), signer)
