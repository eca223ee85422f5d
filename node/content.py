"""What a submission server owes its clients (RFC 6409 section 8, Postfix's defaults): bare LF line
ends normalized to CRLF, and a Date: header added when the submission has none.

DATA still ends only at <CRLF>.<CRLF> (aiosmtpd reads lines up to CRLF), so a dot line after a
bare LF is content, never an end of data: once normalized it is a line of its own that delivery
dot-stuffs again, so no receiver downstream can be smuggled a second message.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from email.utils import format_datetime, getaddresses

from raftmail.consensus.domains import domain_of

BARE_NEWLINE_MODES = ("normalize", "reject")

_BARE_LF = re.compile(rb"(?<!\r)\n")
# A line that starts after a bare LF: aiosmtpd only undid the dot-stuffing of lines after CRLF,
# while clients (smtplib, aiosmtplib, Postfix's smtp) stuff every line that starts after any LF.
_STUFFED_AFTER_BARE_LF = re.compile(rb"(?<!\r)\n\.")
_HEADER_END = re.compile(rb"\r\n\r\n")
_DATE = re.compile(rb"^date[ \t]*:", re.IGNORECASE | re.MULTILINE)
_FROM = re.compile(rb"^from[ \t]*:(.*(?:\r\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?")


def has_bare_lf(message: bytes) -> bool:
    return message.count(b"\n") != message.count(b"\r\n")


def normalize_bare_lf(message: bytes) -> bytes:
    """Bare LF line ends as CRLF, with the dot-stuffing of the lines they start undone. A bare CR
    stays (it is refused later: it is no line end to anyone)."""
    return _BARE_LF.sub(b"\r\n", _STUFFED_AFTER_BARE_LF.sub(b"\n", message))


def with_date(message: bytes, now: float) -> bytes:
    """The message with a Date: header first when its header block has none (RFC 5322 3.6
    requires one, and receivers score its absence as spam). Lines end with CRLF here."""
    end = _HEADER_END.search(message)
    head = message[:end.start() + 2] if end else message
    if _DATE.search(head):
        return message
    stamp = format_datetime(datetime.fromtimestamp(now, timezone.utc))
    return f"Date: {stamp}\r\n".encode() + message


def from_domain(message: bytes) -> str:
    """The domain of the From: header's first address, lower case; "" when there is none. It
    scopes the unsubscribes and complaints about the message's copies."""
    end = _HEADER_END.search(message)
    m = _FROM.search(message[:end.start() + 2] if end else message)
    if m is None:
        return ""
    value = " ".join(m.group(1).decode("utf-8", "replace").split())
    addresses = [a for _, a in getaddresses([value]) if "@" in a]
    domain = domain_of(addresses[0]) if addresses else ""
    return domain if _DOMAIN.fullmatch(domain) else ""
