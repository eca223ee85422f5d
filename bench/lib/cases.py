"""The benchmark cases and the peers they are compared with.

Each case measures one run and returns a value per row; bench/run.py repeats it, keeps the clean
runs and renders the table. Every run starts its servers afresh in its own scratch folder and stops
them before it returns, so runs do not see each other's queues."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import peers
from .cluster import CLUSTER_STOP_GRACE, FAILED_STATES, Cluster, ClusterSpec, queue_final, queue_total
from .cpu import IdlePolicy
from .loadgen import recipients_for
from .peers import Load, LoadResult, PlainSmtpd, SmtpSink
from .postfix import PostfixRelay
from .procs import LOOPBACK, BenchError, spawn, wait_until
from .report import Row

BULK_RECIPIENTS = 100             # "100 recipients per message"
LARGE_BODY_BYTES = 50 * 1024      # "50 KB messages"
POSTFIX_RECIPIENTS_PER_DELIVERY = 50  # Postfix's smtp_destination_recipient_limit default
MIN_DRAIN_RATE = 20.0             # msg/s: a slower drain is reported as a failure, not waited for
MIN_DRAIN_TIMEOUT = 120.0
COMMIT_CHECK_TIMEOUT = 30.0       # after the last 250, every node must show the recipients queued
ELECTION_TIMEOUT = 30.0
ORPHAN_GRACE = 60.0  # past the lease, how long the dead node's recipients may take to be delivered
ELECTION_POLL_INTERVAL = 0.02
CATCHUP_TIMEOUT = 600.0
CATCHUP_POLL_INTERVAL = 0.02
HOLD_SECONDS = 3600.0             # memory case: deliveries wait this long on the silent relay
BLACKHOLE_BACKLOG = 64
LATENCY_SESSIONS = 20
FILL_ROUNDS = 5                   # memory / catch-up: resubmit refused messages this many times
LATE_WARNING_MS = 50.0            # paced load this far behind schedule did not hold the rate


@dataclass(frozen=True)
class Sizes:
    """How much work each case does; FULL is the target size, QUICK only exercises the machinery."""

    messages: int                 # 2 KB messages, 1 recipient (cases 1, 2, 7)
    bulk_messages: int            # messages with BULK_RECIPIENTS recipients
    large_messages: int           # 50 KB messages
    failover_rate: float          # msg/s of steady load during the failover case
    failover_seconds: float
    failover_kill_after: float
    catchup_outcomes: int         # recipient outcomes committed while a node is down
    memory_recipients: int
    latency_seconds: float
    latency_min_messages: int
    sessions: int = 20
    body_bytes: int = 2048
    failover_sessions: int = 12


FULL = Sizes(messages=20000, bulk_messages=2000, large_messages=5000, failover_rate=200.0,
             failover_seconds=15.0, failover_kill_after=5.0, catchup_outcomes=100_000,
             memory_recipients=1_000_000, latency_seconds=20.0, latency_min_messages=1000)
QUICK = Sizes(messages=300, bulk_messages=20, large_messages=100, failover_rate=50.0,
              failover_seconds=4.5, failover_kill_after=1.5, catchup_outcomes=2000,
              memory_recipients=5000, latency_seconds=2.0, latency_min_messages=100)


@dataclass
class Ctx:
    """Everything a case needs to know about this invocation of the harness."""

    quick: bool
    runs: int
    generator: str                # "smtp-source" or "python"
    python: str
    workdir: Path
    idle: IdlePolicy
    sizes: Sizes
    node_command: str
    destination: str              # "smtp-sink" or "aiosmtpd"
    progress: Callable[[str], None]
    rows: dict[str, Row] = field(default_factory=dict)
    run_index: int = 0
    run_notes: list[str] = field(default_factory=list)  # added by helpers during one run
    _scratch_count: int = 0

    def scratch(self, name: str) -> Path:
        """A new folder for one run; world-searchable so Postfix's user can reach its queue."""
        self._scratch_count += 1
        path = self.workdir / f"{self._scratch_count:03d}-{name}"
        path.mkdir(parents=True)
        path.chmod(0o755)
        return path

    def median(self, key: str) -> float | None:
        row = self.rows.get(key)
        return row.median if row else None


@dataclass
class Measurement:
    values: dict[str, float]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RowSpec:
    key: str
    title: str
    unit: str
    baselines: tuple[str, ...] = ()
    lower_is_better: bool = False
    timed_load: bool = False      # measured with the Python generator whatever --generator says


