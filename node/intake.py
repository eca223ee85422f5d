"""SMTP intake's decisions: who may submit, which addresses and messages are acceptable, and the
answer to DATA. A submission is answered 250 only once its body is on a majority of nodes and its
metadata is committed by Raft. Anything less is a 4xx, so the client retries and nothing promised
is ever lost. The SMTP protocol itself (aiosmtpd, and every private name of it we rely on) is in
smtp_server.py, whose hooks call the functions here.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import logging
import re
import secrets
import time
from typing import Awaitable, Callable, Sequence

from aiosmtpd.smtp import Session

from raftmail.node.auth import FailureThrottle, SMTPAuth, UserDirectory, peer_address
from raftmail.consensus.commands import NewSubmission, valid_scope
from raftmail.consensus.domains import domain_of
from raftmail.node.bridge import ProposalFailed
from raftmail.consensus.journal import is_no_space
from raftmail.node.bodies import BodyStore, body_digest
from raftmail.node.config import Config
from raftmail.node.content import from_domain, has_bare_lf, normalize_bare_lf, with_date

log = logging.getLogger("raftmail.intake")
# aiosmtpd warns about its own deprecated attribute on every successful AUTH; not our concern.
logging.getLogger("mail.log").addFilter(lambda record: "login_data is deprecated" not in record.getMessage())

# Replies, with RFC 3463 enhanced codes.
R_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
R_BAD_RCPT = "553 5.1.3 Recipient address must be local-part@domain"
R_NO_SENDER = "553 5.1.7 A submission needs a sender address (null sender refused)"
R_BAD_SENDER_DOMAIN = ("553 5.1.7 The sender domain must be a DNS name like example.com "
                       "(ASCII letters, digits, hyphens; the xn-- form for international names)")
R_NO_QUORUM = "451 4.3.0 Not committed on a majority of the cluster; nothing was queued, try again"
# The entry may still commit after our wait ends: say so, and how a retry stays safe.
R_NOT_CONFIRMED = ("451 4.3.0 Not confirmed committed in time; it may still be queued: retry with the same "
                   "Message-ID (retries are de-duplicated)")
R_QUEUE_FULL = "452 4.3.1 Queue is full; try again later"
R_NO_STORAGE = "452 4.3.1 Insufficient system storage on this node; try another node or later"
R_TOO_MANY_CONN = "421 4.7.0 Too many connections, try again later"
R_TOO_MANY_FROM_CLIENT = "421 4.7.0 Too many connections from your address, try again later"
R_TOO_MANY_STRANGERS = ("421 4.7.0 Too many connections from outside the allowed networks, "
                        "try again later")
R_REFUSED = "554 5.3.0 Submission refused: {}"
R_CAMPAIGN_CANCELLED = "554 5.7.1 Campaign {} is cancelled: submission refused, nothing was queued"
R_AUTH_REQUIRED = "530 5.7.0 Authentication required: this address may submit only after AUTH"
R_AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism: STARTTLS first"
R_AUTH_UNAVAILABLE = "502 5.5.1 AUTH is not available: no users are configured"
R_NON_ASCII_ADDRESS = "553 5.6.7 Non-ASCII address without the SMTPUTF8 parameter on MAIL FROM (RFC 6531)"
R_BAD_UTF8_ADDRESS = "553 5.6.7 Address is not valid UTF-8"
R_BARE_LINE_END = ("554 5.6.0 Message refused: it has a bare CR or LF; every line must end with CRLF "
                   "(RFC 5321 section 2.3.8)")
R_NUL_IN_MESSAGE = "554 5.6.0 Message refused: it contains NUL bytes (RFC 5322, RFC 6152)"
R_TEXT_LINE_TOO_LONG = ("500 5.5.2 Line too long: text lines are at most 998 bytes plus CRLF "
                        "(RFC 5321 section 4.5.3.1.6)")
R_COMMAND_TOO_LONG = "500 5.5.2 Command line too long: at most 512 bytes with CRLF (RFC 5321 section 4.5.3.1.4)"
R_COMMAND_LINE_END = "500 5.5.2 Command lines must end with CRLF, with no bare CR or LF (RFC 5321 section 2.3.8)"
R_COMMAND_NUL = "500 5.5.2 NUL byte in a command line"
R_IDLE = "421 4.4.2 {host} Idle for too long; closing the connection"
R_DATA_TIMEOUT = ("421 4.4.2 {host} Message text not complete within {seconds:g}s; nothing was queued, "
                  "closing the connection")
R_UNAUTHENTICATED_TIMEOUT = "421 4.7.0 {host} Not authenticated within {seconds:g}s; closing the connection"
R_INTERNAL = "451 4.3.0 Local error in processing; nothing was queued, try again"
R_TLS_ACTIVE = "503 5.5.1 TLS is already active"

# RFC 5321 4.5.3.1: 998 text bytes plus CRLF per line; 512 bytes per command line with its CRLF.
MAX_TEXT_LINE_BYTES = 998
MAX_COMMAND_LINE_BYTES = 512
CONTENT_CHECK_INLINE_BYTES = 262144  # larger messages are checked in a worker thread
APPLIED_POLL_SECONDS = 0.05  # how often a submission whose commit outcome was lost looks at the state

# The sender domain goes into every copy's Message-ID and Return-Path: a DNS name, LDH labels.
_SENDER_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                            r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
CAMPAIGN_ID = r"[A-Za-z0-9._:-]{1,64}"  # X-Campaign-ID, and the API's campaign_id
_CAMPAIGN = re.compile(rb"^x-campaign-id:[ \t]*(" + CAMPAIGN_ID.encode() + rb")[ \t]*\r?$",
                       re.IGNORECASE | re.MULTILINE)


def header_block(message: bytes) -> bytes:
    m = _HEADER_END.search(message)
    return message[:m.start()] if m else message


def message_id_of(message: bytes) -> str | None:
    m = _MESSAGE_ID.search(header_block(message))
    if not m:
        return None
    value = b" ".join(m.group(1).split()).decode("utf-8", "replace").strip()
    return value or None


def campaign_of(message: bytes) -> str | None:
    m = _CAMPAIGN.search(header_block(message))
    return m.group(1).decode("ascii") if m else None


def dedupe_key(sender: str, message_id: str | None) -> str | None:
    """Same Message-ID from the same envelope sender = the same message. The state machine
    remembers which recipients were queued under it, so each is queued once per key: a retry
    queues nothing again, a later transaction for new recipients (after a 452 for too many
    recipients) queues those."""
    if not message_id:
        return None
    return hashlib.sha256(f"{sender.lower()}\0{message_id}".encode()).hexdigest()[:32]


def unsubscribe_scope(sender: str, message: bytes) -> str:
    """Where an unsubscribe from a copy of this message applies: its From: domain, else the
    sender's domain ("" when neither is a usable domain)."""
    scope = from_domain(message) or domain_of(sender)
    return scope if valid_scope(scope) else ""


