"""The sender's feedback loop, node side: the tokens in unsubscribe links and VERP addresses, and
reading the reports that come back (RFC 3464 DSNs, RFC 5965 ARF complaints, and the many
non-standard bounce formats, through flufl.bounce).

Every token is authenticated with a key of `[feedback] unsubscribe_secret` (never the cluster
secret: it is shared by every node and opens the Raft traffic and every body) and opaque (encrypted, so a link or a
bounce address shows nobody the recipient). The first key makes tokens; every key in the list is
tried when one is read, so an operator rotates by putting a new key first and dropping the old
one once its links no longer matter.

What a report *means* for the state (suppress or not, which event) is decided in consensus/; this
module only reads tokens and reports and builds the commands.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import email
import email.message
import email.policy
import hashlib
import hmac
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from raftmail.consensus.commands import Feedback, Suppress, is_refusal
from raftmail.consensus.domains import domain_of, normalise_domain
from raftmail.consensus.suppression import UNSUBSCRIBED

if TYPE_CHECKING:
    from raftmail.node.config import Config

log = logging.getLogger("raftmail.feedback")
# flufl.bounce logs every exception of its detectors with a traceback before it re-raises it; a
# report from a stranger that breaks a detector is logged here, in one line.
logging.getLogger("flufl.bounce").setLevel(logging.CRITICAL)

MIN_FEEDBACK_KEY_BYTES = 32
# Local parts of VERP and mailto addresses: one letter says what the address is for.
BOUNCE_KIND = "b"
UNSUBSCRIBE_KIND = "u"
_KINDS = (BOUNCE_KIND, UNSUBSCRIBE_KIND)
VERP_TAG_BYTES = 8  # a forgery needs 2**64 tries; the local part stays near RFC 5321's 64 octets
MAX_TOKEN_CHARS = 2048  # longer tokens are refused before any decoding
MAX_ID_CHARS = 128
_URL_AD = b"raftmail unsubscribe link v1"
_ENHANCED_IN_TEXT = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_REPLY_CODE = re.compile(r"(?<!\d)([245]\d\d)(?!\d)")


def _derive(secret: str, purpose: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=b"raftmail feedback",
                info=purpose).derive(secret.encode("utf-8"))


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


def _unb32(text: str) -> bytes | None:
    try:
        return base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True)
class LinkToken:
    """What a one-click unsubscribe link names: self-contained, it needs no state to be read."""

    recipient: str
    campaign: str
    scope: str  # the From: domain the suppression applies to, "" for the whole cluster
    submission: str
    index: int


class _Key:
    def __init__(self, secret: str) -> None:
        self.siv = AESSIV(_derive(secret, b"unsubscribe link", 64))
        self.verp_mac = _derive(secret, b"verp mac", 32)
        self.verp_enc = _derive(secret, b"verp enc", 32)


class FeedbackKeys:
    """Makes and reads the tokens, with the keys of [feedback] unsubscribe_secret (first one makes)."""

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("feedback tokens need at least one key")
        self._keys = [_Key(s) for s in secrets]

    # -- one-click links: AES-SIV (deterministic, so a retry renders the same bytes)

    def link_token(self, t: LinkToken) -> str:
        plain = msgpack.packb([1, t.recipient, t.campaign, t.scope, t.submission, t.index], use_bin_type=True)
        sealed = self._keys[0].siv.encrypt(plain, [_URL_AD])
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode()

    def read_link_token(self, token: str) -> LinkToken | None:
        """The link's content, or None when no key made it (forged, altered, or a dropped key)."""
        if not token or len(token) > MAX_TOKEN_CHARS or not token.isascii():
            return None
        try:
            sealed = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        for key in self._keys:
            try:
                plain = key.siv.decrypt(sealed, [_URL_AD])
            except (InvalidTag, ValueError):
                continue
            try:
                v, recipient, campaign, scope, sid, idx = msgpack.unpackb(plain, raw=False)
            except (ValueError, TypeError, msgpack.UnpackException):
                return None
            if v != 1 or not all(isinstance(x, str) for x in (recipient, campaign, scope, sid)) \
                    or type(idx) is not int:
                return None
            return LinkToken(recipient, campaign, scope, sid, idx)
        return None

    # -- VERP and mailto local parts: short (SIV with an HMAC tag as the CTR nonce), case-insensitive

    def local_part(self, kind: str, submission: str, index: int) -> str:
        """The local part of a per-recipient feedback address: `kind` then the sealed
        (submission, index), base32 in lower case (some MTAs change the case of local parts)."""
        key = self._keys[0]
        plain = f"{submission}\0{index}".encode()
        tag = hmac.new(key.verp_mac, kind.encode() + plain, hashlib.sha256).digest()[:VERP_TAG_BYTES]
        return kind + _b32(tag + _ctr(key.verp_enc, tag, plain))

    def read_local_part(self, local: str) -> tuple[str, str, int] | None:
        """(kind, submission, index) of a feedback address's local part, or None if forged."""
        local = local.lower()
        if not 2 <= len(local) <= MAX_TOKEN_CHARS or local[0] not in _KINDS:
            return None
        raw = _unb32(local[1:])
        if raw is None or len(raw) <= VERP_TAG_BYTES:
            return None
        tag, sealed = raw[:VERP_TAG_BYTES], raw[VERP_TAG_BYTES:]
        for key in self._keys:
            plain = _ctr(key.verp_enc, tag, sealed)
            expected = hmac.new(key.verp_mac, local[0].encode() + plain, hashlib.sha256).digest()[:VERP_TAG_BYTES]
            if hmac.compare_digest(tag, expected):
                sid, _, idx = plain.decode("utf-8", "replace").partition("\0")
                if not sid or not idx.isdigit() or len(sid) > MAX_ID_CHARS:
                    return None
                return local[0], sid, int(idx)
        return None


