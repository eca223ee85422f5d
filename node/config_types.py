"""The cluster file's schema: frozen dataclasses, one per section, and the whole Config."""
from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from raftmail.node.config_read import ConfigError, _canonical_host, _canonical_ipv6, _parse_port
from raftmail.consensus.domains import normalise_domain
from raftmail.consensus.shaping import BackoffPolicy

@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        # Brackets keep IPv6 round-trippable through parse(); pysyncobj itself wants host:port
        # unbracketed, so consensus code should build its own string from host and port.
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse "host:port" or "[ipv6]:port"; IP literals and host names come back canonical."""
        if not isinstance(text, str):
            raise ValueError('must be a "host:port" string')
        if text.startswith("["):
            end = text.find("]")
            if end < 0 or text[end + 1 : end + 2] != ":":
                raise ValueError('must be "[ipv6]:port"')
            host, port_text = _canonical_ipv6(text[1:end]), text[end + 2 :]
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host:
                raise ValueError('must be "host:port"')
            if ":" in host:
                raise ValueError('IPv6 addresses need brackets, like "[::1]:25"')
            host = _canonical_host(host)
        return cls(host, _parse_port(port_text))


@dataclass(frozen=True)
class NodeConfig:
    id: str
    raft: Address
    smtp: Address
    admin: Address
    # The public HTTP listener (one-click unsubscribe), behind the operator's load balancer; None: off.
    http: Address | None = None


@dataclass(frozen=True)
class ClusterSection:
    name: str
    secret: str = field(repr=False)
    data_dir: Path
    fsync: bool = False
    # Bearer token for every admin route but /healthz, /readyz and /metrics; required when a
    # node's admin address is not loopback.
    admin_token: str | None = field(default=None, repr=False)
    # Optional token that may only read (GET) the admin routes: status, campaigns, events.
    read_token: str | None = field(default=None, repr=False)
    # Peer requests (body fetches, body streams) a node serves at once.
    max_peer_requests: int = 64
    # Sealed body batches a node keeps sending to slow peers in the background, in bytes.
    max_background_push_bytes: int = 64 * 2**20


@dataclass(frozen=True)
class RaftSection:
    election_timeout_min: float = 0.3
    election_timeout_max: float = 0.7
    heartbeat_interval: float = 0.08
    connection_timeout: float = 3.5
    max_commands_in_flight: int = 200
    # Group commit of every command a node proposes: entries in flight, and bytes per entry
    # (under pysyncobj's 64 KiB append_entries batch, so a group never takes its chunked path).
    max_entries_in_flight: int = 2
    max_entry_bytes: int = 60000
    compaction_min_entries: int = 5000
    compaction_min_seconds: float = 300.0
    snapshot_chunk_bytes: int = 262144
    # The Raft port: the largest frame a peer may send (snapshots travel in snapshot_chunk_bytes
    # chunks, log entries in 64 KiB batches), and connections that have not yet proven the
    # cluster secret: how many at once, for how long.
    max_frame_bytes: int = 4194304
    max_pending_connections: int = 16
    handshake_timeout: float = 5.0
    # Disk space the Raft journal reserves ahead of use (allocated, so a full disk refuses an
    # entry cleanly instead of killing the node); it grows by this much at a time.
    journal_reserve_bytes: int = 8388608


FRAME_OVERHEAD_BYTES = 65536  # room in a Raft frame beyond a snapshot chunk (framing, sealing)
DEFAULT_ALLOW_NETWORKS = ("127.0.0.0/8", "::1/128")
MAX_LOGIN_CHARS = 255


def _default_allow_networks() -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(n) for n in DEFAULT_ALLOW_NETWORKS)


def _no_users() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True)
class IntakeSection:
    max_message_bytes: int = 10485760
    max_recipients: int = 1000
    commit_timeout: float = 5.0
    dedupe_window_seconds: float = 86400.0
    # Idempotency keys (envelope sender, Message-ID, recipient) remembered at most, oldest
    # forgotten first, so a key table never outgrows memory within the window.
    dedupe_max_keys: int = 2000000
    max_connections: int = 200
    # Clients outside allow_networks: connections at once per IPv4 address or IPv6 /64, so one
    # stranger cannot take every slot.
    max_connections_per_client: int = 10
    # Clients outside allow_networks that have not authenticated: connections at once, so
    # strangers from many addresses cannot take the slots kept for allow_networks and users who
    # authenticated. Unless set, half of max_connections (resolved when the file is read).
    max_stranger_connections: int = 100
    idle_timeout: float = 300.0
    # Seconds a client outside allow_networks may stay connected without authenticating.
    unauthenticated_timeout: float = 60.0
    # Seconds from the 354 to the final dot, however steadily the text arrives.
    data_timeout: float = 300.0
    max_queued_recipients: int = 5000000
    # Who may submit: clients in these networks without AUTH, everyone else only after AUTH.
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default_factory=_default_allow_networks)
    users: Mapping[str, str] = field(default_factory=_no_users, repr=False)  # login -> scrypt hash
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allow_plaintext_auth_on_loopback: bool = False
    auth_fail_delay: float = 1.0  # seconds after a failed AUTH; doubles per recent failure ...
    auth_fail_delay_max: float = 30.0  # ... up to this
    # A message with bare LF line ends: "normalize" (stored and delivered with CRLF, as Postfix's
    # smtpd_forbid_bare_newline = normalize) or "reject" (554 5.6.0). DATA ends only at CRLF.CRLF.
    bare_newline: str = "normalize"


@dataclass(frozen=True)
class DomainLimits:
    max_connections: int = 10
    max_per_minute: int = 0  # 0 = unlimited
    # Never send to this domain in clear text: without STARTTLS the recipient is deferred.
    require_tls: bool = False


@dataclass(frozen=True)
class DkimSection:
    """One [[delivery.dkim]] entry: the key that signs as `domain` (d=) with `selector` (s=)."""

    domain: str
    selector: str
    key_file: Path  # RSA or Ed25519 private key (PEM); its type picks the algorithm
    default: bool = False  # also signs mail whose From: domain has no entry of its own


@dataclass(frozen=True)
class BackoffSection:
    """[delivery.backoff]: how a destination domain that throttles is slowed (consensus/shaping.py)."""

    step_seconds: float = 60.0  # at most one halving of a domain's limits per this long
    suspend_level: int = 4  # after this many halvings in a row (1/16 of its limits) ...
    suspend_seconds: float = 900.0  # ... the domain gets nothing for this long
    recover_after: int = 50  # clean deliveries before its limits double again ...
    recover_seconds: float = 300.0  # ... at least this long after the last step

    def policy(self) -> BackoffPolicy:
        return BackoffPolicy(self.step_seconds, self.suspend_level, self.suspend_seconds, self.recover_after,
                             self.recover_seconds)


@dataclass(frozen=True)
class SiteSection:
    """[delivery.sites.NAME]: a receiver's MX hosts by pattern; every domain whose MX set has one
    of them shares the site's limits (node/sites.py)."""

    name: str
    mx: tuple[str, ...]  # shell-style patterns of MX host names, lower case: "*.google.com"
    max_connections: int = 10
    max_per_minute: int = 0  # 0 = unlimited

    @property
    def key(self) -> str:
        return f"site:{self.name}"


