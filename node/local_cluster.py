"""A cluster of raftmail node processes on this machine: the cluster file written with free ports,
one `python -m raftmail.cli start` process per node, and the admin API to watch them.

`raftmail drill` restores into one; the test suite and the benchmark build theirs on it (each adds
its own defaults and probes), so there is one way to start, watch and stop local nodes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

LOOPBACK = "127.0.0.1"
STOP_GRACE = 15.0  # seconds a node gets to stop on SIGTERM before it is killed
STATUS_TIMEOUT = 2.0  # seconds an admin call may take
POLL_INTERVAL = 0.05  # seconds between polls of a condition
# Admin calls go straight to the node: never through a proxy named in the environment.
ADMIN_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

T = TypeVar("T")


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Distinct TCP ports nobody listens on now; the sockets are held together so none repeats."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def poll(probe: Callable[[], T | None], timeout: float, interval: float = POLL_INTERVAL,
         tolerate: type[BaseException] | tuple[type[BaseException], ...] = ()) -> tuple[T | None, BaseException | None]:
    """Call `probe` until it returns something truthy or `timeout` seconds pass; (the value or
    None, the last exception of the `tolerate` kinds). The callers raise their own error."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = probe()
            if value:
                return value, None
        except tolerate as e:  # a node that is starting or stopping: poll again
            last = e
        if time.monotonic() >= deadline:
            return None, last
        time.sleep(interval)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string of printable text is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


@dataclass(frozen=True)
class LocalNode:
    id: str
    host: str
    raft: int
    smtp: int
    admin: int


def local_nodes(n: int, hosts: dict[str, str] | None = None, avoid: Sequence[int] = ()) -> list[LocalNode]:
    """n nodes named n1..nN with free ports, on 127.0.0.1 unless `hosts` gives another address."""
    ports = [p for p in free_ports(3 * n + len(avoid)) if p not in avoid][:3 * n]
    return [LocalNode(f"n{i + 1}", (hosts or {}).get(f"n{i + 1}", LOOPBACK), *ports[3 * i:3 * i + 3])
            for i in range(n)]


def render_config(sections: dict[str, dict[str, Any]], nodes: Sequence[LocalNode], extra: str = "") -> str:
    """A cluster file: [cluster] first, one [[node]] each, then the other sections, then `extra`
    (TOML text, for what a caller writes by hand)."""
    sections = {k: dict(v) for k, v in sections.items()}
    lines = ["[cluster]", *(f"{k} = {toml_value(v)}" for k, v in sections.pop("cluster", {}).items()), ""]
    for node in nodes:
        lines += ["[[node]]", f"id = {toml_value(node.id)}", f'raft = "{node.host}:{node.raft}"',
                  f'smtp = "{node.host}:{node.smtp}"', f'admin = "{node.host}:{node.admin}"', ""]
    for section, values in sections.items():
        lines += [f"[{section}]", *(f"{k} = {toml_value(v)}" for k, v in values.items()), ""]
    return "\n".join(lines + ([extra] if extra else []))