@dataclass(frozen=True)
class Case:
    id: str
    group: str                    # "peers" or "raftmail"
    needs: tuple[str, ...]
    rows: tuple[RowSpec, ...]
    measure: Callable[[Ctx], Measurement]
    heavy: bool = False           # long runs: full mode caps them at HEAVY_CASE_RUNS
    full_runs: int | None = None  # full mode: exactly this many runs (failover: the median of 10)


HEAVY_CASE_RUNS = 3


# --------------------------------------------------------------------------------------------
# Loads and destinations
# --------------------------------------------------------------------------------------------


def base_load(ctx: Ctx) -> Load:
    return Load(messages=ctx.sizes.messages, sessions=ctx.sizes.sessions, body_bytes=ctx.sizes.body_bytes)


def bulk_load(ctx: Ctx) -> Load:
    return Load(messages=ctx.sizes.bulk_messages, sessions=ctx.sizes.sessions,
                recipients=BULK_RECIPIENTS, body_bytes=ctx.sizes.body_bytes)


def large_load(ctx: Ctx) -> Load:
    return Load(messages=ctx.sizes.large_messages, sessions=ctx.sizes.sessions,
                body_bytes=LARGE_BODY_BYTES)


@dataclass(frozen=True)
class Variant:
    suffix: str                   # "" / "-rcpt100" / "-50kb"
    label: str
    unit: str
    load: Callable[[Ctx], Load]

    def rate(self, load: Load, seconds: float) -> float:
        count = load.total_recipients if self.unit == "rcpt/s" else load.messages
        return count / seconds


VARIANTS = (
    Variant("", "2 KB, 1 rcpt", "msg/s", base_load),
    Variant("-rcpt100", f"2 KB, {BULK_RECIPIENTS} rcpt/msg", "rcpt/s", bulk_load),
    Variant("-50kb", "50 KB, 1 rcpt", "msg/s", large_load),
)


def drain_timeout(messages: int) -> float:
    return max(MIN_DRAIN_TIMEOUT, messages / MIN_DRAIN_RATE)


@contextlib.contextmanager
def destination(ctx: Ctx, root: Path) -> Iterator[SmtpSink | PlainSmtpd]:
    """Where Postfix and raftmail deliver: smtp-sink, or the plain aiosmtpd server without it."""
    dest = peers.start_destination(root, prefer_smtp_sink=ctx.destination == "smtp-sink",
                                   python=ctx.python)
    try:
        yield dest
    finally:
        dest.stop()


@contextlib.contextmanager
def postfix_relay(root: Path, relay_port: int) -> Iterator[PostfixRelay]:
    relay = PostfixRelay(root / "postfix", relay_port)
    try:
        relay.start()
        yield relay
    finally:
        relay.remove()


@contextlib.contextmanager
def raftmail_cluster(ctx: Ctx, root: Path, spec: ClusterSpec) -> Iterator[tuple[Cluster, str]]:
    cluster = Cluster(root / "cluster", spec, ctx.python, ctx.node_command)
    try:
        leader = cluster.start_all()
        first_term = (cluster.status(leader) or {}).get("term")
        yield cluster, leader
        # Elections during a run are worth knowing: each one costs the clients a round of 451s.
        terms = [s["term"] for s in map(cluster.status, cluster.live_ids()) if s and "term" in s]
        if first_term is not None and terms and max(terms) > first_term:
            ctx.run_notes.append(f"raft term went from {first_term} to {max(terms)} during the run "
                                 "(leader elections)")
    finally:
        killed = cluster.stop_all()
        if killed:
            ctx.progress(f"  (nodes {', '.join(killed)} did not stop within {CLUSTER_STOP_GRACE:g} s "
                         "of SIGTERM and were killed)")


def drive(ctx: Ctx, ports: list[int], load: Load) -> LoadResult:
    result = peers.drive(ports, load, ctx.generator, ctx.python)
    if result.error:
        raise BenchError(f"load generator: {result.error}")
    return result


def drive_cluster(ctx: Ctx, cluster: Cluster, load: Load, among: list[str] | None = None) -> LoadResult:
    """Load the cluster's SMTP ports, counting 4xx replies instead of stopping at the first: a
    451 while the leader changes is raftmail telling the client to try again, not a broken run."""
    load = dataclasses.replace(load, tolerate_refusals=True)
    result = peers.drive(cluster.smtp_ports(among), load, ctx.generator, ctx.python)
    dead = cluster.dead_node_report(among)
    if result.error or dead:
        raise BenchError(f"load generator: {result.error or 'finished'}" + (f"; {dead}" if dead else ""))
    return result