class Intake:
    """Owns the decision for each SMTP transaction: the handler hooks only call it."""

    def __init__(self, config: Config, node_id: str, store: BodyStore,
                 commit_submission: Callable[[NewSubmission, float], Awaitable[list]],
                 replicate_body: Callable[[str, bytes, float], Awaitable[int]],
                 majority: Callable[[], int],
                 campaign_cancelled: Callable[[str], bool] | None = None,
                 storage_problems: Callable[[], dict[str, str]] = dict,
                 in_quorum: Callable[[], bool] = lambda: True,
                 applied_answer: Callable[[dict], list | None] = lambda entry: None) -> None:
        self.config = config
        # Asked of the applied state before a body is stored: a submission to a cancelled
        # campaign is refused at once (the state machine refuses it too, whatever the race).
        self.campaign_cancelled = campaign_cancelled or (lambda campaign: False)
        self.node_id = node_id
        self.store = store
        self.commit_submission = commit_submission
        self.replicate_body = replicate_body
        self.majority = majority
        # What this node cannot store for want of disk space (empty: it can).
        self.storage_problems = storage_problems
        # Whether this node is in a quorum now (Raft's view). Out of one, nothing it proposes can
        # commit: a submission is refused at once instead of at commit_timeout.
        self.in_quorum = in_quorum
        # A submission's answer read back from the applied state (MailState.submission_answer), or
        # None. Asked when a commit's outcome was lost (timeout, leader change).
        self.applied_answer = applied_answer
        self.limits = config.intake
        self.counters = {"accepted": 0, "duplicates": 0, "refused_451": 0, "refused_452": 0,
                         "refused_5xx": 0, "recipients_accepted": 0, "refused_530": 0, "refused_content": 0,
                         "auth_ok": 0, "auth_failed": 0}
        # The SMTP server's connection counts (smtp_server.py keeps them).
        self.connections = {"open": 0, "refused": 0, "refused_per_client": 0, "unauthenticated_timeouts": 0,
                            "data_timeouts": 0, "strangers": 0, "refused_strangers": 0}
        self._seq = 0
        self.auth: SMTPAuth | None = None
        if self.limits.users:
            throttle = FailureThrottle(self.limits.auth_fail_delay, cap=self.limits.auth_fail_delay_max)
            self.auth = SMTPAuth(UserDirectory(self.limits.users), throttle, counters=self.counters)
        # Asked at every MAIL, RCPT and DATA; the networks are fixed, so remember per address.
        self.in_allowed_network = functools.lru_cache(maxsize=4096)(self.in_allowed_network)  # type: ignore[method-assign]

    def storage_refusal(self) -> str | None:
        """452 at MAIL while this node's disk is full: the client tries another node."""
        if self.storage_problems():
            self.counters["refused_452"] += 1
            return R_NO_STORAGE
        return None

    # ------------------------------------------------------------ who may submit

    def in_allowed_network(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.limits.allow_networks if net.version == ip.version)

    def submission_refusal(self, session: Session) -> str | None:
        """The one decision on who may submit (MAIL, RCPT, DATA): clients in [intake]
        allow_networks, and everyone who authenticated. None to go on, else the 530 reply."""
        if session.authenticated or self.in_allowed_network(peer_address(session)):
            return None
        self.counters["refused_530"] += 1
        return R_AUTH_REQUIRED

    def auth_refusal(self, session: Session) -> str | None:
        """None if this session may AUTH now (and EHLO offers it), else the reply to AUTH:
        only with users configured, and only over TLS unless plaintext on loopback is allowed."""
        if self.auth is None:
            return R_AUTH_UNAVAILABLE
        if session.ssl is not None:
            return None
        if self.limits.allow_plaintext_auth_on_loopback and _is_loopback(peer_address(session)):
            return None
        return R_AUTH_NEEDS_TLS

    # ------------------------------------------------------------ what may be submitted

    @staticmethod
    def address_refusal(address: str, smtputf8: bool) -> str | None:
        """RFC 6531: a non-ASCII address only in a transaction that declared SMTPUTF8."""
        if address.isascii():
            return None
        try:
            address.encode("utf-8")  # aiosmtpd keeps invalid UTF-8 as surrogate escapes
        except UnicodeEncodeError:
            return R_BAD_UTF8_ADDRESS
        return None if smtputf8 else R_NON_ASCII_ADDRESS

    @staticmethod
    def content_refusal(message: bytes) -> str | None:
        """Refuse what must not be relayed: NUL bytes, bare CR or LF (which let a message
        smuggle an end-of-data into a receiver that is lenient about line ends) and lines over
        998 bytes. 8-bit text without BODY=8BITMIME is accepted, as most MTAs do; delivery
        declares 8BITMIME downstream."""
        if b"\0" in message:
            return R_NUL_IN_MESSAGE
        crlf = message.count(b"\r\n")
        if message.count(b"\r") != crlf or message.count(b"\n") != crlf:
            return R_BARE_LINE_END
        # Lines end exactly at CRLF here. (A regex for "999 non-CRLF bytes" backtracks for
        # seconds on a large message of long lines.)
        if max(map(len, message.split(b"\r\n")), default=0) > MAX_TEXT_LINE_BYTES:
            return R_TEXT_LINE_TOO_LONG
        return None

    def fixed_content(self, message: bytes) -> tuple[bytes, str | None]:
        """The message as it is stored (bare LF normalized unless [intake] bare_newline = "reject",
        a Date: added when missing) and the refusal, if any."""
        if self.limits.bare_newline == "normalize" and has_bare_lf(message):
            message = normalize_bare_lf(message)
        refusal = self.content_refusal(message)
        return (message, refusal) if refusal else (with_date(message, time.time()), None)

    def check_recipient(self, address: str, already: int) -> str | None:
        """None to accept the RCPT, else the reply."""
        if already >= self.limits.max_recipients:
            return R_TOO_MANY_RCPTS
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain or "." not in domain.strip("."):
            return R_BAD_RCPT
        return None

    def check_sender(self, address: str) -> str | None:
        local, at, domain = address.rpartition("@")
        if not at or not local:
            return R_NO_SENDER
        return None if _SENDER_DOMAIN.fullmatch(domain) and len(domain) <= 253 else R_BAD_SENDER_DOMAIN

    def new_submission_id(self) -> str:
        self._seq += 1
        return f"{int(time.time() * 1000):x}-{self.node_id}-{self._seq}-{secrets.token_hex(3)}"

    async def accept(self, sender: str, recipients: Sequence[str], message: bytes) -> str:
        """Check, store, replicate, commit; the returned string is the SMTP reply to the final dot."""
        if len(message) > CONTENT_CHECK_INLINE_BYTES:  # tens of ms for megabytes: off the loop
            message, refusal = await asyncio.to_thread(self.fixed_content, message)
        else:
            message, refusal = self.fixed_content(message)
        if refusal:
            self.counters["refused_content"] += 1
            log.info("submission from %s refused: %s", sender, refusal)
            return refusal
        campaign = campaign_of(message)
        if campaign is not None and self.campaign_cancelled(campaign):
            return self._cancelled(sender, campaign)
        deadline = time.monotonic() + self.limits.commit_timeout
        digest, refusal = await self.store_body(message, deadline, sender)
        if refusal:
            return refusal
        sid = self.new_submission_id()
        entry = NewSubmission(sid, campaign or sid, sender, digest, len(message), list(recipients),
                              dedupe_key(sender, message_id_of(message)), unsubscribe_scope(sender, message))
        result = await self.commit(entry, deadline)
        if isinstance(result, str):
            return result
        return self._reply(sender, len(recipients), len(message), result)

    async def store_body(self, body: bytes, deadline: float, sender: str) -> tuple[str, str | None]:
        """Store `body` on this node and on a majority of nodes (ours included) before anything
        refers to it: (its digest, None), or ("", the 4xx reply) when that is not done in time."""
        if not self.in_quorum():
            self.counters["refused_451"] += 1
            log.warning("submission from %s refused: this node is not in a quorum now: 451", sender)
            return "", R_NO_QUORUM
        # Our own copy and the peers' copies are written at the same time; the metadata is
        # proposed only once a majority (this node included) holds the body.
        digest = body_digest(body)
        stored, acks = await asyncio.gather(asyncio.to_thread(self.store.put, body),
                                            self.replicate_body(digest, body, max(0.05, deadline - time.monotonic())),
                                            return_exceptions=True)
        if is_no_space(stored):
            self.counters["refused_452"] += 1
            return "", R_NO_STORAGE
        if isinstance(stored, BaseException):
            self.counters["refused_451"] += 1
            log.error("cannot store body %s locally (%s): 451", digest[:12], stored)
            return "", R_NO_QUORUM
        if isinstance(acks, BaseException):
            acks = 0
        if acks + 1 < self.majority():
            self.counters["refused_451"] += 1
            log.warning("body %s on %d nodes (majority %d) before the deadline: 451", digest[:12], acks + 1,
                        self.majority())
            return "", R_NO_QUORUM
        return digest, None

    async def commit(self, entry: NewSubmission, deadline: float) -> list | str:
        """Commit one submission whose body is stored: the state machine's answer, or the 451
        reply when its commit is not known by the deadline."""
        try:
            return await self.commit_submission(entry, max(0.05, deadline - time.monotonic()))
        except ProposalFailed as e:
            # The entry may have committed all the same: until the deadline, the applied state
            # answers (a lost callback or a new leader do not make a committed entry 451).
            result = await self._answer_from_state(entry, deadline) if e.unknown else None
            if result is None:
                self.counters["refused_451"] += 1
                log.warning("submission %s not %s (%s): 451", entry.id,
                            "confirmed committed" if e.unknown else "committed", e.reason)
                return R_NOT_CONFIRMED if e.unknown else R_NO_QUORUM
            log.info("submission %s: %s, but the applied state has it", entry.id, e.reason)
            return result

    async def _answer_from_state(self, entry: dict, deadline: float) -> list | None:
        """Poll the applied state for the submission until `deadline`; None if it never shows."""
        while True:
            result = self.applied_answer(entry)
            left = deadline - time.monotonic()
            if result is not None or left <= 0:
                return result
            await asyncio.sleep(min(APPLIED_POLL_SECONDS, left))

    def _cancelled(self, sender: str, campaign: str) -> str:
        self.counters["refused_5xx"] += 1
        log.info("submission from %s refused: campaign %s is cancelled", sender, campaign)
        return R_CAMPAIGN_CANCELLED.format(campaign)

    def _reply(self, sender: str, n_rcpts: int, size: int, result: list) -> str:
        """The SMTP reply for the state machine's answer to one submission."""
        status, detail = result[0], result[1]
        if status == "ok":
            new, already = (result[2], result[3]) if len(result) >= 4 else (None, 0)
            self.counters["accepted"] += 1
            if new is None:
                self.counters["recipients_accepted"] += n_rcpts
                log.info("accepted submission %s from %s: %d recipients, %d bytes", detail, sender, n_rcpts, size)
                return f"250 2.0.0 Queued as {detail}: committed on a majority"
            self.counters["recipients_accepted"] += new
            log.info("accepted submission %s from %s: %d new recipients, %d already queued under the same "
                     "Message-ID, %d bytes", detail, sender, new, already, size)
            return (f"250 2.0.0 Queued as {detail}: {new} new recipient{'s' if new != 1 else ''} committed on "
                    f"a majority; {already} already queued under this Message-ID, not queued again")
        if status == "cancelled":
            return self._cancelled(sender, detail)
        if status == "duplicate":
            self.counters["duplicates"] += 1
            log.info("duplicate of submission %s (same sender, Message-ID and recipients): not queued again",
                     detail)
            return (f"250 2.0.0 Already queued as {detail}: every recipient is already queued under this "
                    "Message-ID, none queued again")
        if status == "full":
            self.counters["refused_452"] += 1
            return R_QUEUE_FULL
        self.counters["refused_5xx"] += 1
        return R_REFUSED.format(detail)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
