"""The fault suite's driver: a seeded plan of client letters, client threads that submit them the
way a bulk sender does (retrying 4xx with the same Message-ID), fault steps on real node
processes, and the end-of-scenario invariant check against the capture sink's own record."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import shutil
import statistics
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Callable

from cluster import (ADMIN_OPENER, LOCAL, Cluster, SlowSink, make_message, queued_as, set_config,
                     wait_converged_explained, wait_for)

# ---------------------------------------------------------------- parameters

DEFAULT_SEED = 20261128
SEED_ENV = "RAFTMAIL_FAULT_SEED"  # the first (or only) seed
SEEDS_ENV = "RAFTMAIL_FAULT_SEEDS"  # how many consecutive seeds to run (a longer soak, by hand)
REPORT_ENV = "RAFTMAIL_FAULT_REPORT"  # file the summary lines are written to, when set

LEASE_SECONDS = 4.0  # [delivery] lease_seconds: short, so lost holders are replaced quickly
BATCH_SIZE = 20  # recipients per batch: several batches per domain are in flight at once
DOMAIN_CONNECTIONS = 2  # batches in flight per domain, cluster-wide: delivery lags intake a little
SINK_DELAY = 0.04  # seconds the sink takes per message, so batches stay in flight long enough to hit
RETRY_FIRST = 1.0  # [delivery] retry_first: a greylisted recipient is retried within the scenario
# [delivery] retry_factor: no backoff growth, so the greylisted recipient's three deferrals hold
# the final drain for about 3 s, not 1 + 2 + 4 (the backoff itself is tested on its own).
RETRY_FACTOR = 1.0
DOMAINS = ("example.com", "example.net", "example.org", "example.info")
MAX_RCPTS = 20  # recipients per letter, drawn from 1..MAX_RCPTS
BOUNCE_ADDRESS = "gone@bounce.example"  # the sink refuses it: bounced, then suppressed
GREYLIST_ADDRESS = "grey@example.net"  # the sink defers it the first few times: deferred, retried
SINK_RULES = [f"{BOUNCE_ADDRESS}=550 5.1.1 No such user here",
              f"{GREYLIST_ADDRESS}=451 4.7.1 Greylisted, try again later*3"]
SPECIAL_SHARE = 0.12  # share of letters with the bounce or greylist address in them

CLIENT_TIMEOUT = 6.0  # seconds a client waits for one SMTP transaction (commit_timeout is 3)
MAX_TRIES = 8  # transactions per letter: the first and the retries, each to a node drawn by the seed
RETRY_PAUSE = (0.2, 2.0)  # client's backoff between tries: first, cap (doubling)
PROBE_INTERVAL = 0.15  # seconds between failover probe letters
MAX_PROBES = 80  # probe letters per failover measurement
FAILOVER_TIMEOUT = 40.0
CATCH_UP_TIMEOUT = 40.0
DRAIN_TIMEOUT = 120.0  # seconds for every accepted recipient to reach a final state
KILL_SLACK = 0.5  # seconds a killed node's last send may reach the sink after the signal
FINAL_STATES = {"delivered", "bounced", "suppressed", "cancelled", "expired"}
INTAKE_WAIT = 40.0  # seconds to wait for the campaign to reach a fault's trigger point
TAIL = "tail"  # a campaign held back during intake, delivered afterwards (faults "during delivery")
# In the 451 a node answers when its commit wait ended without an outcome: the submission may
# still commit (a letter answered only so is "maybe accepted": neither required nor unacked).
MAYBE_QUEUED = "may still be queued"

_RCPT_MESSAGE_ID = re.compile(r"^<(?P<sid>[^.<>]+)\.(?P<idx>\d+)\.rm@[^>]+>$")
_OUTCOME_LINE = re.compile(r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ INFO raftmail\.sender: outcome "
                           r"campaign=\S+ submission=(?P<sid>\S+) recipient=(?P<rcpt>\S+) node=(?P<node>\S+) "
                           r"batch=(?P<batch>\S+) code=(?P<code>\d+)")
_ASSIGN_LINE = re.compile(r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ INFO raftmail\.scheduler: assigned "
                          r"batch (?P<batch>\S+) \((?P<n>\d+) recipients of (?P<domain>\S+)\) to (?P<node>\S+),")

_UP_LINE = re.compile(r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ INFO raftmail\.node: node (?P<node>\S+) up:")
_EXPIRED_LINE = re.compile(r"^\S+ \S+ \S+ WARNING raftmail\.scheduler: leases expired for batches (?P<batches>\S+):")
# A restarted node giving back a batch leased to its previous process (counted as in flight).
_ABANDON_LINE = re.compile(r"^\S+ \S+ \S+ WARNING raftmail\.sender: batch (?P<batches>\S+) was leased to this node "
                           r"before it restarted: given back")

SUMMARIES: list[str] = []  # one line per scenario run in this session


def seeds() -> list[int]:
    """The seeds to run: RAFTMAIL_FAULT_SEED (or the default) and, with RAFTMAIL_FAULT_SEEDS=N,
    the N-1 after it."""
    base = int(os.environ.get(SEED_ENV) or DEFAULT_SEED)
    n = int(os.environ.get(SEEDS_ENV) or 1)
    return [base + i for i in range(max(1, n))]


def make_fault_cluster(root: Path, n: int, sink_host: str = LOCAL, sink_delay: float = SINK_DELAY, **kw) -> Cluster:
    """A cluster configured for the fault scenarios, delivering into a slow accept-all sink with
    one bouncing and one greylisting address. Not started."""
    extra = f"[delivery.domains.default]\nmax_connections = {DOMAIN_CONNECTIONS}\n"
    kw = {"lease_seconds": LEASE_SECONDS, "batch_size": BATCH_SIZE, "retry_first": RETRY_FIRST,
          "extra_toml": extra, **kw}
    c = Cluster(root, n, sink=SlowSink(root, SINK_RULES, sink_delay, host=sink_host), **kw)
    set_config(c, "delivery", retry_factor=RETRY_FACTOR)
    c.stopped_at = {nid: [] for nid in c.ids}  # when each node process was killed or stopped
    return c


# ---------------------------------------------------------------- letters and clients

@dataclass
class Attempt:
    node: str
    code: int
    text: str
    started: float
    ended: float


@dataclass
class Letter:
    """One message a client wants queued, retried with the same Message-ID until acknowledged."""
    key: str  # its Message-ID header
    campaign: str
    rcpts: list[str]
    targets: list[str]  # the node of each try, drawn by the seeded generator
    attempts: list[Attempt] = field(default_factory=list)
    sid: str | None = None  # the submission id the cluster acknowledged it as

    @property
    def subject(self) -> str:
        return f"fault letter {self.key}"

    def message(self) -> bytes:
        return make_message(subject=self.subject, message_id=self.key, campaign=self.campaign,
                            body=f"letter {self.key}\n")

    def maybe_queued(self) -> bool:
        """Never acknowledged, but some try was answered "may still be queued"."""
        return self.sid is None and any(a.code == 451 and MAYBE_QUEUED in a.text for a in self.attempts)


def make_letters(rng: random.Random, tag: str, ids: list[str], n: int,
                 campaigns: tuple[str, ...] = ("main",), max_rcpts: int = MAX_RCPTS) -> list[Letter]:
    """`n` letters of 1..max_rcpts unique recipients over several domains; a few include the
    bouncing or the greylisted address."""
    letters = []
    for i in range(n):
        rcpts = [f"{tag}-{i}-{j}@{rng.choice(DOMAINS)}" for j in range(rng.randint(1, max_rcpts))]
        if rng.random() < SPECIAL_SHARE:
            rcpts[rng.randrange(len(rcpts))] = rng.choice((BOUNCE_ADDRESS, GREYLIST_ADDRESS))
        letters.append(Letter(key=f"<{tag}.{i}@client.example>", campaign=campaigns[i % len(campaigns)],
                              rcpts=rcpts, targets=[rng.choice(ids) for _ in range(MAX_TRIES)]))
    return letters


class Traffic:
    """Client threads submitting a plan of letters (each client its own share, in order, `pace`
    seconds apart), plus probe letters for failover timing. Records every transaction."""

    def __init__(self, c: Cluster, letters: list[Letter], seed: int, clients: int = 3, pace: float = 0.2) -> None:
        self.c = c
        # Probes are drawn from their own generator: how many a failover needs depends on timing,
        # and must not shift the scenario's own draws.
        self.probe_rng = random.Random(f"probes-{seed}")
        self.letters = list(letters)
        self.extra: list[Letter] = []
        self.clients = clients
        self.pace = pace
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> "Traffic":
        for k in range(self.clients):
            t = threading.Thread(target=self._client, args=(self.letters[k::self.clients],), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _client(self, mine: list[Letter]) -> None:
        for letter in mine:
            self.send(letter)
            time.sleep(self.pace)  # a paced sender, so the campaign spans the faults

    def send(self, letter: Letter) -> Letter:
        """One letter, retried on 4xx and lost connections with the same Message-ID."""
        for n, target in enumerate(letter.targets):
            started = time.time()
            code, text = self.c.submit(target, letter.rcpts, letter.message(), timeout=CLIENT_TIMEOUT)
            with self._lock:
                letter.attempts.append(Attempt(target, code, text, started, time.time()))
                if code == 250:
                    letter.sid = queued_as(text)
            if code == 250 or code >= 500:
                return letter
            time.sleep(min(RETRY_PAUSE[1], RETRY_PAUSE[0] * 2 ** n))  # the client's backoff
        return letter

    def send_extra(self, letter: Letter, background: bool = False) -> Letter:
        with self._lock:
            self.extra.append(letter)
        if not background:
            return self.send(letter)
        t = threading.Thread(target=self.send, args=(letter,), daemon=True)
        t.start()
        with self._lock:
            self._threads.append(t)
        return letter

    def running(self) -> bool:
        with self._lock:
            return any(t.is_alive() for t in self._threads)

    def join(self, timeout: float = 120.0) -> None:
        wait_for(lambda: not self.running(), timeout, "client threads to finish their letters", interval=0.1)

    def all_letters(self) -> list[Letter]:
        with self._lock:
            return self.letters + self.extra

    def acked(self) -> int:
        with self._lock:
            return sum(1 for letter in self.letters + self.extra if letter.sid)

    def first_ack_after(self, since: float, nodes: list[str]) -> float | None:
        """When the first transaction started after `since` on one of `nodes` was answered 250."""
        with self._lock:
            ends = [a.ended for letter in self.letters + self.extra for a in letter.attempts
                    if a.code == 250 and a.started >= since and a.node in nodes]
        return min(ends) if ends else None

    def failover(self, since: float, survivors: list[str], timeout: float = FAILOVER_TIMEOUT) -> float:
        """Seconds from `since` (a leader kill) to the next 250 from a survivor. Probe letters
        of one recipient go to random survivors every PROBE_INTERVAL until one is acknowledged,
        so the measure does not depend on the campaign's pace."""
        deadline = time.time() + timeout
        probes = 0
        while True:
            first = self.first_ack_after(since, survivors)
            if first is not None:
                return first - since
            if time.time() > deadline:
                raise AssertionError(f"no 250 from {survivors} within {timeout}s of the fault")
            if probes < MAX_PROBES:
                probes += 1
                tag = f"probe{int(since * 1000)}x{probes}"
                letter = Letter(key=f"<{tag}@client.example>", campaign="probes",
                                rcpts=[f"{tag}@{self.probe_rng.choice(DOMAINS)}"],
                                targets=[self.probe_rng.choice(survivors) for _ in range(MAX_TRIES)])
                self.send_extra(letter, background=True)
            time.sleep(PROBE_INTERVAL)  # probe pacing, not synchronisation (the loop polls)


