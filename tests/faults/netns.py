"""A private test network for the partition scenarios: one network namespace per node, each
joined by a veth pair to a bridge that lives in a namespace of its own; the root namespace joins
the same bridge through one more veth pair, so the test's clients and the capture sink (both in
the root namespace, on the bridge's root-side address) reach every node. The addresses are a
/24 of 10.213.0.0/16 that no route of this machine uses, and they exist only on these veths; the
node namespaces have no default route, so nothing a node sends can leave the machine.

Faults are nftables rules in the receiving node's namespace that silently drop packets from
chosen node addresses (input hook), or only their TCP segments to and from chosen ports (the Raft
ports, say, while body pushes on the admin port still flow): a dropped TCP segment times out as
it would on a real cut link, rather than failing at once as an output-hook drop would. Clients
and the sink are never blocked, so a client can still reach a node that is cut off from its peers.

Needs root and iproute2 + nftables; names carry the test process id, so a run that crashed
cannot collide with the next one, which also removes what a dead run left behind."""
from __future__ import annotations

import ipaddress
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time

PREFIX = "rmnem"  # namespace names: rmnem-<pid>-<seq>-<role>
_STALE = re.compile(rf"^{PREFIX}-(?P<pid>\d+)-\S+$")
TEST_RANGE = ipaddress.ip_network("10.213.0.0/16")  # one /24 of it per network
ROOT_HOST = 1  # the root namespace's address on the bridge: clients and the sink
FIRST_NODE_HOST = 11  # n1 is .11, n2 .12, ...
TABLE = "raftmail_nemesis"
CMD_TIMEOUT = 10.0  # seconds for one ip/nft command
_seq = itertools.count()


