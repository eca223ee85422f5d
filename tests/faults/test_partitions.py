"""Network partitions on real 3- and 5-node clusters: each node runs in a network namespace of its
own on a private bridge (netns.py), and the test cuts and heals the links between nodes with
packet filters while a seeded campaign is submitted to nodes on both sides. The clients and the
capture sink stay reachable from every node throughout: only node-to-node traffic is cut.

Beyond the fault suite's invariants (driver.verify: 0 accepted lost, 0 skipped, equal state
digests, duplicates within the counted bound), while a minority is cut off no node of it answers
`250`, and every try there gets `451` within `commit_timeout` (+ REPLY_SLACK), at once (within
FAST_REFUSAL) once the node reports itself out of the quorum (/readyz 503); after each heal the
whole cluster converges again (one leader followed by all, every node applied the leader's
commit index), timed as recover_s in the summary line. One scenario cuts only the Raft ports:
bodies still reach every node, so the cut-off side proposes, and its `451`s may say "may still
be queued" (the checker counts such a letter as maybe accepted).

Root, iproute2 and nftables are needed; otherwise the tests skip and say why. Seeds as in the
rest of the fault suite: $RAFTMAIL_FAULT_SEED; $RAFTMAIL_FAULT_SEEDS=N runs N seeds and makes it
a soak (every scenario on 3 and 5 nodes, longer schedules).

    .venv/bin/pytest -q tests/faults/test_partitions.py -s
    RAFTMAIL_FAULT_SEEDS=5 .venv/bin/pytest -q tests/faults/test_partitions.py
"""
from __future__ import annotations

import random
import threading
import time
import urllib.error
from dataclasses import dataclass

import pytest

from cluster import ADMIN_OPENER, Cluster, make_message, queued_as, submission_count, wait_for

from .driver import (CLIENT_TIMEOUT, LEASE_SECONDS, TAIL, Attempt, Letter, Traffic, assignments, check, hold_campaign, holders, make_letters,
                     outcome_lines, record, resume_campaign, seeds, stats, verify, wait_acked, wait_holder)
from .netns import Network

SCENARIO_TIMEOUT = 150  # seconds per scenario and seed
pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.timeout(SCENARIO_TIMEOUT)]

SEEDS = seeds()
SOAK = len(SEEDS) > 1  # several seeds asked for: also the other cluster size, longer schedules
COMMIT_TIMEOUT = 3.0  # [intake] commit_timeout of these clusters
REPLY_SLACK = 1.0  # seconds over commit_timeout a cut-off node may take to answer 451
FAST_REFUSAL = COMMIT_TIMEOUT / 2  # seconds for a 451 from a node that knows it is out of the quorum
HOLD = 5.0  # seconds a partition lasts at least: longer than commit_timeout, so tries there end inside it
LETTERS = 30  # client letters per scenario
MAX_RCPTS = 8  # recipients per letter at most: small campaigns, so the scenarios stay short
PACE = 0.5  # seconds between one client's letters: intake spans the fault
RECOVER_TIMEOUT = 40.0  # seconds from a heal until the cluster has converged
HOLDER_SINK_DELAY = 0.3  # seconds per message: a backlog's batch takes longer than its lease
HOLDER_WAIT = 30.0
BIG_BATCH = 10  # recipients: the cut node is caught while sending a batch at least this large
FOLLOWER_PREFERENCE = 3.0  # seconds to wait for a follower to get one before the leader will do
FLAP_ROUNDS = 10 if SOAK else 3
FLAP_CUT = (1.5, 3.5)  # seconds a flapping partition lasts, drawn per round
FLAP_HEALED = (1.0, 2.5)  # seconds it stays healed between rounds
ASYMMETRIC_HOLD = LEASE_SECONDS + 3.0  # longer than a lease: a stuck holder's batches must move
MAX_MINORITY_LETTERS = 40  # per minority client thread
CLIENT_JOIN = CLIENT_TIMEOUT + 2  # seconds for a minority client's last try to end
RETRIES_AFTER_HEAL = 3  # tries per letter refused while cut off, once healed
# A commit whose outcome the proposer lost: long election timeouts, so the steps of that test
# land between elections, and a commit_timeout that spans two of them.
LOST_OUTCOME_RAFT = {"election_timeout_min": 2.0, "election_timeout_max": 2.5, "connection_timeout": 4.0}
LOST_OUTCOME_COMMIT_TIMEOUT = 12.0


