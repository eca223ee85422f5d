"""SIGKILL every node during a stream of submissions, with log compaction running, and
restart them: no submission that was answered 250 is ever lost, and all replicas agree."""
from __future__ import annotations

import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster import Cluster, SMTPSession, make_message, queued_as, wait_converged_explained, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.faults, pytest.mark.timeout(180)]

ROUNDS = 3
CLIENTS = 6
COMPACTION_MIN_ENTRIES = 50  # low, so snapshots are taken and the log is cut during the stream
ACKS_BEFORE_KILL = (120, 240)  # the kill comes after a random number of 250s in this range


class SubmissionStream:
    """Client threads submitting unique messages to random nodes until stopped; keeps the
    submission id of every 250."""

    def __init__(self, c: Cluster, clients: int, tag: str) -> None:
        self.c = c
        self.tag = tag
        self.acked: list[str] = []
        self.refused = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(clients)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        assert not any(t.is_alive() for t in self._threads), "a client thread hung"

    def _client(self, k: int) -> None:
        rng = random.Random(f"{self.tag}-{k}")
        sessions = {nid: SMTPSession(self.c, nid, timeout=10) for nid in self.c.ids}
        n = 0
        try:
            while not self._stop.is_set():
                n += 1
                nid = rng.choice(self.c.ids)
                msg = make_message(message_id=f"<{self.tag}-{k}-{n}@example.com>", body=f"{self.tag} {k} {n}\n")
                code, text = sessions[nid].send([f"c{k}-{n}@example.com"], msg)
                with self._lock:
                    if code == 250:
                        self.acked.append(queued_as(text))
                    else:
                        self.refused += 1
                if code == 0:
                    time.sleep(0.05)  # the node is down: do not spin on refused connections
        finally:
            for s in sessions.values():
                s.close()

    def count(self) -> int:
        with self._lock:
            return len(self.acked)


class SnapshotWatch:
    """Counts snapshot.bin rewrites (log compactions) on every node while it runs."""

    def __init__(self, c: Cluster, interval: float = 0.05) -> None:
        self.c = c
        self.interval = interval
        self.seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _mtimes(self) -> dict[str, int | None]:
        out = {}
        for nid in self.c.ids:
            try:
                out[nid] = (self.c.data_dir(nid) / "raft" / "snapshot.bin").stat().st_mtime_ns
            except FileNotFoundError:
                out[nid] = None
        return out

    def _run(self) -> None:
        last = self._mtimes()
        while not self._stop.wait(self.interval):
            now = self._mtimes()
            self.seen += sum(1 for nid in now if now[nid] is not None and now[nid] != last[nid])
            last = now

    def __enter__(self) -> "SnapshotWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def kill_all(c: Cluster) -> None:
    """SIGKILL every node at once (no node gets to finish anything)."""
    for nid in c.ids:
        c.signal(nid, signal.SIGKILL)
    for nid in c.ids:
        c.procs[nid].wait(10)


def missing_on(c: Cluster, nid: str, sids: list[str]) -> list[str]:
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda sid: c.submission(nid, sid) is not None, sids))
    return [sid for sid, ok in zip(sids, found) if not ok]


def test_sigkill_every_node_during_a_stream_loses_no_acknowledged_submission(make_cluster) -> None:
    c = make_cluster(compaction_min_entries=COMPACTION_MIN_ENTRIES)
    acked: list[str] = []
    total_compactions = 0
    rng = random.Random(2)
    for rnd in range(1, ROUNDS + 1):
        kill_after = rng.randint(*ACKS_BEFORE_KILL)
        stream = SubmissionStream(c, CLIENTS, f"round{rnd}")
        started = time.monotonic()
        with SnapshotWatch(c) as watch:
            stream.start()
            try:
                wait_for(lambda: stream.count() >= kill_after, 40, f"{kill_after} acknowledged submissions")
                kill_all(c)
            finally:
                stream.stop()
        streamed = time.monotonic() - started
        acked += stream.acked
        total_compactions += watch.seen

        c.start_all_and_wait()
        wait_converged_explained(c, timeout=40)
        missing = {nid: missing_on(c, nid, acked) for nid in c.ids}
        n_missing = sum(len(m) for m in missing.values())
        print(f"\nround {rnd}: {len(stream.acked)} acknowledged in {streamed:.1f}s "
              f"({stream.refused} not acknowledged), compactions seen {watch.seen}, "
              f"missing {n_missing} of {len(acked)} acknowledged so far")
        assert n_missing == 0, {nid: m[:5] for nid, m in missing.items() if m}
    assert len(set(acked)) == len(acked)
    assert total_compactions > 0, "no log compaction happened during the streams"


def test_sigkill_inside_the_journal_rewrite_on_every_node_loses_nothing(make_cluster, monkeypatch) -> None:
    """Every node compacts at the same log length; a test hook SIGKILLs each one in the middle
    of rewriting its journal (after the first kept entry), under load. Restarted, every
    submission answered 250 is there on every node."""
    from raftmail.consensus.journal import KILL_IN_REWRITE_ENV
    from raftmail.consensus.raft_snapshot import SNAPSHOT_DELAY_ENV
    monkeypatch.setenv(KILL_IN_REWRITE_ENV, "1")
    # A snapshot that takes a second (as a large state does): the rewrite then keeps a second's
    # worth of committed, acknowledged entries, which an in-place rewrite cut at the kill.
    monkeypatch.setenv(SNAPSHOT_DELAY_ENV, "1.0")
    c = make_cluster(compaction_min_entries=150)
    monkeypatch.delenv(KILL_IN_REWRITE_ENV)  # restarts run without the hooks
    monkeypatch.delenv(SNAPSHOT_DELAY_ENV)
    stream = SubmissionStream(c, CLIENTS, "rewrite")
    stream.start()
    try:
        wait_for(lambda: sum(not c.alive(n) for n in c.ids) >= 2, 90,
                 "a majority to be killed inside the journal rewrite")
        wait_for(lambda: not any(c.alive(n) for n in c.ids), 10, "the last node to compact (and die)")
    except AssertionError:
        pass  # a node whose compaction kept no entry is not killed by the hook: kill it now
    finally:
        stream.stop()
    hooked = [n for n in c.ids if c.procs[n].poll() == -signal.SIGKILL]
    kill_all(c)
    assert len(hooked) >= 2, f"the hook killed only {hooked}"
    assert len(stream.acked) > 50
    c.start_all_and_wait()
    wait_converged_explained(c, timeout=40)
    missing = {nid: missing_on(c, nid, stream.acked) for nid in c.ids}
    print(f"\n{len(stream.acked)} acknowledged, killed in the rewrite: {hooked}, "
          f"missing: { {n: len(m) for n, m in missing.items()} }")
    assert not any(missing.values()), {nid: m[:5] for nid, m in missing.items() if m}