def _ctr(key: bytes, tag: bytes, data: bytes) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.CTR(tag + bytes(16 - len(tag))))
    enc = cipher.encryptor()
    return enc.update(data) + enc.finalize()


# ------------------------------------------------------------------ reports


@dataclass(frozen=True)
class Report:
    """What a message sent to a feedback address says. kind: "complaint" (ARF), "bounce" (a DSN
    or a non-standard bounce, with a reply code and an enhanced status), "ignored" (a DSN that
    reports no failure, such as a delivery or relay notice), "unparsed" (nothing recognisable)."""

    kind: str
    code: int = 0
    enhanced: str | None = None
    text: str = ""
    remote: str = ""


def parse_report(message: bytes, max_bytes: int) -> Report:
    """Read a report; never raises (a report nobody can read is "unparsed")."""
    try:
        msg = email.message_from_bytes(message[:max_bytes])
        if msg.get_content_type() == "multipart/report":
            report_type = str(msg.get_param("report-type", "") or "").lower()
            if report_type == "feedback-report":
                return _arf(msg)
            if report_type == "delivery-status":
                dsn = _dsn(msg)
                if dsn is not None:
                    return dsn
        return _heuristic(msg)
    except Exception as e:  # a report is data from strangers: nothing in it may stop the node
        log.info("feedback report not parsed: %s: %s", type(e).__name__, e)
        return Report("unparsed", text=f"{type(e).__name__}")


def _fields(part: email.message.Message) -> list[email.message.Message]:
    payload = part.get_payload()
    return [p for p in payload if isinstance(p, email.message.Message)] if isinstance(payload, list) else []


def _arf(msg: email.message.Message) -> Report:
    kind, agent = "abuse", ""
    for part in msg.walk():
        if part.get_content_type() == "message/feedback-report":
            for block in _fields(part):
                kind = str(block.get("Feedback-Type", kind)).strip().lower()[:40]
                agent = str(block.get("User-Agent", block.get("Reporting-MTA", ""))).strip()[:80]
                break
    return Report("complaint", text=f"complaint: feedback-type {kind}" + (f" from {agent}" if agent else ""),
                  remote=agent)


