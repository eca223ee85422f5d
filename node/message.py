"""Per-recipient rendering of a submitted message: ids, headers, DKIM.

The submitted body is kept byte for byte; only the header block is edited, line by line, so a
retry on another node renders exactly the same bytes (apart from the DKIM timestamp).
"""

from __future__ import annotations

import re
from collections import Counter

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

# Headers this module owns: any copy in the submission is dropped and replaced.
REPLACED_HEADERS: frozenset[bytes] = frozenset(
    {b"return-path", b"message-id", b"list-unsubscribe", b"list-unsubscribe-post", b"dkim-signature"}
)

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

# RFC 5322 atext plus "." : what may stand in a Message-ID's left part.
_ID_LEFT_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
_HEADER_NAME_RE = re.compile(rb"^([!-9;-~]+)[ \t]*:")


def recipient_message_id(submission_id: str, index: int, sender_domain: str) -> str:
    """The Message-ID of one recipient's copy; the same on every retry and on every node."""
    if not _ID_LEFT_RE.match(submission_id):
        raise ValueError(f"submission id not usable in a Message-ID: {submission_id!r}")
    if index < 0:
        raise ValueError(f"recipient index must be >= 0, got {index}")
    if not _DOMAIN_RE.match(sender_domain):
        raise ValueError(f"sender domain not usable in a Message-ID: {sender_domain!r}")
    return f"<{submission_id}.{index}.rm@{sender_domain}>"


class DkimSigner:
    """Signs rendered messages for one domain and selector (rsa-sha256, relaxed/relaxed)."""

    def __init__(self, domain: str, selector: str, private_key_pem: bytes) -> None:
        self.domain = domain
        self.selector = selector
        self._key_pem = _traditional_rsa_pem(private_key_pem)

    def sign(self, message: bytes) -> bytes:
        """Return the DKIM-Signature header (folded, ending with the message's line ending)."""
        eol = _line_ending(message)
        header_lines, _ = _split_header_block(message)
        present = Counter(name for name, _ in _header_fields(header_lines) if name in DKIM_HEADERS)
        if not present[b"from"]:
            raise ValueError("cannot DKIM-sign a message without a From header")
        # Each present instance is listed once so a duplicated header stays covered.
        include = [name for name in DKIM_HEADERS for _ in range(present[name])]
        return dkimpy.sign(
            _to_crlf(message),  # the signature covers the bytes as they go over SMTP
            self.selector.encode(),
            self.domain.encode(),
            self._key_pem,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=b"rsa-sha256",
            include_headers=include,
            linesep=eol,
        )


def render_for_recipient(
    body: bytes,
    *,
    recipient: str,
    message_id: str,
    unsubscribe_url: str | None = None,
    unsubscribe_mailto: str | None = None,
    feedback_id: str | None = None,
    dkim: DkimSigner | None = None,
) -> bytes:
    """One recipient's copy of a submitted message: owned headers replaced, body bytes untouched.

    `unsubscribe_url` (https) and `unsubscribe_mailto` (an address) make the RFC 2369
    List-Unsubscribe header; the https one also makes it RFC 8058 one-click. `feedback_id` is
    Gmail's Feedback-ID header (it replaces a submitted one)."""
    for name, value in (("recipient", recipient), ("message_id", message_id), ("unsubscribe_url", unsubscribe_url),
                        ("unsubscribe_mailto", unsubscribe_mailto), ("feedback_id", feedback_id)):
        if value is not None:
            _reject_line_breaks(name, value)
    eol = _line_ending(body)
    header_lines, rest = _split_header_block(body)
    dropped = REPLACED_HEADERS | ({b"feedback-id"} if feedback_id is not None else set())
    kept = [line for name, field in _header_fields(header_lines) if name not in dropped for line in field]
    # No Return-Path: only the final delivery adds one (RFC 5321 4.4); a submitted one is dropped.
    added = [f"Message-ID: {message_id}"]
    targets = ([f"<{unsubscribe_url}>"] if unsubscribe_url is not None else []) + (
        [f"<mailto:{unsubscribe_mailto}>"] if unsubscribe_mailto is not None else [])
    if targets:
        added.append(f"List-Unsubscribe: {', '.join(targets)}")
    if unsubscribe_url is not None:
        added.append("List-Unsubscribe-Post: List-Unsubscribe=One-Click")
    if feedback_id is not None:
        added.append(f"Feedback-ID: {feedback_id}")
    rendered = b"".join(h.encode() + eol for h in added) + b"".join(kept) + rest
    if dkim is not None:
        rendered = dkim.sign(rendered) + rendered
    return rendered


def _reject_line_breaks(name: str, value: str) -> None:
    # A CR or LF in a header value would let a submission smuggle in headers of its own.
    if "\r" in value or "\n" in value:
        raise ValueError(f"{name} must not contain line breaks: {value!r}")


def _line_ending(message: bytes) -> bytes:
    """The line ending of the message's first line (CRLF or LF); CRLF when there is none."""
    first_lf = message.find(b"\n")
    if first_lf > 0 and message[first_lf - 1 : first_lf] == b"\r":
        return b"\r\n"
    return b"\n" if first_lf >= 0 else b"\r\n"


def _split_header_block(message: bytes) -> tuple[list[bytes], bytes]:
    """Header lines (each with its line ending) and the rest, which starts at the blank line."""
    # Split on LF only: a stray CR inside a header line is not a line break.
    lines = re.findall(rb"[^\n]*\n|[^\n]+$", message)
    offset = 0
    for i, line in enumerate(lines):
        if line in (b"\r\n", b"\n"):
            return lines[:i], message[offset:]
        offset += len(line)
    return lines, b""


def _header_fields(header_lines: list[bytes]) -> list[tuple[bytes, list[bytes]]]:
    """Group header lines into fields: (lower-cased name, [first line, continuation lines...]).

    A line that is neither a continuation nor "name:" forms a field with an empty name, so it is
    kept as it was rather than being mistaken for part of the field above it.
    """
    fields: list[tuple[bytes, list[bytes]]] = []
    for line in header_lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
            continue
        match = _HEADER_NAME_RE.match(line)
        fields.append((match.group(1).lower() if match else b"", [line]))
    return fields


def _to_crlf(message: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", message)


def _traditional_rsa_pem(private_key_pem: bytes) -> bytes:
    # dkimpy reads only PKCS#1 ("BEGIN RSA PRIVATE KEY"); accept PKCS#8 too by re-encoding,
    # and fail here, at configuration time, rather than on the first message.
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("DKIM key must be an RSA private key (rsa-sha256)")
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
