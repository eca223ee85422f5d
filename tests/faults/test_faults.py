"""Fault injection on real 3- and 5-node clusters. Each scenario submits a seeded
campaign to nodes drawn at random while one kind of fault happens, then checks the invariants
against the capture sink (see driver.verify) and prints one summary line.

Seed: $RAFTMAIL_FAULT_SEED (default driver.DEFAULT_SEED); $RAFTMAIL_FAULT_SEEDS=N runs N
consecutive seeds (a longer soak, by hand); $RAFTMAIL_FAULT_REPORT=FILE collects the summary lines.

    .venv/bin/pytest -q tests/faults -s
    RAFTMAIL_FAULT_SEED=7 RAFTMAIL_FAULT_SEEDS=5 RAFTMAIL_FAULT_REPORT=/tmp/faults.txt .venv/bin/pytest -q tests/faults
"""
from __future__ import annotations

import random
import signal
import time
from collections import Counter

import pytest

from cluster import Cluster, wait_for

from .driver import (FINAL_STATES, LEASE_SECONDS, MAX_TRIES, TAIL, Letter, Traffic, assignments, check,
                     hold_campaign, holders, kill, make_letters, outcome_lines, record, restart, resume_campaign,
                     seeds, start_nodes, stats, stop, verify, wait_acked, wait_back, wait_caught_up, wait_holder,
                     wipe)

SCENARIO_TIMEOUT = 150  # seconds per scenario and seed
pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.timeout(SCENARIO_TIMEOUT)]

SEEDS = seeds()
HOLDER_WAIT = 30.0  # seconds to wait for a node to hold batches
KILL_ATTEMPTS = 3  # tries to catch a follower while it holds batches (a batch may finish first)
FOLLOWER_KILL_ROUNDS = 2  # followers killed while holding batches, each round on its own backlog
COMPACTION_MIN_ENTRIES = 100  # low, so the wiped node can only come back from a snapshot
COMPACTED_MARGIN = 20  # the leader's log must be this much shorter than its commit index


def start_campaign(c: Cluster, seed: int, tag: str, letters: int, pace: float,
                   campaigns: tuple[str, ...] = ("main",)) -> tuple[random.Random, Traffic]:
    print(f"\nscenario {tag}: seed {seed} ({len(c.ids)} nodes)", flush=True)
    rng = random.Random(seed)
    traffic = Traffic(c, make_letters(rng, f"{tag}{seed}", c.ids, letters, campaigns), seed, pace=pace).start()
    return rng, traffic


def resume_tail_and_wait_delivering(c: Cluster, traffic: Traffic) -> None:
    """After intake, release the held TAIL campaign as one backlog, and wait until its batches
    are in flight: a fault then lands during delivery whatever the timing."""
    traffic.join()
    resume_campaign(c, TAIL)
    wait_holder(c, lambda h, ld: h, HOLDER_WAIT, "batches in flight")


def kill_leader(c: Cluster, traffic: Traffic, rng: random.Random, extra: int = 0) -> float:
    """SIGKILL the leader (and `extra` more nodes, batch holders first), time the failover,
    restart them. Returns the failover seconds."""
    ld = c.wait_leader()
    held = holders(c)
    others = [n for n in c.ids if n != ld]
    rng.shuffle(others)
    others.sort(key=lambda n: n not in held)  # stable: holders first, in the seeded order
    victims = [ld] + others[:extra]
    survivors = [n for n in c.ids if n not in victims]
    at = kill(c, victims)
    failover = traffic.failover(at, survivors)
    print(f"  killed {victims} (leader {ld}; batches held {held}); failover {failover:.2f}s", flush=True)
    restart(c, victims)
    return failover


# ---------------------------------------------------------------- 1. leader killed, intake and delivery

def leader_kills(c: Cluster, seed: int, name: str, letters: int, intake_kills: tuple[int, ...],
                 extra: int) -> None:
    """Leader kills at the given numbers of acknowledged letters, then one during delivery."""
    rng, traffic = start_campaign(c, seed, name, letters=letters, pace=0.3, campaigns=("main", TAIL))
    hold_campaign(c, traffic, TAIL)
    failovers, phases = [], []
    for acks in intake_kills:
        phases.append("intake" if wait_acked(traffic, acks) else "delivery")
        failovers.append(kill_leader(c, traffic, rng, extra))
    resume_tail_and_wait_delivering(c, traffic)
    phases.append("delivery")
    failovers.append(kill_leader(c, traffic, rng, extra))
    print(f"  leader kills during: {phases}", flush=True)
    v = verify(c, traffic, name, seed, failovers)
    record(v)
    assert "intake" in phases, "no leader kill landed during intake"
    check(v, c)


