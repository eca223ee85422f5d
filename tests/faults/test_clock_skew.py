"""Fault scenario: nodes whose wall clocks disagree by 10 s each way (libfaketime, wall clock only:
the monotonic clock, which leases use, is left alone; see skewed_launch in tests/cluster.py).
Campaigns go in while the leader runs ahead, a node running behind holds batches, a holder is
SIGKILLed and restarted at once while the leader is ahead, and leadership moves from the skewed
leader to another node. Same invariants as the other scenarios (driver.verify). Needs the
`faketime` package (libfaketime); skipped with the reason without it.

Seeds as in test_faults.py (RAFTMAIL_FAULT_SEED, RAFTMAIL_FAULT_SEEDS)."""
from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest

from cluster import PY, libfaketime, skewed_launch

from .driver import (Traffic, check, holders, kill, make_fault_cluster, make_letters, record,
                     restart, seeds, verify, wait_holder)
from .test_faults import SCENARIO_TIMEOUT, wait_acked

pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.timeout(SCENARIO_TIMEOUT)]

SKEW_SECONDS = 10
HOLDER_WAIT = 30.0


def transfer_to(c, target: str, timeout: float = 30.0) -> None:
    """Ask the leader to hand leadership to `target` until it leads (a transfer to a follower
    that is not caught up does nothing: asked again)."""
    c.hand_leadership(to=target, timeout=timeout)


@pytest.mark.skipif(libfaketime() is None, reason="libfaketime (package faketime) is not installed")
@pytest.mark.parametrize("offset", [SKEW_SECONDS, -SKEW_SECONDS])
def test_a_skewed_node_has_its_wall_clock_off_its_monotonic_clock_true_and_can_sleep(offset: int) -> None:
    """What the scenario's nodes run under (skewed_launch): the wall clock `offset` off, the
    monotonic clock the machine's, and time.sleep working (Debian's libfaketime alone makes it
    fail with EINVAL: tests/faketime/sitecustomize.py)."""
    probe = ("import json, time; m0 = time.monotonic(); time.sleep(0.05); "
             "print(json.dumps([time.time(), m0, time.monotonic() - m0]))")
    before_wall, before_mono = time.time(), time.monotonic()
    run = subprocess.run([*skewed_launch(offset), PY, "-c", probe], capture_output=True, text=True, timeout=30)
    after_wall, after_mono = time.time(), time.monotonic()
    assert run.returncode == 0, run.stderr
    wall, mono, slept = json.loads(run.stdout)
    assert before_wall + offset - 1 <= wall <= after_wall + offset + 1, (wall - before_wall, offset)
    assert before_mono <= mono <= after_mono, "the monotonic clock must be left true"
    assert 0.05 <= slept < 1.0, slept


@pytest.mark.skipif(libfaketime() is None, reason="libfaketime (package faketime) is not installed")
@pytest.mark.parametrize("seed", seeds())
def test_clock_skew_leader_ahead_holder_behind(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    ahead, behind, plain = rng.sample(["n1", "n2", "n3"], 3)
    skews = {ahead: SKEW_SECONDS, behind: -SKEW_SECONDS, plain: 0}
    # Every (re)start of a skewed node runs under libfaketime.
    c = make_fault_cluster(tmp_path, 3, launch={n: skewed_launch(o) for n, o in skews.items() if o})
    try:
        c.start_all_and_wait()
        print(f"\nscenario clock_skew: seed {seed}; {ahead} +{SKEW_SECONDS}s, {behind} -{SKEW_SECONDS}s, "
              f"{plain} unskewed", flush=True)
        transfer_to(c, ahead)
        traffic = Traffic(c, make_letters(rng, f"skew{seed}", c.ids, 40), seed, pace=0.3).start()
        wait_acked(traffic, 6)
        # A node 10 s behind holds batches that the leader 10 s ahead assigned.
        wait_holder(c, lambda h, _ld: behind if h.get(behind) else None, HOLDER_WAIT,
                    f"{behind} (behind) to hold batches from {ahead} (ahead)", led_by=ahead)
        # A holder SIGKILLed and restarted at once while the leader is ahead.
        victim = wait_holder(c, lambda h, _ld: next((n for n in (behind, plain) if h.get(n)), None), HOLDER_WAIT,
                             "a follower holding batches", led_by=ahead)
        kill(c, [victim])
        restart(c, [victim])
        print(f"  killed holder {victim} ({skews[victim]:+d}s) and restarted it at once; leader {ahead}", flush=True)
        # Leadership moves off the skewed leader: kill it.
        wait_acked(traffic, 20)
        transfer_to(c, ahead)
        held = holders(c)
        at = kill(c, [ahead])
        survivors = [behind, plain]
        failover = traffic.failover(at, survivors)
        new = c.wait_leader(among=survivors)
        print(f"  killed leader {ahead} (+{SKEW_SECONDS}s; batches held {held}); {new} "
              f"({skews[new]:+d}s) leads; failover {failover:.2f}s", flush=True)
        restart(c, [ahead])
        v = verify(c, traffic, "clock_skew", seed, [failover])
        v.notes.append(f"skews: {skews}; leadership {ahead} -> {new}")
        record(v)
        check(v, c)
    finally:
        c.close()
