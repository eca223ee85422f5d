"""Traffic shaping by destination site and source address on a real cluster: domains whose MX
hosts belong to one receiver share its connection limit (MX answers from a local DNS server, mail
delivered to the MX hosts' address), and a pool's source addresses are bound, named in EHLO and
held to their warm-up caps across a leader kill."""
from __future__ import annotations

import datetime
import re
import time

import pytest

from cluster import deliveries_per_recipient, make_message, run_cli, wait_for
from dns_server import DnsServer

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(150)]


def connections_per_site(sink, site_of: dict[str, str]) -> dict[str, int]:
    """The most sink connections open at once per site, a connection's site being that of the
    domain of the recipients it carried."""
    conn_domain = {e["conn"]: e["rcpt"].rpartition("@")[2] for e in sink.events("rcpt")}
    edges = []
    for e in sink.events():
        if e.get("event") in ("connect", "disconnect") and e["conn"] in conn_domain:
            edges.append((e["t"], e["event"] == "connect", site_of[conn_domain[e["conn"]]]))
    peak: dict[str, int] = {}
    open_now: dict[str, int] = {}
    for _t, opens, site in sorted(edges, key=lambda x: (x[0], x[1])):  # a close before an open at a tie
        open_now[site] = open_now.get(site, 0) + (1 if opens else -1)
        peak[site] = max(peak.get(site, 0), open_now[site])
    return peak


def test_domains_hosted_by_one_receiver_share_its_connection_limit(make_cluster) -> None:
    records = {("one.test.", "MX"): ["10 mx1.shared.test."], ("two.test.", "MX"): ["10 mx2.shared.test."],
               ("three.test.", "MX"): ["10 mx.auto.test."], ("four.test.", "MX"): ["10 mx.auto.test."],
               **{(h, "A"): ["127.0.0.1"] for h in ("mx1.shared.test.", "mx2.shared.test.", "mx.auto.test.")}}
    with DnsServer(records) as dns:
        sites = ('\n[delivery.sites.shared]\nmx = ["*.shared.test"]\nmax_connections = 1\n'
                 '\n[delivery.domains.default]\nmax_connections = 1\n')
        c = make_cluster(delay=0.15, start=False, batch_size=2, extra_toml=sites,
                         delivery={"relay": None, "dns_servers": [dns.address]})
        # MX hosts are reached on the sink's port (a real MX listens on 25).
        c.config_path.write_text(c.config_path.read_text().replace(
            "[delivery]\n", f"[delivery]\nmx_port = {c.sink.port}\n", 1))
        c.start_all_and_wait()
        domains = ["one.test", "two.test", "three.test", "four.test"]
        rcpts = [f"r{i}@{d}" for d in domains for i in range(6)]
        code, text = c.submit(c.followers()[0], rcpts, make_message(campaign="rollup"))
        assert code == 250, text
        wait_for(lambda: len(c.sink.delivered()) >= len(rcpts), 90, "every recipient delivered")
        assert deliveries_per_recipient(c.sink) == {r: 1 for r in rcpts}
        # Each domain alone would have had its own connection (max_connections = 1 each): the
        # two of a named site, and the two of one MX set, had one between them ...
        site_of = {"one.test": "shared", "two.test": "shared", "three.test": "auto", "four.test": "auto"}
        peaks = connections_per_site(c.sink, site_of)
        assert peaks == {"shared": 1, "auto": 1}, peaks
        # ... while the two receivers were served at the same time.
        assert connections_per_site(c.sink, {d: "all" for d in domains})["all"] == 2
        # One MX lookup per domain for the scheduler, cached; the senders look up MX to deliver.
        assert all(dns.asked(d + ".", "MX") >= 1 for d in domains)


WARMUP_CAP = 3


def pool_toml(today: str) -> str:
    sources = "".join(f'\n[[delivery.pools.brand.sources]]\naddress = "{address}"\nnode = "{node}"\n'
                      f'ehlo = "{ehlo}"\nwarmup = [{WARMUP_CAP}]\nwarmup_start = {today}\n'
                      for address, node, ehlo in (("127.0.0.2", "n1", "mta2.brand.test"),
                                                  ("127.0.0.3", "n2", "mta3.brand.test")))
    return '\n[delivery.pools.brand]\nsenders = ["brand.test"]\n' + sources