@pytest.mark.parametrize("seed", SEEDS)
def test_leader_sigkill_during_intake_and_delivery(fault_cluster, seed: int) -> None:
    leader_kills(fault_cluster(3), seed, "leader_kill", letters=44, intake_kills=(6, 22), extra=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_five_nodes_leader_and_a_holder_sigkilled_together(fault_cluster, seed: int) -> None:
    leader_kills(fault_cluster(5), seed, "leader_kill_5", letters=36, intake_kills=(6,), extra=1)


# ---------------------------------------------------------------- 2. follower holding batches killed

@pytest.mark.parametrize("seed", SEEDS)
def test_follower_holding_batches_sigkilled(fault_cluster, seed: int) -> None:
    c = fault_cluster(3)
    # Each round after the first has a campaign of its own, held back until the round starts: a
    # fresh backlog of batches to catch a follower holding, however fast the earlier rounds'
    # mail was delivered (once, the whole campaign was done before the second round looked).
    held = [f"{TAIL}{r}" for r in range(1, FOLLOWER_KILL_ROUNDS)]
    rng, traffic = start_campaign(c, seed, "follower_kill", letters=40, pace=0.25, campaigns=("main", *held))
    for campaign in held:
        hold_campaign(c, traffic, campaign)
    expiries_seen = 0
    for rnd in range(FOLLOWER_KILL_ROUNDS):
        if rnd:
            resume_campaign(c, held[rnd - 1])
        order = rng.sample(c.ids, len(c.ids))
        for _attempt in range(KILL_ATTEMPTS):
            victim = wait_holder(c, lambda h, ld: next((n for n in order if n != ld and n in h), None),
                                 HOLDER_WAIT, "a follower holding batches")
            before = stats(c)["lease_expiries"]
            kill(c, [victim])
            stranded = holders(c).get(victim, 0)  # committed batches it can no longer finish
            if stranded:
                # Down past its lease: the leader must hand its batches to the others.
                wait_for(lambda: stats(c)["lease_expiries"] > before, LEASE_SECONDS * 4,
                         f"{victim}'s leases to expire")
                expiries_seen += 1
            print(f"  killed follower {victim} holding {stranded} batches", flush=True)
            restart(c, [victim])
            if stranded:
                break
    v = verify(c, traffic, "follower_kill", seed, [])
    record(v)
    assert expiries_seen >= 1, "no follower was killed while it held a batch"
    assert v.stats["reassigned_in_flight"] > 0
    check(v, c)


# ---------------------------------------------------------------- 3. node frozen past its lease

@pytest.mark.parametrize("seed", SEEDS)
def test_frozen_node_wakes_and_does_not_send_what_was_reassigned(fault_cluster, seed: int) -> None:
    c = fault_cluster(3)
    rng, traffic = start_campaign(c, seed, "sigstop", letters=40, pace=0.25)
    wait_acked(traffic, 8)
    order = rng.sample(c.ids, len(c.ids))
    victim = wait_holder(c, lambda h, ld: next((n for n in order if n in h), None), HOLDER_WAIT,
                         "a node holding batches")
    survivors = [n for n in c.ids if n != victim]
    was_leader = c.leader() == victim
    before = stats(c)["lease_expiries"]
    stopped_at = time.time()
    c.signal(victim, signal.SIGSTOP)
    failovers = [traffic.failover(stopped_at, survivors)] if was_leader else []
    # Frozen for longer than the lease: the others expire its batches and deliver them.
    wait_for(lambda: stats(c, survivors)["lease_expiries"] > before
             and time.time() - stopped_at > LEASE_SECONDS + 1, LEASE_SECONDS * 5,
             f"{victim}'s leases to expire while it is frozen", interval=0.1)
    woke_at = time.time()
    c.signal(victim, signal.SIGCONT)
    wait_caught_up(c, victim)
    print(f"  froze {victim} ({'leader' if was_leader else 'follower'}) for {woke_at - stopped_at:.1f}s",
          flush=True)
    v = verify(c, traffic, "sigstop", seed, failovers)
    # Its batches from before the freeze: after waking it may finish at most the one message that
    # was on the wire (may_send is asked before each message); nothing else of them.
    old = {a["batch"] for a in assignments(c) if a["node"] == victim and a["t"] < stopped_at}
    late = Counter(o["batch"] for o in outcome_lines(c, victim) if o["t"] >= woke_at and o["batch"] in old)
    v.notes.append(f"sends after waking, per batch leased before the freeze: {dict(late)}")
    record(v)
    assert all(n <= 1 for n in late.values()), f"seed {seed}: {victim} kept sending reassigned batches: {late}"
    assert v.stats["lease_expiries"] > before
    check(v, c)


# ---------------------------------------------------------------- 4. every node killed

@pytest.mark.parametrize("seed", SEEDS)
def test_every_node_sigkilled_and_restarted(fault_cluster, seed: int) -> None:
    c = fault_cluster(3)
    rng, traffic = start_campaign(c, seed, "kill_all", letters=32, pace=0.25, campaigns=("main", TAIL))
    hold_campaign(c, traffic, TAIL)
    failovers = []
    for phase in ("intake", "delivery"):
        if phase == "intake":
            assert wait_acked(traffic, 8), "the campaign's intake ended before the kill"
        else:
            resume_tail_and_wait_delivering(c, traffic)
        at = kill(c, c.ids)
        start_nodes(c, c.ids)
        failovers.append(traffic.failover(at, c.ids))
        wait_back(c, c.ids)
        print(f"  killed every node during {phase}; next 250 after {failovers[-1]:.2f}s", flush=True)
    v = verify(c, traffic, "kill_all", seed, failovers)
    record(v)
    check(v, c)


# ---------------------------------------------------------------- 5. data directory lost

@pytest.mark.parametrize("seed", SEEDS)
def test_wiped_node_rejoins_from_snapshot_fetches_bodies_and_serves(fault_cluster, seed: int) -> None:
    c = fault_cluster(3, compaction_min_entries=COMPACTION_MIN_ENTRIES)
    rng, traffic = start_campaign(c, seed, "wipe", letters=40, pace=0.15, campaigns=("live", "held"))
    # One campaign is held, so unfinished submissions (bodies the wiped node must fetch) exist
    # whatever the timing.
    hold_campaign(c, traffic, "held")
    wait_acked(traffic, 20)

    def compacted():
        st = c.status(c.leader() or c.ids[0])
        return st and st["log_len"] + COMPACTED_MARGIN < st["commit_index"]
    wait_for(compacted, 60, "the leader to compact its log into a snapshot", interval=0.2)

    victim = rng.choice(c.ids)
    was_leader = c.leader() == victim
    survivors = [n for n in c.ids if n != victim]
    at = kill(c, [victim])
    wipe(c, victim)
    failovers = [traffic.failover(at, survivors)] if was_leader else []
    ld = c.wait_leader(among=survivors)
    wait_for(lambda: (st := c.status(ld)) and st["log_len"] + COMPACTED_MARGIN < st["commit_index"], 60,
             f"leader {ld} to have compacted its log", interval=0.2)
    restart(c, [victim])
    assert (c.data_dir(victim) / "raft" / "snapshot.bin").exists(), "the wiped node has no snapshot"
    traffic.join()  # the bodies check below needs a settled set of submissions
    print(f"  wiped {victim} ({'leader' if was_leader else 'follower'}); rejoined from {ld}'s snapshot",
          flush=True)

    # The bodies of every unfinished submission are fetched from the peers into its own store
    # (submissions that finish meanwhile need no body any more: asked afresh on every poll).
    def unfinished_bodies() -> dict[str, str]:
        out = {}
        for letter in traffic.all_letters():
            sub = c.submission(victim, letter.sid) if letter.sid else None
            if sub and any(r["state"] not in FINAL_STATES for r in sub["recipients"]):
                out[letter.sid] = sub["body"]
        return out

    bodies = c.data_dir(victim) / "bodies"

    def lacking() -> dict[str, list[str]]:
        """Bodies of unfinished submissions the wiped node lacks -> the nodes that have them."""
        return {d[:12]: [n for n in c.ids if (c.data_dir(n) / "bodies" / d[:2] / d).exists()]
                for d in unfinished_bodies().values() if not (bodies / d[:2] / d).exists()}
    wanted = unfinished_bodies()
    assert wanted, "no unfinished submission when the wiped node came back"
    try:
        wait_for(lambda: not lacking(), 30, f"{victim} to fetch the bodies of unfinished submissions", interval=0.2)
    except AssertionError as e:
        raise AssertionError(f"seed {seed}: {e}; lacking (body: nodes holding it): {lacking()}") from None

    # It serves: a submission to it is answered 250 on the first try.
    probe = Letter(key=f"<wiped-{seed}@client.example>", campaign="live", rcpts=[f"after-wipe-{seed}@example.com"],
                   targets=[victim] * MAX_TRIES)
    traffic.send_extra(probe)
    assert probe.attempts[0].code == 250, f"the rejoined node answered {probe.attempts[0]}"

    resume_campaign(c, "held")
    v = verify(c, traffic, "wipe_rejoin", seed, failovers)
    v.notes.append(f"{len(wanted)} unfinished submissions' bodies fetched by {victim}")
    record(v)
    check(v, c)


# ---------------------------------------------------------------- 6. rolling restart

@pytest.mark.parametrize("seed", SEEDS)
def test_rolling_restart_during_a_campaign(fault_cluster, seed: int) -> None:
    c = fault_cluster(3)
    rng, traffic = start_campaign(c, seed, "rolling", letters=45, pace=0.6)
    wait_acked(traffic, 6)
    failovers, codes = [], {}
    for nid in rng.sample(c.ids, len(c.ids)):
        was_leader = c.wait_leader() == nid
        survivors = [n for n in c.ids if n != nid]
        at, codes[nid] = stop(c, nid)
        if was_leader:
            failovers.append(traffic.failover(at, survivors))
        restart(c, [nid])
        print(f"  restarted {nid} ({'leader' if was_leader else 'follower'}), exit {codes[nid]} after "
              f"{time.time() - at:.1f}s", flush=True)
    v = verify(c, traffic, "rolling_restart", seed, failovers)
    record(v)
    assert all(code == 0 for code in codes.values()), f"a node did not stop cleanly on SIGTERM: {codes}"
    check(v, c)