def sizes(default: list[int]) -> list[int]:
    return [3, 5] if SOAK else default


# ---------------------------------------------------------------- helpers

@dataclass
class Cut:
    """One partition: the nodes on the minority side and when it held (from `at` to `healed`)."""
    minority: list[str]
    at: float
    healed: float = 0.0


class MinorityClients:
    """One client per node of a minority that keeps submitting one-try letters to that node
    until stopped: proof that the cut-off side refuses, whatever the campaign's draws."""

    def __init__(self, traffic: Traffic, nodes: list[str], tag: str) -> None:
        self.traffic, self.nodes, self.tag = traffic, nodes, tag
        self.stopping = threading.Event()
        self.letters: list[Letter] = []
        self.threads = [threading.Thread(target=self._client, args=(nid,), daemon=True) for nid in nodes]

    def _client(self, nid: str) -> None:
        for k in range(MAX_MINORITY_LETTERS):
            if self.stopping.is_set():
                return
            key = f"{self.tag}-{nid}-{k}"
            letter = Letter(key=f"<{key}@client.example>", campaign="minority", rcpts=[f"{key}@example.com"],
                            targets=[nid])
            self.letters.append(letter)
            self.traffic.send_extra(letter)

    def __enter__(self) -> "MinorityClients":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()  # a try in flight finishes on its own; verify() joins the clients

    def retry_refused(self, c: Cluster) -> None:
        """After the heal, retry each letter not acknowledged while cut off, as a client does
        after a 451: a try that committed after all is answered 'Already queued'."""
        for t in self.threads:
            t.join(CLIENT_JOIN)
        for letter in self.letters:
            for _ in range(RETRIES_AFTER_HEAL):
                if letter.sid:
                    break
                started = time.time()
                code, text = c.submit(letter.targets[0], letter.rcpts, letter.message(), timeout=CLIENT_TIMEOUT)
                letter.attempts.append(Attempt(letter.targets[0], code, text, started, time.time()))
                if code == 250:
                    letter.sid = queued_as(text)


def hold(seconds: float) -> None:
    """Keep a fault (or a healed spell) for its seeded duration: the schedule, not synchronisation."""
    time.sleep(seconds)


def inside(cut: Cut, traffic: Traffic) -> list:
    """Every try made to the minority while the cut held (started after it, answered before the heal)."""
    return [a for letter in traffic.all_letters() for a in letter.attempts
            if a.node in cut.minority and a.started >= cut.at and a.ended <= cut.healed]


def minority_problems(cuts: list[Cut], traffic: Traffic,
                      unready: dict[str, float] | None = None) -> tuple[list[str], str]:
    """Tries on a cut-off minority answered other than 451 within commit_timeout + slack, or,
    when started after the node reported /readyz 503 (`unready`: node -> seconds into the cut),
    not within FAST_REFUSAL."""
    problems, tries, slowest, fast = [], 0, 0.0, []
    for cut in cuts:
        for a in inside(cut, traffic):
            tries += 1
            took = a.ended - a.started
            slowest = max(slowest, took)
            known_out = unready is not None and a.node in unready and a.started >= cut.at + unready[a.node]
            limit = FAST_REFUSAL if known_out else COMMIT_TIMEOUT + REPLY_SLACK
            if known_out:
                fast.append(took)
            if a.code == 250:
                problems.append(f"minority {cut.minority} answered 250 on {a.node} {a.started - cut.at:.2f}s into "
                                f"the partition: {a.text}")
            elif a.code != 451 or took > limit:
                problems.append(f"{a.node} (minority {cut.minority}) answered {a.code} after {took:.2f}s, "
                                f"{a.started - cut.at:.2f}s into the partition (want 451 within {limit}s"
                                f"{', it said it was out of the quorum' if known_out else ''}): {a.text}")
    summary = f"minority side: {tries} tries while cut off, slowest answer {slowest:.2f}s"
    if fast:
        summary += f"; {len(fast)} after it said /readyz 503, slowest {max(fast):.2f}s"
    return problems, summary


def acks_inside(cut: Cut, traffic: Traffic, nodes: list[str]) -> int:
    return sum(1 for letter in traffic.all_letters() for a in letter.attempts
               if a.code == 250 and a.node in nodes and a.started >= cut.at and a.ended <= cut.healed)


