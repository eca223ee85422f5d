"""SMTP intake: a submission is answered 250 only once its body is on a majority of nodes and its
metadata is committed by Raft. Anything less is a 4xx, so the client retries and nothing promised
is ever lost.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

from aiosmtpd.smtp import SMTP, Envelope, Session

from raftmail.node.bridge import ProposalFailed, Proposer
from raftmail.node.bodies import BodyStore
from raftmail.node.config import Config

log = logging.getLogger("raftmail.intake")

# Replies, with RFC 3463 enhanced codes.
R_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
R_BAD_RCPT = "553 5.1.3 Recipient address must be local-part@domain"
R_NO_SENDER = "553 5.1.7 A submission needs a sender address (null sender refused)"
R_NO_QUORUM = "451 4.3.0 Not committed on a majority of the cluster; nothing was queued, try again"
R_QUEUE_FULL = "452 4.3.1 Queue is full; try again later"
R_TOO_MANY_CONN = "421 4.7.0 Too many connections, try again later"
R_REFUSED = "554 5.3.0 Submission refused: {}"

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_CAMPAIGN = re.compile(rb"^x-campaign-id:[ \t]*([A-Za-z0-9._:-]{1,64})[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


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
    """Same Message-ID from the same envelope sender = the same submission, retried."""
    if not message_id:
        return None
    return hashlib.sha256(f"{sender.lower()}\0{message_id}".encode()).hexdigest()[:32]


@dataclass
class Pending:
    """A submission waiting for its group commit."""
    entry: dict
    size: int
    future: asyncio.Future


class GroupCommitter:
    """Many SMTP transactions per Raft entry: whatever arrives while a commit is in flight rides
    in the next one. No added latency when idle; bounded entry size and queue length."""

    def __init__(self, proposer: Proposer, *, max_entry_bytes: int, max_waiting: int,
                 max_commits_in_flight: int = 4) -> None:
        self._proposer = proposer
        self._max_entry_bytes = max_entry_bytes
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(max_waiting)
        self._workers: list[asyncio.Task] = []
        self._n_workers = max_commits_in_flight
        self.commits = 0
        self.submissions = 0

    def start(self, make_command: Callable[[list[dict]], dict], timeout: float) -> None:
        self._make_command = make_command
        self._timeout = timeout
        self._workers = [asyncio.create_task(self._run()) for _ in range(self._n_workers)]

    async def stop(self) -> None:
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def commit(self, entry: dict, size: int) -> list:
        fut = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(Pending(entry, size, fut))
        except asyncio.QueueFull:
            raise ProposalFailed("intake queue is full", unknown=False) from None
        return await fut

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            group, size = [first], first.size
            while not self._queue.empty() and size < self._max_entry_bytes:
                nxt = self._queue.get_nowait()
                group.append(nxt)
                size += nxt.size
            live = [p for p in group if not p.future.done()]
            if not live:
                continue
            try:
                results = await self._proposer.propose(self._make_command([p.entry for p in live]),
                                                       self._timeout)
                if not isinstance(results, list) or len(results) != len(live):
                    raise ProposalFailed(f"unexpected result {results!r}", unknown=True)
                self.commits += 1
                self.submissions += len(live)
                for p, r in zip(live, results):
                    if not p.future.done():
                        p.future.set_result(r)
            except ProposalFailed as e:
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(ProposalFailed(e.reason, e.unknown))
            except Exception as e:  # never lose a waiter
                log.exception("group commit failed")
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(ProposalFailed(str(e), unknown=True))


class Intake:
    """Owns the decision for each SMTP transaction: the handler hooks only call it."""

    def __init__(self, config: Config, node_id: str, store: BodyStore, committer: GroupCommitter,
                 replicate_body: Callable[[str, bytes, float], Awaitable[int]],
                 majority: Callable[[], int]) -> None:
        self.config = config
        self.node_id = node_id
        self.store = store
        self.committer = committer
        self.replicate_body = replicate_body
        self.majority = majority
        self.limits = config.intake
        self.counters = {"accepted": 0, "duplicates": 0, "refused_451": 0, "refused_452": 0,
                         "refused_5xx": 0, "recipients_accepted": 0}
        self._seq = 0

    def check_recipient(self, address: str, already: int) -> str | None:
        """None to accept the RCPT, else the reply."""
        if already >= self.limits.max_recipients:
            return R_TOO_MANY_RCPTS
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain or "." not in domain.strip("."):
            return R_BAD_RCPT
        return None

    def check_sender(self, address: str) -> str | None:
        return R_NO_SENDER if not address or "@" not in address else None

    def new_submission_id(self) -> str:
        self._seq += 1
        return f"{int(time.time() * 1000):x}-{self.node_id}-{self._seq}-{secrets.token_hex(3)}"

    async def accept(self, sender: str, recipients: Sequence[str], message: bytes) -> str:
        """Store, replicate, commit; the returned string is the SMTP reply to the final dot."""
        timeout = self.limits.commit_timeout
        deadline = time.monotonic() + timeout
        digest = await asyncio.to_thread(self.store.put, message)
        acks = await self.replicate_body(digest, message, timeout)
        if acks + 1 < self.majority():
            self.counters["refused_451"] += 1
            log.warning("body %s on %d nodes (majority %d) before the deadline: 451", digest[:12], acks + 1,
                        self.majority())
            return R_NO_QUORUM
        sid = self.new_submission_id()
        entry = {"id": sid, "campaign": campaign_of(message) or sid, "sender": sender, "body": digest,
                 "size": len(message), "rcpts": list(recipients),
                 "key": dedupe_key(sender, message_id_of(message))}
        try:
            status, detail = await asyncio.wait_for(
                self.committer.commit(entry, len(message) // 64 + 64 * len(recipients)),
                max(0.05, deadline - time.monotonic()))
        except (ProposalFailed, asyncio.TimeoutError) as e:
            self.counters["refused_451"] += 1
            log.warning("submission %s not committed (%s): 451", sid, getattr(e, "reason", "timeout"))
            return R_NO_QUORUM
        if status == "ok":
            self.counters["accepted"] += 1
            self.counters["recipients_accepted"] += len(recipients)
            log.info("accepted submission %s from %s: %d recipients, %d bytes", sid, sender,
                     len(recipients), len(message))
            return f"250 2.0.0 Queued as {sid}: committed on a majority"
        if status == "duplicate":
            self.counters["duplicates"] += 1
            log.info("duplicate of submission %s (same sender and Message-ID): not queued again", detail)
            return f"250 2.0.0 Already queued as {detail}: duplicate not queued again"
        if status == "full":
            self.counters["refused_452"] += 1
            return R_QUEUE_FULL
        self.counters["refused_5xx"] += 1
        return R_REFUSED.format(detail)


class IntakeHandler:
    """aiosmtpd hooks: small, each delegating to Intake."""

    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        refusal = self.intake.check_sender(address)
        if refusal:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        refusal = self.intake.check_recipient(address, len(envelope.rcpt_tos))
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return await self.intake.accept(envelope.mail_from, envelope.rcpt_tos, envelope.original_content)


class IntakeSMTP(SMTP):
    """aiosmtpd's server with a connection limit and enhanced status codes on its own refusals."""

    _REWRITE = {
        "552 Error: Too much mail data": "552 5.3.4 Message exceeds the size limit of {limit} bytes",
        "552 Error: message size exceeds fixed maximum message size":
            "552 5.3.4 Message exceeds the size limit of {limit} bytes",
    }

    def __init__(self, handler: Any, *, connections: dict, max_connections: int, **kw: Any) -> None:
        super().__init__(handler, **kw)
        self._connections = connections
        self._max_connections = max_connections
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._connections["open"] >= self._max_connections:
            self._connections["refused"] += 1
            transport.write(f"{R_TOO_MANY_CONN}\r\n".encode())  # type: ignore[attr-defined]
            transport.close()
            return
        self._connections["open"] += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._connections["open"] -= 1
            self._counted = False
            super().connection_lost(error)

    async def push(self, status: str) -> None:
        template = self._REWRITE.get(status)
        if template is not None:
            status = template.format(limit=self.data_size_limit)
        await super().push(status)


async def start_smtp_server(intake: Intake, host: str, port: int, *, hostname: str) -> asyncio.AbstractServer:
    limits = intake.limits
    connections = {"open": 0, "refused": 0}
    handler = IntakeHandler(intake)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: IntakeSMTP(handler, connections=connections, max_connections=limits.max_connections,
                           data_size_limit=limits.max_message_bytes, enable_SMTPUTF8=True,
                           decode_data=False, hostname=hostname, timeout=limits.idle_timeout),
        host, port, reuse_address=True, backlog=512)
    intake.connections = connections  # type: ignore[attr-defined]
    return server
