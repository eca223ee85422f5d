"""Forced recovery: a surviving node becomes a one-member cluster when a majority is lost for good.

The node must be stopped. Its state is rebuilt from its own snapshot and every entry of its
journal (entries it held but had not seen committed are committed now, as etcd's
--force-new-cluster does: their clients were told to retry with the same Message-ID, which is
de-duplicated), batches in flight go back to the queue counted as possibly sent, and the lost
members are recorded as removed. The old Raft directory is kept beside the new one, renamed,
and the new one appears whole or not at all."""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from raftmail.consensus.journal import fsync_dir, read_journal
from raftmail.consensus.pysyncobj_compat import command_of_entry
from raftmail.consensus.raft_snapshot import decode_snapshot, encode_snapshot
from raftmail.consensus.restore import forced_state
from raftmail.consensus.state import MailState
from raftmail.node.backup import RESTORED_LAST, RESTORED_PREV
from raftmail.node.config import Address, Config

PROBE_TIMEOUT = 1.0  # seconds to wait for each member's admin port
KEPT_SUFFIX = ".before-recover"


class RecoveryRefused(Exception):
    """Why recovery must not run now (the message says what to do instead)."""


@dataclass
class RecoveryPlan:
    node_id: str
    raft_dir: Path
    snapshot_index: int  # the last entry the snapshot covers (0: no snapshot)
    last_index: int  # the last entry in the journal
    commit_index: int  # the last entry this node knew to be committed
    forced_entries: int  # entries after commit_index that are committed now
    state: MailState  # the state after every entry, before the forced changes
    lost: dict[str, dict[str, str]]  # lost member id -> addresses

    def summary(self) -> dict:
        return {"node": self.node_id, "snapshot_index": self.snapshot_index, "last_index": self.last_index,
                "commit_index": self.commit_index, "forced_entries": self.forced_entries,
                "queue": self.state.queue_counts(), "batches_in_flight": len(self.state.batches),
                "lost_members": sorted(self.lost)}


def _answers(address: Address, token: str | None) -> bool:
    """Whether a node's admin port answers /status (a running node)."""
    req = urllib.request.Request(f"http://{address}/status",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=PROBE_TIMEOUT) as r:
            json.loads(r.read())
            return True
    except (OSError, ValueError):
        return False


