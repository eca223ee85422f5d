"""Every node's sender: delivers the batches the log assigned to it and reports each recipient's
outcome through the log, a few at a time, so a crash repeats at most the sends in flight."""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any, AsyncIterator, Awaitable, Callable, NamedTuple, Protocol

from raftmail.consensus.backoff import next_retry_delay
from raftmail.consensus.commands import Abandon, Incarnate, Renew, Report, ReportRow
from raftmail.consensus.outcomes import STATE_NAMES, judge_reply
from raftmail.consensus.records import MAX_TEXT
from raftmail.consensus.state import MailState
from raftmail.consensus.view import StateView
from raftmail.node.bridge import Propose, ProposalFailed
from raftmail.node.config import DeliverySection, DkimSection, FeedbackSection
from raftmail.node.delivery import Outcome, deliver_batch
from raftmail.node.routes import resolve_routes
from raftmail.node.sites import make_resolver
from raftmail.node.feedback import BOUNCE_KIND, UNSUBSCRIBE_KIND, FeedbackKeys, LinkToken
from raftmail.node.dkim import DkimKeyring
from raftmail.node.message import recipient_message_id, render_for_recipient, seven_bit_copy
from raftmail.node.tasks import Tasks
from raftmail.node.templates import RenderLimits, render_copy

log = logging.getLogger("raftmail.sender")

class Recipient(NamedTuple):
    """One leased recipient as the sender needs it, read once from the state when the batch starts."""

    submission: str
    index: int
    attempts: int  # attempts before this one
    campaign: str
    address: str
    sender: str  # envelope sender
    body: str  # body digest
    scope: str  # the message's From: domain (where an unsubscribe applies)
    template: int | None = None  # the body is a template object: this submission's first position in it


class DeliveryObserver(Protocol):
    """What the sender tells monitoring (node/metrics.py implements it)."""

    def batch_started(self, bid: str) -> None: ...

    def delivery_outcome(self, bid: str, domain: str, outcome: str) -> None: ...


POLL_INTERVAL = 0.05  # seconds between looks at the log for new batches of ours
STOP_REPORT_SECONDS = 2.0  # how long a stopping node keeps trying to report its last outcomes