def refusal_note(result: LoadResult, load: Load, resubmitted: bool = False) -> list[str]:
    if not result.refused:
        return []
    what = "resubmitted in a later round" if resubmitted else "not retried; rates count committed ones only"
    return [f"{result.refused} of {load.messages} submissions refused, {what} (first: {result.first_refusal})"]


def committed_recipients(cluster: Cluster, node_id: str, result: LoadResult) -> int:
    """Recipients the node counts once every 250 the generator saw is applied there."""
    queue, _ = cluster.wait_queue(node_id, lambda q: queue_total(q) >= result.recipients_ok,
                                  COMMIT_CHECK_TIMEOUT,
                                  f"{node_id} to show the {result.recipients_ok} recipients answered 250")
    committed = queue_total(queue)
    if committed == 0:
        raise BenchError(f"nothing was committed: {result.refused} refusals, first: {result.first_refusal}")
    return committed


def fill_queue(ctx: Ctx, cluster: Cluster, node_id: str, recipients: int, *,
               among: list[str] | None = None) -> tuple[int, list[str]]:
    """Submit bulk messages until the node counts at least `recipients` queued recipients,
    resubmitting what was refused (up to FILL_ROUNDS rounds); returns the count and notes."""
    notes: list[str] = []
    for _ in range(FILL_ROUNDS):
        queued = queue_total(cluster.queue(node_id) or {})
        missing = recipients - queued
        if missing <= 0:
            return queued, notes
        load = Load(messages=math.ceil(missing / BULK_RECIPIENTS), sessions=ctx.sizes.sessions,
                    recipients=BULK_RECIPIENTS, body_bytes=ctx.sizes.body_bytes)
        result = drive_cluster(ctx, cluster, load, among)
        notes += refusal_note(result, load, resubmitted=True)
        committed_recipients(cluster, node_id, result)
    queued = queue_total(cluster.queue(node_id) or {})
    if queued < recipients:
        raise BenchError(f"only {queued} of {recipients} recipients queued after {FILL_ROUNDS} rounds; "
                         + " ".join(notes))
    return queued, notes


def wait_destination(dest: SmtpSink | PlainSmtpd, expected: int, timeout: float) -> float:
    return peers.wait_for_count(dest.messages, expected, timeout, f"{dest.kind} message count")


# --------------------------------------------------------------------------------------------
# Peer cases
# --------------------------------------------------------------------------------------------


def measure_sink_direct(ctx: Ctx) -> Measurement:
    load = base_load(ctx)
    root = ctx.scratch("sink-direct")
    sink = SmtpSink(root)
    try:
        result = drive(ctx, [sink.port], load)
        wait_destination(sink, load.messages, COMMIT_CHECK_TIMEOUT)
    finally:
        sink.stop()
    return Measurement({"sink-direct": load.messages / result.elapsed})


def measure_intake_baseline(variant: Variant) -> Callable[[Ctx], Measurement]:
    def measure(ctx: Ctx) -> Measurement:
        load = variant.load(ctx)
        server = PlainSmtpd(ctx.scratch("intake-baseline"), ctx.python)
        try:
            result = drive(ctx, [server.port], load)
            counted = server.stats()
        finally:
            server.stop()
        if counted["messages"] != load.messages or counted["recipients"] != load.total_recipients:
            raise BenchError(f"aiosmtpd counted {counted}, expected {load.messages} messages / "
                             f"{load.total_recipients} recipients")
        return Measurement({f"intake{variant.suffix}-baseline": variant.rate(load, result.elapsed)})

    return measure


def postfix_run(ctx: Ctx, load: Load) -> tuple[float, float]:
    """Seconds until smtp-source was done, and until the destination had every message."""
    root = ctx.scratch("postfix")
    per_message = math.ceil(load.recipients / POSTFIX_RECIPIENTS_PER_DELIVERY)
    with destination(ctx, root) as dest, postfix_relay(root, dest.port) as relay:
        started = time.monotonic()
        result = drive(ctx, [relay.port], load)
        delivered_at = wait_destination(dest, load.messages * per_message, drain_timeout(load.messages))
    return result.elapsed, delivered_at - started


def measure_intake_postfix(variant: Variant) -> Callable[[Ctx], Measurement]:
    def measure(ctx: Ctx) -> Measurement:
        load = variant.load(ctx)
        accept_seconds, e2e_seconds = postfix_run(ctx, load)
        note = f"end to end in the same runs: {variant.rate(load, e2e_seconds):.0f} {variant.unit}"
        return Measurement({f"intake{variant.suffix}-postfix": variant.rate(load, accept_seconds)},
                           [note])

    return measure


