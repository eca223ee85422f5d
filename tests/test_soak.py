"""Heavy load: sustained intake through followers while the log compacts.
Every node must end healthy and identical, with nothing acknowledged missing and no follower
truncating entries it had applied. RAFTMAIL_SOAK_SECONDS makes it longer by hand."""
from __future__ import annotations

import os
import random
import threading
import time

import pytest

from cluster import make_message, queued_as, submission_count

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

SOAK_SECONDS = float(os.environ.get("RAFTMAIL_SOAK_SECONDS", "15"))


def test_sustained_follower_intake_with_compaction(make_cluster) -> None:
    c = make_cluster(compaction_min_entries=150, batch_size=20)
    leader = c.leader()
    followers = [n for n in c.ids if n != leader]
    acked: list[str] = []
    refused = [0]
    stop = threading.Event()
    lock = threading.Lock()

    def client(k: int) -> None:
        rng = random.Random(k)
        i = 0
        while not stop.is_set():
            i += 1
            rcpts = [f"u{k}-{i}-{j}@example.com" for j in range(rng.randint(1, 10))]
            code, text = c.submit(rng.choice(followers), rcpts,
                                  make_message(message_id=f"<soak-{k}-{i}@x>", size=2000))
            with lock:
                if code == 250:
                    acked.append(queued_as(text))
                else:
                    refused[0] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    started = time.monotonic()
    snapshots = set()
    while time.monotonic() - started < SOAK_SECONDS:
        for n in c.ids:
            p = c.data_dir(n) / "raft" / "snapshot.bin"
            if p.exists():
                snapshots.add((n, p.stat().st_mtime_ns))
        time.sleep(0.5)  # sampling the snapshot files while the load runs, not synchronisation
    stop.set()
    for t in threads:
        t.join(30)
    digest = c.wait_converged(timeout=60)
    print(f"\nsoak: {SOAK_SECONDS:.0f}s, {len(acked)} submissions acknowledged, {refused[0]} refused, "
          f"{len(snapshots)} snapshots written, digest {digest[:12]}")
    assert len(acked) > 100
    assert len(snapshots) >= 3, "log compaction did not run during the soak"
    for n in c.ids:
        st = c.status(n)
        assert st["role"] in ("leader", "follower") and st["has_quorum"]
        text = c.log_text(n)
        assert "truncating already-applied" not in text, f"{n} truncated applied entries"
        assert "raft tick failed" not in text, f"{n}: tick loop failed"
    missing = [sid for sid in acked[:: max(1, len(acked) // 200)] if c.submission(followers[0], sid) is None]
    assert missing == []
    assert submission_count(c, leader) >= len(acked)