def _listening(address: Address) -> bool:
    try:
        with socket.create_connection((address.host, address.port), timeout=PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def check_recoverable(config: Config, node_id: str, members: dict[str, dict[str, str]]) -> None:
    """Refuse while this node runs, or while a majority of the members still answers."""
    me = config.node(node_id)
    if _answers(me.admin, config.cluster.admin_token) or _listening(me.raft):
        raise RecoveryRefused(f"node {node_id} is running (its admin or raft port answers): stop it first")
    up = [nid for nid, addr in members.items()
          if nid != node_id and _answers(Address.parse(addr["admin"]), config.cluster.admin_token)]
    majority = len(members) // 2 + 1
    if len(up) + 1 >= majority:
        raise RecoveryRefused(f"{', '.join(sorted(up))} still answer: with {node_id} that is {len(up) + 1} of "
                              f"{len(members)} members, a majority. The cluster can elect a leader by itself: "
                              f"start {node_id} normally instead of forcing a new cluster")


def plan(config: Config, node_id: str) -> RecoveryPlan:
    """Read the stopped node's Raft directory (changing nothing) and rebuild its state."""
    raft_dir = config.node_data_dir(node_id) / "raft"
    journal_path, snapshot_path = raft_dir / "journal.bin", raft_dir / "snapshot.bin"
    if not journal_path.exists() and not snapshot_path.exists():
        raise RecoveryRefused(f"{raft_dir} holds no journal and no snapshot: nothing to recover from")
    state, snapshot_index = MailState(), 0
    if snapshot_path.exists():
        blob, last, _prev, _cluster = decode_snapshot(snapshot_path.read_bytes())
        state, snapshot_index = MailState.from_snapshot(blob), last[1]
    entries, meta = read_journal(journal_path) if journal_path.exists() else ([], {})
    last_index = snapshot_index
    for data, idx, _term in entries:
        if idx <= snapshot_index:
            continue
        command = command_of_entry(data)
        if command is not None:
            state.apply_blob(command)  # exactly what the node's own apply does with it
        last_index = idx
    commit_index = max(snapshot_index, min(int(meta.get("raftCommitIndex", 0)), last_index))
    lost = {n.id: {"raft": str(n.raft), "smtp": str(n.smtp), "admin": str(n.admin)}
            for n in config.nodes if n.id != node_id}
    for nid, rec in state.members.items():
        if nid != node_id and rec.get("status") != "removed":
            lost[nid] = {k: rec[k] for k in ("raft", "smtp", "admin")}
    return RecoveryPlan(node_id, raft_dir, snapshot_index, last_index, commit_index, last_index - commit_index,
                        state, lost)


def force_new_cluster(config: Config, p: RecoveryPlan, now: float) -> dict:
    """Write the one-member cluster's Raft directory; the old one is kept, renamed. Returns what
    was done (counts after the recovery, recipients returned from batches, the kept dir)."""
    me = config.node(p.node_id)
    addresses = {"raft": str(me.raft), "smtp": str(me.smtp), "admin": str(me.admin)}
    st, returned = forced_state(p.state, now, p.node_id, addresses, p.lost)
    snapshot = encode_snapshot(st.to_snapshot(), RESTORED_LAST, RESTORED_PREV, [str(me.raft)])
    new_dir = p.raft_dir.with_name(p.raft_dir.name + ".recovering")
    kept = p.raft_dir.with_name(f"{p.raft_dir.name}{KEPT_SUFFIX}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}")
    if new_dir.exists():
        shutil.rmtree(new_dir)  # our own temp name, left by an interrupted recovery
    try:
        new_dir.mkdir(mode=0o700)
        with open(new_dir / "snapshot.bin", "wb") as f:
            f.write(snapshot)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(new_dir)
        os.rename(p.raft_dir, kept)
        os.rename(new_dir, p.raft_dir)
        fsync_dir(p.raft_dir.parent)
    except BaseException:
        if not p.raft_dir.exists() and kept.exists():
            os.rename(kept, p.raft_dir)  # put the original back: nothing half done
        shutil.rmtree(new_dir, ignore_errors=True)
        raise
    return {"queue": st.queue_counts(), "returned": returned, "kept": str(kept), "members": [p.node_id],
            "removed": sorted(p.lost)}


# ------------------------------------------------------------------ restore drill

DRILL_NODES = 3
DRILL_READY_TIMEOUT = 60.0  # seconds for the throw-away cluster to elect a leader
DRILL_NOOP_TIMEOUT = 5.0  # seconds a committed write may take in it
FINAL_STATES = ("delivered", "bounced", "suppressed", "cancelled", "expired")


def drill_restore(backup: Path, progress: Callable[[str], None] = lambda s: None,
                  keep_dir: Path | None = None) -> dict:
    """Restore `backup` into a throw-away local cluster (3 nodes on free 127.0.0.1 ports, every
    delivery to a local capture sink), start it, and compare its queue with the manifest: the
    same recipients in every final state, and every unfinished one (pending, deferred, in flight
    at backup time) queued again. Removes the cluster unless `keep_dir` is given. The result has
    "ok" and, when not ok, "error"."""
    import secrets
    import subprocess
    import sys
    import tempfile

    from raftmail.node.backup import BackupError, restore
    from raftmail.node.config import load_config
    from raftmail.node.local_cluster import LOOPBACK, LocalCluster, free_ports, local_nodes, port_open, render_config

    root = Path(keep_dir or tempfile.mkdtemp(prefix="raftmail-drill-"))
    started = time.monotonic()
    cluster: LocalCluster | None = None
    sink: subprocess.Popen | None = None
    try:
        nodes = local_nodes(DRILL_NODES)
        sink_port = free_ports(1)[0]
        sections = {"cluster": {"name": "restore-drill", "secret": secrets.token_hex(32), "data_dir": "data",
                                "admin_token": secrets.token_hex(16)},
                    "delivery": {"relay": f"{LOOPBACK}:{sink_port}"}}
        cluster = LocalCluster(root, nodes, render_config(sections, nodes))
        progress(f"restoring {backup} into a throw-away cluster in {root}")
        try:
            seeded = restore(load_config(cluster.config_path), backup, time.time(), progress)
        except BackupError as e:
            return {"ok": False, "error": str(e)}
        manifest = seeded["manifest"]
        with open(root / "sink.log", "ab") as log:
            sink = subprocess.Popen([sys.executable, "-m", "raftmail.cli", "sink", "--listen",
                                     f"{LOOPBACK}:{sink_port}", "--maildir", str(root / "sink")],
                                    stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        cluster.start()
        deadline = time.monotonic() + DRILL_READY_TIMEOUT
        leader = None
        while leader is None and time.monotonic() < deadline:
            leader = cluster.leader()
            time.sleep(0.1)
        if leader is None or not port_open(sink_port):
            return {"ok": False, "error": f"the restored cluster elected no leader in {DRILL_READY_TIMEOUT:g} s "
                                          f"(logs in {root})"}
        queue = cluster.queue(leader) or {}
        expected = manifest.get("counts", {})
        # The drill's sink may have taken some of the queued ones already: delivered may only grow.
        sent = queue.get("delivered", 0) - expected.get("delivered", 0)
        problems = [f"{name}: {queue.get(name, 0)} restored, {expected.get(name, 0)} in the backup"
                    for name in FINAL_STATES if name != "delivered" and queue.get(name, 0) != expected.get(name, 0)]
        if sent < 0:
            problems.append(f"delivered: {queue.get('delivered', 0)} restored, {expected['delivered']} in the backup")
        unfinished = sum(v for k, v in expected.items() if k not in FINAL_STATES)
        queued = sum(v for k, v in queue.items() if k not in FINAL_STATES)
        if queued + max(sent, 0) != unfinished:
            problems.append(f"unfinished: {queued} queued again (+{max(sent, 0)} sent by the drill), "
                            f"{unfinished} in the backup")
        return {"ok": not problems, "error": "; ".join(problems) if problems else None,
                "cluster": manifest.get("cluster"), "index": manifest.get("index"), "leader": leader,
                "counts": queue, "manifest_counts": expected, "bodies": seeded["bodies"],
                "returned": seeded["returned"], "seconds": round(time.monotonic() - started, 2)}
    finally:
        if cluster is not None:
            cluster.stop_all(grace=5.0)
        if sink is not None:
            sink.terminate()
            try:
                sink.wait(5)
            except subprocess.TimeoutExpired:
                sink.kill()
        if keep_dir is None:
            shutil.rmtree(root, ignore_errors=True)
