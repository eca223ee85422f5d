"""Monitoring for one node: Prometheus metrics on the admin address (`/metrics`), and the health
probes load balancers ask (`/healthz`, `/readyz`).

Metrics are read at scrape time from the sources the node wires in (`NodeSources`: the Raft
node, the read view, the body store, the task supervisor, and the intake, webhook and feedback desk
once they run), or counted by small hooks in the I/O shell (intake, sender). Nothing here writes to
the state machine. Label values are
bounded: reply codes, SMTP commands, recipient states, member ids, and destination domains capped
to the names of the cluster file's [delivery.domains] tables plus "other".
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from aiohttp import web
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from raftmail.consensus.commands import Noop
from raftmail.consensus.domains import normalise_domain
from raftmail.consensus.outcomes import STATE_NAMES
from raftmail.node.bridge import Propose, ProposalFailed
from raftmail.node.config import MonitoringSection

if TYPE_CHECKING:
    from raftmail.consensus.raft import RaftNode
    from raftmail.consensus.view import StateView
    from raftmail.node.bodies import BodyStore
    from raftmail.node.tasks import Tasks

OTHER_DOMAIN = "other"
ROLES = ("leader", "follower", "candidate")
DISK_STORES = ("journal", "snapshot", "bodies")  # what raftmail_disk_full reports on
# Seconds from the end of DATA to the reply: body replication plus the Raft commit.
INTAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Seconds per recipient attempt (the first of a batch includes route lookup and connecting).
DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
MAX_TRACKED_BATCHES = 1024  # batches whose last attempt time is remembered (for the latency)
READY_WRITE_TIMEOUT = 1.0  # seconds a /readyz?write=1 noop may take to commit


def domain_label(domain: str, known: frozenset[str]) -> str:
    """A destination domain as a label value: a configured [delivery.domains] name, else "other"."""
    d = normalise_domain(domain)
    return d if d in known else OTHER_DOMAIN


def reply_code(reply: str) -> str:
    """The three-digit code of an SMTP reply line ("000" if it has none)."""
    code = reply[:3]
    return code if code.isdigit() else "000"


def readiness(rs: dict, members: int, max_lag: int) -> tuple[bool, str]:
    """Is this node fit to take SMTP submissions? (ready, reason), from its Raft status.

    Ready means part of a quorum (pysyncobj connected to a majority, and a known leader that is
    this node or connected to it and heard from lately) and caught up (applied index within `max_lag` entries of the
    leader's commit index as this node last heard it)."""
    connected = len(rs.get("partners_connected") or [])
    leader = rs.get("leader_addr")
    silent = rs.get("leader_silent_for")
    if not rs.get("has_quorum") and 2 * (connected + 1) > members:
        # Connected to a majority: it is the leader that is missing or silent.
        if leader is None:
            return False, "no known leader (election in progress?)"
        if silent is not None:
            return False, f"no quorum: nothing heard from the leader {leader} for {silent:.1f}s"
    if not rs.get("has_quorum"):
        return False, f"no quorum: connected to {connected + 1} of {members} members"
    if leader is None:
        return False, "no known leader (election in progress?)"
    if rs.get("role") != "leader" and leader not in (rs.get("partners_connected") or []):
        return False, f"the leader {leader} is not connected"
    leader_commit = rs.get("leader_commit_index")
    if leader_commit is None:
        return False, "the leader's commit index is not known yet"
    lag = leader_commit - (rs.get("applied_index") or 0)
    if lag > max_lag:
        return False, f"catching up: applied index {rs.get('applied_index')} is {lag} entries behind " \
                      f"the leader's commit index {leader_commit} (ready within {max_lag})"
    return True, f"ready: in a quorum with leader {leader}, {max(lag, 0)} entries behind"


@dataclass
class NodeSources:
    """What a scrape reads, each piece named. The components that start with the node's loop
    (intake, webhook, feedback desk, proposer) are attached when they exist: until then their
    metrics are absent, not guessed."""

    node_id: str
    cluster: str
    monitoring: MonitoringSection
    raft: "RaftNode"
    view: Callable[[], "StateView"]  # the published read view
    members: Callable[[], dict]  # id -> member record
    storage_problems: Callable[[], dict[str, str]]
    store: "BodyStore"
    bodies_fetched: Callable[[], int]
    tasks: "Tasks"
    propose: Propose | None = None
    intake_connections: Callable[[], dict[str, int]] | None = None
    webhook: Any = None  # webhook.WebhookPoster, when one is configured
    feedback_counters: Callable[[], dict[str, int]] | None = None


class NodeMetrics:
    """The metric registry of one node, and the hooks the I/O shell calls."""

    def __init__(self, sources: NodeSources, domains: frozenset[str]) -> None:
        self.sources = sources
        self.domains = frozenset(d for d in domains if d != "default")
        # `_created` series would double the series count and say nothing an operator watches.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=False)
        reg = self.registry
        self.submissions = Counter("raftmail_intake_submissions", "SMTP submissions (DATA) answered "
                                   "by this node, by result: accepted, duplicate, refused",
                                   ["result"], registry=reg)
        self.recipients = Counter("raftmail_intake_recipients", "Recipients of SMTP submissions answered "
                                  "by this node, by result: accepted, duplicate, refused",
                                  ["result"], registry=reg)
        self.refused_replies = Counter("raftmail_intake_refused", "SMTP commands this node refused, by command "
                               "and reply code", ["command", "code"], registry=reg)
        self.intake_seconds = Histogram("raftmail_intake_seconds", "Seconds from the end of DATA to the "
                                        "reply (body replication and Raft commit)",
                                        buckets=INTAKE_BUCKETS, registry=reg)
        self.deliveries = Counter("raftmail_deliveries", "Recipient delivery attempts made by this node, "
                                  "by outcome and destination domain", ["outcome", "domain"], registry=reg)
        self.delivery_seconds = Histogram("raftmail_delivery_seconds", "Seconds per recipient delivery "
                                          "attempt by this node (the first of a batch includes connecting)",
                                          ["domain"], buckets=DELIVERY_BUCKETS, registry=reg)
        self.batches_started = Counter("raftmail_batches_started", "Leased batches this node started "
                                       "delivering", registry=reg)
        self._batch_clock: OrderedDict[str, float] = OrderedDict()
        # (outcome, domain label) -> its delivery counter and latency histogram: looking a labelled
        # child up costs more than counting with it, once per recipient. Bounded like the labels.
        self._outcome_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._write_proof = 0.0  # monotonic time of the last committed /readyz noop
        self._proving: asyncio.Future[tuple[bool, str]] | None = None  # the one noop in flight
        reg.register(_NodeCollector(self))

    # ---------------------------------------------------------------- hooks

    # -- the intake observer (smtp_server.IntakeObserver): every refusal and every DATA answer

    def refused(self, command: str, reply: str) -> None:
        self.refused_replies.labels(command, reply_code(reply)).inc()

    def data_answered(self, reply: str, n_recipients: int, seconds: float) -> None:
        self.intake_seconds.observe(seconds)
        if reply.startswith("250"):
            result = "duplicate" if "Already queued" in reply else "accepted"
        else:
            result = "refused"
            self.refused("DATA", reply)
        self.submissions.labels(result).inc()
        self.recipients.labels(result).inc(n_recipients)

    def batch_started(self, bid: str) -> None:
        self.batches_started.inc()
        self._batch_clock[bid] = time.monotonic()
        while len(self._batch_clock) > MAX_TRACKED_BATCHES:
            self._batch_clock.popitem(last=False)

    def delivery_outcome(self, bid: str, domain: str, outcome: str) -> None:
        """One recipient attempt finished with `outcome` (delivered, deferred, bounced)."""
        key = (outcome, domain_label(domain, self.domains))
        children = self._outcome_children.get(key)
        if children is None:
            children = self._outcome_children[key] = (self.deliveries.labels(*key), self.delivery_seconds.labels(key[1]))
        children[0].inc()
        now = time.monotonic()
        last = self._batch_clock.get(bid)
        if last is not None:
            children[1].observe(now - last)
            self._batch_clock[bid] = now

    # ---------------------------------------------------------------- probes

    def ready(self) -> tuple[bool, str]:
        src = self.sources
        return readiness(src.raft.raft_status(), len(src.raft.otherNodes) + 1, src.monitoring.ready_max_lag)

    async def prove_quorum(self) -> tuple[bool, str]:
        """A committed noop, unless one committed within [monitoring] ready_write_window. Probes
        arriving while a noop is in flight share its answer: at most one noop at a time, and at
        most one per window, however many probes come."""
        if time.monotonic() - self._write_proof < self.sources.monitoring.ready_write_window:
            return True, "a noop committed recently"
        if self._proving is None:
            self._proving = asyncio.ensure_future(self._commit_noop())
            self._proving.add_done_callback(lambda _f: setattr(self, "_proving", None))
        return await asyncio.shield(self._proving)

    async def _commit_noop(self) -> tuple[bool, str]:
        if self.sources.propose is None:
            return False, "the node is still starting"
        try:
            await self.sources.propose(Noop(), READY_WRITE_TIMEOUT)
        except ProposalFailed as e:
            return False, f"a noop write did not commit: {e.reason}"
        self._write_proof = time.monotonic()
        return True, "a noop write committed"

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _NodeCollector:
    """Gauges and counters read from the node and its replicated state at scrape time."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        node = self.metrics.sources
        yield from self._raft(node)
        yield from self._queue(node)
        yield from self._intake(node)
        yield from self._bodies(node)
        yield from self._disk(node)
        yield from self._webhook(node)
        yield from self._feedback(node)

    def _raft(self, node: NodeSources) -> Iterator[Metric]:
        rs = node.raft.raft_status()
        info = InfoMetricFamily("raftmail_node", "This node's id and cluster name")
        info.add_metric([], {"node": node.node_id, "cluster": node.cluster})
        yield info
        role = GaugeMetricFamily("raftmail_raft_role", "1 for this node's current Raft role", labels=["role"])
        for r in ROLES:
            role.add_metric([r], 1.0 if rs["role"] == r else 0.0)
        yield role
        yield _gauge("raftmail_raft_term", "Current Raft term", rs["term"] or 0)
        yield _gauge("raftmail_raft_commit_index", "Highest log index known committed", rs["commit_index"] or 0)
        yield _gauge("raftmail_raft_applied_index", "Highest log index applied to the state",
                     rs["applied_index"] or 0)
        known = rs["leader_commit_index"] is not None and rs["leader_addr"] is not None
        yield _gauge("raftmail_raft_leader_known", "1 when this node knows a leader", 1 if known else 0)
        if rs["leader_commit_index"] is not None:
            yield _gauge("raftmail_raft_leader_commit_index", "The leader's commit index as this node last "
                         "heard it", rs["leader_commit_index"])
            yield _gauge("raftmail_raft_lag_entries", "Log entries this node's applied index is behind the "
                         "leader's commit index", max(0, rs["leader_commit_index"] - (rs["applied_index"] or 0)))
        yield _counter("raftmail_raft_leader_changes", "Times this node became or stopped being the "
                       "leader (odd while it leads)", rs["leader_changes"])
        yield _gauge("raftmail_raft_quorum", "1 when this node is connected to a majority of the members",
                     1 if rs["has_quorum"] else 0)
        yield _gauge("raftmail_raft_peers_connected", "Other members this node's Raft transport is "
                     "connected to", len(rs["partners_connected"]))
        yield _gauge("raftmail_raft_members", "Members of the Raft membership, this node included",
                     len(node.raft.otherNodes) + 1)
        yield _gauge("raftmail_raft_log_entries", "Entries in this node's Raft log (since the last "
                     "snapshot)", rs["log_len"] or 0)
        yield _counter("raftmail_raft_tick_errors", "Exceptions in this node's Raft tick thread",
                       node.raft.tick_errors)
        yield _counter("raftmail_task_crashes", "Background tasks of this node that died with an exception "
                       "(each one is a bug; long-running ones are started again)", node.tasks.crashes)
        ready, _ = readiness(rs, len(node.raft.otherNodes) + 1, node.monitoring.ready_max_lag)
        yield _gauge("raftmail_ready", "1 when /readyz answers 200 (caught up and in a quorum)", 1 if ready else 0)

    def _queue(self, node: NodeSources) -> Iterator[Metric]:
        v = node.view()  # the published view: a scrape never waits for the apply lock
        q = {"counts": v.counts, "batches": v.node_batches, "stats": v.stats, "submissions": v.submissions,
             "campaigns": v.campaigns, "suppressed": v.suppressed, "events": v.event_seq}
        states = GaugeMetricFamily("raftmail_recipients", "Recipients in the cluster's queue by state "
                                   "(replicated: the same on every caught-up node)", labels=["state"])
        for i, name in enumerate(STATE_NAMES):
            states.add_metric([name], q["counts"][i])
        yield states
        batches = GaugeMetricFamily("raftmail_batches_in_flight", "Leased batches per holder (replicated)",
                                    labels=["node"])
        for holder in sorted(set(q["batches"]) | set(node.members())):
            batches.add_metric([holder], q["batches"].get(holder, 0))
        yield batches
        level = GaugeMetricFamily("raftmail_backoff_level", "Adaptive backoff of a destination site (a domain, "
                                  "or its MX rollup group): its limits are divided by 2**level (replicated)",
                                  labels=["site"])
        paused = GaugeMetricFamily("raftmail_backoff_suspended_seconds", "Seconds a destination site stays "
                                   "suspended after throttling replies (replicated)", labels=["site"])
        now = time.time()
        for site, b in sorted(v.backoff.items()):
            level.add_metric([site], b.level)
            paused.add_metric([site], max(0.0, b.suspended_until - now))
        yield level
        yield paused
        yield _gauge("raftmail_submissions", "Submissions kept in the replicated state", q["submissions"])
        yield _gauge("raftmail_campaigns", "Campaigns kept in the replicated state", q["campaigns"])
        yield _gauge("raftmail_suppressed_addresses", "Addresses on the replicated suppression list",
                     q["suppressed"])
        s = q["stats"]
        yield _counter("raftmail_lease_expiries", "Batch leases that ran out (replicated)", s.get("lease_expiries", 0))
        yield _counter("raftmail_recipients_reassigned", "Recipients returned to the queue by a lease "
                       "expiry, possibly sent already (replicated)", s.get("reassigned_in_flight", 0))
        yield _counter("raftmail_fenced_outcomes", "Outcomes reported after the lease moved on (replicated)",
                       s.get("fenced_reports", 0))
        yield _counter("raftmail_maybe_delivered", "Final dots that got no reply: the receiver may have the "
                       "copy, and a retry may duplicate it (replicated)", s.get("maybe_delivered", 0))
        yield _counter("raftmail_batches_abandoned", "Batches a restarted node gave back, counted as possibly "
                       "sent (replicated)", s.get("batches_abandoned", 0))
        yield _counter("raftmail_duplicate_submissions", "Submissions deduplicated by Message-ID and "
                       "sender (replicated)", s.get("duplicates_refused", 0))
        yield _counter("raftmail_commands_refused", "Replicated commands the state machine refused",
                       s.get("commands_refused", 0))
        yield _counter("raftmail_apply_errors", "Replicated commands whose apply raised an unexpected "
                       "exception: a bug, logged with the command (replicated)", s.get("apply_errors", 0))
        yield _counter("raftmail_outcome_events", "Recipient outcome events committed (replicated)", q["events"])

    def _intake(self, node: NodeSources) -> Iterator[Metric]:
        if node.intake_connections is None:
            return
        conns = node.intake_connections()
        yield _gauge("raftmail_intake_connections_open", "SMTP client connections open on this node",
                     conns.get("open", 0))
        yield _counter("raftmail_intake_connections_refused", "SMTP connections refused with 421 (too many)",
                       conns.get("refused", 0))
        yield _counter("raftmail_intake_refused_per_client", "SMTP connections refused with 421 because "
                       "their client outside allow_networks held max_connections_per_client",
                       conns.get("refused_per_client", 0))
        yield _counter("raftmail_intake_refused_strangers", "SMTP connections refused with 421 because clients "
                       "outside allow_networks, not authenticated, held max_stranger_connections",
                       conns.get("refused_strangers", 0))
        yield _counter("raftmail_intake_unauthenticated_timeouts", "SMTP sessions outside allow_networks "
                       "closed with 421 for not authenticating within unauthenticated_timeout",
                       conns.get("unauthenticated_timeouts", 0))
        yield _counter("raftmail_intake_data_timeouts", "SMTP sessions closed with 421 for message text "
                       "not complete within data_timeout (nothing queued)", conns.get("data_timeouts", 0))

    def _disk(self, node: NodeSources) -> Iterator[Metric]:
        full = GaugeMetricFamily("raftmail_disk_full", "1 while this node cannot store for want of disk "
                                 "space (it then refuses submissions with 452)", labels=["store"])
        problems = node.storage_problems()
        for store in DISK_STORES:
            full.add_metric([store], 1 if store in problems else 0)
        yield full

    def _bodies(self, node: NodeSources) -> Iterator[Metric]:
        count, size = node.store.stats()
        yield _gauge("raftmail_body_store_bodies", "Message bodies in this node's body store", count)
        yield _gauge("raftmail_body_store_bytes", "Bytes of message bodies in this node's body store", size)
        yield _counter("raftmail_bodies_fetched", "Bodies this node fetched from peers",
                       node.bodies_fetched())

    def _webhook(self, node: NodeSources) -> Iterator[Metric]:
        hook = node.webhook
        if hook is None:
            return
        yield _gauge("raftmail_webhook_cursor", "Last outcome event seq the webhook acknowledged to this node",
                     hook.cursor)
        yield _counter("raftmail_webhook_posts_ok", "Webhook POSTs acknowledged with 2xx", hook.posts_ok)
        yield _counter("raftmail_webhook_posts_failed", "Webhook POSTs that failed (retried)", hook.posts_failed)
        yield _counter("raftmail_webhook_events_posted", "Outcome events acknowledged by the webhook",
                       hook.events_posted)
        yield _counter("raftmail_webhook_events_skipped", "Outcome events that left the ring before the "
                       "webhook got them", hook.events_skipped)

    def _feedback(self, node: NodeSources) -> Iterator[Metric]:
        if node.feedback_counters is None:
            return
        family = CounterMetricFamily("raftmail_feedback", "What this node did with reports mailed to the "
                                     "feedback domains and one-click unsubscribes, by result (unparsed: "
                                     "accepted, nothing recognised; forged: a token no key made)", labels=["result"])
        for result, n in node.feedback_counters().items():
            family.add_metric([result], n)
        yield family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


# ---------------------------------------------------------------- HTTP

def add_monitoring_routes(app: web.Application, metrics: NodeMetrics, started: float) -> None:
    """GET /metrics, /healthz and /readyz on the node's admin app (`started`: the node's start,
    wall clock, for the uptime it reports)."""
    node_id = metrics.sources.node_id

    async def h_metrics(request: web.Request) -> web.Response:
        # In a thread: the body store walk must not stall SMTP intake.
        body = await asyncio.to_thread(metrics.exposition)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def h_healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "node": node_id, "uptime": round(time.time() - started, 1)})

    async def h_readyz(request: web.Request) -> web.Response:
        ready, reason = metrics.ready()
        if ready and request.query.get("write") in ("1", "true", "yes"):
            ready, reason = await metrics.prove_quorum()
        return web.json_response({"ready": ready, "node": node_id, "reason": reason}, status=200 if ready else 503)

    app.router.add_get("/metrics", h_metrics)
    app.router.add_get("/healthz", h_healthz)
    app.router.add_get("/readyz", h_readyz)