class BatchRun:
    """One leased batch being delivered by this node."""

    def __init__(self, sender: "Sender", bid: str, domain: str, items: list[tuple[str, int]],
                 lease: float, source: str = "") -> None:
        self.sender = sender
        self.bid = bid
        self.domain = domain
        self.source = source  # the pool address its connections bind ("": the system's choice)
        self.items = items  # position in this list = index given to deliver_batch
        self.results: list[ReportRow] = []
        self.rows: list[Recipient] = []  # read when the batch starts; position = index in self.items
        self.attempted: set[int] = set()
        self.flushing = asyncio.Lock()
        self.lease_seconds = lease
        d = self.sender.delivery
        self.margin = d.lease_send_margin
        # Monotonic time this node SENT the last renewal that committed: the leader can only have
        # applied it later, so a lease counted from here ends before the leader's does.
        self.renewed_from: float | None = None
        self.fenced = False

    def holds(self) -> bool:
        """The batch is still ours in the committed state (not expired, reassigned or fenced)."""
        b = self.sender.view().batches.get(self.bid)
        return b is not None and b.node == self.sender.node_id and b.incarnation == self.sender.incarnation

    def lease_left(self) -> float:
        """Seconds before this holder must stop: its lease on its own monotonic clock, minus the
        send margin. From the last committed renewal's send time, else from when this node applied
        the assignment."""
        if self.fenced:
            return 0.0
        base = self.renewed_from
        if base is None:
            seen = self.sender.lease_applied_at(self.bid)
            if seen is None:
                return 0.0  # never saw it applied: no basis for a lease
            base = seen[1]
        return base + self.lease_seconds - self.margin - time.monotonic()

    def may_send(self) -> bool:
        return not self.sender.stopping and self.lease_left() > 0

    async def keep_lease(self) -> None:
        """Renew while the batch runs (a transaction in progress included): right away, then every
        quarter lease. A holder cut off from the leader gets no renewal, and its lease_left runs
        out: deliver() stops before the next command or final dot."""
        every = self.lease_seconds / 4
        while True:
            sent = time.monotonic()
            try:
                res = await self.sender.propose(
                    Renew(self.bid, self.sender.node_id, self.sender.incarnation),
                    min(every, self.sender.commit_timeout))
                if res.get("ok"):
                    self.renewed_from = max(self.renewed_from or sent, sent)
                else:
                    log.warning("batch %s: renewal refused, the batch is no longer ours", self.bid)
                    self.fenced = True
                    return
            except ProposalFailed as e:
                log.warning("batch %s: lease not renewed (%s); %.1fs left", self.bid, e.reason, self.lease_left())
            await asyncio.sleep(max(0.0, sent + every - time.monotonic()))

    def on_outcome(self, o: Outcome) -> None:
        r = self.rows[o.index]
        sid, idx = r.submission, r.index
        d = self.sender.delivery
        text = o.text[:MAX_TEXT]  # all the state keeps
        # The state machine applies the same rule to the same row (code, enhanced, text).
        verdict = judge_reply(o.code, o.enhanced, text)
        self.sender.observer.delivery_outcome(self.bid, self.domain, STATE_NAMES[verdict.state])
        next_at = None
        if verdict.deferred:
            next_at = time.time() + next_retry_delay(
                r.attempts + 1, first=d.retry_first, factor=d.retry_factor,
                max_interval=d.retry_max_interval, jitter_fraction=d.retry_jitter, jitter=random.random())
        self.attempted.add(o.index)
        self.results.append(ReportRow(sid, idx, o.code, verdict.enhanced, text, next_at, o.remote, o.maybe_delivered))
        log.info("outcome campaign=%s submission=%s recipient=%s node=%s batch=%s code=%s state=%s remote=%s",
                 r.campaign, sid, r.address, self.sender.node_id, self.bid, o.code, STATE_NAMES[verdict.state], o.remote)
        if len(self.results) >= d.report_every:
            self.sender.tasks.start(self.flush(), f"report of batch {self.bid}")

    async def flush(self, release: list[tuple[str, int]] | None = None) -> bool:
        """Report buffered outcomes (and unattempted items to release) as one command. Outcomes
        not known to be committed go back into the buffer, so a later flush reports them."""
        async with self.flushing:
            results, self.results = self.results, []
            if not results and not release:
                return True
            d = self.sender.delivery
            cmd = Report(self.bid, self.sender.node_id, time.time(), d.max_age, results, release or (),
                         max_maybe=d.max_maybe_delivered)
            # While stopping, a cluster being shut down as a whole has no quorum to report to:
            # try briefly, then leave the rest to the lease.
            patience = STOP_REPORT_SECONDS if self.sender.stopping else max(self.sender.delivery.lease_seconds, 5.0)
            deadline = time.monotonic() + patience
            try:
                while True:
                    try:
                        res = await self.sender.propose(cmd, self.sender.commit_timeout)
                        if res.get("fenced"):
                            log.warning("batch %s: %d outcomes arrived after the lease moved on (possible "
                                        "duplicates)", self.bid, res["fenced"])
                        return True
                    except ProposalFailed as e:
                        if time.monotonic() > deadline:
                            log.error("batch %s: %d outcomes not reported yet (%s); if they never are, the "
                                      "lease returns them to the queue", self.bid, len(results), e.reason)
                            self.results = results + self.results
                            return False
                        await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                self.results = results + self.results  # e.g. the ticker stopped mid-election
                raise

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.sender.delivery.report_interval
        while True:
            # One report clock for every batch on this node: their reports fall due in the same
            # loop turn and share one Raft entry (the proposer's group commit).
            await asyncio.sleep(interval - loop.time() % interval)
            if self.results:
                await self.flush()

    async def run(self) -> None:
        sender, d = self.sender, self.sender.delivery
        sender.observer.batch_started(self.bid)

        def read(st):
            out = []
            for sid, idx in self.items:
                sub = st.submissions[sid]
                det = sub.detail.get(idx)
                out.append(Recipient(sid, idx, det.attempts if det else 0, sub.campaign, sub.rcpts[idx], sub.sender,
                                     sub.body, sub.scope, sub.template))
            return out
        # A locked read bounded by the batch's size, in a worker thread: the loop never waits for it.
        rows = self.rows = await asyncio.to_thread(sender.read_state, read)
        ticker = asyncio.create_task(self._ticker())
        keeper = asyncio.create_task(self.keep_lease())
        try:
            routes = await resolve_routes(self.domain, routes=d.routes, relay=d.relay,
                                          relay_username=d.relay_username, relay_password=d.relay_password,
                                          resolver=sender.resolver, port=d.mx_port, dns_lifetime=d.dns_timeout)
            source = d.source(self.source) if self.source else None
            by_sender: dict[str, list[int]] = {}
            for pos, r in enumerate(rows):
                by_sender.setdefault(r.sender, []).append(pos)
            for mail_from, positions in by_sender.items():
                if not self.may_send():
                    break
                await deliver_batch(routes, mail_from, self._messages(rows, positions),
                                    helo_name=source.ehlo if source is not None else d.helo_name,
                                    source_address=self.source or None, connect_timeout=d.connect_timeout,
                                    command_timeout=d.command_timeout, may_send=self.may_send,
                                    on_outcome=self.on_outcome,
                                    require_tls=d.limits_for(self.domain).require_tls,
                                    tls_verify=d.tls_verify, tls_ca_file=d.tls_ca_file,
                                    lease_left=self.lease_left,
                                    seven_bit=lambda copy: seven_bit_copy(copy, self.sender.dkim))
        except Exception:
            log.exception("batch %s failed", self.bid)
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)  # its outcomes are back in self.results
        release = [(sid, idx) for pos, (sid, idx) in enumerate(self.items) if pos not in self.attempted]
        try:
            if self.holds():
                await self.flush(release)  # the keeper renews while the last report commits
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    async def _messages(self, rows: list[Recipient],
                        positions: list[int]) -> AsyncIterator[tuple[int, str, bytes, str]]:
        bodies: dict[str, bytes | None] = {}
        for pos in positions:
            r = rows[pos]
            sid, idx, campaign, rcpt, sender, digest = r.submission, r.index, r.campaign, r.address, r.sender, r.body
            if digest not in bodies:
                bodies[digest] = await self.sender.fetch_body(digest)
            body = bodies[digest]
            if body is None:
                log.error("batch %s: body %s of submission %s is on no reachable node", self.bid, digest[:12], sid)
                continue  # not attempted: released back to the queue at the end
            try:
                if r.template is not None:  # an API request's copy: rendered from its template object
                    body = render_copy(bodies[digest], digest, r.template + idx, rcpt, self.sender.render_limits)
                msg = render_for_recipient(body, recipient=rcpt,
                                           message_id=recipient_message_id(sid, idx, sender.rpartition("@")[2]),
                                           dkim=self.sender.dkim, **self.sender.feedback_headers(sid, idx, campaign,
                                                                                                  rcpt, r.scope))
            except Exception as e:
                # The same body renders the same way on every node and at every retry: a
                # permanent outcome, decided once (bounced, the reason in the event).
                log.error("batch %s: submission %s cannot be rendered for %s: %s", self.bid, sid, rcpt, e)
                self.on_outcome(Outcome(pos, 554, "5.6.0",
                                        f"5.6.0 message cannot be rendered: {type(e).__name__}: {e}"[:200], ""))
                continue
            yield pos, rcpt, msg, self.sender.envelope_sender(sender, sid, idx)


