"""A node that was down while many recipient outcomes were committed rejoins from a snapshot.
CI runs 10,000 outcomes; RAFTMAIL_CATCHUP_OUTCOMES=100000 runs the full size by hand (bench/run.py
measures it too)."""
from __future__ import annotations

import os
import time

import pytest

from cluster import make_message, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

OUTCOMES = int(os.environ.get("RAFTMAIL_CATCHUP_OUTCOMES", "10000"))


def test_rejoin_after_many_outcomes_catches_up_from_a_snapshot(make_cluster) -> None:
    # Group commit packs many reports per entry: keep the threshold well under the log this makes.
    c = make_cluster(compaction_min_entries=50, batch_size=200)
    leader = c.leader()
    down = next(n for n in c.ids if n != leader)
    c.kill(down)
    per = 1000
    for i in range(OUTCOMES // per):
        code, text = c.submit(leader, [f"r{i}-{j}@example.com" for j in range(per)],
                              make_message(message_id=f"<catchup-{i}@x>"))
        assert code == 250, text
    wait_for(lambda: c.queue(leader)["delivered"] >= OUTCOMES, 60 + OUTCOMES / 100, "every outcome committed",
             interval=0.5)
    target = c.status(leader)["commit_index"]
    snap = c.data_dir(down) / "raft" / "snapshot.bin"
    before = snap.stat().st_mtime_ns if snap.exists() else 0
    started = time.monotonic()
    c.start(down)
    wait_for(lambda: (c.status(down) or {}).get("applied_index", 0) >= target, 120, f"{down} to catch up",
             interval=0.05)
    took = time.monotonic() - started
    print(f"\ncatch-up after {OUTCOMES} outcomes: {took:.2f}s from restart to commit index {target}")
    assert snap.exists() and snap.stat().st_mtime_ns != before, "it caught up without a snapshot"
    assert c.status(down)["queue"]["delivered"] >= OUTCOMES
    c.wait_converged()