def _dsn(msg: email.message.Message) -> Report | None:
    """The first per-recipient block that reports a failure or a delay; "ignored" when every block
    reports success; None when there is no delivery-status part to read."""
    seen = False
    for part in msg.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks = _fields(part)
        remote = str(blocks[0].get("Reporting-MTA", "")).partition(";")[2].strip()[:100] if blocks else ""
        for block in blocks[1:]:
            seen = True
            action = str(block.get("Action", "")).strip().lower()
            if not action.startswith(("failed", "delayed", "error")):
                continue
            status = str(block.get("Status", "")).strip()
            diagnostic = " ".join(str(block.get("Diagnostic-Code", "")).split())
            remote = str(block.get("Remote-MTA", "")).partition(";")[2].strip()[:100] or remote
            enhanced = _enhanced(status) or _enhanced(diagnostic)
            temporary = action.startswith("delayed") or (enhanced or "").startswith("4")
            if enhanced is not None and enhanced[0] != ("4" if temporary else "5"):
                enhanced = None  # a status that contradicts the action: trust neither for suppression
            reply = _REPLY_CODE.search(diagnostic.partition(";")[2] or diagnostic)
            code = int(reply.group(1)) if reply and reply.group(1)[0] == ("4" if temporary else "5") else \
                (450 if temporary else 550)
            text = f"late {'delay' if temporary else 'bounce'} (DSN): {status or '-'} {diagnostic}".strip()
            return Report("bounce", code, enhanced, text, remote)
    return Report("ignored", text="DSN without a failure") if seen else None


def _heuristic(msg: email.message.Message) -> Report:
    """Non-standard bounces: flufl.bounce's detectors (Mailman's) say permanent or temporary; the
    enhanced status code, when the text has one, says whether the address is bad."""
    from flufl.bounce import all_failures

    temporary, permanent = all_failures(msg)
    if not temporary and not permanent:
        return Report("unparsed", text="no bounce or complaint recognised")
    temp = not permanent
    text = " ".join(_text_of(msg).split())
    found = [m for m in _ENHANCED_IN_TEXT.finditer(text) if m.group(1) == ("4" if temp else "5")]
    enhanced = f"{found[0].group(1)}.{int(found[0].group(2))}.{int(found[0].group(3))}" if found else None
    snippet = text[found[0].start():found[0].start() + 120] if found else ""
    return Report("bounce", 450 if temp else 550, enhanced,
                  f"late {'delay' if temp else 'bounce'}: {snippet or 'no status code given'}".strip())


def _text_of(msg: email.message.Message, limit: int = 65536) -> str:
    out = []
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                out.append(payload.decode("utf-8", "replace"))
        if sum(map(len, out)) > limit:
            break
    return "\n".join(out)[:limit]


def _enhanced(text: str) -> str | None:
    m = _ENHANCED_IN_TEXT.search(text)
    return f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}" if m else None


# ------------------------------------------------------------------ the node's desk


R_FEEDBACK_UNKNOWN = "550 5.1.1 No such feedback address"
R_FEEDBACK_MIXED = "452 4.5.3 Feedback addresses and other recipients go in separate transactions"
R_NULL_SENDER_ONLY_FEEDBACK = "550 5.7.1 Mail from the null sender is taken only for the feedback addresses"
R_FEEDBACK_NOT_COMMITTED = "451 4.3.0 Report not committed on a majority of the cluster; try again"
R_FEEDBACK_TAKEN = "250 2.0.0 Report taken: {}"