@dataclass(frozen=True)
class SourceAddress:
    """One [[delivery.pools.NAME.sources]] entry: an address of one node that connections bind."""

    address: str  # an IP literal the node has
    node: str  # the node that has it: only that node gets batches for it
    ehlo: str  # the EHLO name sent from it (its reverse DNS name)
    weight: int = 1  # its share of the pool's batches
    # Warm-up: recipients per destination site per UTC day, day 1 first; no cap after the last.
    warmup: tuple[int, ...] = ()
    warmup_start: float = 0.0  # UTC midnight (epoch seconds) of warm-up day 1

    def daily_cap(self, now: float) -> int | None:
        """Today's warm-up cap per site (None: warmed up or no schedule); before day 1, the first."""
        if not self.warmup:
            return None
        day = max(0, int((now - self.warmup_start) // 86400))
        return self.warmup[day] if day < len(self.warmup) else None


@dataclass(frozen=True)
class PoolSection:
    """[delivery.pools.NAME]: source addresses that mail of some senders or campaigns leaves from."""

    name: str
    sources: tuple[SourceAddress, ...]
    senders: tuple[str, ...] = ()  # envelope sender domains that use this pool
    campaigns: tuple[str, ...] = ()  # campaign ids (shell-style patterns) that use this pool


def _no_routes() -> Mapping[str, Address]:
    return MappingProxyType({})


def _default_domains() -> Mapping[str, DomainLimits]:
    return MappingProxyType({"default": DomainLimits()})


@dataclass(frozen=True)
class DeliverySection:
    relay: Address | None = None
    relay_username: str | None = None
    relay_password: str | None = field(default=None, repr=False)
    routes: Mapping[str, Address] = field(default_factory=_no_routes)
    domains: Mapping[str, DomainLimits] = field(default_factory=_default_domains)
    helo_name: str = "localhost"
    batch_size: int = 100
    lease_seconds: float = 30.0
    # The leader expires a lease only once its own monotonic clock says lease_seconds plus this
    # much passed since it applied the batch's assignment or last renewal (covers heartbeats and
    # apply delays between nodes; the heartbeat is 0.08 s).
    lease_expiry_margin: float = 1.0
    # A holder starts no SMTP command, and sends no final dot, within this much of its lease end
    # as its own monotonic clock measures it.
    lease_send_margin: float = 1.0
    # Final dots sent without a reply (timeout, connection lost) before a recipient is not tried
    # again: it ends `expired`, its event text saying it was maybe delivered.
    max_maybe_delivered: int = 3
    max_concurrent_batches: int = 20
    connect_timeout: float = 30.0
    command_timeout: float = 60.0
    report_every: int = 50
    report_interval: float = 0.2
    retry_first: float = 300.0
    retry_factor: float = 2.0
    retry_max_interval: float = 14400.0
    retry_jitter: float = 0.2
    max_age: float = 259200.0
    unsubscribe_url: str | None = None
    backoff: BackoffSection = BackoffSection()
    dkim: tuple[DkimSection, ...] = ()  # [[delivery.dkim]]: by From: domain (node/dkim.py)
    # Verify the receiver's certificate (and host name) whenever relay credentials are sent or the
    # domain has require_tls; plain opportunistic STARTTLS stays unverified, as MX certificates
    # often are. tls_ca_file: a PEM bundle to trust instead of the system's CAs.
    tls_verify: bool = True
    tls_ca_file: Path | None = None
    # MX rollup: named receivers by MX pattern ([delivery.sites.NAME]); other domains with the
    # same MX set are grouped automatically. MX answers are cached for their TTL, at most
    # mx_cache_seconds, for at most mx_cache_domains domains.
    sites: Mapping[str, SiteSection] = field(default_factory=lambda: MappingProxyType({}))
    mx_cache_seconds: float = 3600.0
    mx_cache_domains: int = 100000
    # Resolvers for MX lookups ("host:port"; none: the system's) and the port MX hosts listen on.
    dns_servers: tuple[Address, ...] = ()
    mx_port: int = 25
    dns_timeout: float = 10.0
    # Source-address pools ([delivery.pools.NAME]); mail no pool claims uses default_pool, or
    # the system's choice of address when that is unset.
    pools: Mapping[str, PoolSection] = field(default_factory=lambda: MappingProxyType({}))
    default_pool: str | None = None

    def limits_for(self, domain: str) -> DomainLimits:
        """Limits for a recipient domain: its own [delivery.domains."x"] table, else the default."""
        specific = self.domains.get(normalise_domain(domain))
        if specific is not None:
            return specific
        return self.domains.get("default", DomainLimits())

    def limits_for_site(self, site: str) -> DomainLimits:
        """Limits for a destination site (node/sites.py): a named site's own, the default for an
        automatic MX group, else the domain's."""
        if site.startswith("site:") and site[5:] in self.sites:
            named = self.sites[site[5:]]
            return DomainLimits(named.max_connections, named.max_per_minute)
        if site.startswith("mx:"):
            return self.domains.get("default", DomainLimits())
        return self.limits_for(site)

    def source(self, address: str) -> SourceAddress | None:
        """The pool source entry of `address` (each address is in one pool)."""
        for pool in self.pools.values():
            for s in pool.sources:
                if s.address == address:
                    return s
        return None


@dataclass(frozen=True)
class StorageSection:
    # Bodies and per-recipient detail of finished submissions are kept this long (7 days) ...
    body_retention_seconds: float = 604800.0
    # ... then a compressed record of each recipient's final state, this long (30 days).
    archive_retention_seconds: float = 2592000.0
    # How often the leader applies the retention and each node deletes expired bodies.
    maintenance_interval_seconds: float = 60.0
    # Count bounds, whatever the retention, in recipients (oldest first): finished submissions
    # keep per-recipient detail for at most this many recipients (then they are archived) ...
    max_finished_recipients: int = 200000
    # ... and the compact final-state records at most this many (then they are dropped) ...
    max_archived_recipients: int = 2000000
    # ... and addresses on the suppression list (the oldest entry is forgotten first).
    max_suppressed_addresses: int = 1000000
    # A body no live submission references is deleted only once its file is this old: a new
    # submission of the same bytes, stored but not yet committed, refreshes it.
    body_gc_grace_seconds: float = 3600.0
    # Recently written or read bodies kept in memory for the sender (0: none; no body over a
    # quarter of it is kept).
    body_cache_bytes: int = 64 * 2**20


# At most this many outcome events per webhook POST (the /events endpoint's own page limit).
MAX_WEBHOOK_BATCH = 10000


@dataclass(frozen=True)
class MonitoringSection:
    # Outcome events are POSTed here in batches by the Raft leader; None = no webhook.
    # Not repr'd: the URL often carries the receiver's token.
    webhook_url: str | None = field(default=None, repr=False)
    webhook_batch: int = 500  # events per POST
    webhook_timeout: float = 10.0  # seconds per POST
    webhook_retry_first: float = 1.0  # seconds before the first retry; doubles per failure ...
    webhook_max_retry_interval: float = 300.0  # ... up to this
    # /readyz: ready only when the applied index is within this many entries of the leader's commit.
    ready_max_lag: int = 100
    # /readyz?write=1: a committed noop younger than this proves the quorum without a new write.
    ready_write_window: float = 3.0


UNSUBSCRIBE_SCOPES = ("domain", "cluster")


@dataclass(frozen=True)
class FeedbackSection:
    # Keys of the unsubscribe links and VERP addresses; the first makes tokens, every one is
    # tried when a token is read (rotation). Never the cluster secret.
    unsubscribe_secret: tuple[str, ...] = field(default=(), repr=False)
    # "domain": an unsubscribe or complaint suppresses the address for mail from the same From:
    # domain; "cluster": for everything the cluster sends.
    unsubscribe_scope: str = "domain"
    # A domain whose per-recipient addresses unsubscribe (mailto: in List-Unsubscribe).
    unsubscribe_mailto: str | None = None
    # The VERP domain: each copy's envelope sender is a per-recipient address there.
    bounce_domain: str | None = None
    # Gmail's Feedback-ID: "<campaign>:<feedback_id>".
    feedback_id: str | None = None
    # Public HTTP requests served at once per node (more get 503).
    max_http_requests: int = 64
    # Bytes of a report (DSN, ARF) that are parsed; the rest is accepted unread.
    max_report_bytes: int = 1048576

    def domains(self) -> frozenset[str]:
        """Domains whose addresses take feedback from anyone."""
        return frozenset(d for d in (self.bounce_domain, self.unsubscribe_mailto) if d is not None)


@dataclass(frozen=True)
class ApiSection:
    """The HTTP injection API on the public listener (node/inject_api.py)."""
    # Request body bytes (JSON); more gets 413. The template object a request makes is at most
    # about this size, so the peer channel takes bodies up to it too.
    max_request_bytes: int = 33554432
    max_recipients: int = 100000  # per request
    # Recipients per replicated submission: a request is committed as one command of such parts.
    recipients_per_submission: int = 1000
    max_template_bytes: int = 1048576  # subject, headers and bodies together, before rendering
    max_rendered_bytes: int = 2097152  # templated text of one copy, after rendering
    max_render_seconds: float = 0.25  # per copy; checked at calls, loop steps and output chunks
    # Callers in these networks need no key; everyone else sends Authorization: Bearer KEY.
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default_factory=_default_allow_networks)
    keys: Mapping[str, str] = field(default_factory=_no_users, repr=False)  # key name -> scrypt hash


@dataclass(frozen=True)
class Config:
    path: Path
    cluster: ClusterSection
    nodes: tuple[NodeConfig, ...]
    raft: RaftSection
    intake: IntakeSection
    delivery: DeliverySection
    storage: StorageSection
    monitoring: MonitoringSection = field(default_factory=MonitoringSection)
    feedback: FeedbackSection = field(default_factory=FeedbackSection)
    api: ApiSection = field(default_factory=ApiSection)

    def node(self, node_id: str) -> NodeConfig:
        for node in self.nodes:
            if node.id == node_id:
                return node
        known = ", ".join(node.id for node in self.nodes)
        raise ConfigError(self.path, "--node", f"unknown node id {json.dumps(node_id)}; known ids: {known}")

    def node_data_dir(self, node_id: str) -> Path:
        return self.cluster.data_dir / self.node(node_id).id

    def majority(self) -> int:
        return len(self.nodes) // 2 + 1

    def max_body_bytes(self) -> int:
        """The largest body a node stores and the peer channel carries: an SMTP message, or the
        template object of an API request (at most about the request's size)."""
        return max(self.intake.max_message_bytes, self.api.max_request_bytes)
