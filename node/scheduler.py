"""The leader's scheduler: turns queued recipients into leased batches for live nodes.

It decides nothing by itself: every assignment and every lease expiry is a committed command, and
the state machine re-checks eligibility and the per-domain throttles when it applies it. A node
that only believes it is leader (pysyncobj can say so for up to leaderFallbackTimeout) changes
nothing unless its command commits, and then the log has ordered it after everything else.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from raftmail.consensus.commands import Assign, Backoff, Command, Expire, ExpireUnsent, Prune
from raftmail.consensus.shaping import limits_at, next_step
from raftmail.consensus.view import StateView
from raftmail.node.bridge import ProposalFailed
from raftmail.node.config_types import DeliverySection, IntakeSection, PoolSection, SourceAddress, StorageSection
from raftmail.node.leases import LeaseClock
from raftmail.node.sites import SiteMap, SourceChooser, pool_for

log = logging.getLogger("raftmail.scheduler")

SCHEDULE_INTERVAL = 0.1  # seconds between scheduling rounds on the leader
HEADS_WAIT_SECONDS = 0.5  # a round waits this long for the tick thread to make the queue's heads
MAX_EXPIRE = 1000  # batches named in one expire command
UNSENT_CHECK_INTERVAL = 1.0  # seconds between the leader's scans for waiting recipients past max_age


def prune_command(storage: StorageSection, intake: IntakeSection, now: float) -> Prune:
    """The retention and count bounds, as the command every replica applies the same way."""
    st = storage
    return Prune(now, retention=st.body_retention_seconds, archive_retention=st.archive_retention_seconds,
                 max_finished=st.max_finished_recipients, max_archived=st.max_archived_recipients,
                 max_suppressed=st.max_suppressed_addresses, dedupe_window=intake.dedupe_window_seconds,
                 max_dedupe=intake.dedupe_max_keys)


def backoff_status(view: StateView, delivery: DeliverySection, now: float) -> dict[str, dict]:
    """Each destination site (domain or MX rollup group) in backoff: its level, the limits in
    force, how long it stays suspended and the reply that caused it (/status, `raftmail status`)."""
    shown = {}
    for site, b in sorted(view.backoff.items()):
        if b.level == 0 and now >= b.suspended_until:
            continue  # only noted, no step taken yet
        limits = delivery.limits_for_site(site)
        connections, per_minute = limits_at(limits.max_connections, limits.max_per_minute, b.level)
        shown[site] = {"level": b.level, "max_connections": connections, "max_per_minute": per_minute,
                         "suspended_for": round(max(0.0, b.suspended_until - now), 1), "reason": b.reason}
    return shown


def warmup_status(view: StateView, delivery: DeliverySection, now: float) -> dict[str, dict]:
    """Each pool address still warming up: today's cap per site and what each site has used."""
    shown = {}
    for pool in delivery.pools.values():
        for source in pool.sources:
            cap = source.daily_cap(now)
            if cap is None:
                continue
            sites = sorted(key.partition(" ")[2] for key in view.warmup if key.partition(" ")[0] == source.address)
            used = {site: n for site in sites if (n := view.warmed_today(source.address, site, now))}
            shown[source.address] = {"pool": pool.name, "node": source.node, "cap": cap, "sites": used}
    return shown


