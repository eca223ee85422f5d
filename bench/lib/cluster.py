"""A 3-node raftmail cluster on 127.0.0.1 for the benchmark: the TOML file with free ports, one
`python -m raftmail.cli start` process per node, and the admin /status API to watch it."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raftmail.node.local_cluster import LocalCluster, local_nodes, render_config

from .cpu import cpu_seconds
from .procs import LOOPBACK, BenchError, Child, rss_bytes, spawn, wait_until

DEFAULT_NODES = 3
DEFAULT_READY_TIMEOUT = 60.0
DEFAULT_STATUS_TIMEOUT = 2.0
STATUS_POLL_INTERVAL = 0.05
NODE_STOP_GRACE = 15.0
# After a run the cluster is thrown away; a node that needs longer than this to stop on SIGTERM
# is killed (and reported on stderr) instead of costing every run its slow shutdown.
CLUSTER_STOP_GRACE = 3.0
BENCH_SECRET = "bench-secret-0123456789abcdef-0123456789"
# {python}, {config} and {node} are filled in; `--node-command` on run.py can replace it.
DEFAULT_NODE_COMMAND = "{python} -m raftmail.cli start --config {config} --node {node}"
FINAL_STATES = ("delivered", "bounced", "suppressed", "cancelled", "expired")
FAILED_STATES = ("bounced", "cancelled", "expired")


def raftmail_available(python: str = sys.executable, node_command: str = DEFAULT_NODE_COMMAND) -> str | None:
    """None when `... start --help` works, else why the raftmail cases cannot run."""
    argv = _node_argv(node_command, python, Path("CONFIG"), "NODE")
    help_argv = argv[: argv.index("--config")] + ["--help"] if "--config" in argv else argv + ["--help"]
    try:
        done = subprocess.run(help_argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{shlex.join(help_argv)}` failed: {exc}"
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return f"`{shlex.join(help_argv)}` failed: {last[0]}"
    return None


def _node_argv(template: str, python: str, config: Path, node_id: str) -> list[str]:
    return [part.format(python=python, config=config, node=node_id) for part in shlex.split(template)]


@dataclass
class ClusterSpec:
    """What varies between cases; every other setting is raftmail's default."""

    relay_port: int
    nodes: int = DEFAULT_NODES
    fsync: bool = False
    batch_size: int = 100
    lease_seconds: float = 10.0
    max_message_bytes: int = 10 * 2**20
    max_recipients: int = 1000
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # section -> key -> value


def spec_sections(spec: ClusterSpec, data_dir: Path) -> dict[str, dict[str, Any]]:
    cluster: dict[str, Any] = {"name": "bench", "secret": BENCH_SECRET, "data_dir": str(data_dir)}
    if spec.fsync:
        cluster["fsync"] = True
    sections: dict[str, dict[str, Any]] = {
        "cluster": cluster,
        "intake": {"max_message_bytes": spec.max_message_bytes, "max_recipients": spec.max_recipients},
        "delivery": {"relay": f"{LOOPBACK}:{spec.relay_port}", "batch_size": spec.batch_size,
                     "lease_seconds": spec.lease_seconds},
    }
    for section, values in spec.extra.items():
        sections.setdefault(section, {}).update(values)
    return sections


def queue_total(queue: dict[str, int]) -> int:
    return sum(v for v in queue.values() if isinstance(v, int))


def queue_final(queue: dict[str, int]) -> int:
    return sum(queue.get(name, 0) for name in FINAL_STATES)


class Cluster(LocalCluster):
    """Start, watch, kill and restart the nodes of one benchmark cluster."""

    def __init__(self, root: Path, spec: ClusterSpec, python: str = sys.executable,
                 node_command: str = DEFAULT_NODE_COMMAND) -> None:
        self.spec = spec
        self.node_command = node_command
        self.children: dict[str, Child] = {}
        nodes = local_nodes(spec.nodes)
        text = render_config(spec_sections(spec, root / "data"), nodes,
                             "# Written by bench/run.py for one benchmark run; every address is 127.0.0.1.")
        super().__init__(root, nodes, text, python)

    # -- processes

    def node_argv(self, nid: str) -> list[str]:
        return _node_argv(self.node_command, self.python, self.config_path, nid)

    def spawn(self, nid: str, argv: list[str], log_path: Path) -> subprocess.Popen:
        # In its own session and registered, so the harness stops it even when it is interrupted.
        child = spawn(f"raftmail-{nid}", argv, log_path, cwd=self.root)
        self.children[nid] = child
        return child.proc

    def start_all(self, timeout: float = DEFAULT_READY_TIMEOUT) -> str:
        """Start every node; returns the leader once all answer /status and follow it."""
        self.start()
        return self.wait_ready(timeout)

    def stop_all(self, grace: float = CLUSTER_STOP_GRACE) -> list[str]:
        return super().stop_all(grace)

    def signal_and_wait(self, node_id: str, sig: int = signal.SIGKILL) -> float:
        """Send `sig` and wait for the process to end; returns the monotonic time it was sent."""
        sent = time.monotonic()
        self.signal(node_id, sig)
        try:
            self.procs[node_id].wait(timeout=NODE_STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.children[node_id].kill()
        return sent

    def dead_node_report(self, among: list[str] | None = None) -> str:
        """Which of the nodes expected to run died, with the end of their logs, for an error."""
        expected = among or [node.id for node in self.nodes if node.id in self.children]
        dead = [node_id for node_id in expected if not self.alive(node_id)]
        parts = []
        for node_id in dead:
            log_tail = self.children[node_id].log_tail().strip().splitlines()[-5:]
            parts.append(f"{node_id} exited ({self.children[node_id].proc.returncode}): "
                         + " | ".join(log_tail))
        return "; ".join(parts)

    def check_alive(self, expected: list[str] | None = None) -> None:
        for node_id in expected or list(self.children):
            if not self.alive(node_id):
                raise BenchError(f"raftmail node died: {self.dead_node_report(expected)}")

    def rss(self, node_id: str) -> int:
        return rss_bytes(self.procs[node_id].pid)

    def cpu_seconds(self) -> float:
        """User + system CPU the node processes have used so far, all threads, together."""
        return cpu_seconds(proc.pid for proc in self.procs.values())

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT, among: list[str] | None = None) -> str:
        def ready() -> str | None:
            self.check_alive(among)
            return self.leader(among)

        return wait_until(ready, timeout, "a raftmail leader followed by every node",
                          interval=STATUS_POLL_INTERVAL)

    def smtp_ports(self, among: list[str] | None = None) -> list[int]:
        return [self.by_id[node_id].smtp for node_id in (among or self.ids)]

    def delivered_at(self, node_id: str) -> dict[str, float]:
        """recipient -> wall time of its first `delivered` outcome, from the node's event ring."""
        first: dict[str, float] = {}
        after = 0
        while True:
            events = self.get(node_id, f"/events?after={after}&limit=10000", timeout=10.0)["events"]
            if not events:
                return first
            for event in events:
                if event["outcome"] == "delivered":
                    first.setdefault(event["recipient"], event["t"])
            after = events[-1]["seq"]

    def wait_queue(self, node_id: str, predicate, timeout: float, what: str,
                   interval: float = STATUS_POLL_INTERVAL) -> tuple[dict[str, int], float]:
        """Poll a node's queue counts until `predicate(queue)`; returns them and when it held."""
        def probe() -> dict[str, int] | None:
            self.check_alive([node_id])
            queue = self.queue(node_id)
            return queue if queue is not None and predicate(queue) else None

        queue = wait_until(probe, timeout, what, interval=interval)
        return queue, time.monotonic()