class Sender:
    def __init__(self, node_id: str, incarnation: str, delivery: DeliverySection, feedback: FeedbackSection,
                 commit_timeout: float, view: Callable[[], StateView], propose: Propose,
                 read_state: Callable[[Callable[[MailState], Any]], Any], raft_status: Callable[[], dict],
                 lease_applied_at: Callable[[str], float | None], fetch_body: Callable[[str], Awaitable[bytes | None]],
                 tasks: Tasks, observer: DeliveryObserver, render_limits: RenderLimits) -> None:
        self.node_id, self.incarnation = node_id, incarnation
        self.delivery, self.feedback, self.commit_timeout = delivery, feedback, commit_timeout
        self.view = view  # the published read view: polled without the apply lock
        self.propose = propose
        self.read_state = read_state  # a locked read: only in a worker thread, bounded by a batch
        self.raft_status = raft_status
        self.lease_applied_at = lease_applied_at
        self.fetch_body = fetch_body  # from the local store, else from a peer
        self.tasks = tasks
        self.observer = observer
        self.running: dict[str, asyncio.Task] = {}
        # Batches this process already ran: never run one twice, even if its last report failed
        # (the lease returns what was not reported).
        self.finished: set[str] = set()
        self.stopping = False
        self.dkim = DkimKeyring(delivery.dkim) if delivery.dkim else None
        # MX lookups through [delivery] dns_servers; None: the system's resolver, read per lookup
        # (a machine without /etc/resolv.conf still starts, and sends through routes or a relay).
        self.resolver = make_resolver(delivery) if delivery.dns_servers else None
        self.render_limits = render_limits
        fb = feedback
        self.keys = FeedbackKeys(fb.unsubscribe_secret) if fb.unsubscribe_secret else None

    def use_dkim(self, entries: tuple[DkimSection, ...]) -> None:
        """Sign copies rendered from now on with `entries` (the keys are read before the swap)."""
        self.dkim = DkimKeyring(entries) if entries else None

    def envelope_sender(self, sender: str, sid: str, idx: int) -> str:
        """The copy's envelope sender: with [feedback] bounce_domain, a per-recipient VERP address
        there, so a late bounce or complaint names its copy; else the submission's sender."""
        domain = self.feedback.bounce_domain
        if domain is None or self.keys is None:
            return sender
        return f"{self.keys.local_part(BOUNCE_KIND, sid, idx)}@{domain}"

    def feedback_headers(self, sid: str, idx: int, campaign: str, rcpt: str, scope: str) -> dict:
        """render_for_recipient's unsubscribe and Feedback-ID arguments for one copy."""
        d, fb = self.delivery, self.feedback
        out: dict = {}
        if fb.feedback_id is not None:
            out["feedback_id"] = f"{campaign.replace(':', '-')}:{fb.feedback_id}"
        if self.keys is None:
            return out
        if fb.unsubscribe_scope == "cluster":
            scope = ""
        if d.unsubscribe_url:
            token = self.keys.link_token(LinkToken(rcpt, campaign, scope, sid, idx))
            out["unsubscribe_url"] = d.unsubscribe_url.replace("{token}", token)
        if fb.unsubscribe_mailto is not None:
            out["unsubscribe_mailto"] = f"{self.keys.local_part(UNSUBSCRIBE_KIND, sid, idx)}@{fb.unsubscribe_mailto}"
        return out

    def caught_up(self) -> bool:
        """Applied everything the current leader has told us is committed: before that, our
        view of our own batches may be stale (a restart replays an old journal)."""
        rs = self.raft_status()
        return rs["leader_commit_index"] is not None and rs["applied_index"] >= rs["leader_commit_index"]

    async def announce(self) -> None:
        """Commit this process's incarnation before taking any batch. Batches leased to the node's
        previous process go back to the queue in the same command, counted as possibly sent."""
        timeout = self.commit_timeout
        while not self.stopping:
            try:
                res = await self.propose(
                    Incarnate(self.node_id, self.incarnation, time.time()), timeout)
            except ProposalFailed as e:
                log.debug("incarnation not announced yet (%s)", e.reason)
                await asyncio.sleep(0.2)
                continue
            if res.get("abandoned"):
                log.warning("batch %s was leased to this node before it restarted: given back, %d recipients "
                            "back in the queue (counted as possibly sent twice)",
                            ",".join(res["abandoned"]), res.get("returned", 0))
            return

    def announced(self) -> bool:
        return self.view().incarnations.get(self.node_id) == self.incarnation

    async def run(self) -> None:
        limit = self.delivery.max_concurrent_batches
        announcing: asyncio.Task | None = None
        while not self.stopping:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                if not self.caught_up():
                    continue
                if not self.announced():
                    if announcing is None or announcing.done():
                        announcing = asyncio.create_task(self.announce())
                    continue
                mine = [(b.id, b.domain, list(b.items), b.lease, b.incarnation, b.source)
                        for b in self.view().batches_of(self.node_id)]
                self.finished &= {m[0] for m in mine}
                for bid, domain, items, lease, incarnation, source in mine:
                    if bid in self.running or bid in self.finished or len(self.running) >= limit:
                        continue
                    if incarnation != self.incarnation:
                        # Leased to this node's previous process, which may have sent any of it.
                        self.finished.add(bid)
                        self.tasks.start(self._abandon(bid), f"abandon batch {bid}")
                        continue
                    task = asyncio.create_task(BatchRun(self, bid, domain, items, lease, source).run())
                    self.running[bid] = task
                    task.add_done_callback(lambda _t, bid=bid: self._done(bid))
            except Exception:
                log.exception("sender poll failed")
        if announcing is not None:
            announcing.cancel()

    async def _abandon(self, bid: str) -> None:
        try:
            res = await self.propose(Abandon(bid, self.node_id, self.incarnation, time.time()),
                                                   self.commit_timeout)
            log.warning("batch %s was leased to this node before it restarted: given back, %d recipients "
                        "back in the queue (counted as possibly sent twice)", bid, res.get("abandoned", 0))
        except ProposalFailed as e:
            log.warning("batch %s: could not give it back (%s); its lease will expire", bid, e.reason)

    def _done(self, bid: str) -> None:
        self.running.pop(bid, None)
        self.finished.add(bid)

    async def stop(self, grace: float = 10.0) -> None:
        """Finish the message in flight, report every outcome, release the rest, then return:
        a clean stop (a rolling restart) sends nothing twice."""
        self.stopping = True
        running = list(self.running.values())
        if running:
            _done, pending = await asyncio.wait(running, timeout=grace)
            for t in pending:
                t.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        # Batches the leader handed us after we stopped taking new ones were never started:
        # nothing of them was sent, so they go straight back to the queue.
        unstarted = [(b.id, list(b.items)) for b in self.view().batches_of(self.node_id)
                     if b.id not in self.finished]
        for bid, items in unstarted:
            try:
                await self.propose(
                    Report(bid, self.node_id, time.time(), self.delivery.max_age, (), items),
                    STOP_REPORT_SECONDS)
            except ProposalFailed:
                break  # no quorum: their lease returns them