class Scheduler:
    """Reads only the published view (node/readview.py): a round never waits for the apply lock."""

    def __init__(self, view: Callable[[], StateView], heads_view: Callable[[int, float], Awaitable[StateView]],
                 propose: Callable[[Command, float], Awaitable[Any]],
                 delivery: DeliverySection, intake: IntakeSection, storage: StorageSection, leases: LeaseClock,
                 live_nodes: Callable[[], list[str]], is_leader: Callable[[], bool], term: Callable[[], int]) -> None:
        self.view = view
        self.heads_view = heads_view  # a view with the queue's heads, made on request
        self.propose = propose
        self.delivery = delivery
        self.intake = intake
        self.storage = storage
        self.leases = leases
        self.live_nodes = live_nodes
        self.is_leader = is_leader
        self.term = term
        self.rounds = 0
        self.assigned_batches = 0
        self._rr = 0  # round-robin start, so idle nodes share batches evenly
        self._last_prune = 0.0
        self._last_unsent_check = -UNSENT_CHECK_INTERVAL
        self._prune_more = False
        self.stopping = False  # a node shutting down hands out nothing more
        self.sites = SiteMap(delivery)
        self._chooser = SourceChooser()
        self._warmed: dict[tuple[str, str], int] = {}  # (source, site) -> recipients assigned this round

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SCHEDULE_INTERVAL)
            if self.stopping or not self.is_leader():
                continue
            try:
                await self.round()
            except ProposalFailed as e:
                log.debug("scheduling round stopped: %s", e.reason)
            except Exception:
                log.exception("scheduling round failed")

    async def round(self) -> None:
        d = self.delivery
        timeout = self.intake.commit_timeout
        now = time.time()
        self.rounds += 1
        await self.expire_leases()
        await self.expire_unsent(now)
        if now - self._last_prune > self.storage.maintenance_interval_seconds or self._prune_more:
            self._last_prune = now
            res = await self.propose(prune_command(self.storage, self.intake, now), timeout)
            # Each prune does bounded work in the tick thread; a backlog is worked off a round at a time.
            self._prune_more = bool(res.get("more"))
            if res.get("archived") or res.get("dropped"):
                log.info("retention: %d finished submissions archived, %d archives dropped",
                         res["archived"], res["dropped"])
        view = self.view()
        await self.step_backoff(view, now, timeout)
        self._warmed.clear()
        # Only node processes that announced their incarnation take batches (node/sender.py).
        live = [n for n in self.live_nodes() if n in view.incarnations]
        if not live:
            return
        capacity = d.max_concurrent_batches * len(live)
        if capacity <= len(view.batches):
            return
        # With the steps just committed (their limits apply to this round) and the queue's heads,
        # as many recipients as the free batches could take.
        view = await self.heads_view((capacity - len(view.batches)) * d.batch_size, HEADS_WAIT_SECONDS)
        room = capacity - len(view.batches)
        if room <= 0:
            return
        load = dict(view.node_batches)
        site_batches = dict(view.site_batches)
        eligible = view.eligible(now, room * d.batch_size)
        term = self.term()
        for domain, items in eligible.items():
            site = self.sites.site_of(domain)
            if site is None:
                continue  # its MX lookup is under way: next round
            limits = d.limits_for_site(site)
            backoff = view.backoff.get(site)
            if backoff is not None and now < backoff.suspended_until:
                continue  # suspended: the receiver asked for a pause
            max_connections, max_per_minute = limits_at(limits.max_connections, limits.max_per_minute,
                                                        backoff.level if backoff is not None else 0)
            if 0 < max_per_minute <= view.sent_last_minute(site, now):
                continue  # quota used up: an assign would only commit a refusal every round
            for pool, pool_items in self._by_pool(view, items):
                while pool_items and site_batches.get(site, 0) < max_connections:
                    source = None
                    if pool is None:
                        target = self._pick(live, load, d.max_concurrent_batches)
                    else:
                        source = self._pick_source(pool, site, view, now, live, load)
                        target = source.node if source is not None else None
                    if target is None:
                        break  # no node (or no address of this pool) can take more now
                    chunk, pool_items = pool_items[:d.batch_size], pool_items[d.batch_size:]
                    res = await self.propose(Assign(
                        node=target, domain=domain, now=now, lease=d.lease_seconds, term=term,
                        max_connections=max_connections, max_per_minute=max_per_minute, items=chunk,
                        site=site if site != domain else None, source=source.address if source else None,
                        daily_cap=source.daily_cap(now) if source else None), timeout)
                    if not res.get("batch"):
                        break  # throttled, warm-up cap reached, or nothing left for this domain
                    self.assigned_batches += 1
                    load[target] = load.get(target, 0) + 1
                    site_batches[site] = site_batches.get(site, 0) + 1
                    if source is not None:
                        self._warmed[(source.address, site)] = self._warmed.get((source.address, site), 0) + res["n"]
                    log.info("assigned batch %s (%d recipients of %s%s%s) to %s, lease %.0fs", res["batch"], res["n"],
                             domain, f" at {site}" if site != domain else "",
                             f" from {source.address}" if source else "", target, d.lease_seconds)

    def _by_pool(self, view: StateView, items: list[list]) -> list[tuple[PoolSection | None, list[list]]]:
        """A domain's eligible recipients split by the pool their mail leaves from, in queue order."""
        if not self.delivery.pools:
            return [(None, items)]
        groups: dict[str | None, tuple[PoolSection | None, list[list]]] = {}
        pool_of: dict[str, PoolSection | None] = {}  # a submission's recipients share its pool
        for item in items:
            sid = item[0]
            if sid not in pool_of:
                pool_of[sid] = pool_for(self.delivery, *view.head_submissions.get(sid, ("", "")))
            pool = pool_of[sid]
            groups.setdefault(pool.name if pool else None, (pool, []))[1].append(item)
        return list(groups.values())

    def _pick_source(self, pool: PoolSection, site: str, view: StateView, now: float, live: list[str],
                     load: dict[str, int]) -> SourceAddress | None:
        """A source of `pool` on a live node with room, whose warm-up cap for `site` is not used up
        today (the committed count, plus what this round assigned before the view caught up)."""
        usable = []
        for s in pool.sources:
            if s.node not in live or load.get(s.node, 0) >= self.delivery.max_concurrent_batches:
                continue
            cap = s.daily_cap(now)
            if cap is not None and view.warmed_today(s.address, site, now) + self._warmed.get((s.address, site), 0) >= cap:
                continue
            usable.append(s)
        return self._chooser.choose(usable)

    async def step_backoff(self, view: StateView, now: float, timeout: float) -> None:
        """Propose the next adaptive-backoff step of every site whose replies call for one."""
        policy = self.delivery.backoff.policy()
        for domain, backoff in view.backoff.items():  # `domain`: the site (the Backoff command's wire name)
            step = next_step(backoff, now, policy)
            if step is None:
                continue
            level, suspended_until, reason = step
            await self.propose(Backoff(domain=domain, now=now, level=level, suspended_until=suspended_until,
                                       reason=reason), timeout)
            limits = self.delivery.limits_for_site(domain)
            connections, per_minute = limits_at(limits.max_connections, limits.max_per_minute, level)
            if suspended_until > now:
                log.warning("backoff: %s suspended for %.0fs after %r", domain, suspended_until - now, reason)
            elif level > backoff.level:
                log.warning("backoff: %s slowed to level %d (%d connections, %s per minute) after %r", domain,
                            level, connections, per_minute or "unlimited", reason)
            elif level > 0:
                log.info("backoff: %s recovering, level %d (%d connections)", domain, level, connections)
            else:
                log.info("backoff: %s back to its configured limits", domain)

    async def expire_leases(self) -> None:
        """Batches whose lease ran out on this leader's own monotonic clock, counted from when it
        applied their assignment or last renewal; named with the renewal count it saw, so a
        renewal committed meanwhile keeps the batch."""
        mono = time.monotonic()
        leases = self.leases
        held = self.view().batches.values()
        leases.forget_except({b.id for b in held})
        due = [[b.id, b.renewals] for b in held
               if leases.since(b.id, b.renewals, mono) > b.lease + self.delivery.lease_expiry_margin]
        if not due:
            return
        res = await self.propose(Expire(time.time(), due[:MAX_EXPIRE]), self.intake.commit_timeout)
        if res.get("expired"):
            log.warning("leases expired for batches %s: %d recipients back in the queue",
                        ",".join(res["expired"]), res["returned"])

    async def expire_unsent(self, now: float) -> None:
        """`max_age` for recipients still waiting (never attempted, or not due for a retry)."""
        max_age = self.delivery.max_age
        if time.monotonic() - self._last_unsent_check < UNSENT_CHECK_INTERVAL:
            return
        self._last_unsent_check = time.monotonic()
        oldest = self.view().oldest_waiting
        if oldest is None or oldest + max_age >= now:
            return
        res = await self.propose(ExpireUnsent(now, max_age), self.intake.commit_timeout)
        if res.get("expired"):
            log.warning("%d recipients expired unsent: older than max_age (%gs)", res["expired"], max_age)

    def _pick(self, live: list[str], load: dict[str, int], per_node: int) -> str | None:
        """The least-loaded live node; ties rotate."""
        self._rr += 1
        order = live[self._rr % len(live):] + live[:self._rr % len(live)]
        best = min(order, key=lambda n: load.get(n, 0))
        return best if load.get(best, 0) < per_node else None