def test_a_pool_binds_its_addresses_and_their_warm_up_caps_hold_across_a_leader_kill(make_cluster) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    if (86400 - (now.hour * 3600 + now.minute * 60 + now.second)) < 180:
        pytest.skip("a UTC day ends within 3 minutes: the warm-up caps start again at midnight")
    c = make_cluster(extra_toml=pool_toml(now.date().isoformat()), batch_size=2)
    ehlo = {"127.0.0.2": "mta2.brand.test", "127.0.0.3": "mta3.brand.test"}

    def sent_from() -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in c.sink.delivered():
            counts[e["peer"].rpartition(":")[0]] = counts.get(e["peer"].rpartition(":")[0], 0) + 1
        return counts

    first = [f"a{i}@warm.test" for i in range(4)]
    code, text = c.submit(c.followers()[0], first, make_message(sender="news@brand.test"), sender="news@brand.test")
    assert code == 250, text
    # Mail no pool claims leaves from the system's choice of address, uncapped.
    plain = [f"p{i}@warm.test" for i in range(5)]
    code, text = c.submit(c.followers()[0], plain, make_message())
    assert code == 250, text
    wait_for(lambda: len(c.sink.delivered()) >= len(first) + len(plain), 40, "the first recipients delivered")
    for e in c.sink.delivered():
        address = e["peer"].rpartition(":")[0]
        if e["rcpt"] in first:
            assert address in ehlo and e["helo"] == ehlo[address], e
        else:
            assert address == "127.0.0.1", e
    before = sent_from()

    # A new leader knows what the old one assigned: it keeps every address within today's cap.
    leader = c.wait_leader()
    c.kill(leader)
    leader = c.wait_leader(30, among=[n for n in c.ids if c.alive(n)])
    usable = [a for a, node in (("127.0.0.2", "n1"), ("127.0.0.3", "n2")) if c.alive(node)]
    second = [f"b{i}@warm.test" for i in range(6)]
    code, text = c.submit(leader, second, make_message(sender="news@brand.test"), sender="news@brand.test")
    assert code == 250, text
    wait_for(lambda: all(sent_from().get(a, 0) >= WARMUP_CAP for a in usable), 40, "the live addresses' caps used")
    # Whatever is left waits for tomorrow's cap: nothing more leaves in the next seconds.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        counts = sent_from()
        assert all(counts.get(a, 0) == WARMUP_CAP for a in usable), counts
        assert all(counts.get(a, 0) == before.get(a, 0) for a in ehlo if a not in usable), counts
        time.sleep(0.2)
    brand = len(first) + len(second)
    sent = sum(sent_from().get(a, 0) for a in ehlo)
    assert sent < brand and c.queue(leader)["pending"] == brand - sent, (sent, c.queue(leader))
    assert max(deliveries_per_recipient(c.sink).values()) == 1
    # Every batch of the pool went to the node that has its address (the leaders' log lines).
    holders = set()
    for nid in c.ids:
        for line in (c.root / f"{nid}.log").read_text().splitlines():
            m = re.search(r"assigned batch \S+ \(.* from (\S+)\) to (\S+),", line)
            if m:
                holders.add((m.group(1), m.group(2)))
    assert holders and holders <= {("127.0.0.2", "n1"), ("127.0.0.3", "n2")}, holders
    # Operators see each address's cap and use: /status and `raftmail status`.
    warmup = c.status(leader)["warmup"]
    assert {a: warmup[a]["sites"].get("warm.test") for a in usable} == {a: WARMUP_CAP for a in usable}, warmup
    assert warmup["127.0.0.2"]["cap"] == WARMUP_CAP and warmup["127.0.0.2"]["pool"] == "brand"
    r = run_cli(c.config_path, "status")
    assert r.returncode == 0 and f"warm-up: {usable[0]} (pool brand" in r.stdout, r.stdout + r.stderr
