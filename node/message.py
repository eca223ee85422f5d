"""Per-recipient rendering of a submitted message: ids, headers, DKIM.

The submitted body is kept byte for byte; only the header block is edited, line by line, so a
retry on another node renders exactly the same bytes (apart from the DKIM timestamp).
"""

from __future__ import annotations

import quopri
import re
from email.encoders import encode_base64
from email.parser import BytesParser
from email.policy import compat32
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # node/dkim.py reads headers with this module's helpers
    from raftmail.node.dkim import DkimKeyring


# Headers this module owns: any copy in the submission is dropped and replaced.
REPLACED_HEADERS: frozenset[bytes] = frozenset(
    {b"return-path", b"message-id", b"list-unsubscribe", b"list-unsubscribe-post", b"dkim-signature"}
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


def render_for_recipient(
    body: bytes,
    *,
    recipient: str,
    message_id: str,
    unsubscribe_url: str | None = None,
    unsubscribe_mailto: str | None = None,
    feedback_id: str | None = None,
    dkim: DkimKeyring | None = None,
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


def seven_bit_copy(copy: bytes, dkim: DkimKeyring | None = None) -> bytes:
    """`copy` for a receiver that does not take 8-bit content (no 8BITMIME, RFC 6152): every
    part whose body holds 8-bit bytes re-encoded (text as quoted-printable, anything else as
    base64), then signed again, since the signature covered the 8-bit body. ValueError when a
    header holds 8-bit bytes: no transfer encoding applies there."""
    header_lines, rest = _split_header_block(copy)
    unsigned = [line for name, field in _header_fields(header_lines) if name != b"dkim-signature" for line in field]
    if not all(line.isascii() for line in unsigned):
        raise ValueError("a header holds 8-bit bytes (not RFC 2047 encoded): no 7-bit form exists")
    eol = _line_ending(copy)
    message = BytesParser(policy=compat32).parsebytes(b"".join(unsigned) + rest)
    for part in message.walk():
        encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
        if part.is_multipart():
            if encoding in ("8bit", "binary"):
                part.replace_header("Content-Transfer-Encoding", "7bit")
            continue
        payload = part.get_payload(decode=True) or b""
        if payload.isascii() and encoding not in ("8bit", "binary"):
            continue
        del part["Content-Transfer-Encoding"]
        if part.get_content_maintype() == "text":
            lines = payload.replace(b"\r\n", b"\n")
            part.set_payload(quopri.encodestring(lines).decode("ascii"))
            part["Content-Transfer-Encoding"] = "quoted-printable"
        else:
            part.set_payload(payload)
            encode_base64(part)
    out = message.as_bytes(policy=compat32.clone(linesep=eol.decode(), max_line_length=0))
    return (dkim.sign(out) if dkim is not None else b"") + out
