"""Where a destination domain's mail goes: a configured route, the relay, a domain literal, or the
domain's MX records (implicit MX when it has none, nothing for a null MX), most preferred first.
"""
from __future__ import annotations

import ipaddress
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from raftmail.consensus.domains import normalise_domain

if TYPE_CHECKING:
    from raftmail.node.config import Address

log = logging.getLogger("raftmail.node.delivery")  # route trouble is delivery trouble to an operator

MAX_MX_HOSTS = 10  # MX hosts of a domain tried, most preferred first
MAX_ROUTES = 20  # addresses tried for one batch: each failure can cost a connect timeout


@dataclass(frozen=True)
class Route:
    """One place to hand a domain's mail to, with AUTH credentials for a relay."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    # The MX host's address, looked up with our resolver ([delivery] dns_servers); None: the
    # system resolves `host` when connecting. TLS always checks the certificate against `host`.
    address: str | None = None

    @property
    def remote(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


async def resolve_routes(
    domain: str,
    *,
    routes: Mapping[str, Address],
    relay: Address | None,
    relay_username: str | None,
    relay_password: str | None,
    resolver: dns.asyncresolver.Resolver | None = None,
    port: int = 25,
    dns_lifetime: float = 10.0,
) -> list[Route]:
    """Where to deliver `domain`'s mail, most preferred first; [] when the domain takes no mail.

    A configured per-domain route wins, then the relay; otherwise MX records in preference order,
    or the domain's own addresses when it has no MX (implicit MX, RFC 5321 5.1). A null MX
    (RFC 7505), a missing domain, or a failed lookup give [] (the batch is then deferred).
    """
    key = normalise_domain(domain)
    configured = {normalise_domain(name): address for name, address in routes.items()}
    if key in configured:
        address = configured[key]
        return [Route(address.host, address.port)]
    if relay is not None:
        return [Route(relay.host, relay.port, relay_username, relay_password)]
    literal = address_literal(key)
    if literal is not None:
        return [Route(literal, port)]
    resolver = resolver if resolver is not None else dns.asyncresolver.Resolver()
    return await _mx_routes(key, resolver, port, dns_lifetime)


def address_literal(domain: str) -> str | None:
    """The IP of a domain literal such as "[192.0.2.1]" or "[IPv6:2001:db8::1]" (RFC 5321 4.1.3)."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


async def _mx_routes(
    domain: str, resolver: dns.asyncresolver.Resolver, port: int, lifetime: float
) -> list[Route]:
    try:
        answer = await resolver.resolve(domain, "MX", lifetime=lifetime)
    except dns.resolver.NXDOMAIN:
        return []
    except dns.resolver.NoAnswer:
        return await _implicit_mx_routes(domain, resolver, port, lifetime)
    except dns.exception.DNSException as exc:
        log.warning("MX lookup for %s failed: %s", domain, exc)
        return []
    # A null MX ("." ) says the domain accepts no mail; any other MX next to it is a
    # misconfiguration (RFC 7505 3), so only real exchanges are used.
    records = [(r.preference, r.exchange) for r in answer if r.exchange != dns.name.root]
    # Equal preferences are shuffled to spread load, as RFC 5321 5.1 asks.
    records.sort(key=lambda record: (record[0], random.random()))
    routes: list[Route] = []
    for _, exchange in records[:MAX_MX_HOSTS]:
        host = exchange.to_text(omit_final_dot=True)
        addresses = await _addresses(host, resolver, lifetime)
        routes += [Route(host, port, address=a) for a in addresses] if addresses else [Route(host, port)]
    return routes[:MAX_ROUTES]


async def _addresses(host: str, resolver: dns.asyncresolver.Resolver, lifetime: float) -> list[str]:
    """`host`'s IPv4 then IPv6 addresses from our resolver; [] when it has none or the lookup failed
    (the connection then resolves the name itself)."""
    found: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(host, rdtype, lifetime=lifetime)
        except dns.exception.DNSException:
            continue
        found += [record.address for record in answer]
    return found


async def _implicit_mx_routes(
    domain: str, resolver: dns.asyncresolver.Resolver, port: int, lifetime: float
) -> list[Route]:
    routes: list[Route] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(domain, rdtype, lifetime=lifetime)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException as exc:
            log.warning("%s lookup for %s failed: %s", rdtype, domain, exc)
            continue
        routes += [Route(record.address, port) for record in answer]
    return routes