class LocalCluster:
    """Start, signal, watch and stop the nodes of a cluster file whose nodes all run here."""

    def __init__(self, root: Path, nodes: Sequence[LocalNode], config_text: str, python: str = sys.executable,
                 launch: dict[str, list[str]] | None = None) -> None:
        self.root = root
        self.nodes = list(nodes)
        self.by_id = {n.id: n for n in self.nodes}
        self.ids = [n.id for n in self.nodes]
        self.python = python
        # The command prefix that starts a node (e.g. `ip netns exec NAME`, a skewed clock).
        self.launch = {nid: (launch or {}).get(nid, []) for nid in self.ids}
        self.procs: dict[str, subprocess.Popen] = {}
        root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "cluster.toml"
        self.config_path.write_text(config_text)

    # -- processes

    def node_argv(self, nid: str) -> list[str]:
        return [*self.launch[nid], self.python, "-m", "raftmail.cli", "start", "--config", str(self.config_path),
                "--node", nid]

    def start(self, nid: str | None = None) -> None:
        """Start one node, or every node; output goes to ROOT/<id>.log."""
        for node in [nid] if nid else self.ids:
            self.procs[node] = self.spawn(node, self.node_argv(node), self.log_path(node))

    def spawn(self, nid: str, argv: list[str], log_path: Path) -> subprocess.Popen:
        with open(log_path, "ab") as log:
            return subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def signal(self, nid: str, sig: int) -> None:
        p = self.procs.get(nid)
        if p is not None and p.poll() is None:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self, nid: str) -> None:
        self.signal(nid, signal.SIGKILL)
        self.procs[nid].wait(STOP_GRACE)

    def stop(self, nid: str, grace: float = STOP_GRACE) -> bool:
        """SIGTERM, then SIGKILL after `grace` seconds; True when it stopped by itself."""
        p = self.procs.get(nid)
        if p is None or p.poll() is not None:
            return True
        p.terminate()
        try:
            p.wait(grace)
            return True
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            return False

    def stop_all(self, grace: float = STOP_GRACE) -> list[str]:
        """SIGTERM every node together, SIGKILL what still runs after `grace` seconds; returns the
        ids that had to be killed."""
        for nid in self.ids:
            self.signal(nid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        killed = []
        for nid, p in self.procs.items():
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append(nid)
                p.kill()
                p.wait()
        return killed

    def alive(self, nid: str) -> bool:
        p = self.procs.get(nid)
        return p is not None and p.poll() is None

    def live_ids(self) -> list[str]:
        return [nid for nid in self.ids if self.alive(nid)]

    def close(self) -> None:
        """Kill every node (stopped ones too: SIGCONT first)."""
        for nid in self.ids:
            self.signal(nid, signal.SIGCONT)
            self.signal(nid, signal.SIGKILL)
        for p in self.procs.values():
            try:
                p.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                pass

    def data_dir(self, nid: str) -> Path:
        return self.root / "data" / nid

    def log_path(self, nid: str) -> Path:
        return self.root / f"{nid}.log"

    def log_text(self, nid: str) -> str:
        p = self.log_path(nid)
        return p.read_text(errors="replace") if p.exists() else ""

    # -- admin API

    def _cluster_section(self) -> dict:
        import tomllib
        return tomllib.loads(self.config_path.read_text()).get("cluster", {})

    def token(self) -> str | None:
        """The token an operator's CLI would send to read: from the cluster file, if it has one."""
        cluster = self._cluster_section()
        return cluster.get("read_token") or cluster.get("admin_token")

    def admin_token(self) -> str | None:
        """The token that may change things, if the cluster file has one."""
        return self._cluster_section().get("admin_token")

    def admin_url(self, nid: str, path: str) -> str:
        node = self.by_id[nid]
        return f"http://{node.host}:{node.admin}{path}"

    def get(self, nid: str, path: str, timeout: float = STATUS_TIMEOUT) -> Any:
        token = self.token()
        req = urllib.request.Request(self.admin_url(nid, path),
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        with ADMIN_OPENER.open(req, timeout=timeout) as r:
            return json.loads(r.read())

    def status(self, nid: str, timeout: float = STATUS_TIMEOUT) -> dict | None:
        try:
            return self.get(nid, "/status", timeout)
        except (OSError, ValueError, urllib.error.URLError):
            return None  # starting, stopped or busy: the caller polls again

    def leader(self, among: list[str] | None = None) -> str | None:
        """The one node that leads with a quorum and that every other live node follows."""
        nodes = among or self.live_ids()
        sts = {n: self.status(n) for n in nodes}
        leaders = [n for n, s in sts.items() if s and s.get("role") == "leader" and s.get("has_quorum")]
        if len(leaders) != 1:
            return None
        ld = leaders[0]
        if all(s and (n == ld or s.get("leader") == ld) for n, s in sts.items()):
            return ld
        return None

    def queue(self, nid: str) -> dict | None:
        st = self.status(nid)
        return st.get("queue") if st else None