def measure_e2e_postfix(ctx: Ctx) -> Measurement:
    load = base_load(ctx)
    accept_seconds, e2e_seconds = postfix_run(ctx, load)
    return Measurement({"e2e-postfix": load.messages / e2e_seconds},
                       [f"accepted at {load.messages / accept_seconds:.0f} msg/s in the same runs"])


# --------------------------------------------------------------------------------------------
# Latency at half the maximum rate (peers and raftmail)
# --------------------------------------------------------------------------------------------


def half_max_rate(ctx: Ctx, intake_key: str, measure_max: Callable[[], float]) -> tuple[float, str]:
    """Half of this invocation's intake median when that case ran, else of a fresh closed-loop run."""
    median = ctx.median(intake_key)
    if median:
        return median / 2, f"rate = half of {intake_key}'s median {median:.0f} msg/s"
    maximum = measure_max()
    return maximum / 2, f"rate = half of {maximum:.0f} msg/s measured first ({ctx.generator}, closed loop)"


def paced_latency(ctx: Ctx, ports: list[int], rate: float, prefix: str,
                  tolerate: bool = False) -> Measurement:
    messages = max(ctx.sizes.latency_min_messages, int(rate * ctx.sizes.latency_seconds))
    # Connections are reused: per-message connects cost the Python generator more CPU than the
    # rates here leave it, and the measured span (final dot to reply) does not include them.
    load = Load(messages=messages, sessions=LATENCY_SESSIONS, body_bytes=ctx.sizes.body_bytes,
                reuse=True, tolerate_refusals=tolerate)
    result = peers.run_python_load(ports, load, ctx.python, rate=rate)
    if result.error:
        raise BenchError(f"paced load: {result.error}")
    latency = result.latency_ms or {}
    if not latency.get("count"):
        raise BenchError("paced load timed no replies")
    lag = (result.start_lag_ms or {}).get("p99") or 0.0
    sent_rate = (messages - 1) / result.send_seconds if result.send_seconds else rate
    notes = [f"target {rate:.0f} msg/s over {messages} messages: sent at {sent_rate:.0f} msg/s, "
             f"p99 start lag {lag:.1f} ms"]
    if lag > LATE_WARNING_MS:
        notes.append("the generator fell behind its schedule (all sessions busy or CPU short): "
                     "the server saw less than the target rate")
    notes += refusal_note(result, load)
    return Measurement({f"{prefix}-p50": latency["p50"], f"{prefix}-p99": latency["p99"]}, notes)


def measure_latency_baseline(ctx: Ctx) -> Measurement:
    server = PlainSmtpd(ctx.scratch("latency-baseline"), ctx.python)
    try:
        def measure_max() -> float:
            before = server.messages()
            load = base_load(ctx)
            result = drive(ctx, [server.port], load)
            if server.messages() - before != load.messages:
                raise BenchError("aiosmtpd miscounted the closed-loop run")
            return load.messages / result.elapsed

        rate, how = half_max_rate(ctx, "intake-baseline", measure_max)
        measurement = paced_latency(ctx, [server.port], rate, "latency-baseline")
    finally:
        server.stop()
    measurement.notes.insert(0, how)
    return measurement


def measure_latency_postfix(ctx: Ctx) -> Measurement:
    root = ctx.scratch("latency-postfix")
    with destination(ctx, root) as dest, postfix_relay(root, dest.port) as relay:
        def measure_max() -> float:
            load = base_load(ctx)
            before = dest.messages()
            result = drive(ctx, [relay.port], load)
            wait_destination(dest, before + load.messages, drain_timeout(load.messages))
            return load.messages / result.elapsed

        rate, how = half_max_rate(ctx, "intake-postfix", measure_max)
        measurement = paced_latency(ctx, [relay.port], rate, "latency-postfix")
    measurement.notes.insert(0, how)
    return measurement


# --------------------------------------------------------------------------------------------
# raftmail cases
# --------------------------------------------------------------------------------------------


def wait_committed(cluster: Cluster, node_id: str, recipients: int) -> None:
    cluster.wait_queue(node_id, lambda q: queue_total(q) >= recipients, COMMIT_CHECK_TIMEOUT,
                       f"{node_id} to show {recipients} queued recipients")


def wait_delivered(cluster: Cluster, node_id: str, recipients: int) -> tuple[dict, float]:
    def done(queue: dict[str, int]) -> bool:
        failed = sum(queue.get(name, 0) for name in FAILED_STATES)
        if failed:
            raise BenchError(f"{failed} recipients failed for good: {queue}")
        return queue_final(queue) >= recipients

    return cluster.wait_queue(node_id, done, drain_timeout(recipients),
                              f"{recipients} recipient outcomes on {node_id}")


