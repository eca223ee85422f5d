"""MX rollup and source-address pools without a cluster: the state machine's throttles per site
and warm-up caps per source, the site of a domain from real DNS answers (a local server), the
choice of pool and source, and the config that names them."""
from __future__ import annotations

import asyncio
import datetime
from collections import Counter
from pathlib import Path

import pytest

from dns_server import DnsServer
from raftmail.consensus.records import Batch
from raftmail.consensus.state import MailState
from raftmail.consensus.view import view_of
from raftmail.node.config import ConfigError, load_config
from raftmail.node.config_types import (Address, DeliverySection, DomainLimits, PoolSection, SiteSection,
                                        SourceAddress)
from raftmail.node.sites import SiteMap, SourceChooser, pool_for, site_of_mx
from test_state import DAY, T0, assign_cmd, core_digest, prune_cmd, restored, run, submission, submit_cmd

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------- the state machine


def two_domain_state() -> MailState:
    state = MailState()
    run(state, submit_cmd(T0, submission("s1", [f"a{i}@one.test" for i in range(4)] +
                                         [f"b{i}@two.test" for i in range(4)])))
    return state


def test_two_domains_of_one_site_share_its_connections_and_rate() -> None:
    state = two_domain_state()
    one = assign_cmd("n1", "one.test", [["s1", 0], ["s1", 1]], T0, max_connections=1, max_per_minute=3)
    assert run(state, {**one, "site": "site:shared"})["batch"]
    two = assign_cmd("n2", "two.test", [["s1", 4]], T0, max_connections=1, max_per_minute=3)
    assert run(state, {**two, "site": "site:shared"}) == {"batch": None, "reason": "max_connections"}
    # Without the site the other domain counts on its own, as before MX rollup.
    assert run(state, two)["batch"]
    assert state.site_batches == {"site:shared": 1, "two.test": 1}
    # The rate too: 2 of 3 used by one.test, so two.test gets one more this minute.
    three = assign_cmd("n2", "two.test", [["s1", 5], ["s1", 6]], T0 + 1, max_connections=2, max_per_minute=3)
    assert run(state, {**three, "site": "site:shared"})["n"] == 1


def test_a_warm_up_cap_counts_per_source_and_site_and_starts_again_the_next_utc_day() -> None:
    state = MailState()
    run(state, submit_cmd(T0, submission("s1", [f"r{i}@one.test" for i in range(10)])))
    capped = {"source": "192.0.2.10", "site": "mx:mx.one.test", "daily_cap": 3}
    res = run(state, {**assign_cmd("n1", "one.test", [["s1", i] for i in range(5)], T0), **capped})
    assert res["n"] == 3 and state.batches[res["batch"]].source == "192.0.2.10"
    assert run(state, {**assign_cmd("n1", "one.test", [["s1", 5]], T0 + 1), **capped}) == {
        "batch": None, "reason": "daily_cap"}
    # Another source has its own count; so does the same source towards another site.
    assert run(state, {**assign_cmd("n2", "one.test", [["s1", 5]], T0 + 1), **capped,
                       "source": "192.0.2.11"})["n"] == 1
    assert run(state, {**assign_cmd("n1", "one.test", [["s1", 6]], T0 + 1), **capped,
                       "site": "one.test"})["n"] == 1
    # The count is replicated state: a snapshot (a new leader's, say) keeps it ...
    copy = restored(state)
    assert copy.warmup == state.warmup and core_digest(copy) == core_digest(state)
    assert view_of(copy, "n1", 10).warmed_today("192.0.2.10", "mx:mx.one.test", T0 + 2) == 3
    # ... and the next UTC day starts from zero; a prune forgets the earlier days.
    tomorrow = (T0 // DAY + 1) * DAY + 1
    assert run(copy, {**assign_cmd("n1", "one.test", [["s1", 7]], tomorrow), **capped})["n"] == 1
    run(copy, prune_cmd(tomorrow + DAY))
    assert copy.warmup == {}


def test_a_batch_without_site_or_source_keeps_its_older_wire_shape() -> None:
    plain = Batch("b1", "n1", "one.test", {("s1", 0): None}, 30.0, 1, T0)
    assert len(plain.to_wire()) == 9
    older = Batch.from_wire(plain.to_wire())
    assert (older.site, older.source) == ("one.test", "")
    shaped = Batch("b2", "n1", "one.test", {("s1", 0): None}, 30.0, 1, T0, site="site:g", source="192.0.2.1")
    again = Batch.from_wire(shaped.to_wire())
    assert (again.site, again.source) == ("site:g", "192.0.2.1")


@pytest.mark.parametrize("bad", [{"site": ""}, {"site": 7}, {"source": "x" * 300}, {"daily_cap": "ten"}])
def test_an_assign_with_a_bad_site_source_or_cap_is_refused(bad: dict) -> None:
    state = two_domain_state()
    res = run(state, {**assign_cmd("n1", "one.test", [["s1", 0]], T0), **bad})
    assert "error" in res and state.batches == {}


# ---------------------------------------------------------------- sites from DNS


GOOGLE = SiteSection("google", ("*.google.test", "*.googlemail.test"), max_connections=20, max_per_minute=600)
RECORDS = {
    ("brand-a.test.", "MX"): ["10 aspmx.l.google.test.", "20 alt1.aspmx.l.google.test."],
    ("brand-b.test.", "MX"): ["5 alt2.aspmx.googlemail.test."],
    ("shop.test.", "MX"): ["10 mx1.host.test.", "20 mx2.host.test."],
    ("club.test.", "MX"): ["10 MX2.host.test.", "10 mx1.host.test."],
    ("solo.test.", "MX"): ["10 mx.solo.test."],
    ("nullmx.test.", "MX"): ["0 ."],
}


def delivery(server: DnsServer, **kw) -> DeliverySection:
    return DeliverySection(sites={"google": GOOGLE}, dns_servers=(Address("127.0.0.1", server.port),),
                           dns_timeout=2.0, **kw)


async def sites_of(site_map: SiteMap, domains: list[str]) -> dict[str, str]:
    """Ask like the scheduler does, a round every 10 ms, until every domain has its site."""
    for _ in range(300):
        found = {d: site_map.site_of(d) for d in domains}
        if all(found.values()):
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"no site for {[d for d, s in found.items() if not s]}")


