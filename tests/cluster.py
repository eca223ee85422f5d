"""Test harness: real raftmail node processes, a real capture sink, free ports on 127.0.0.1 (or on
addresses of network namespaces a test makes: `hosts` and `launch` of Cluster, `host` of Sink)."""
from __future__ import annotations

import json
import os
import smtplib
import socket
import subprocess
import sys
import urllib.request
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Callable

from raftmail.node.local_cluster import (ADMIN_OPENER, LOOPBACK as LOCAL,  # noqa: F401 (the tests' too)
                                         LocalCluster, free_ports, local_nodes,
                                         poll, port_open, render_config)

PY = sys.executable
SECRET = "test-cluster-secret-0123456789abcdef"


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition", interval: float = 0.05) -> Any:
    """Poll `pred` until it returns something truthy, or fail after `timeout` seconds."""
    value, last_exc = poll(pred, timeout, interval, tolerate=Exception)
    if value:
        return value
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


def make_message(subject: str = "Hello", message_id: str | None = None, body: str = "Hello from raftmail.\n",
                 sender: str = "news@example.com", campaign: str | None = None, size: int = 0) -> bytes:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = "list@example.com"
    m["Subject"] = subject
    m["Date"] = "Sat, 28 Nov 2026 10:00:00 +0000"
    if message_id:
        m["Message-ID"] = message_id
    if campaign:
        m["X-Campaign-ID"] = campaign
    if size:
        body = body + ("x" * 76 + "\n") * (size // 77 + 1)
    m.set_content(body)
    return m.as_bytes(policy=policy.SMTP)  # CRLF, as it travels (and is stored)


class Sink:
    """`raftmail sink` as its own process."""

    def __init__(self, root: Path, replies: list[str] | None = None, host: str = LOCAL) -> None:
        self.port = free_ports(1)[0]
        self.host = host
        self.maildir = root / "sink"
        self.replies = replies or []
        self.proc: subprocess.Popen | None = None
        self.root = root
        self.options: list[str] = []  # more `raftmail sink` options, set before it starts

    def command(self) -> list[str]:
        cmd = [PY, "-m", "raftmail.cli", "sink", "--listen", f"{self.host}:{self.port}", "--maildir", str(self.maildir)]
        for r in self.replies:
            cmd += ["--reply", r]
        return cmd + self.options

    def start(self) -> None:
        self.log = open(self.root / "sink.log", "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=self.log)
        wait_for(lambda: port_open(self.port, self.host), 15, "sink to listen")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def events(self, kind: str | None = None) -> list[dict]:
        from raftmail.node.sink import read_log
        if not self.maildir.exists():
            return []
        return [e for e in read_log(self.maildir) if kind is None or e.get("event") == kind]

    def delivered(self) -> list[dict]:
        return self.events("message")


LIBFAKETIME_PATHS = (Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
                     Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"),
                     Path("/usr/lib/faketime/libfaketime.so.1"), Path("/usr/local/lib/faketime/libfaketime.so.1"))


def libfaketime() -> Path | None:
    """Debian's libfaketime (package faketime), or None."""
    return next((p for p in LIBFAKETIME_PATHS if p.exists()), None)


FAKETIME_SITE = Path(__file__).parent / "faketime"  # its sitecustomize mends time.sleep under libfaketime


def skewed_launch(offset: int) -> list[str]:
    """A command prefix (Cluster's `launch`) that runs a node with its wall clock `offset` seconds
    off and its monotonic clock true, as on another machine. libfaketime is preloaded into the node
    itself: the `faketime` wrapper forks, so a signal to the wrapper would miss the node. Debian's
    libfaketime breaks time.sleep when the monotonic clock is left true; the node's Python mends
    it at start (tests/faketime/sitecustomize.py)."""
    lib = libfaketime()
    assert lib is not None, "libfaketime is not installed"
    path = os.pathsep.join(filter(None, [str(FAKETIME_SITE), os.environ.get("PYTHONPATH")]))
    return ["env", f"LD_PRELOAD={lib}", f"FAKETIME={offset:+d}s", "FAKETIME_DONT_FAKE_MONOTONIC=1",
            "FAKETIME_NO_CACHE=1", f"PYTHONPATH={path}"]

class Cluster(LocalCluster):
    def __init__(self, root: Path, n: int = 3, *, sink: Sink | None = None, extra_toml: str = "",
                 lease_seconds: float = 4.0, retry_first: float = 1.0, batch_size: int = 50,
                 compaction_min_entries: int = 5000, commit_timeout: float = 3.0,
                 hosts: dict[str, str] | None = None, launch: dict[str, list[str]] | None = None,
                 delivery: dict[str, Any] | None = None) -> None:
        """`delivery`: more [delivery] keys; a key given as None is left out (relay=None: MX delivery)."""
        # Never the sink's port, which was picked earlier.
        nodes = local_nodes(n, hosts, avoid=[sink.port] if sink is not None else [])
        # Always a local relay: without one the sender would look up MX records on the internet.
        # With no sink, the relay is a port nobody listens on (deliveries defer).
        relay = f"{sink.host}:{sink.port}" if sink is not None else f"{LOCAL}:{free_ports(1)[0]}"
        sections = {
            "cluster": {"name": "test", "secret": SECRET, "data_dir": "data"},
            "raft": {"compaction_min_entries": compaction_min_entries},
            "intake": {"commit_timeout": commit_timeout, "max_recipients": 1000},
            "delivery": {"lease_seconds": lease_seconds, "retry_first": retry_first, "batch_size": batch_size,
                         "report_interval": 0.1, "connect_timeout": 5, "command_timeout": 10, "relay": relay},
        }
        for key, value in (delivery or {}).items():
            if value is None:
                sections["delivery"].pop(key, None)
            else:
                sections["delivery"][key] = value
        super().__init__(root, nodes, render_config(sections, nodes, extra_toml), python=PY, launch=launch)
        self.hosts = {node.id: node.host for node in nodes}
        self.raft = {node.id: node.raft for node in nodes}
        self.smtp = {node.id: node.smtp for node in nodes}
        self.admin = {node.id: node.admin for node in nodes}
        self.sink = sink

    def start_all_and_wait(self, timeout: float = 30.0) -> str:
        if self.sink is not None and self.sink.proc is None:
            self.sink.start()
        self.start()
        for nid in self.ids:
            wait_for(lambda nid=nid: self.status(nid), timeout, f"{nid} to answer /status")
        return self.wait_leader(timeout)

    def close(self) -> None:
        super().close()
        if self.sink is not None:
            self.sink.stop()

    def status(self, nid: str, timeout: float = 2.0) -> dict | None:
        try:
            return self.get(nid, "/status", timeout)
        except Exception:
            return None

    def hand_leadership(self, away_from: str | None = None, to: str | None = None, timeout: float = 20.0) -> str:
        """Ask the leader to hand leadership over (to `to`, else to a caught-up follower) until
        `to` leads, or `away_from` no longer does; returns the leader. A transfer is refused while
        no follower is caught up (right after a start, say), so it is asked again."""
        def done() -> str | None:
            ld = self.leader()
            if ld is not None and (ld == to if to else ld != away_from):
                return ld
            if ld is not None:
                self.ask_transfer(ld, to)
            return None
        return wait_for(done, timeout, f"{to} to lead" if to else f"leadership to move off {away_from}",
                        interval=0.5)

    def ask_transfer(self, leader: str, to: str | None = None) -> None:
        """Ask `leader` once to hand leadership to `to` (else to a caught-up follower); whether
        it did shows in `leader()` later."""
        token = self.admin_token()
        req = urllib.request.Request(
            self.admin_url(leader, "/cluster/transfer"), data=json.dumps({"to": to} if to else {}).encode(),
            method="POST", headers={"Content-Type": "application/json",
                                    **({"Authorization": f"Bearer {token}"} if token else {})})
        try:
            ADMIN_OPENER.open(req, timeout=5).read()
        except OSError:
            pass

    def wait_leader(self, timeout: float = 30.0, among: list[str] | None = None) -> str:
        return wait_for(lambda: self.leader(among), timeout, "a leader followed by every live node")

    def followers(self) -> list[str]:
        ld = self.leader()
        return [n for n in self.ids if n != ld and self.alive(n)]

    def digest(self, nid: str) -> dict:
        return self.get(nid, "/state/digest", timeout=10)

    def submission(self, nid: str, sid: str) -> dict | None:
        try:
            return self.get(nid, f"/state/submissions/{sid}")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def queue(self, nid: str) -> dict:
        return self.get(nid, "/status")["queue"]

    def wait_converged(self, nodes: list[str] | None = None, timeout: float = 30.0) -> str:
        """Every given node has applied the same commands: equal digests."""
        nodes = nodes or [n for n in self.ids if self.alive(n)]

        def same():
            ds = {n: self.digest(n)["digest"] for n in nodes}
            return len(set(ds.values())) == 1 and next(iter(ds.values()))
        return wait_for(same, timeout, f"state digests of {nodes} to agree", interval=0.2)

    # -- SMTP

    def submit(self, nid: str, rcpts: list[str], message: bytes | None = None,
               sender: str = "news@example.com", timeout: float = 15.0,
               source: str | None = None) -> tuple[int, str]:
        """One SMTP transaction (from the local address `source`, when given); returns the reply
        to the final dot (or to the first refusal)."""
        message = message if message is not None else make_message()
        try:
            with smtplib.SMTP(self.hosts[nid], self.smtp[nid], timeout=timeout,
                              source_address=(source, 0) if source else None) as s:
                s.ehlo("client.test")
                code, text = s.mail(sender)
                if code != 250:
                    return code, text.decode()
                for r in rcpts:
                    code, text = s.rcpt(r)
                    if code not in (250, 251):
                        return code, text.decode()
                code, text = s.data(message)
                return code, text.decode()
        except smtplib.SMTPServerDisconnected as e:
            return 0, f"disconnected: {e}"
        except (OSError, smtplib.SMTPException) as e:
            return 0, f"{type(e).__name__}: {e}"


def queued_as(reply_text: str) -> str:
    """The submission id in our 250 reply."""
    words = reply_text.replace(":", " ").split()
    return words[words.index("as") + 1]


# -- appended helpers (generic; existing behaviour above is unchanged)

def set_config(c: Cluster, section: str, **values: Any) -> None:
    """Set keys of a top-level [section] in the cluster file before the nodes start: a key the
    section already has is replaced, a new key is added under the section header."""
    lines = c.config_path.read_text().split("\n")
    header = f"[{section}]"
    if header not in lines:
        lines += ["", header]
    start = lines.index(header) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
    for key, value in values.items():
        rendered = f"{key} = {json.dumps(value)}"
        at = next((i for i in range(start, end) if lines[i].split("=")[0].strip() == key), None)
        if at is None:
            lines.insert(start, rendered)
            end += 1
        else:
            lines[at] = rendered
    c.config_path.write_text("\n".join(lines))


def founders_only(c: Cluster, n: int) -> str:
    """The cluster file as the founding members see it: the first n [[node]] tables (the others
    join at run time)."""
    head, *nodes = c.config_path.read_text().split("[[node]]")
    kept = nodes[:n]
    tail = nodes[-1][nodes[-1].index("[raft]"):]
    kept[-1] = kept[-1] if "[raft]" not in kept[-1] else kept[-1][:kept[-1].index("[raft]")]
    return head + "".join("[[node]]" + k for k in kept) + tail


def start_founders(c: Cluster, n: int) -> tuple[str, str]:
    """Start the sink and the first n nodes with a cluster file that lists only them (the others
    join at run time); returns the whole file's text, for later, and the founders' leader."""
    full = c.config_path.read_text()
    c.config_path.write_text(founders_only(c, n))
    c.sink.start()
    founders = c.ids[:n]
    for nid in founders:
        c.start(nid)
    return full, c.wait_leader(30, among=founders)


def submission_count(c: Cluster, nid: str) -> int:
    """Submissions in a node's applied state (retries answered as duplicates do not add one), from
    a /status whose view shows every command applied when it was asked."""
    status = wait_for(lambda: (lambda s: s if s["view_behind"] == 0 else None)(c.get(nid, "/status")), 10,
                      f"{nid}'s read view to show what it applied")
    return status["submissions"]


def run_cli(config_path: Path, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """`raftmail ARGS --config FILE` as a subprocess, the way an operator runs it."""
    return subprocess.run([PY, "-m", "raftmail.cli", *args, "--config", str(config_path)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


# -- delivery helpers (appended for the delivery tests)

class SlowSink(Sink):
    """A capture sink that waits `delay` seconds before accepting each message (`raftmail sink
    --delay`), so a test can catch a batch while it is being delivered."""

    def __init__(self, root: Path, replies: list[str] | None = None, delay: float = 0.0, host: str = LOCAL) -> None:
        super().__init__(root, replies, host)
        self.delay = delay

    def command(self) -> list[str]:
        return super().command() + ["--delay", str(self.delay)]


def deliveries_per_recipient(sink: Sink) -> dict[str, int]:
    """How many times the sink accepted a message for each recipient (lower-cased address)."""
    counts: dict[str, int] = {}
    for e in sink.delivered():
        addr = e["rcpt"].lower()
        counts[addr] = counts.get(addr, 0) + 1
    return counts


def peak_connections(sink: Sink) -> int:
    """The most SMTP connections the sink had open at once, from its connect/disconnect events."""
    open_now = peak = 0
    for e in sink.events():
        if e.get("event") == "connect":
            open_now += 1
            peak = max(peak, open_now, e.get("open", 0))
        elif e.get("event") == "disconnect":
            open_now -= 1
    return peak


class SMTPSession:
    """One client connection to one node, reused for many transactions (as bulk senders do);
    reconnects after any failure. Not thread-safe: one per thread."""

    def __init__(self, c: Cluster, nid: str, timeout: float = 15.0) -> None:
        self.c, self.nid, self.timeout = c, nid, timeout
        self._smtp: smtplib.SMTP | None = None

    def send(self, rcpts: list[str], message: bytes, sender: str = "news@example.com") -> tuple[int, str]:
        """One transaction; the reply to the final dot or to the first refusal, 0 for no reply."""
        try:
            if self._smtp is None:
                self._smtp = smtplib.SMTP(self.c.hosts[self.nid], self.c.smtp[self.nid], timeout=self.timeout)
                self._smtp.ehlo("client.test")
            s = self._smtp
            code, text = s.mail(sender)
            for r in rcpts:
                if code != 250:
                    break
                code, text = s.rcpt(r)
                code = 250 if code == 251 else code
            if code == 250:
                code, text = s.data(message)
            else:
                s.rset()
            return code, text.decode(errors="replace")
        except (OSError, smtplib.SMTPException) as e:
            self.close()
            return 0, f"{type(e).__name__}: {e}"

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.close()
            except OSError:
                pass
            self._smtp = None


def describe(c: Cluster) -> str:
    """Each node's view in one line, for failure messages."""
    out = []
    for nid in c.ids:
        st = c.status(nid)
        if not st:
            out.append(f"{nid}: no answer (alive={c.alive(nid)})")
            continue
        try:
            dg = c.digest(nid)["digest"][:12]
        except Exception as e:  # report, do not hide the original failure
            dg = f"? ({e})"
        out.append(f"{nid}: {st['role']} term {st['term']} leader {st['leader']} commit {st['commit_index']} "
                   f"applied {st['applied_index']} submissions {st['submissions']} queue {st['queue']} digest {dg}")
    return "\n".join(out)


def wait_converged_explained(c: Cluster, nodes: list[str] | None = None, timeout: float = 30.0) -> str:
    """`wait_converged`, with every node's view in the failure message."""
    try:
        return c.wait_converged(nodes, timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{describe(c)}") from None


def read_until_closed(s: socket.socket) -> str:
    """Every reply a server sends until it closes the connection (raw-socket SMTP tests)."""
    chunks = []
    while True:
        data = s.recv(65536)
        if not data:
            return b"".join(chunks).decode("utf-8", "replace")
        chunks.append(data)
