"""Full disks, for real: each node's data dir is its own small tmpfs, which the test fills.
One full node (the leader) refuses submissions with 452, hands leadership over and stays up; a
full majority answers nothing with 250; once space is freed, service is back and nothing
accepted is lost. pysyncobj's sparse mmap journal died of SIGBUS here (see test_raft_journal)."""
from __future__ import annotations

import os
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from cluster import make_message, queued_as, set_config, wait_converged_explained, wait_for
from test_cluster_durability import missing_on

pytestmark = [pytest.mark.cluster, pytest.mark.faults, pytest.mark.timeout(240)]

FS_SIZE = "24m"
JOURNAL_RESERVE = 65536  # small, so the journal runs out of its reservation within the test


@pytest.fixture
def small_data_dirs():
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs per node's data dir needs root")
    mounted: list[Path] = []

    def mount(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0700", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {done.stderr.strip()}")
        mounted.append(path)
    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\xff" * 65536)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\xff" * 512)
        except OSError:
            pass
    return filler


def metric(c, nid: str, line_start: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{c.admin[nid]}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    return None


class Stream:
    """One client submitting to the given nodes in turn until stopped; keeps every 250."""

    def __init__(self, c, nodes: list[str], tag: str) -> None:
        self.c, self.nodes, self.tag = c, nodes, tag
        self.acked: list[str] = []
        self.codes: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            nid = self.nodes[n % len(self.nodes)]
            code, text = self.c.submit(nid, [f"{self.tag}{n}@example.com"],
                                       make_message(message_id=f"<{self.tag}-{n}@x>"), timeout=10)
            self.codes[code] = self.codes.get(code, 0) + 1
            if code == 250:
                self.acked.append(queued_as(text))
            elif code == 0:
                time.sleep(0.05)

    def __enter__(self) -> "Stream":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def leftover_temps(c) -> list[str]:
    out = []
    for nid in c.ids:
        for root, _dirs, files in os.walk(c.data_dir(nid)):
            out += [os.path.join(root, f) for f in files if ".tmp" in f]
    return out


def test_full_disks_refuse_cleanly_and_recover_without_loss(make_cluster, small_data_dirs) -> None:
    c = make_cluster(start=False)
    set_config(c, "raft", journal_reserve_bytes=JOURNAL_RESERVE)
    for nid in c.ids:
        small_data_dirs(c.data_dir(nid))
    c.start_all_and_wait()
    acked: list[str] = []

    # -- one full node, the leader
    full = c.wait_leader()
    others = [n for n in c.ids if n != full]
    filler = fill(c.data_dir(full))
    with Stream(c, others, "one") as stream:
        wait_for(lambda: {"journal", "bodies"} <= set(c.status(full)["disk_full"]), 60,
                 f"{full} to find its disk full (journal and bodies)")
        wait_for(lambda: c.leader() in others, 30, "leadership to move off the full node")
        code, text = c.submit(full, ["x@example.com"], make_message(message_id="<on-full@x>"))
        assert code == 452 and text.startswith("4.3.1"), (code, text)
        n_before = len(stream.acked)
        wait_for(lambda: len(stream.acked) >= n_before + 20, 30, "submissions to the others to go on")
    acked += stream.acked
    assert c.alive(full), "the node with the full disk died"
    assert metric(c, full, 'raftmail_disk_full{store="journal"}') == 1.0
    assert metric(c, full, 'raftmail_disk_full{store="bodies"}') == 1.0
    assert metric(c, others[0], 'raftmail_disk_full{store="journal"}') == 0.0
    log = c.log_text(full)
    assert "disk full" in log and "handing Raft leadership over" in log
    print(f"\none full node: {stream.codes}")

    # -- restarted while its disk is still full, it comes up and says so
    c.kill(full)
    c.start(full)
    wait_for(lambda: "journal" in c.status(full)["disk_full"], 30, f"{full} to restart and report its full disk")
    code, text = c.submit(full, ["y@example.com"], make_message(message_id="<on-full-2@x>"))
    assert code == 452, (code, text)

    # -- space again: the node takes submissions, and has everything
    filler.unlink()
    wait_for(lambda: c.status(full)["disk_full"] == {}, 30, f"{full} to see free space")
    wait_for(lambda: c.submit(full, ["back@example.com"], make_message(message_id="<back@x>"))[0] == 250, 30,
             "the node to accept again")
    assert "disk space available again" in c.log_text(full)

    # -- a full majority: nothing is accepted anywhere
    leader = c.wait_leader()
    majority = [leader, next(n for n in c.ids if n != leader)]
    fillers = [fill(c.data_dir(n)) for n in majority]
    with Stream(c, c.ids, "maj") as stream:
        wait_for(lambda: all(c.status(n)["disk_full"] for n in majority), 60, "the majority to find its disks full")
        n_seen = sum(stream.codes.values())
        wait_for(lambda: sum(stream.codes.values()) >= n_seen + 15, 60, "more submissions to be answered")
        no_250_after = len(stream.acked)
        n_seen = sum(stream.codes.values())
        wait_for(lambda: sum(stream.codes.values()) >= n_seen + 15, 60, "more submissions to be answered")
        assert len(stream.acked) == no_250_after, "a 250 while a majority of disks was full"
        for f in fillers:
            f.unlink()
        wait_for(lambda: len(stream.acked) >= no_250_after + 20, 60, "service to come back once space is freed")
    acked += stream.acked
    print(f"full majority, then freed: {stream.codes}")
    assert set(stream.codes) <= {250, 451, 452}, stream.codes

    # -- nothing accepted is lost, no temp file is left, every node can store again
    wait_for(lambda: all(c.status(n)["disk_full"] == {} for n in c.ids), 30, "every node to store again")
    wait_converged_explained(c, timeout=60)
    missing = {nid: missing_on(c, nid, acked) for nid in c.ids}
    assert not any(missing.values()), {n: m[:5] for n, m in missing.items() if m}
    assert leftover_temps(c) == []