def test_domains_are_grouped_by_named_site_or_by_their_mx_set() -> None:
    async def main() -> None:
        with DnsServer(RECORDS) as server:
            site_map = SiteMap(delivery(server))
            assert site_map.site_of("brand-a.test") is None  # the first ask starts a lookup
            found = await sites_of(site_map, ["brand-a.test", "Brand-B.test.", "shop.test", "club.test",
                                              "solo.test", "nullmx.test", "missing.test"])
            await site_map.close()
        assert found == {
            "brand-a.test": "site:google", "Brand-B.test.": "site:google",  # named by pattern
            "shop.test": "mx:mx1.host.test,mx2.host.test", "club.test": "mx:mx1.host.test,mx2.host.test",
            "solo.test": "mx:mx.solo.test",
            "nullmx.test": "nullmx.test", "missing.test": "missing.test",  # no usable MX: their own
        }
    asyncio.run(main())


def test_mx_answers_are_cached_for_their_ttl() -> None:
    async def main() -> None:
        now = [1000.0]
        with DnsServer(RECORDS, ttl=30) as server:
            site_map = SiteMap(delivery(server), clock=lambda: now[0])
            await sites_of(site_map, ["shop.test"])
            for _ in range(50):
                assert site_map.site_of("shop.test") == "mx:mx1.host.test,mx2.host.test"
            assert server.asked("shop.test.", "MX") == 1
            now[0] += 31  # past the TTL: the old answer serves while a new lookup runs
            assert site_map.site_of("shop.test") == "mx:mx1.host.test,mx2.host.test"
            server.zone[("shop.test.", "MX")] = ["10 mx.elsewhere.test."]
            for _ in range(300):
                if site_map.site_of("shop.test") == "mx:mx.elsewhere.test":
                    break
                await asyncio.sleep(0.01)
            assert site_map.site_of("shop.test") == "mx:mx.elsewhere.test"
            assert server.asked("shop.test.", "MX") == 2
            await site_map.close()
    asyncio.run(main())


def test_a_domain_with_its_own_limits_a_route_or_the_relay_is_its_own_site_without_a_lookup() -> None:
    async def main() -> None:
        with DnsServer(RECORDS) as server:
            own = delivery(server, domains={"default": DomainLimits(), "shop.test": DomainLimits(2, 0)},
                           routes={"club.test": Address("127.0.0.1", 2525)})
            site_map = SiteMap(own)
            assert site_map.site_of("shop.test") == "shop.test"
            assert site_map.site_of("club.test") == "club.test"
            assert site_map.site_of("[192.0.2.1]") == "[192.0.2.1]"
            relayed = SiteMap(delivery(server, relay=Address("127.0.0.1", 2525)))
            assert relayed.site_of("brand-a.test") == "brand-a.test"
            assert not server.queries
    asyncio.run(main())


def test_site_limits_are_the_named_sites_the_defaults_for_a_group_else_the_domains() -> None:
    d = DeliverySection(sites={"google": GOOGLE},
                        domains={"default": DomainLimits(3, 60), "shop.test": DomainLimits(7, 0)})
    assert d.limits_for_site("site:google") == DomainLimits(20, 600)
    assert d.limits_for_site("mx:mx1.host.test") == DomainLimits(3, 60)
    assert d.limits_for_site("shop.test") == DomainLimits(7, 0)
    assert site_of_mx(["b.google.test", "x.other.test"], d) == "site:google"


# ---------------------------------------------------------------- pools and sources


def source(address: str, node: str, weight: int = 1, **kw) -> SourceAddress:
    return SourceAddress(address, node, f"mta-{node}.example.test", weight, **kw)


