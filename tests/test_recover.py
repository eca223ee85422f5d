"""Disaster recovery: a survivor of a lost majority becomes a one-member cluster (`raftmail recover
--force-new-cluster`), new nodes join it, and everything it had committed is delivered; a backup
taken under load passes a restore drill, and a damaged one fails it naming the bad part."""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from cluster import (PY, make_message, run_cli, set_config, start_founders, submission_count,
                     wait_converged_explained, wait_for)

pytestmark = pytest.mark.timeout(240)

DEFERRED = [f"d{i}@defer.test" for i in range(4)]
RETRY = 8.0  # seconds before a deferred recipient is tried again


def _deliveries(c) -> dict[str, int]:
    per: dict[str, int] = {}
    for e in c.sink.delivered():
        per[e["rcpt"].lower()] = per.get(e["rcpt"].lower(), 0) + 1
    return per


@pytest.mark.cluster
def test_survivor_of_a_lost_majority_becomes_a_new_cluster_and_delivers_everything(make_cluster) -> None:
    # Deferred once, retried RETRY s later: the loss falls inside that wait.
    c = make_cluster(5, start=False, batch_size=10, retry_first=RETRY,
                     replies=[f"{a}=451 4.3.0 Try later*1" for a in DEFERRED])
    full, leader = start_founders(c, 3)
    # A held campaign keeps recipients queued through the loss.
    acked: list[str] = ["first@example.com"]
    code, text = c.submit(leader, acked, make_message(message_id="<held-first@x>", campaign="held"))
    assert code == 250, text
    # Delivered before the pause, so the counts below do not depend on which came first.
    wait_for(lambda: (c.queue(leader) or {}).get("delivered") == 1, 30, "the first recipient delivered")
    r = run_cli(c.config_path, "pause", "held")
    assert r.returncode == 0, r.stderr
    for i in range(8):
        rcpts = [f"h{i}-{k}@example.com" for k in range(10)]
        code, text = c.submit(leader, rcpts, make_message(message_id=f"<held-{i}@x>", campaign="held"))
        assert code == 250, text
        acked += rcpts
    survivor = next(n for n in ("n1", "n2", "n3") if n != leader)

    # While the others answer, forcing is refused (and the survivor must be stopped first).
    c.stop(survivor)
    r = run_cli(c.config_path, "recover", "--node", survivor, "--force-new-cluster", "--yes")
    assert r.returncode == 1 and "still answer" in r.stderr, r.stderr
    c.start(survivor)
    leader = c.wait_leader(30, among=["n1", "n2", "n3"])

    for i in range(4):
        rcpts = [f"s{i}-{k}@example.com" for k in range(10)] + [DEFERRED[i]]
        code, text = c.submit(leader, rcpts, make_message(message_id=f"<sent-{i}@x>"))
        assert code == 250, text
        acked += rcpts
    # Quiet until the retries are due: the survivor holds everything the cluster committed.
    quiet = {"pending": 80, "in_flight": 0, "deferred": len(DEFERRED), "delivered": 41}
    wait_for(lambda: all({k: (c.queue(n) or {}).get(k) for k in quiet} == quiet for n in ("n1", "n2", "n3")),
             RETRY, "every node to see the campaign sent, held and deferred")

    lost = [n for n in ("n1", "n2", "n3") if n != survivor]
    for n in lost:
        c.kill(n)
        shutil.rmtree(c.data_dir(n))
    c.stop(survivor)
    # Without the typed confirmation nothing changes.
    r = subprocess.run([PY, "-m", "raftmail.cli", "recover", "--config", str(c.config_path), "--node", survivor,
                        "--force-new-cluster"], input="no\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "nothing was changed" in r.stderr, r.stderr + r.stdout
    assert not list(c.data_dir(survivor).glob("raft.before-recover-*"))
    r = run_cli(c.config_path, "recover", "--node", survivor, "--force-new-cluster", "--yes")
    assert r.returncode == 0, r.stderr
    assert "may be lost" in r.stdout.lower() and f"removed for good: {', '.join(sorted(lost))}" in r.stdout, r.stdout
    assert list(c.data_dir(survivor).glob("raft.before-recover-*")), "the old Raft directory was not kept"

    c.start(survivor)
    assert c.wait_leader(30, among=[survivor]) == survivor
    assert submission_count(c, survivor) == 13
    # The operator lists two new machines in the file; a one-member cluster grows only with a
    # node that already runs, so each is started, then joined.
    c.config_path.write_text(full)
    for n in ("n4", "n5"):
        c.start(n)
        wait_for(lambda n=n: c.status(n), 30, f"{n} to answer")
        r = run_cli(c.config_path, "join", "--node", n)
        assert r.returncode == 0, r.stderr
    wait_for(lambda: c.leader(among=[survivor, "n4", "n5"]), 30, "one leader of the new three")
    r = run_cli(c.config_path, "resume", "held")
    assert r.returncode == 0, r.stderr
    leader = c.wait_leader(30, among=[survivor, "n4", "n5"])
    wait_for(lambda: c.queue(leader)["delivered"] == len(acked), 90, "every acknowledged recipient delivered",
             interval=0.2)
    per = _deliveries(c)
    assert set(per) == {a.lower() for a in acked}
    # Nothing was in flight at the loss: one copy each.
    assert set(per.values()) == {1}, per
    wait_converged_explained(c, [survivor, "n4", "n5"])
    # The new membership (who is connected at this moment is not the question).
    assert c.status(leader)["members"] == {survivor: "active", "n4": "active", "n5": "active"}


def _backup_under_load(c, out: Path) -> None:
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            c.submit(c.ids[i % 3], [f"l{i}-{k}@example.com" for k in range(5)], make_message(f"l{i}"))
            i += 1
    t = threading.Thread(target=load)
    t.start()
    try:
        r = run_cli(c.config_path, "backup", "--out", str(out), timeout=120)
        assert r.returncode == 0, r.stderr
    finally:
        stop.set()
        t.join(30)


@pytest.mark.cluster
def test_restore_drill_passes_for_a_backup_taken_under_load_and_names_a_damaged_part(make_cluster, tmp_path) -> None:
    c = make_cluster(replies=["slow@defer.test=451 4.3.0 later*100"], start=False)
    set_config(c, "cluster", admin_token="drill-admin-token-0123456789")  # a backup needs one
    c.start_all_and_wait()
    code, text = c.submit(c.ids[0], ["first@example.com"], make_message(message_id="<p-first@x>", campaign="held"))
    assert code == 250, text
    # Delivered before the pause, so the counts below do not depend on which came first.
    wait_for(lambda: (c.queue(c.ids[0]) or {}).get("delivered") == 1, 30, "the first recipient delivered")
    r = run_cli(c.config_path, "pause", "held")
    assert r.returncode == 0, r.stderr
    for i in range(10):
        code, text = c.submit(c.ids[i % 3], [f"p{i}-{k}@example.com" for k in range(10)] + ["slow@defer.test"],
                              make_message(message_id=f"<p{i}@x>", campaign="held" if i % 2 else None))
        assert code == 250, text
    out = tmp_path / "cluster.backup"
    _backup_under_load(c, out)

    r = subprocess.run([PY, "-m", "raftmail.cli", "drill", "--restore", str(out), "--json"],
                       capture_output=True, text=True, timeout=150)
    result = json.loads(r.stdout)
    assert r.returncode == 0 and result["ok"], result
    manifest_total = sum(result["manifest_counts"].values())
    assert sum(result["counts"].values()) == manifest_total and manifest_total >= 150

    damaged = tmp_path / "damaged.backup"
    data = out.read_bytes()
    damaged.write_bytes(data[:len(data) * 2 // 3])
    r = subprocess.run([PY, "-m", "raftmail.cli", "drill", "--restore", str(damaged)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "restore drill FAILED" in r.stderr and "part " in r.stderr, r.stderr


def test_journal_entries_are_read_back_without_running_any_code() -> None:
    import pickle

    from raftmail.consensus.pysyncobj_compat import command_of_entry
    assert command_of_entry(b"\x00" + pickle.dumps((0, (b"\x81\xa2op\xa4noop",)), protocol=2)) == b"\x81\xa2op\xa4noop"
    assert command_of_entry(b"\x01") is None  # pysyncobj's own no-op
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        command_of_entry(b"\x00" + pickle.dumps(print))