# ---------------------------------------------------------------- cluster views and fault steps

def any_status(c: Cluster, among: list[str] | None = None) -> dict | None:
    """The status of the leader if there is one, else of any live node that answers. `among`
    leaves out a node that cannot answer (a frozen one)."""
    nodes = among or [n for n in c.ids if c.alive(n)]
    ld = c.leader(nodes)
    for nid in ([ld] if ld else []) + nodes:
        st = c.status(nid)
        if st:
            return st
    return None


def holders(c: Cluster, among: list[str] | None = None) -> dict[str, int]:
    """Batches in flight per node, from the committed state."""
    st = any_status(c, among)
    return dict(st["batches_in_flight"]) if st else {}


def stats(c: Cluster, among: list[str] | None = None) -> dict[str, int]:
    st = any_status(c, among)
    return dict(st["stats"]) if st else {}


def admin_post(c: Cluster, nid: str, path: str, body: dict | None = None, timeout: float = 10.0) -> dict:
    headers = {"Content-Type": "application/json"}
    token = c.admin_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://{c.hosts[nid]}:{c.admin[nid]}{path}", data=json.dumps(body or {}).encode(),
                                 method="POST", headers=headers)
    with ADMIN_OPENER.open(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_acked(traffic: Traffic, n: int) -> bool:
    """Until `n` letters are acknowledged or the campaign's intake ended; True if still in intake."""
    wait_for(lambda: traffic.acked() >= n or not traffic.running(), INTAKE_WAIT, f"{n} acknowledged letters")
    return traffic.running()


def hold_campaign(c: Cluster, traffic: Traffic, campaign: str = TAIL) -> None:
    """Pause `campaign` as soon as it exists: its letters pile up while the others flow."""
    wait_for(lambda: any(lt.sid for lt in traffic.letters if lt.campaign == campaign), INTAKE_WAIT,
             f"a letter of campaign {campaign} to be acknowledged")
    wait_for(lambda: admin_post(c, c.wait_leader(), f"/campaigns/{campaign}/pause"), 30, f"{campaign} to pause")


def resume_campaign(c: Cluster, campaign: str = TAIL) -> None:
    wait_for(lambda: admin_post(c, c.wait_leader(), f"/campaigns/{campaign}/resume"), 30, f"{campaign} to resume")


def wait_holder(c: Cluster, choose: Callable[[dict[str, int], str | None], str | None],
                timeout: float = 30.0, what: str = "a node holding batches", led_by: str | None = None) -> str:
    """Poll the batch holders until `choose(holders, leader)` names a node. With `led_by`, only
    while that node leads: an election on a loaded machine (timeouts of 0.3-0.7 s) may move
    leadership off it meanwhile, and it is handed back."""
    asked = [0.0]

    def pick():
        ld = c.leader()
        if ld is None:
            return None
        if led_by is not None and ld != led_by:
            if time.monotonic() - asked[0] > 0.5:
                asked[0] = time.monotonic()
                c.ask_transfer(ld, led_by)
            return None
        return choose(holders(c), ld)
    return wait_for(pick, timeout, what, interval=0.02)


def wait_caught_up(c: Cluster, nid: str, timeout: float = CATCH_UP_TIMEOUT) -> None:
    """`nid` follows the leader and has applied everything the leader had committed when asked."""
    ld = c.wait_leader(timeout)
    target = c.status(ld)["commit_index"] if ld != nid else 0

    def caught_up():
        st = c.status(nid)
        return st and st["leader"] == ld and st["applied_index"] >= target
    wait_for(caught_up, timeout, f"{nid} to catch up with leader {ld} (index {target})", interval=0.1)


def kill(c: Cluster, nids: list[str]) -> float:
    """SIGKILL `nids` at once; returns the moment of the kill."""
    at = time.time()
    for nid in nids:
        c.signal(nid, signal.SIGKILL)
    for nid in nids:
        c.procs[nid].wait(10)
        c.stopped_at[nid].append(at)
    return at


def stop(c: Cluster, nid: str, timeout: float = 30.0) -> tuple[float, int]:
    """SIGTERM one node and wait for it to exit: (the moment of the signal, its exit status)."""
    at = time.time()
    c.procs[nid].terminate()
    code = c.procs[nid].wait(timeout)
    c.stopped_at[nid].append(at)
    return at, code


def start_nodes(c: Cluster, nids: list[str]) -> None:
    for nid in nids:
        c.start(nid)


def wait_back(c: Cluster, nids: list[str], timeout: float = CATCH_UP_TIMEOUT) -> None:
    """Restarted nodes answer, follow the leader and have caught up with it."""
    for nid in nids:
        wait_for(lambda nid=nid: c.status(nid), timeout, f"{nid} to answer /status after its restart")
    for nid in nids:
        wait_caught_up(c, nid, timeout)


def restart(c: Cluster, nids: list[str], timeout: float = CATCH_UP_TIMEOUT) -> None:
    start_nodes(c, nids)
    wait_back(c, nids, timeout)


def wipe(c: Cluster, nid: str) -> None:
    """Delete a stopped node's whole data directory (Raft journal, snapshot, bodies)."""
    assert not c.alive(nid), f"{nid} must be down before its data is deleted"
    shutil.rmtree(c.data_dir(nid))


def log_time(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=timezone.utc).timestamp()


def outcome_lines(c: Cluster, nid: str) -> list[dict]:
    """Every send a node logged: time, submission, recipient, node, batch, code."""
    out = []
    for line in c.log_text(nid).splitlines():
        m = _OUTCOME_LINE.match(line)
        if m:
            out.append({**m.groupdict(), "t": log_time(m["ts"])})
    return out


def assignments(c: Cluster) -> list[dict]:
    """Every batch assignment any leader logged: time, batch, size, domain, node."""
    out = []
    for nid in c.ids:
        for line in c.log_text(nid).splitlines():
            m = _ASSIGN_LINE.match(line)
            if m:
                out.append({**m.groupdict(), "t": log_time(m["ts"])})
    return out


# ---------------------------------------------------------------- the invariants

@dataclass
class Verdict:
    scenario: str
    seed: int
    nodes: int
    submissions: int = 0  # letters acknowledged 250
    refused: int = 0  # letters never acknowledged (every try 4xx or no answer) and not maybe accepted
    maybe: int = 0  # letters never acknowledged that a try was told "may still be queued"
    maybe_copies: int = 0  # sink copies of such letters (they may have committed: not unacked)
    retried: int = 0  # acknowledged letters that got a 4xx or no answer first (the client retried)
    deduped: int = 0  # retries answered "Already queued": an earlier try had committed after all
    accepted: int = 0  # recipients of acknowledged letters
    delivered: int = 0
    final: Counter = field(default_factory=Counter)
    lost: list = field(default_factory=list)  # delivered by the state, absent at the sink
    skipped: list = field(default_factory=list)  # accepted recipients not in a final state
    missing: list = field(default_factory=list)  # acknowledged submissions absent from the state
    unacked: list = field(default_factory=list)  # sink copies of letters never acknowledged
    mismatched: list = field(default_factory=list)  # at the sink, but the state says not delivered
    duplicates: int = 0
    duplicated: list = field(default_factory=list)
    bound: int = 0
    causes: Counter = field(default_factory=Counter)  # excess copies by cause (classify_duplicates)
    stats: dict = field(default_factory=dict)
    failovers: list = field(default_factory=list)
    recoveries: list = field(default_factory=list)  # seconds from a healed partition to a converged cluster
    notes: list = field(default_factory=list)

    def line(self) -> str:
        f = f"{statistics.median(self.failovers):.2f}" if self.failovers else "-"
        r = f" recover_s={max(self.recoveries):.2f}" if self.recoveries else ""
        return (f"scenario={self.scenario} seed={self.seed} accepted={self.accepted} delivered={self.delivered} "
                f"lost={len(self.lost)} skipped={len(self.skipped)} duplicates={self.duplicates} failover_s={f}{r} "
                f"nodes={self.nodes} submissions={self.submissions} retried={self.retried} "
                f"deduped={self.deduped} refused={self.refused} maybe_accepted={self.maybe} "
                f"bound={self.bound} lease_expiries={self.stats.get('lease_expiries', 0)}"
                + "".join(f" dup_{k}={n}" for k, n in sorted(self.causes.items()) if k != "counted"))

    def problems(self) -> list[str]:
        out = []
        for name in ("missing", "lost", "skipped", "unacked", "mismatched"):
            items = getattr(self, name)
            if items:
                out.append(f"{len(items)} {name}: {items[:8]}")
        if self.duplicates > self.bound:
            out.append(f"{self.duplicates} duplicates exceed the bound {self.bound} "
                       f"(reassigned_in_flight + fenced_reports); by cause {dict(self.causes)}; "
                       f"duplicated: {self.duplicated[:8]}")
        if not self.submissions:
            out.append("no letter was acknowledged")
        return out


def verify(c: Cluster, traffic: Traffic, scenario: str, seed: int, failovers: list[float],
           drain_timeout: float = DRAIN_TIMEOUT) -> Verdict:
    """Check the invariants once the campaign is over; every node must be running.

    - every acknowledged submission is in the state, and each of its recipients reached a final
      state (0 skipped); a recipient the state calls delivered reached the sink (0 lost);
    - the sink holds nothing of a letter the cluster never acknowledged, unless a try of it was
      answered "may still be queued" (maybe accepted: its copies are allowed, not required), and
      nothing for a recipient whose final state is not delivered;
    - every replica has the same state (equal digests);
    - duplicates stay within the cluster's own count of sends that could have been in flight.
    """
    traffic.join()
    assert all(c.alive(nid) for nid in c.ids), "every node must run for the final check"
    ld = c.wait_leader(30)

    def drained():
        q = c.queue(ld)
        return q["pending"] + q["deferred"] + q["in_flight"] == 0
    v = Verdict(scenario, seed, len(c.ids), failovers=list(failovers))
    try:
        wait_for(drained, drain_timeout, "every accepted recipient to reach a final state", interval=0.2)
    except AssertionError as e:  # counted below as skipped recipients, with the rest of the verdict
        v.notes.append(f"{e}; queue {c.queue(ld)}")
    wait_converged_explained(c, c.ids, 40)

    letters = traffic.all_letters()
    by_sid: dict[str, Letter] = {}
    maybe_subjects: set[str] = set()
    for letter in letters:
        if letter.maybe_queued():
            v.maybe += 1
            maybe_subjects.add(letter.subject)
        elif letter.sid is None:
            v.refused += 1
        if letter.sid is None:
            continue
        assert letter.sid not in by_sid, f"two letters acknowledged as {letter.sid}"
        by_sid[letter.sid] = letter
    v.submissions = len(by_sid)
    v.retried = sum(1 for letter in by_sid.values() if len(letter.attempts) > 1)
    v.deduped = sum(1 for letter in by_sid.values() if "Already queued" in letter.attempts[-1].text)

    states: dict[tuple[str, int], str] = {}
    for sid, letter in by_sid.items():
        sub = c.submission(ld, sid)
        if sub is None:
            v.missing.append(sid)
            continue
        assert [r["address"] for r in sub["recipients"]] == letter.rcpts, f"{sid}: recipients differ"
        for r in sub["recipients"]:
            states[(sid, r["index"])] = r["state"]
    v.accepted = len(states)

    copies: Counter = Counter()
    for e in c.sink.delivered():
        m = _RCPT_MESSAGE_ID.match(e.get("message_id") or "")
        if not m:
            v.unacked.append(("no raftmail Message-ID", e.get("message_id"), e.get("rcpt")))
            continue
        copies[(m["sid"], int(m["idx"]))] += 1
    for key, state in states.items():
        v.final[state] += 1
        if state not in FINAL_STATES:
            v.skipped.append((key, state))
        elif state == "delivered" and copies[key] == 0:
            v.lost.append(key)
    v.delivered = v.final["delivered"]
    for key, n in copies.items():
        if key[0] not in by_sid:
            subject = letter_key_of(c, key)
            if subject in maybe_subjects:
                v.maybe_copies += n
            else:
                v.unacked.append((key, subject))
        elif states.get(key) != "delivered":
            v.mismatched.append((key, states.get(key)))
    if v.maybe:
        v.notes.append(f"{v.maybe} letters never acknowledged but told {MAYBE_QUEUED!r}: {v.maybe_copies} "
                       "copies of them at the sink (allowed, not required)")
    v.duplicated = sorted(k for k, n in copies.items() if n > 1)
    v.duplicates = sum(n - 1 for n in copies.values() if n > 1)
    v.stats = c.status(ld)["stats"]
    # Why this bounds the duplicates: a recipient reaches the sink a second time only if a holder
    # sent it and the outcome never committed while that holder's lease was valid. Then either the
    # lease ran out and the expiry returned it to the queue (every item still leased at expiry is
    # counted in reassigned_in_flight, sent or not, so this over-counts), or the holder's report
    # came after the batch had moved on (counted in fenced_reports). Each extra copy needs one such
    # event for that recipient; sends whose outcome committed are never repeated. (A node that
    # restarts while its lease runs gives the batch back with an `abandon` command, which also
    # counts every recipient still held in reassigned_in_flight.) classify_duplicates() names
    # the cause of each extra copy from the logs, for the failure message.
    # A final dot that got no reply is retried too (counted in maybe_delivered).
    v.bound = v.stats["reassigned_in_flight"] + v.stats["fenced_reports"] + v.stats.get("maybe_delivered", 0)
    if v.duplicated:
        v.causes = classify_duplicates(c, copies, by_sid)
        v.notes.append(explain_duplicates(c, v.duplicated, by_sid))
    return v


def letter_key_of(c: Cluster, key: tuple[str, int]) -> str:
    """The client's letter behind a sink copy, from the Subject of the stored file."""
    for e in c.sink.delivered():
        if (e.get("message_id") or "").startswith(f"<{key[0]}.{key[1]}."):
            raw = (c.sink.maildir / e["file"]).read_bytes()
            return str(BytesHeaderParser().parsebytes(raw).get("Subject"))
    return "?"


def explain_duplicates(c: Cluster, duplicated: list[tuple[str, int]], by_sid: dict[str, Letter]) -> str:
    """For each duplicated recipient, which node sent each copy in which batch (node logs, sink
    connections): tells a reassigned batch from a holder that re-ran its own batch."""
    attributed = attribute_copies(c, by_sid)
    parts = []
    for key in duplicated[:10]:
        copies = [f"{node or '?'}/{batch or '?'}" for _t, node, batch in sorted(attributed.get(key, []))]
        parts.append(f"{key[0]}.{key[1]} {by_sid[key[0]].rcpts[key[1]] if key[0] in by_sid else '?'}: {copies}")
    return "duplicated recipients, copies by node/batch: " + "; ".join(parts)


def node_starts(c: Cluster) -> dict[str, list[float]]:
    """When each node process came up (one entry per start), from its log."""
    out: dict[str, list[float]] = {nid: [] for nid in c.ids}
    for nid in c.ids:
        for line in c.log_text(nid).splitlines():
            m = _UP_LINE.match(line)
            if m:
                out[nid].append(log_time(m["ts"]))
    return out


def expired_batches(c: Cluster) -> set[str]:
    """Batches returned to the queue as possibly sent (counted in reassigned_in_flight): leases
    some leader expired, and batches a restarted node gave back; from the log lines."""
    out: set[str] = set()
    for nid in c.ids:
        for line in c.log_text(nid).splitlines():
            m = _EXPIRED_LINE.match(line) or _ABANDON_LINE.match(line)
            if m:
                out.update(m["batches"].split(","))
    return out


def attribute_copies(c: Cluster, by_sid: dict[str, Letter]) -> dict[tuple[str, int], list[tuple]]:
    """Every sink copy of an acknowledged recipient as (time, node, batch), from the node logs.
    A send whose node died before logging it is attributed through the sink connection it came
    on (a batch uses one connection), else left as (time, None, None)."""
    logged: dict[tuple[str, str], list[dict]] = {}
    for nid in c.ids:
        for o in outcome_lines(c, nid):
            logged.setdefault((o["sid"], o["rcpt"]), []).append(o)
    conn_owner: dict[int, tuple[str, str]] = {}
    found: list[tuple[tuple[str, int], float, int, dict | None]] = []
    for e in c.sink.delivered():
        m = _RCPT_MESSAGE_ID.match(e.get("message_id") or "")
        if not m or m["sid"] not in by_sid:
            continue
        key = (m["sid"], int(m["idx"]))
        candidates = logged.get((key[0], by_sid[key[0]].rcpts[key[1]]), [])
        best = min(candidates, key=lambda o: abs(o["t"] - e["t"]), default=None)
        if best is not None and abs(best["t"] - e["t"]) < 2.0:
            candidates.remove(best)  # each logged send explains one copy
            conn_owner[e["conn"]] = (best["node"], best["batch"])
        found.append((key, e["t"], e["conn"], best if best is not None and abs(best["t"] - e["t"]) < 2.0 else None))
    out: dict[tuple[str, int], list[tuple]] = {}
    for key, t, conn, o in found:
        node, batch = (o["node"], o["batch"]) if o else conn_owner.get(conn, (None, None))
        out.setdefault(key, []).append((t, node, batch))
    return out


def classify_duplicates(c: Cluster, copies: Counter, by_sid: dict[str, Letter]) -> Counter:
    """Extra sink copies by cause, from the node logs:
    - resumed: a node sent it in a batch leased to its previous process (before a kill or stop);
    - released: a node sent it, restarted, and it was sent again in another batch although that
      batch never expired (its new process released what the old one had sent);
    - unattributed: a copy whose sender died before logging it, and no other sign;
    - counted: anything else (a lease expiry or a fenced report, which the state counts)."""
    assigned = {a["batch"]: (a["node"], a["t"]) for a in assignments(c)}
    starts = node_starts(c)
    stops = getattr(c, "stopped_at", None) or starts  # the kills and stops the driver made
    expired = expired_batches(c)
    attributed = attribute_copies(c, by_sid)

    def resent_by_next_process(node: str | None, assigned_at: float, sent: float) -> bool:
        """Leased to the node before one of its processes was stopped, sent after the next came up."""
        return node is not None and any(assigned_at < s and any(s < u < sent for u in starts.get(node, []))
                                        for s in stops.get(node, []))

    def stopped_after(node: str | None, sent: float) -> bool:
        """The sending process was stopped after the send (a dying process's last copy reaches
        the sink a moment after the signal: KILL_SLACK)."""
        return node is not None and any(s > sent - KILL_SLACK for s in stops.get(node, []))

    causes: Counter = Counter()
    for key, n in copies.items():
        if n < 2 or key[0] not in by_sid:
            continue
        seen = sorted(attributed.get(key, []), key=lambda x: x[0])
        resumed = any(b in assigned and assigned[b][0] == node and resent_by_next_process(node, assigned[b][1], t)
                      for t, node, b in seen)
        released = any(b is not None and stopped_after(node, t) and b not in expired
                       and any(t2 > t and b2 != b for t2, _, b2 in seen) for t, node, b in seen)
        unattributed = any(node is None for _t, node, _b in seen)
        cause = "resumed" if resumed else "released" if released else "unattributed" if unattributed else "counted"
        causes[cause] += n - 1
    return causes


def record(v: Verdict) -> str:
    """Print the scenario's summary line and keep it for the session report."""
    line = v.line()
    SUMMARIES.append(line)
    print(f"\n{line}", flush=True)
    for note in v.notes:
        print(f"  {note}", flush=True)
    return line


def write_report(path: str | None = None) -> None:
    path = path or os.environ.get(REPORT_ENV)
    if path and SUMMARIES:
        Path(path).write_text("\n".join(SUMMARIES) + "\n")


def check(v: Verdict, c: Cluster) -> None:
    """Fail the scenario with every broken invariant and the nodes' view; call it last."""
    problems = v.problems()
    if problems:
        from cluster import describe
        raise AssertionError(f"seed {v.seed} scenario {v.scenario}: " + "; ".join(problems)
                             + "\n" + "\n".join(v.notes) + "\n" + describe(c))