def test_a_pool_is_picked_by_campaign_then_sender_domain_then_the_default() -> None:
    news = PoolSection("news", (source("192.0.2.1", "n1"),), senders=("news.example.test",))
    promo = PoolSection("promo", (source("192.0.2.2", "n2"),), campaigns=("spring-*",))
    other = PoolSection("other", (source("192.0.2.3", "n3"),))
    d = DeliverySection(pools={"news": news, "promo": promo, "other": other}, default_pool="other")
    assert pool_for(d, "a@News.Example.test", "weekly") is news
    assert pool_for(d, "a@news.example.test", "spring-sale") is promo
    assert pool_for(d, "a@shop.test", "weekly") is other
    assert pool_for(d, "", "weekly") is other  # a null sender (a DSN) too
    assert pool_for(DeliverySection(pools={"news": news}), "a@shop.test", "x") is None


def test_sources_share_batches_by_weight() -> None:
    chooser = SourceChooser()
    heavy, light = source("192.0.2.1", "n1", 3), source("192.0.2.2", "n2", 1)
    picks = Counter(chooser.choose([heavy, light]).address for _ in range(400))
    assert picks == {"192.0.2.1": 300, "192.0.2.2": 100}
    assert chooser.choose([]) is None


def test_a_warm_up_schedule_ramps_by_utc_day_and_ends_uncapped() -> None:
    start = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc).timestamp()
    s = source("192.0.2.1", "n1", warmup=(50, 100, 500), warmup_start=start)
    assert s.daily_cap(start - 3600) == 50  # before day 1: the first cap
    assert s.daily_cap(start + 10) == 50
    assert s.daily_cap(start + DAY + 10) == 100
    assert s.daily_cap(start + 2 * DAY + 10) == 500
    assert s.daily_cap(start + 3 * DAY) is None
    assert source("192.0.2.2", "n1").daily_cap(start) is None


# ---------------------------------------------------------------- config


BASE = """
[cluster]
name = "t"
secret = "test-cluster-secret-0123456789abcdef"
data_dir = "data"
[[node]]
id = "n1"
raft = "127.0.0.1:7001"
smtp = "127.0.0.1:2501"
admin = "127.0.0.1:8001"
"""

SHAPED = BASE + """
[delivery]
dns_servers = ["127.0.0.1:5353"]
mx_port = 2525
default_pool = "brand"
[delivery.sites.google]
mx = ["*.google.com", "*.GoogleMail.com"]
max_connections = 20
[delivery.pools.brand]
senders = ["news.example.com"]
campaigns = ["spring-*"]
[[delivery.pools.brand.sources]]
address = "192.0.2.10"
node = "n1"
ehlo = "mta1.example.com"
weight = 2
warmup = [50, 100]
warmup_start = 2026-12-01
"""


def load(tmp_path: Path, text: str):
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return load_config(path)


def test_sites_pools_and_resolvers_are_read_from_the_cluster_file(tmp_path: Path) -> None:
    d = load(tmp_path, SHAPED).delivery
    assert d.sites["google"] == SiteSection("google", ("*.google.com", "*.googlemail.com"), 20, 0)
    assert d.dns_servers == (Address("127.0.0.1", 5353),) and d.mx_port == 2525
    pool = d.pools["brand"]
    assert pool.senders == ("news.example.com",) and pool.campaigns == ("spring-*",)
    s = pool.sources[0]
    assert (s.address, s.node, s.ehlo, s.weight, s.warmup) == ("192.0.2.10", "n1", "mta1.example.com", 2, (50, 100))
    assert s.warmup_start == datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc).timestamp()
    assert d.default_pool == "brand" and d.source("192.0.2.10") is s


@pytest.mark.parametrize("change, key, words", [
    (('node = "n1"', 'node = "n9"'), "node", "not a [[node]] id"),
    (('address = "192.0.2.10"', 'address = "mta.example.com"'), "address", "must be an IP address"),
    (("warmup = [50, 100]", "warmup = [50, 0]"), "warmup", "positive daily caps"),
    (("warmup_start = 2026-12-01", ""), "warmup_start", "is required with warmup"),
    (('default_pool = "brand"', 'default_pool = "bulk"'), "default_pool", "names no [delivery.pools.bulk]"),
    (('mx = ["*.google.com", "*.GoogleMail.com"]', "mx = []"), "mx", "one or more host names"),
    (('dns_servers = ["127.0.0.1:5353"]', 'dns_servers = ["dns.example.com:53"]'), "dns_servers", "by IP"),
    (("mx_port = 2525", "mx_port = 70000"), "mx_port", "port number"),
    (("weight = 2", "weight = 0"), "weight", "from 1 to"),
])
def test_a_bad_site_or_pool_is_refused_with_the_key_named(tmp_path: Path, change, key, words) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, SHAPED.replace(*change))
    assert key in str(info.value) and words in str(info.value), str(info.value)