class FeedbackDesk:
    """Where the feedback reaches the cluster: reports mailed to the bounce and mailto domains
    (taken from anyone, without AUTH, with the null sender) and one-click unsubscribe links. Each
    becomes a command, and its sender hears 2xx only once that command is committed."""

    def __init__(self, config: "Config", node_id: str,
                 propose: Callable[[dict, float], Awaitable[Any]]) -> None:
        self.config = config
        self.fb = config.feedback
        self.node_id = node_id
        self.propose = propose  # (command, timeout) -> awaitable result; raises ProposalFailed
        self.keys = FeedbackKeys(self.fb.unsubscribe_secret) if self.fb.unsubscribe_secret else None
        self.domains = self.fb.domains()
        self.counters = {"reports": 0, "bounces": 0, "complaints": 0, "unsubscribes": 0, "unparsed": 0,
                         "ignored": 0, "unmatched": 0, "forged": 0, "not_committed": 0}

    def is_feedback_address(self, address: str) -> bool:
        return bool(self.domains) and domain_of(address) in self.domains

    def _read(self, address: str) -> tuple[str, str, int] | None:
        local, _, domain = address.rpartition("@")
        found = self.keys.read_local_part(local) if self.keys is not None else None
        if found is None:
            return None
        domain = normalise_domain(domain)
        wanted = self.fb.bounce_domain if found[0] == BOUNCE_KIND else self.fb.unsubscribe_mailto
        return found if domain == wanted else None

    def recipient_refusal(self, address: str) -> str | None:
        if self._read(address) is None:
            self.counters["forged"] += 1
            return R_FEEDBACK_UNKNOWN
        return None

    def _scope_mode(self) -> str:
        return "cluster" if self.fb.unsubscribe_scope == "cluster" else "domain"

    async def accept(self, sender: str, recipients: Sequence[str], message: bytes, peer: str) -> str:
        """The reply to DATA of a transaction whose recipients are all feedback addresses."""
        self.counters["reports"] += 1
        report: Report | None = None
        commands: list[Feedback] = []
        now = time.time()
        for rcpt in recipients:
            found = self._read(rcpt)
            if found is None:  # checked at RCPT; a key dropped since then
                continue
            kind, sid, idx = found
            if kind == UNSUBSCRIBE_KIND:
                commands.append(Feedback("unsubscribe", sid, idx, now, self.node_id, self._scope_mode(), peer,
                                         "unsubscribed by mail (List-Unsubscribe mailto)"))
                continue
            if report is None:
                report = await asyncio.to_thread(parse_report, message, self.fb.max_report_bytes)
            if report.kind == "complaint":
                commands.append(Feedback("complaint", sid, idx, now, self.node_id, self._scope_mode(),
                                         report.remote or peer, report.text))
            elif report.kind == "bounce":
                commands.append(Feedback("bounce", sid, idx, now, self.node_id, remote=report.remote or peer,
                                         text=report.text, code=report.code, enhanced=report.enhanced))
        if report is not None and report.kind in ("unparsed", "ignored"):
            self.counters[report.kind] += 1
            log.info("feedback from %s (%s) to %s: %s, nothing to do (%s)", sender or "<>", peer,
                     ",".join(recipients), report.kind, report.text)
        if not commands:
            return R_FEEDBACK_TAKEN.format(report.kind if report is not None else "nothing to do")
        timeout = self.config.intake.commit_timeout
        try:
            results = await asyncio.gather(*(self.propose(c, timeout) for c in commands))
        except Exception as e:  # ProposalFailed: the sender retries, nothing was promised
            self.counters["not_committed"] += 1
            log.warning("feedback from %s not committed (%s): 451", peer, getattr(e, "reason", e))
            return R_FEEDBACK_NOT_COMMITTED
        for c, r in zip(commands, results):
            if isinstance(r, dict) and r.get("matched") is False:
                self.counters["unmatched"] += 1
            else:
                self.counters[{"bounce": "bounces", "complaint": "complaints"}.get(c.kind, "unsubscribes")] += 1
        log.info("feedback from %s (%s): %s", sender or "<>", peer,
                 ", ".join(f"{c.kind} of {c.submission}.{c.index}" for c in commands))
        return R_FEEDBACK_TAKEN.format(", ".join(c.kind for c in commands))

    async def unsubscribe(self, token: str) -> tuple[int, str]:
        """A one-click POST: (HTTP status, what happened). 2xx only once the suppression is committed."""
        link = self.keys.read_link_token(token) if self.keys is not None else None
        if link is None:
            self.counters["forged"] += 1
            return 404, "unknown or expired unsubscribe link"
        command = Suppress(link.recipient, time.time(), "one-click unsubscribe", link.scope, "unsubscribe",
                           UNSUBSCRIBED, link.campaign, link.submission, link.index, self.node_id)
        try:
            result = await self.propose(command, self.config.intake.commit_timeout)
        except Exception as e:
            self.counters["not_committed"] += 1
            log.warning("one-click unsubscribe not committed (%s): 503", getattr(e, "reason", e))
            return 503, "not committed; please try again"
        if is_refusal(result) or not result.get("ok"):
            log.error("one-click unsubscribe refused by the state machine: %r", result)
            return 400, "refused"
        self.counters["unsubscribes"] += 1
        return 200, "unsubscribed"

    def link_valid(self, token: str) -> bool:
        return self.keys is not None and self.keys.read_link_token(token) is not None
