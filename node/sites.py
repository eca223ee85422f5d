"""Where the leader's throttles count: destination sites (MX rollup) and source-address pools.

A destination site is what a receiver's limits apply to. Domains hosted by one provider share its
servers, so they share its limits: a domain whose MX hosts match a `[delivery.sites.NAME]` pattern
belongs to "site:NAME"; other domains are grouped by their MX set ("mx:host1,host2"). A domain
with its own `[delivery.domains."x"]` table, a route, the relay, or no usable MX is its own site.
MX answers are cached for their TTL (bounded by `mx_cache_seconds`); a lookup never holds up the
scheduler: an unknown domain waits a round while its lookup runs in the background.

Pools pick the source address a batch's connections bind, by envelope sender domain or campaign,
weighted, only among addresses of live nodes whose warm-up cap for the site is not used up today.
The state machine counts the warm-up (consensus/batches.py); this module only chooses.
"""
from __future__ import annotations

import asyncio
import fnmatch
import logging
import socket
import time
from collections import OrderedDict
from typing import Callable

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from raftmail.consensus.commands import MAX_SITE_CHARS
from raftmail.consensus.domains import domain_of, normalise_domain
from raftmail.node.config_read import ConfigError
from raftmail.node.config_types import DeliverySection, PoolSection, SourceAddress
from raftmail.node.routes import address_literal

log = logging.getLogger("raftmail.scheduler")

NEGATIVE_CACHE_SECONDS = 60.0  # a domain without usable MX is looked up again after this long
MIN_CACHE_SECONDS = 5.0  # a TTL of 0 would look the domain up every round
MAX_LOOKUPS = 32  # MX lookups in flight at once


def make_resolver(delivery: DeliverySection) -> dns.asyncresolver.Resolver:
    """The resolver MX lookups use: [delivery] dns_servers, or the system's."""
    if not delivery.dns_servers:
        return dns.asyncresolver.Resolver()
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [a.host for a in delivery.dns_servers]
    resolver.nameserver_ports = {a.host: a.port for a in delivery.dns_servers}
    return resolver


def site_of_mx(hosts: list[str], delivery: DeliverySection) -> str:
    """The site key of an MX set: the first named site one of its hosts matches, else the set."""
    for site in delivery.sites.values():
        if any(fnmatch.fnmatchcase(host, pattern) for host in hosts for pattern in site.mx):
            return site.key
    return ("mx:" + ",".join(sorted(set(hosts))))[:MAX_SITE_CHARS]


class SiteMap:
    """Domain -> destination site, from cached MX answers (the leader's scheduler asks)."""

    def __init__(self, delivery: DeliverySection, resolver: dns.asyncresolver.Resolver | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.delivery = delivery
        self._resolver = resolver  # made at the first lookup: most clusters with a relay never need one
        self.clock = clock
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()  # domain -> (site, expires)
        self._lookups: dict[str, asyncio.Task] = {}

    def site_of(self, domain: str) -> str | None:
        """`domain`'s site now, or None while its first MX lookup runs (ask again next round)."""
        domain = normalise_domain(domain)
        if self._own_site(domain):
            return domain
        cached = self._cache.get(domain)
        if cached is not None and cached[1] > self.clock():
            return cached[0]
        if domain not in self._lookups and len(self._lookups) < MAX_LOOKUPS:
            self._lookups[domain] = asyncio.get_running_loop().create_task(self._look_up(domain))
        return cached[0] if cached is not None else None  # an expired answer serves while it renews

    def _own_site(self, domain: str) -> bool:
        d = self.delivery
        return (d.relay is not None or domain in d.routes or domain in d.domains
                or address_literal(domain) is not None)

    async def _look_up(self, domain: str) -> None:
        try:
            site, ttl = await self._resolve(domain)
        except Exception:  # never leave the task's exception unread; the domain is its own site
            log.exception("MX lookup for %s failed", domain)
            site, ttl = domain, NEGATIVE_CACHE_SECONDS
        finally:
            self._lookups.pop(domain, None)
        self._cache[domain] = (site, self.clock() + max(MIN_CACHE_SECONDS, min(ttl, self.delivery.mx_cache_seconds)))
        self._cache.move_to_end(domain)
        while len(self._cache) > self.delivery.mx_cache_domains:
            self._cache.popitem(last=False)

    async def _resolve(self, domain: str) -> tuple[str, float]:
        if self._resolver is None:
            self._resolver = make_resolver(self.delivery)
        try:
            answer = await self._resolver.resolve(domain, "MX", lifetime=self.delivery.dns_timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers,
                dns.exception.Timeout) as exc:
            log.info("MX lookup for %s: %s; it is its own site", domain, exc.__class__.__name__)
            return domain, NEGATIVE_CACHE_SECONDS
        hosts = [r.exchange.to_text(omit_final_dot=True).lower() for r in answer if r.exchange != dns.name.root]
        if not hosts:
            return domain, NEGATIVE_CACHE_SECONDS  # null MX: it takes no mail; delivery bounces it
        return site_of_mx(hosts, self.delivery), float(answer.rrset.ttl if answer.rrset is not None else 0)

    async def close(self) -> None:
        tasks = list(self._lookups.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def check_source_addresses(delivery: DeliverySection, node_id: str, src: str) -> None:
    """Refuse to start a node that lacks an address its pools name for it: each of its batches
    would otherwise fail to connect (EADDRNOTAVAIL) and only defer."""
    for pool in delivery.pools.values():
        for s in pool.sources:
            if s.node != node_id:
                continue
            family = socket.AF_INET6 if ":" in s.address else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((s.address, 0))
                except OSError as exc:
                    raise ConfigError(src, f"[[delivery.pools.{pool.name}.sources]] address",
                                      f"{s.address} is named for node {node_id}, but this machine cannot send "
                                      f"from it ({exc.strerror or exc}): add the address to an interface here, "
                                      "or name the node that has it") from None


def pool_for(delivery: DeliverySection, sender: str, campaign: str) -> PoolSection | None:
    """The pool mail from `sender` in `campaign` leaves from: a pool naming the campaign, then one
    naming the sender's domain, then the default pool; None: the system's choice of address."""
    pools = delivery.pools.values()
    for pool in pools:
        if any(fnmatch.fnmatchcase(campaign, pattern) for pattern in pool.campaigns):
            return pool
    sender_domain = domain_of(sender) if "@" in sender else ""
    for pool in pools:
        if sender_domain and sender_domain in pool.senders:
            return pool
    return delivery.pools.get(delivery.default_pool) if delivery.default_pool else None


class SourceChooser:
    """Smooth weighted round robin over a pool's usable sources (nginx's algorithm): over time
    each source gets batches in proportion to its weight, interleaved."""

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def choose(self, usable: list[SourceAddress]) -> SourceAddress | None:
        if not usable:
            return None
        total = sum(s.weight for s in usable)
        for s in usable:
            self._current[s.address] = self._current.get(s.address, 0) + s.weight
        best = max(usable, key=lambda s: self._current[s.address])
        self._current[best.address] -= total
        return best
