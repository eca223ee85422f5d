"""A 3-node raftmail cluster on 127.0.0.1 for the benchmark: the TOML file with free ports, one
`python -m raftmail.cli start` process per node, and the admin /status API to watch it."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import LOOPBACK, BenchError, Child, free_ports, rss_bytes, spawn, wait_until

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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string of printable text is a valid TOML basic string
    raise TypeError(f"no TOML form for {value!r}")


@dataclass(frozen=True)
class NodePorts:
    id: str
    raft: int
    smtp: int
    admin: int


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


def render_config(spec: ClusterSpec, nodes: list[NodePorts], data_dir: Path) -> str:
    cluster = {"name": "bench", "secret": BENCH_SECRET, "data_dir": str(data_dir)}
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
    lines = ["# Written by bench/run.py for one benchmark run; every address is 127.0.0.1.", ""]
    lines += ["[cluster]", *(f"{k} = {_toml_value(v)}" for k, v in sections.pop("cluster").items()), ""]
    for node in nodes:
        lines += ["[[node]]", f"id = {_toml_value(node.id)}",
                  f'raft = "{LOOPBACK}:{node.raft}"', f'smtp = "{LOOPBACK}:{node.smtp}"',
                  f'admin = "{LOOPBACK}:{node.admin}"', ""]
    for section, values in sections.items():
        lines += [f"[{section}]", *(f"{k} = {_toml_value(v)}" for k, v in values.items()), ""]
    return "\n".join(lines)


def queue_total(queue: dict[str, int]) -> int:
    return sum(v for v in queue.values() if isinstance(v, int))


def queue_final(queue: dict[str, int]) -> int:
    return sum(queue.get(name, 0) for name in FINAL_STATES)


class Cluster:
    """Start, watch, kill and restart the nodes of one benchmark cluster."""

    def __init__(self, root: Path, spec: ClusterSpec, python: str = sys.executable,
                 node_command: str = DEFAULT_NODE_COMMAND) -> None:
        self.root = root
        self.spec = spec
        self.python = python
        self.node_command = node_command
        ports = free_ports(3 * spec.nodes)
        self.nodes = [NodePorts(f"n{i + 1}", *ports[3 * i: 3 * i + 3]) for i in range(spec.nodes)]
        self.by_id = {node.id: node for node in self.nodes}
        self.config_path = root / "cluster.toml"
        self.children: dict[str, Child] = {}
        root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_config(spec, self.nodes, root / "data"))

    # -- processes

    def start_node(self, node_id: str) -> Child:
        argv = _node_argv(self.node_command, self.python, self.config_path, node_id)
        child = spawn(f"raftmail-{node_id}", argv, self.root / f"{node_id}.log", cwd=self.root)
        self.children[node_id] = child
        return child

    def start(self, timeout: float = DEFAULT_READY_TIMEOUT) -> str:
        """Start every node; returns the leader once all answer /status and follow it."""
        for node in self.nodes:
            self.start_node(node.id)
        return self.wait_ready(timeout)

    def alive(self, node_id: str) -> bool:
        child = self.children.get(node_id)
        return child is not None and child.alive()

    def live_ids(self) -> list[str]:
        return [node.id for node in self.nodes if self.alive(node.id)]

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> float:
        """Send `sig` and wait for the process to end; returns the monotonic time it was sent."""
        child = self.children[node_id]
        sent = time.monotonic()
        child.signal(sig)
        try:
            child.proc.wait(timeout=NODE_STOP_GRACE)
        except subprocess.TimeoutExpired:
            child.kill()
        return sent

    def stop(self, grace: float = CLUSTER_STOP_GRACE) -> list[str]:
        """SIGTERM every node together, SIGKILL what is still running after `grace` seconds (the
        run is over and its data thrown away); returns the ids that had to be killed."""
        for child in self.children.values():
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        killed = []
        for node_id, child in self.children.items():
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                child.stop()  # already ended: only forgets it
            except subprocess.TimeoutExpired:
                killed.append(node_id)
                child.kill()
        return killed

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
        return rss_bytes(self.children[node_id].pid)

    # -- admin API

    def status(self, node_id: str, timeout: float = DEFAULT_STATUS_TIMEOUT) -> dict | None:
        url = f"http://{LOOPBACK}:{self.by_id[node_id].admin}/status"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return json.loads(response.read())
        except (OSError, ValueError, urllib.error.URLError):
            return None  # starting, stopped or busy: the caller polls again

    def leader(self, among: list[str] | None = None) -> str | None:
        """The one node that leads with a quorum and that every other live node follows."""
        nodes = among or self.live_ids()
        statuses = {node_id: self.status(node_id) for node_id in nodes}
        leaders = [n for n, s in statuses.items() if s and s.get("role") == "leader" and s.get("has_quorum")]
        if len(leaders) != 1:
            return None
        leader = leaders[0]
        if all(s and (n == leader or s.get("leader") == leader) for n, s in statuses.items()):
            return leader
        return None

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT, among: list[str] | None = None) -> str:
        def ready() -> str | None:
            self.check_alive(among)
            return self.leader(among)

        return wait_until(ready, timeout, "a raftmail leader followed by every node",
                          interval=STATUS_POLL_INTERVAL)

    def smtp_ports(self, among: list[str] | None = None) -> list[int]:
        return [self.by_id[node_id].smtp for node_id in (among or [n.id for n in self.nodes])]

    def delivered_at(self, node_id: str) -> dict[str, float]:
        """recipient -> wall time of its first `delivered` outcome, from the node's event ring."""
        first: dict[str, float] = {}
        after = 0
        while True:
            url = f"http://{LOOPBACK}:{self.by_id[node_id].admin}/events?after={after}&limit=10000"
            with urllib.request.urlopen(url, timeout=10.0) as response:
                events = json.loads(response.read())["events"]
            if not events:
                return first
            for event in events:
                if event["outcome"] == "delivered":
                    first.setdefault(event["recipient"], event["t"])
            after = events[-1]["seq"]

    def queue(self, node_id: str) -> dict[str, int] | None:
        status = self.status(node_id)
        return status.get("queue") if status else None

    def wait_queue(self, node_id: str, predicate, timeout: float, what: str,
                   interval: float = STATUS_POLL_INTERVAL) -> tuple[dict[str, int], float]:
        """Poll a node's queue counts until `predicate(queue)`; returns them and when it held."""
        def probe() -> dict[str, int] | None:
            self.check_alive([node_id])
            queue = self.queue(node_id)
            return queue if queue is not None and predicate(queue) else None

        queue = wait_until(probe, timeout, what, interval=interval)
        return queue, time.monotonic()
