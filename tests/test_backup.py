"""Backup of a live cluster under load, the file check, and restore into a new cluster (real
processes, real SMTP on both sides)."""
from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

from raftmail.consensus.outcomes import DEFERRED, IN_FLIGHT, PENDING
from raftmail.consensus.state import MailState
from raftmail.node.backup import STATE, read_backup

from cluster import PY, Cluster, Sink, SlowSink, make_message, set_config, wait_for

TOKEN = "backup-test-admin-token"


def cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "raftmail.cli", *args], capture_output=True, text=True, timeout=timeout)


def waiting_in(path: Path) -> set[str]:
    """Recipients pending, deferred or in flight in a backup file's state."""
    out: set[str] = set()

    def on_part(name: str, data: bytes) -> None:
        if name == STATE:
            st = MailState.from_snapshot(data)
            out.update(r.lower() for _, _, r, s in st.iter_recipients() if s in (PENDING, DEFERRED, IN_FLIGHT))
    read_backup(path, on_part)
    return out


def test_backup_under_load_verify_and_restore(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    # Deferring and slow: the backup catches pending, deferred and in-flight recipients. The
    # deferred ones are retried after retry_first, a time the backup carries: short, so the new
    # cluster retries them soon after the restore (the old sink defers them every time).
    sink = SlowSink(tmp_path / "old", replies=[f"u{i}-0@defer.test=451 4.7.1 try later" for i in range(10)]
                   + ["gone@bounce.test=550 5.1.1 no such user"], delay=1.0)
    c = Cluster(tmp_path / "old", sink=sink, retry_first=5.0, batch_size=20)
    set_config(c, "cluster", admin_token=TOKEN)
    loader_stop = threading.Event()
    try:
        c.start_all_and_wait()
        code, _ = c.submit("n1", ["gone@bounce.test"])
        assert code == 250
        for i in range(30):
            rcpts = [f"u{i}-{k}@{d}" for k in range(10) for d in ("a.test", "b.test", "defer.test")]
            code, text = c.submit(c.ids[i % 3], rcpts, make_message(f"s{i}", size=2000 + i))
            assert code == 250, text
        seen: list = []

        def mixed() -> bool:
            st = c.get("n1", "/status")
            seen[:] = [st["queue"], st["suppressed"]]
            return st["queue"]["deferred"] > 0 and st["queue"]["in_flight"] > 0 and st["suppressed"] > 0
        try:
            wait_for(mixed, 60, "deferred, in-flight and suppressed")
        except AssertionError as e:
            raise AssertionError(f"{e}: {seen}") from None

        def load() -> None:  # submissions go on while the backup runs
            i = 0
            while not loader_stop.is_set():
                c.submit(c.ids[i % 3], [f"late{i}@a.test"], make_message(f"late{i}"))
                i += 1
        loader = threading.Thread(target=load, daemon=True)
        loader.start()

        out = tmp_path / "cluster.backup"
        noauth = tmp_path / "noauth.toml"
        noauth.write_text(c.config_path.read_text().replace(TOKEN, "wrong-admin-token-0123456789"))
        r = cli("backup", "--config", str(noauth), "--out", str(out))
        assert r.returncode == 1 and "401" in r.stderr and not out.exists(), r.stderr
        r = cli("backup", "--config", str(c.config_path), "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert not Path(str(out) + ".partial").exists()
        loader_stop.set()
        loader.join(30)
        manifest = read_backup(out)
        counts = manifest["counts"]
        assert counts["deferred"] > 0 and counts["in_flight"] > 0 and manifest["suppressed"] > 0, manifest

        r = cli("backup", "--verify", str(out))
        assert r.returncode == 0 and "ok:" in r.stdout, r.stdout + r.stderr

        # A byte flipped inside a body, and a truncated copy: refused, naming the part.
        raw = out.read_bytes()
        body = manifest["parts"][5]["name"]
        # The member header names it last (the manifest first); its data starts at the next block.
        at = raw.rindex(body.encode())
        at = (at // 512 + 1) * 512 + 100
        flipped = tmp_path / "flipped.backup"
        flipped.write_bytes(raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:])
        r = cli("backup", "--verify", str(flipped))
        assert r.returncode == 1 and body in r.stderr and "sha256" in r.stderr, r.stderr
        truncated = tmp_path / "truncated.backup"
        truncated.write_bytes(raw[:len(raw) // 2])
        r = cli("backup", "--verify", str(truncated))
        assert r.returncode == 1 and "part bodies/" in r.stderr, r.stderr
    finally:
        loader_stop.set()
        c.close()
        sink.stop()

    waiting = waiting_in(out)
    sink2 = Sink(tmp_path / "new")
    c2 = Cluster(tmp_path / "new", sink=sink2, retry_first=1.0)
    try:
        # A data dir that is not empty is refused, and nothing is left behind.
        c2.data_dir("n2").mkdir(parents=True)
        (c2.data_dir("n2") / "x").write_text("x")
        r = cli("restore", "--config", str(c2.config_path), "--from", str(out))
        assert r.returncode == 1 and "not empty" in r.stderr, r.stderr
        assert not c2.data_dir("n1").exists()
        shutil.rmtree(c2.data_dir("n2"))
        r = cli("restore", "--config", str(c2.config_path), "--from", str(flipped))
        assert r.returncode == 1 and not c2.data_dir("n1").exists(), r.stderr
        assert not any(p.name.endswith(".restoring") for p in c2.data_dir("n1").parent.iterdir())

        r = cli("restore", "--config", str(c2.config_path), "--from", str(out))
        assert r.returncode == 0, r.stderr
        c2.start_all_and_wait()
        final = ("delivered", "bounced", "suppressed", "expired", "cancelled")
        q = c2.queue("n1")
        assert {k: q[k] for k in final if k != "delivered"} == {k: counts[k] for k in final if k != "delivered"}
        assert c2.get("n1", "/status")["suppressed"] == manifest["suppressed"]
        # Everything that was waiting or in flight is delivered by the new cluster.
        wait_for(lambda: waiting <= {e["rcpt"].lower() for e in sink2.delivered()}, 120,
                 "every waiting recipient of the backup delivered by the new cluster")
        wait_for(lambda: c2.queue("n1")["delivered"] == counts["delivered"] + len(waiting), 30, "delivered count")
        q = c2.queue("n1")
        assert q["pending"] == q["deferred"] == q["in_flight"] == 0, q
    finally:
        c2.close()
        sink2.stop()