def wait_recovered(c: Cluster, net: Network, healed: float, timeout: float = RECOVER_TIMEOUT) -> float:
    """Seconds from the heal until one leader is followed by every node and every node has applied
    the leader's commit index."""
    def converged() -> bool:
        ld = c.leader(c.ids)
        if not ld:
            return False
        target = c.status(ld)["commit_index"]
        return all((st := c.status(n)) and st["applied_index"] >= target for n in c.ids)
    try:
        wait_for(converged, timeout, "the cluster to converge after the heal", interval=0.05)
    except AssertionError as e:
        from cluster import describe
        raise AssertionError(f"{e}\n{net.describe()}\n{describe(c)}") from None
    return time.time() - healed


def readyz(c: Cluster, nid: str) -> int:
    """The HTTP status of a node's /readyz (0 if it does not answer)."""
    try:
        with ADMIN_OPENER.open(f"http://{c.hosts[nid]}:{c.admin[nid]}/readyz", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def leaders_seen(c: Cluster, until: float) -> list[tuple[str, int]]:
    """Poll every node until `until`: each (leader, term) some node reported, in order seen."""
    seen: list[tuple[str, int]] = []
    while time.time() < until:
        for nid in c.ids:
            st = c.status(nid)
            if st and st["role"] == "leader" and (nid, st["term"]) not in seen:
                seen.append((nid, st["term"]))
        time.sleep(0.2)  # poll interval
    return seen


def tracebacks(c: Cluster) -> dict[str, int]:
    """Tracebacks per node log (an exception nothing handled): noted in the summary, for the reader."""
    out = {}
    for nid in c.ids:
        n = sum(1 for line in c.log_text(nid).splitlines() if line.startswith("Traceback"))
        if n:
            out[nid] = n
    return out


def start_campaign(c: Cluster, seed: int, tag: str, campaigns: tuple[str, ...] = ("main",),
                   letters: int = LETTERS, pace: float = PACE) -> tuple[random.Random, Traffic]:
    print(f"\nscenario {tag}: seed {seed} ({len(c.ids)} nodes)", flush=True)
    rng = random.Random(f"{tag}-{seed}")
    plan = make_letters(rng, f"{tag}{seed}", c.ids, letters, campaigns, max_rcpts=MAX_RCPTS)
    return rng, Traffic(c, plan, seed, pace=pace).start()


def finish(c: Cluster, traffic: Traffic, name: str, seed: int, cuts: list[Cut], failovers: list[float],
           recoveries: list[float], notes: list[str], extra_problems: list[str] = (),
           unready: dict[str, float] | None = None) -> None:
    """verify(), then the partition checks on top, one summary line, and the verdict."""
    v = verify(c, traffic, name, seed, failovers)
    v.recoveries = list(recoveries)
    problems, summary = minority_problems(cuts, traffic, unready)
    v.notes += notes + [summary]
    if len(recoveries) > 1:
        v.notes.append(f"recovery after each heal: {', '.join(f'{r:.2f}' for r in recoveries)} s")
    for letter in traffic.all_letters():
        if letter.sid and "Already queued" in letter.attempts[-1].text:
            v.notes.append(f"{letter.key} answered 'Already queued' on a retry; its earlier tries: "
                           + "; ".join(f"{a.node} {a.code} {a.text[:60]!r} after {a.ended - a.started:.2f}s"
                                       for a in letter.attempts[:-1]))
    errors = tracebacks(c)
    if errors:
        v.notes.append(f"tracebacks in node logs: {errors}")
    record(v)
    problems += list(extra_problems)
    assert not problems, f"seed {seed} scenario {name}: " + "; ".join(problems[:10])
    check(v, c)


# ---------------------------------------------------------------- 1. the leader alone in the minority

def leader_cuts(default: list[tuple[int, str]]) -> list[tuple[int, str]]:
    return [(n, what) for n in (3, 5) for what in ("net", "raft")] if SOAK else default


@pytest.mark.parametrize("n,what", leader_cuts([(3, "net"), (5, "net"), (3, "raft")]))
@pytest.mark.parametrize("seed", SEEDS)
def test_leader_cut_off_in_the_minority(partition_cluster, seed: int, n: int, what: str) -> None:
    """The leader (with one more node of five) is cut off from the majority while the campaign is
    submitted to every node: the minority answers only 451 (at once once it reports /readyz 503,
    followers included), the majority elects a leader and goes on accepting; after the heal the
    old leader follows and every replica agrees. `what`: "net" cuts every packet between the
    sides, "raft" only the Raft ports (bodies still reach every node, so the minority proposes)."""
    c, net = partition_cluster(n, commit_timeout=COMMIT_TIMEOUT)
    name = f"partition_leader_{n}" if what == "net" else f"partition_raft_{n}"
    rng, traffic = start_campaign(c, seed, name)
    wait_acked(traffic, 6)
    ld = c.wait_leader()
    others = rng.sample([x for x in c.ids if x != ld], n - 1)
    minority = [ld] + others[:(n - 1) // 2 - 1]
    majority = [x for x in c.ids if x not in minority]
    at = net.partition(minority, majority) if what == "net" else net.partition_ports(c.raft, minority, majority)
    cut = Cut(minority, at)
    with MinorityClients(traffic, minority, f"m{seed}") as clients:
        failover = traffic.failover(cut.at, majority)
        new_leader = c.wait_leader(among=majority)
        # A load balancer must stop sending clients to the cut-off side: its /readyz turns 503,
        # on the old leader and on a follower cut off with it alike.
        unready: dict[str, float] = {}
        last_ready: dict[str, tuple] = {}

        def held_long_enough() -> bool:
            for m in minority:
                if m not in unready:
                    code, t0 = readyz(c, m), time.time()
                    st = c.status(m) or {}
                    last_ready[m] = (code, round(time.time() - t0, 2), st.get("role"), st.get("has_quorum"),
                                     st.get("connected"))
                    if code == 503:
                        unready[m] = time.time() - cut.at
            # Every minority node also answered a try it got after it said 503 (that one fast).
            return time.time() >= cut.at + HOLD and all(m in unready for m in minority) and all(
                any(a.node == m and a.started >= cut.at + unready[m]
                    for a in inside(Cut(minority, cut.at, time.time()), traffic)) for m in minority)
        try:
            wait_for(held_long_enough, HOLD + 3 * COMMIT_TIMEOUT,
                     "/readyz 503 from every minority node while cut off, then a finished try on it", interval=0.1)
        except AssertionError as e:
            raise AssertionError(f"seed {seed}: {e}; /readyz 503 after (s): {unready}; last /readyz and "
                                 f"/status (code, s, role, has_quorum, connected): {last_ready}") from None
        old_role = (c.status(ld) or {}).get("role")
        term_before = (c.status(new_leader) or {}).get("term")
        cut.healed = net.heal()
    recovered = wait_recovered(c, net, cut.healed)
    clients.retry_refused(c)
    after = c.leader()
    term_after = (c.status(after) or {}).get("term") if after else None
    print(f"  cut off {minority} (leader {ld}) for {cut.healed - cut.at:.1f}s; {new_leader} led the majority "
          f"after {failover:.2f}s; converged {recovered:.2f}s after the heal", flush=True)
    notes = [f"cut off {minority} (leader {ld}) for {cut.healed - cut.at:.1f}s; majority {majority} "
             f"acknowledged {acks_inside(cut, traffic, majority)} tries meanwhile; the old leader's role "
             f"before the heal: {old_role}; leader (term) before the heal {new_leader} ({term_before}), "
             f"after it {after} ({term_after}); minority /readyz 503 after (s): "
             f"{ {m: round(t, 2) for m, t in unready.items()} }"]
    finish(c, traffic, name, seed, [cut], [failover], [recovered], notes, unready=unready)


# ---------------------------------------------------------------- 2. a batch holder cut off past its lease

@pytest.mark.parametrize("n", sizes([3]))
@pytest.mark.parametrize("seed", SEEDS)
def test_batch_holder_cut_off_longer_than_its_lease(partition_cluster, seed: int, n: int) -> None:
    """A node sending a large batch loses every peer (the receiver still answers it) for longer
    than its lease: it stops sending before its lease ends, the others expire and finish its
    batches, and after the heal it rejoins; duplicates stay within the counted bound."""
    c, net = partition_cluster(n, commit_timeout=COMMIT_TIMEOUT, sink_delay=HOLDER_SINK_DELAY)
    name = f"partition_holder_{n}"
    rng, traffic = start_campaign(c, seed, name, campaigns=("main", TAIL))
    # One campaign is held back during intake and released as one backlog: full batches, each
    # taking longer than a lease to send, so the cut lands in the middle of one.
    hold_campaign(c, traffic, TAIL)
    traffic.join()
    resumed = time.time()
    resume_campaign(c, TAIL)
    order = rng.sample(c.ids, n)

    def big_batch_holder(held: dict[str, int], leader: str | None) -> str | None:
        """The first follower in the seeded order sending a large batch of the backlog (the
        leader too, if no follower got one soon)."""
        big = {a["node"] for a in assignments(c) if a["t"] >= resumed - 1 and int(a["n"]) >= BIG_BATCH}
        leader_too = time.time() > resumed + FOLLOWER_PREFERENCE
        return next((x for x in order if x in big and x in held and (x != leader or leader_too)), None)
    victim = wait_holder(c, big_batch_holder, HOLDER_WAIT, f"a node sending a batch of {BIG_BATCH}+ recipients")
    was_leader = victim == c.leader()
    others = [x for x in c.ids if x != victim]
    before = stats(c)["lease_expiries"]
    held = holders(c).get(victim, 0)
    cut = Cut([victim], net.isolate(victim))
    with MinorityClients(traffic, [victim], f"h{seed}") as clients:
        wait_for(lambda: stats(c, others)["lease_expiries"] > before and time.time() > cut.at + LEASE_SECONDS + 1,
                 LEASE_SECONDS * 5, f"{victim}'s leases to expire while it is cut off", interval=0.1)
        cut.healed = net.heal()
    recovered = wait_recovered(c, net, cut.healed)
    clients.retry_refused(c)
    # Its lease can have been renewed at the latest just before the cut: from cut + lease on it
    # may not send anything (it stops a margin before the end of its lease).
    sends = [o for o in outcome_lines(c, victim) if cut.at <= o["t"] <= cut.healed]
    late = [o for o in sends if o["t"] > cut.at + LEASE_SECONDS]
    what = f"cut off {victim} ({'leader' if was_leader else 'follower'}) holding {held} batches"
    print(f"  {what} for {cut.healed - cut.at:.1f}s; converged {recovered:.2f}s after the heal", flush=True)
    notes = [f"{what} for {cut.healed - cut.at:.1f}s; it sent {len(sends)} messages while cut off, the last "
             f"{max((o['t'] for o in sends), default=cut.at) - cut.at:.2f}s after the cut (lease {LEASE_SECONDS}s)"]
    problems = [f"{victim} sent {len(late)} messages after its lease ran out while cut off, e.g. "
                f"{[(o['batch'], o['rcpt'], round(o['t'] - cut.at, 2)) for o in late[:5]]}"] if late else []
    finish(c, traffic, name, seed, [cut], [], [recovered], notes, problems)
    assert stats(c)["lease_expiries"] > before


# ---------------------------------------------------------------- 3. a flapping partition

@pytest.mark.parametrize("n", sizes([5]))
@pytest.mark.parametrize("seed", SEEDS)
def test_flapping_partition(partition_cluster, seed: int, n: int) -> None:
    """A partition that re-forms every few seconds around a seeded minority (the leader in it
    half of the time) and heals in between; the campaign goes on throughout."""
    c, net = partition_cluster(n, commit_timeout=COMMIT_TIMEOUT)
    name = f"partition_flap_{n}"
    # The campaign's intake spans the rounds: each of the 3 clients sends its share over them.
    letters = LETTERS * FLAP_ROUNDS // 3
    rounds_span = FLAP_ROUNDS * (sum(FLAP_CUT) + sum(FLAP_HEALED)) / 2
    rng, traffic = start_campaign(c, seed, name, letters=letters, pace=max(PACE, rounds_span / (letters / 3)))
    wait_acked(traffic, 4)
    cuts: list[Cut] = []
    recoveries: list[float] = []
    minority_clients: list[MinorityClients] = []
    for r in range(FLAP_ROUNDS):
        ld = c.leader()
        size = rng.randint(1, (n - 1) // 2)
        if ld and rng.random() < 0.5:
            minority = [ld] + rng.sample([x for x in c.ids if x != ld], size - 1)
        else:
            minority = rng.sample([x for x in c.ids if x != ld], size)
        majority = [x for x in c.ids if x not in minority]
        cut = Cut(minority, net.partition(minority, majority))
        with MinorityClients(traffic, minority, f"f{seed}r{r}") as clients:
            hold(rng.uniform(*FLAP_CUT))
            cut.healed = net.heal()
        cuts.append(cut)
        minority_clients.append(clients)
        print(f"  round {r}: cut off {minority} (leader {ld}) for {cut.healed - cut.at:.1f}s", flush=True)
        if r + 1 < FLAP_ROUNDS:
            hold(rng.uniform(*FLAP_HEALED))
    recoveries.append(wait_recovered(c, net, cuts[-1].healed))
    for clients in minority_clients:
        clients.retry_refused(c)
    notes = [f"{len(cuts)} partitions: " + "; ".join(f"{cut.minority} {cut.healed - cut.at:.1f}s" for cut in cuts)]
    finish(c, traffic, name, seed, cuts, [], recoveries, notes)


# ---------------------------------------------------------------- 4. asymmetric: hears the leader, cannot answer

@pytest.mark.parametrize("n", sizes([3]))
@pytest.mark.parametrize("seed", SEEDS)
def test_follower_hears_the_leader_but_cannot_answer(partition_cluster, seed: int, n: int) -> None:
    """Everything a follower sends to the leader is dropped (the leader's packets still reach
    it; other links work), for longer than a lease: whatever the elections do meanwhile, no
    accepted recipient is lost or skipped and after the heal every replica agrees."""
    c, net = partition_cluster(n, commit_timeout=COMMIT_TIMEOUT)
    name = f"partition_oneway_{n}"
    rng, traffic = start_campaign(c, seed, name)
    wait_acked(traffic, 6)
    ld = c.wait_leader()
    victim = rng.choice([x for x in c.ids if x != ld])
    cut = Cut([], net.drop_one_way(victim, ld))
    seen = leaders_seen(c, cut.at + ASYMMETRIC_HOLD)
    cut.healed = net.heal()
    recovered = wait_recovered(c, net, cut.healed)
    acks = acks_inside(cut, traffic, c.ids)
    print(f"  dropped {victim} -> {ld} for {cut.healed - cut.at:.1f}s: leaders seen {seen}, {acks} acknowledged "
          f"meanwhile; converged {recovered:.2f}s after the heal", flush=True)
    notes = [f"dropped {victim} -> leader {ld} for {cut.healed - cut.at:.1f}s; leaders (node, term) seen "
             f"meanwhile {seen}; {acks} tries acknowledged meanwhile"]
    finish(c, traffic, name, seed, [], [], [recovered], notes)


# ---------------------------------------------------------------- 5. a commit whose outcome the proposer lost

def test_a_commit_whose_outcome_the_proposer_lost_is_answered_250(partition_cluster) -> None:
    """A follower forwards a submission to the leader and never hears back (the leader's Raft
    traffic to it is cut, one way), while the leader commits it with the other follower; then the
    leader is cut off altogether and the other follower, which holds the entry, takes over. The
    proposer learns only that its leader changed: it must answer 250 from its applied state once
    the entry is applied there, not 451 "may still be queued"."""
    c, net = partition_cluster(3, commit_timeout=LOST_OUTCOME_COMMIT_TIMEOUT, raft=LOST_OUTCOME_RAFT)
    ld = c.wait_leader()
    proposer, other = [x for x in c.ids if x != ld]
    wait_for(lambda: readyz(c, proposer) == 200 and readyz(c, other) == 200, 20, "both followers to be ready")
    before = submission_count(c, other)
    rcpts = ["lost-outcome-1@example.com", "lost-outcome-2@example.net"]
    message = make_message(subject="lost outcome", message_id="<lost-outcome@client.example>")
    reply: dict[str, tuple[int, str]] = {}
    net.drop_ports(c.raft, {proposer: {ld}})
    client = threading.Thread(target=lambda: reply.update(
        got=c.submit(proposer, rcpts, message, timeout=LOST_OUTCOME_COMMIT_TIMEOUT + 5)), daemon=True)
    started = time.time()
    client.start()
    wait_for(lambda: submission_count(c, other) > before, 5, f"{ld} to commit the submission with {other}",
             interval=0.02)
    net.partition_ports(c.raft, [ld], [proposer, other])
    client.join(LOST_OUTCOME_COMMIT_TIMEOUT + 10)
    code, text = reply.get("got", (0, "no answer"))
    print(f"\n  {proposer} answered {code} after {time.time() - started:.2f}s: {text}", flush=True)
    assert code == 250 and "Queued as" in text, f"{proposer} answered {code} {text!r}; {net.describe()}"
    assert c.wait_leader(among=[proposer, other]) == other
    sub = c.submission(other, queued_as(text))
    assert sub is not None and [r["address"] for r in sub["recipients"]] == rcpts