def unavailable() -> str | None:
    """Why this machine cannot build the test network, or None if it can."""
    if os.geteuid() != 0:
        return "network partition scenarios need root (network namespaces, nftables)"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        return f"network partition scenarios need {' and '.join(missing)} (Debian: iproute2, nftables)"
    probe = f"{PREFIX}-{os.getpid()}-probe-ns"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"network partition scenarios cannot create a network namespace: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def _run(*cmd: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=CMD_TIMEOUT)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete the namespaces of earlier test processes that are no longer running (a crashed or
    killed run leaves them mounted, maybe with its node processes still inside: those are
    killed); their veths go with them. Returns the names removed."""
    p = _run("ip", "-j", "netns", "list", check=False)
    names = [e["name"] for e in json.loads(p.stdout or "[]")] if p.returncode == 0 else []
    removed = []
    for name in names:
        m = _STALE.match(name)
        if m and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            for pid in _run("ip", "netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


def _free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    """A /24 of TEST_RANGE that overlaps no address or route of the root namespace."""
    used = []
    for args in (("ip", "-j", "-4", "route", "show", "table", "all"), ("ip", "-j", "-4", "addr")):
        for entry in json.loads(_run(*args).stdout or "[]"):
            dst = entry.get("dst")
            if dst and dst != "default":
                used.append(ipaddress.ip_network(dst, strict=False))
            for a in entry.get("addr_info", []):
                used.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    candidates = list(TEST_RANGE.subnets(new_prefix=24))[1:-1]
    rng.shuffle(candidates)
    for net in candidates:
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError(f"no free /24 in {TEST_RANGE}")


class Network:
    """The namespaces, bridge and veths for one cluster, and the packet filters that partition it.
    Use as a context manager, or call close() in a finalizer: it removes everything it made."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = list(ids)
        seq = next(_seq)
        self.tag = f"{PREFIX}-{os.getpid()}-{seq}"
        self.hub = f"{self.tag}-hub"
        self.ns = {nid: f"{self.tag}-{nid}" for nid in self.ids}
        self.root_link = f"rmn{os.getpid():x}{seq:x}"[:15]  # the root namespace's end of its veth
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway = ""  # the root namespace's address on the bridge
        self.hosts: dict[str, str] = {}
        self.blocked: dict[str, set[str]] = {nid: set() for nid in self.ids}  # receiver -> senders dropped
        # receiver -> (sender, port) pairs: the sender's TCP segments to or from that port dropped
        self.port_blocked: dict[str, set[tuple[str, int]]] = {nid: set() for nid in self.ids}
        self.made: list[str] = []  # namespaces created, for close()

    # ---------------------------------------------------------------- setup and teardown

    def up(self) -> "Network":
        remove_stale()
        self.subnet = _free_subnet(random.Random(self.tag))
        hosts = list(self.subnet.hosts())
        self.gateway = str(hosts[ROOT_HOST - 1])
        self.hosts = {nid: str(hosts[FIRST_NODE_HOST - 1 + i]) for i, nid in enumerate(self.ids)}
        plen = self.subnet.prefixlen
        try:
            self._add_ns(self.hub)
            _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.hub, "link", "set", "br0", "up")
            # The root namespace's port on the bridge.
            _run("ip", "link", "add", self.root_link, "type", "veth", "peer", "name", "root", "netns", self.hub)
            _run("ip", "-n", self.hub, "link", "set", "root", "master", "br0", "up")
            _run("ip", "addr", "add", f"{self.gateway}/{plen}", "dev", self.root_link)
            _run("ip", "link", "set", self.root_link, "up")
            for nid in self.ids:
                ns = self.ns[nid]
                self._add_ns(ns)
                _run("ip", "-n", self.hub, "link", "add", nid, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _run("ip", "-n", self.hub, "link", "set", nid, "master", "br0", "up")
                _run("ip", "-n", ns, "addr", "add", f"{self.hosts[nid]}/{plen}", "dev", "eth0")
                _run("ip", "-n", ns, "link", "set", "eth0", "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                self._nft(nid, f"""
                    table inet {TABLE} {{
                        set blocked {{ type ipv4_addr; }}
                        set blocked_port {{ type ipv4_addr . inet_service; }}
                        chain input {{
                            type filter hook input priority 0; policy accept;
                            ip saddr @blocked drop
                            ip saddr . tcp dport @blocked_port drop
                            ip saddr . tcp sport @blocked_port drop
                        }}
                    }}""")
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.made.append(name)

    def close(self) -> None:
        """Remove the root-side veth and every namespace made (their veths and rules go with them)."""
        _run("ip", "link", "del", self.root_link, check=False)
        for name in reversed(self.made):
            _run("ip", "netns", "del", name, check=False)
        self.made.clear()

    def __enter__(self) -> "Network":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- running nodes there

    def launch(self, nid: str) -> list[str]:
        """The command prefix that runs a process in `nid`'s namespace."""
        return ["ip", "netns", "exec", self.ns[nid]]

    # ---------------------------------------------------------------- faults

    def _nft(self, nid: str, script: str) -> None:
        _run(*self.launch(nid), "nft", "-f", "-", stdin=script)

    def _apply(self, blocked: dict[str, set[str]], port_blocked: dict[str, set[tuple[str, int]]] | None = None) -> float:
        """Make each node drop what it receives from the nodes in blocked[node], and the TCP
        segments to or from port p of each (sender, p) in port_blocked[node]; returns the moment
        the last rule was in place."""
        port_blocked = port_blocked or {}
        for nid in self.ids:
            want = set(blocked.get(nid, set()))
            want_ports = set(port_blocked.get(nid, set()))
            if want == self.blocked[nid] and want_ports == self.port_blocked[nid]:
                continue
            script = f"flush set inet {TABLE} blocked\nflush set inet {TABLE} blocked_port\n"
            if want:
                script += f"add element inet {TABLE} blocked {{ {', '.join(self.hosts[s] for s in sorted(want))} }}\n"
            if want_ports:
                pairs = ", ".join(f"{self.hosts[s]} . {port}" for s, port in sorted(want_ports))
                script += f"add element inet {TABLE} blocked_port {{ {pairs} }}\n"
            self._nft(nid, script)
            self.blocked[nid], self.port_blocked[nid] = want, want_ports
        return time.time()

    def _apart(self, sides: tuple[list[str], ...]) -> dict[str, set[str]]:
        """Each node -> the nodes on other sides (a node on no side is apart from every other)."""
        side_of = {nid: k for k, side in enumerate(sides) for nid in side}

        def apart(a: str, b: str) -> bool:
            return a != b and (a not in side_of or side_of.get(b) != side_of[a])
        return {nid: {o for o in self.ids if apart(nid, o)} for nid in self.ids}

    def partition(self, *sides: list[str]) -> float:
        """Nodes on different sides hear nothing from each other; a node on no side is cut off
        from every other node. Replaces any earlier fault. Returns the moment it holds."""
        return self._apply(self._apart(sides))

    def isolate(self, nid: str) -> float:
        """`nid` hears no other node and no other node hears it (clients and the sink still do)."""
        return self.partition([o for o in self.ids if o != nid])

    def drop_one_way(self, sender: str, receiver: str) -> float:
        """What `sender` sends to `receiver` is lost; the other direction still works."""
        return self._apply({receiver: {sender}})

    def drop_ports(self, ports: dict[str, int], blocked: dict[str, set[str]]) -> float:
        """Each node loses the TCP traffic of the nodes in blocked[node] on `ports` (node id -> the
        port it listens on, e.g. its Raft port): their segments to its own port and from theirs,
        so every connection between the two on those ports, whoever opened it. Everything else
        (SMTP, the admin port's body pushes) still flows. Replaces any earlier fault."""
        return self._apply({}, {r: {(s, ports[r]) for s in senders} | {(s, ports[s]) for s in senders}
                                for r, senders in blocked.items()})

    def partition_ports(self, ports: dict[str, int], *sides: list[str]) -> float:
        """`partition`, on `ports` only: nodes on different sides lose each other's traffic there."""
        return self.drop_ports(ports, self._apart(sides))

    def heal(self) -> float:
        return self._apply({})

    def describe(self) -> str:
        cut = {nid: sorted(s) for nid, s in self.blocked.items() if s}
        ports = {nid: sorted(s) for nid, s in self.port_blocked.items() if s}
        what = ([f"drops (receiver <- senders): {cut}"] if cut else []) + \
            ([f"port drops (receiver <- (sender, port)): {ports}"] if ports else [])
        return "; ".join(what) or "no drops"