def intake_raftmail(ctx: Ctx, variant: Variant, fsync: bool = False,
                    extra: dict[str, dict[str, Any]] | None = None) -> tuple[float, list[str]]:
    """Committed recipients (or messages) per second of load, and notes on refusals."""
    load = variant.load(ctx)
    root = ctx.scratch(f"intake{variant.suffix}-raftmail")
    spec = ClusterSpec(relay_port=0, fsync=fsync, extra=extra or {})
    with destination(ctx, root) as dest, \
            raftmail_cluster(ctx, root, dataclasses.replace(spec, relay_port=dest.port)) as (cluster, leader):
        result = drive_cluster(ctx, cluster, load)
        # Every 250 means committed: the leader must already count those recipients.
        committed = committed_recipients(cluster, leader, result)
    counted = dataclasses.replace(load, messages=committed // load.recipients)
    return variant.rate(counted, result.elapsed), refusal_note(result, load)


def measure_intake_raftmail(variant: Variant) -> Callable[[Ctx], Measurement]:
    def measure(ctx: Ctx) -> Measurement:
        rate, notes = intake_raftmail(ctx, variant)
        return Measurement({f"intake{variant.suffix}-raftmail": rate}, notes)

    return measure


def e2e_raftmail(ctx: Ctx, extra: dict[str, dict[str, Any]] | None = None) -> tuple[float, float, list[str]]:
    """Messages per second from the start of the load to the last delivery, the nodes' CPU
    milliseconds per message over that time (the three together), and notes."""
    load = base_load(ctx)
    root = ctx.scratch("e2e-raftmail")
    with destination(ctx, root) as dest, \
            raftmail_cluster(ctx, root, ClusterSpec(relay_port=dest.port, extra=extra or {})) as (cluster, leader):
        cpu_before = cluster.cpu_seconds()
        started = time.monotonic()
        result = drive_cluster(ctx, cluster, load)
        committed = committed_recipients(cluster, leader, result)
        _queue, done_at = wait_delivered(cluster, leader, committed)
        cpu_ms = (cluster.cpu_seconds() - cpu_before) * 1000 / committed
        # A delivered outcome is committed only after the destination's 250, so it has them all.
        if dest.messages() < committed:
            raise BenchError(f"{dest.kind} counted {dest.messages()} messages, raftmail says "
                             f"{committed} delivered")
    notes = [f"accepted at {committed / result.elapsed:.0f} msg/s in the same runs", *refusal_note(result, load)]
    return committed / (done_at - started), cpu_ms, notes


def measure_e2e_raftmail(ctx: Ctx) -> Measurement:
    rate, cpu_ms, notes = e2e_raftmail(ctx)
    return Measurement({"e2e-raftmail": rate, "e2e-raftmail-cpu": cpu_ms}, notes)


def _read_records(path: Path) -> list[list]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def measure_failover(ctx: Ctx) -> Measurement:
    sizes = ctx.sizes
    root = ctx.scratch("failover-raftmail")
    records_path = root / "records.jsonl"
    with destination(ctx, root) as dest, \
            raftmail_cluster(ctx, root, ClusterSpec(relay_port=dest.port)) as (cluster, leader):
        node_ids = [node.id for node in cluster.nodes]
        survivors = [n for n in node_ids if n != leader]
        load = Load(messages=int(sizes.failover_rate * sizes.failover_seconds),
                    sessions=sizes.failover_sessions, body_bytes=sizes.body_bytes)
        argv = peers.loadgen_argv(cluster.smtp_ports(), load, ctx.python, rate=sizes.failover_rate,
                                  keep_going=True, records=records_path)
        generator = spawn("loadgen-failover", argv, capture=True)
        try:
            # Steady load first, so the kill lands in the middle of committed traffic.
            time.sleep(sizes.failover_kill_after)
            if generator.proc.poll() is not None:
                raise BenchError("load generator ended before the kill: "
                                 f"{generator.proc.stderr.read()[-300:]!r}")
            killed_at = cluster.signal_and_wait(leader, signal.SIGKILL)
            killed_wall = time.time() - (time.monotonic() - killed_at)
            new_leader = wait_until(lambda: cluster.leader(among=survivors), ELECTION_TIMEOUT,
                                    "a new leader among the survivors", interval=ELECTION_POLL_INTERVAL)
            elected_at = time.monotonic()
            stdout, stderr = generator.proc.communicate(
                timeout=sizes.failover_seconds + peers.MIN_LOAD_DEADLINE)
        finally:
            generator.stop(grace=3.0)
        # The dead node's batches come back when their lease ends; wait until nothing is left.
        spec_lease = ClusterSpec.lease_seconds
        cluster.wait_queue(new_leader, lambda q: not any(q.get(k, 0) for k in ("pending", "in_flight", "deferred")),
                           spec_lease + ORPHAN_GRACE, "every recipient accepted to be delivered")
        delivered_at = cluster.delivered_at(new_leader)
    records = _read_records(records_path)
    before_kill = [recipients_for(r[6], 1)[0] for r in records if r[4] == 250 and r[3] < killed_at]
    missing = [rcpt for rcpt in before_kill if rcpt not in delivered_at]
    if missing:
        raise BenchError(f"{len(missing)} recipients accepted before the kill were never delivered, e.g. {missing[0]}")
    orphans_done = max(delivered_at[rcpt] for rcpt in before_kill) - killed_wall
    summary = peers.parse_loadgen_output(0, stdout, stderr)
    survivor_index = {node_ids.index(n) for n in survivors}
    on_survivors = [r for r in records if r[0] in survivor_index]
    fresh_250s = [r[3] - killed_at for r in on_survivors if r[4] == 250 and r[2] and r[2] >= killed_at]
    any_250s = [r[3] - killed_at for r in on_survivors if r[4] == 250 and r[3] >= killed_at]
    if not fresh_250s:
        raise BenchError(f"no 250 from a survivor for a message ended after the kill "
                         f"({summary.messages_ok} of {load.messages} accepted in all)")
    failed_after = sum(1 for r in on_survivors if r[4] != 250 and r[3] >= killed_at)
    notes = [f"killed leader {leader}; new leader {new_leader}; steady load {sizes.failover_rate:.0f} msg/s "
             f"over {sizes.failover_sessions} sessions on all 3 nodes",
             f"first 250 on a survivor after the kill, any message: {min(any_250s):.3f} s; "
             f"{failed_after} submissions to survivors refused or failed after the kill",
             f"all {len(before_kill)} recipients accepted before the kill delivered (lease "
             f"{spec_lease:g} s; target: lease + 2 s)"]
    return Measurement({"failover-next-250": min(fresh_250s),
                        "failover-election": max(0.0, elected_at - killed_at),
                        "failover-orphans-delivered": orphans_done}, notes)


def wait_node_reaches(cluster: Cluster, node_id: str, target: int, started: float) -> tuple[float, float]:
    """Seconds from `started` until the node's commit index, and its applied index, reach `target`."""
    commit_at: float | None = None

    def probe() -> float | None:
        nonlocal commit_at
        status = cluster.status(node_id, timeout=1.0)
        if not status:
            cluster.check_alive([node_id])
            return None
        now = time.monotonic()
        if commit_at is None and status["commit_index"] >= target:
            commit_at = now
        return now if commit_at is not None and status["applied_index"] >= target else None

    applied_at = wait_until(probe, CATCHUP_TIMEOUT, f"{node_id} to reach index {target}",
                            interval=CATCHUP_POLL_INTERVAL)
    return commit_at - started, applied_at - started


def measure_catchup(ctx: Ctx) -> Measurement:
    outcomes = ctx.sizes.catchup_outcomes
    root = ctx.scratch("catchup-raftmail")
    with destination(ctx, root) as dest, \
            raftmail_cluster(ctx, root, ClusterSpec(relay_port=dest.port)) as (cluster, leader):
        behind = next(node.id for node in cluster.nodes if node.id != leader)
        live = [n.id for n in cluster.nodes if n.id != behind]
        cluster.signal_and_wait(behind, signal.SIGTERM)
        queued, notes = fill_queue(ctx, cluster, leader, outcomes, among=live)
        wait_delivered(cluster, leader, queued)
        target = cluster.status(leader)["commit_index"]
        restarted = time.monotonic()
        cluster.start(behind)
        commit_s, applied_s = wait_node_reaches(cluster, behind, target, restarted)
        # The same restart with nothing to catch up: what the node costs just to come back.
        cluster.signal_and_wait(behind, signal.SIGTERM)
        idle_target = cluster.status(leader)["commit_index"]
        restarted = time.monotonic()
        cluster.start(behind)
        idle_commit_s, _ = wait_node_reaches(cluster, behind, idle_target, restarted)
    notes.insert(0, f"{behind} stopped (SIGTERM) while {queued} recipients in messages of "
                    f"{BULK_RECIPIENTS} were accepted and delivered; leader commit index then {target}")
    return Measurement({"catchup-commit": commit_s, "catchup-applied": applied_s,
                        "catchup-restart-idle": idle_commit_s}, notes)


class Blackhole:
    """A port whose TCP handshakes complete in the kernel and that then never says a word: the
    cluster's deliveries wait there, so its queue stays full while memory is measured."""

    def __init__(self, backlog: int = BLACKHOLE_BACKLOG) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def measure_memory(ctx: Ctx) -> Measurement:
    recipients = ctx.sizes.memory_recipients
    hold = {"connect_timeout": HOLD_SECONDS, "command_timeout": HOLD_SECONDS}
    root = ctx.scratch("memory-raftmail")
    blackhole = Blackhole()
    spec = ClusterSpec(relay_port=blackhole.port, lease_seconds=HOLD_SECONDS, extra={"delivery": hold})
    try:
        with raftmail_cluster(ctx, root, spec) as (cluster, leader):
            idle = {node.id: cluster.rss(node.id) for node in cluster.nodes}
            queued, fill_notes = fill_queue(ctx, cluster, leader, recipients)
            for node in cluster.nodes:
                wait_committed(cluster, node.id, queued)
            loaded = {node.id: cluster.rss(node.id) for node in cluster.nodes}
            leader = cluster.leader() or leader  # leadership may have moved while filling
    finally:
        blackhole.close()
    per_recipient = {n: (loaded[n] - idle[n]) / queued for n in idle}
    followers = [n for n in per_recipient if n != leader]
    mib = 2**20
    notes = [f"{queued} recipients in messages of {BULK_RECIPIENTS} held undelivered; RSS "
             + ", ".join(f"{n} {idle[n] / mib:.0f}→{loaded[n] / mib:.0f} MiB" for n in idle),
             *fill_notes]
    return Measurement({"memory-leader": per_recipient[leader],
                        "memory-follower": max(per_recipient[n] for n in followers)}, notes)


def measure_latency_raftmail(ctx: Ctx) -> Measurement:
    root = ctx.scratch("latency-raftmail")
    with destination(ctx, root) as dest, \
            raftmail_cluster(ctx, root, ClusterSpec(relay_port=dest.port)) as (cluster, leader):
        def measure_max() -> float:
            result = drive_cluster(ctx, cluster, base_load(ctx))
            committed = committed_recipients(cluster, leader, result)
            wait_delivered(cluster, leader, committed)  # a quiet cluster for the timed part
            return committed / result.elapsed

        rate, how = half_max_rate(ctx, "intake-raftmail", measure_max)
        measurement = paced_latency(ctx, cluster.smtp_ports(), rate, "latency-raftmail", tolerate=True)
    measurement.notes.insert(0, how)
    return measurement


def measure_fsync(ctx: Ctx) -> Measurement:
    # Alternate which setting goes first, so drift over the whole run hits both alike.
    order = (False, True) if ctx.run_index % 2 == 0 else (True, False)
    values, notes = {}, []
    for fsync in order:
        key = "fsync-on" if fsync else "fsync-off"
        values[key], refusals = intake_raftmail(ctx, VARIANTS[0], fsync=fsync)
        notes += [f"{key}: {note}" for note in refusals]
    return Measurement(values, notes)


# --------------------------------------------------------------------------------------------
# The registry, in the order cases run (latency cases read the intake medians before them)
# --------------------------------------------------------------------------------------------


def _intake_cases() -> list[Case]:
    cases = []
    for v in VARIANTS:
        base_key, pf_key, rm_key = (f"intake{v.suffix}-baseline", f"intake{v.suffix}-postfix",
                                    f"intake{v.suffix}-raftmail")
        cases += [
            Case(base_key, "peers", (), (RowSpec(base_key, f"intake {v.label}: plain aiosmtpd, 1 process "
                                                 "(ceiling for one Python intake)", v.unit),),
                 measure_intake_baseline(v)),
            Case(pf_key, "peers", ("postfix",),
                 (RowSpec(pf_key, f"intake {v.label}: Postfix accepting while relaying", v.unit,
                          (base_key,)),),
                 measure_intake_postfix(v)),
            Case(rm_key, "raftmail", ("raftmail",),
                 (RowSpec(rm_key, f"intake {v.label}: 3-node raftmail, committed 250s", v.unit,
                          (base_key, pf_key)),),
                 measure_intake_raftmail(v)),
        ]
    return cases


def _registry() -> list[Case]:
    sec, ms, bpr = "s", "ms", "bytes/rcpt"
    return [
        Case("sink-direct", "peers", ("smtp-sink",),
             (RowSpec("sink-direct", "load generator → smtp-sink directly (the tools' ceiling)", "msg/s"),),
             measure_sink_direct),
        *_intake_cases(),
        Case("e2e-postfix", "peers", ("postfix",),
             (RowSpec("e2e-postfix", "end to end 2 KB: Postfix relaying to the destination", "msg/s"),),
             measure_e2e_postfix),
        Case("e2e-raftmail", "raftmail", ("raftmail",),
             (RowSpec("e2e-raftmail", "end to end 2 KB: 3-node raftmail, submission → last delivery",
                      "msg/s", ("e2e-postfix",)),
              RowSpec("e2e-raftmail-cpu", "end to end 2 KB: CPU of the 3 nodes together per message",
                      "ms/msg", lower_is_better=True)),
             measure_e2e_raftmail),
        Case("failover-raftmail", "raftmail", ("raftmail",),
             (RowSpec("failover-next-250", "failover: SIGKILL leader under load → next 250 from a survivor",
                      sec, lower_is_better=True, timed_load=True),
              RowSpec("failover-election", "failover: SIGKILL leader → survivor leads with quorum", sec,
                      lower_is_better=True, timed_load=True),
              RowSpec("failover-orphans-delivered", "failover: SIGKILL leader → every recipient accepted "
                      "before the kill delivered (the dead node's batches after their lease)", sec,
                      lower_is_better=True, timed_load=True)),
             measure_failover, full_runs=10),
        Case("catchup-raftmail", "raftmail", ("raftmail",),
             (RowSpec("catchup-commit", "catch-up: restarted node reaches leader's commit index", sec,
                      ("catchup-restart-idle",), lower_is_better=True),
              RowSpec("catchup-applied", "catch-up: restarted node has applied up to it", sec,
                      ("catchup-restart-idle",), lower_is_better=True),
              RowSpec("catchup-restart-idle", "restart with nothing to catch up (same node)", sec,
                      lower_is_better=True)),
             measure_catchup, heavy=True),
        Case("memory-raftmail", "raftmail", ("raftmail",),
             (RowSpec("memory-leader", "memory: leader RSS growth per queued recipient", bpr,
                      lower_is_better=True),
              RowSpec("memory-follower", "memory: largest follower RSS growth per queued recipient", bpr,
                      lower_is_better=True)),
             measure_memory, heavy=True),
        Case("latency-baseline", "peers", (),
             (RowSpec("latency-baseline-p50", "intake latency p50, DATA end → 250, plain aiosmtpd at "
                      "half its max rate", ms, lower_is_better=True, timed_load=True),
              RowSpec("latency-baseline-p99", "intake latency p99, plain aiosmtpd", ms,
                      lower_is_better=True, timed_load=True)),
             measure_latency_baseline),
        Case("latency-postfix", "peers", ("postfix",),
             (RowSpec("latency-postfix-p50", "intake latency p50, Postfix at half its max rate", ms,
                      ("latency-baseline-p50",), lower_is_better=True, timed_load=True),
              RowSpec("latency-postfix-p99", "intake latency p99, Postfix", ms,
                      ("latency-baseline-p99",), lower_is_better=True, timed_load=True)),
             measure_latency_postfix),
        Case("latency-raftmail", "raftmail", ("raftmail",),
             (RowSpec("latency-raftmail-p50", "intake latency p50, 3-node raftmail at half its max rate",
                      ms, ("latency-baseline-p50", "latency-postfix-p50"), lower_is_better=True,
                      timed_load=True),
              RowSpec("latency-raftmail-p99", "intake latency p99, 3-node raftmail", ms,
                      ("latency-baseline-p99", "latency-postfix-p99"), lower_is_better=True,
                      timed_load=True)),
             measure_latency_raftmail),
        Case("fsync-raftmail", "raftmail", ("raftmail",),
             (RowSpec("fsync-off", "intake 2 KB, raftmail default (fsync off), paired runs", "msg/s"),
              RowSpec("fsync-on", "intake 2 KB, raftmail with [cluster] fsync = true", "msg/s",
                      ("fsync-off",))),
             measure_fsync),
    ]


CASES: list[Case] = _registry()
CASES_BY_ID: dict[str, Case] = {case.id: case for case in CASES}
GROUPS: dict[str, list[str]] = {
    "all": [case.id for case in CASES],
    "peers": [case.id for case in CASES if case.group == "peers"],
    "raftmail": [case.id for case in CASES if case.group == "raftmail"],
}
