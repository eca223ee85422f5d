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
from typing import TYPE_CHECKING

from raftmail.node.bridge import ProposalFailed

if TYPE_CHECKING:
    from raftmail.node.config import Config
    from raftmail.node.runtime import MailNode

log = logging.getLogger("raftmail.scheduler")

SCHEDULE_INTERVAL = 0.1  # seconds between scheduling rounds on the leader
MAX_EXPIRE = 1000  # batches named in one expire command
UNSENT_CHECK_INTERVAL = 1.0  # seconds between the leader's scans for waiting recipients past max_age


def prune_command(config: "Config", now: float) -> dict:
    """The retention and count bounds, as the command every replica applies the same way."""
    st = config.storage
    return {"op": "prune", "now": now, "retention": st.body_retention_seconds,
            "archive_retention": st.archive_retention_seconds, "max_finished": st.max_finished_recipients,
            "max_archived": st.max_archived_recipients, "max_suppressed": st.max_suppressed_addresses,
            "dedupe_window": config.intake.dedupe_window_seconds, "max_dedupe": config.intake.dedupe_max_keys}


class Scheduler:
    def __init__(self, node: "MailNode") -> None:
        self.node = node
        self.rounds = 0
        self.assigned_batches = 0
        self._rr = 0  # round-robin start, so idle nodes share batches evenly
        self._last_prune = 0.0
        self._last_unsent_check = -UNSENT_CHECK_INTERVAL
        self._prune_more = False
        self.stopping = False  # a node shutting down hands out nothing more

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SCHEDULE_INTERVAL)
            if self.stopping or not self.node.raft.is_leader():
                continue
            try:
                await self.round()
            except ProposalFailed as e:
                log.debug("scheduling round stopped: %s", e.reason)
            except Exception:
                log.exception("scheduling round failed")

    async def round(self) -> None:
        node, d = self.node, self.node.config.delivery
        timeout = node.config.intake.commit_timeout
        now = time.time()
        self.rounds += 1
        await self.expire_leases()
        await self.expire_unsent(now)
        if now - self._last_prune > node.config.storage.maintenance_interval_seconds or self._prune_more:
            self._last_prune = now
            res = await node.proposer.propose(prune_command(node.config, now), timeout)
            # Each prune does bounded work in the tick thread; a backlog is worked off a round at a time.
            self._prune_more = bool(res.get("more"))
            if res.get("archived") or res.get("dropped"):
                log.info("retention: %d finished submissions archived, %d archives dropped",
                         res["archived"], res["dropped"])
        # Only node processes that announced their incarnation take batches (node/sender.py).
        announced = node.raft.read(lambda st: set(st.incarnations))
        live = [n for n in node.live_nodes() if n in announced]
        if not live:
            return
        capacity = d.max_concurrent_batches * len(live)

        def read(st):
            load: dict[str, int] = {}
            for b in st.batches.values():
                load[b.node] = load.get(b.node, 0) + 1
            room = capacity - len(st.batches)
            if room <= 0:
                return {}, load, {}, {}
            # Assigned in the last minute per domain, counted without st.sent_last_minute(),
            # which prunes: a read must not change replicated state.
            recent = {dom: sum(n for t, n in q if t > now - 60) for dom, q in st.domain_recent.items()}
            return st.eligible(now, room * d.batch_size), load, dict(st.domain_batches), recent
        eligible, load, domain_batches, recent = node.raft.read(read)
        term = node.raft.raftCurrentTerm
        for domain, items in eligible.items():
            limits = d.limits_for(domain)
            if 0 < limits.max_per_minute <= recent.get(domain, 0):
                continue  # quota used up: an assign would only commit a refusal every round
            while items and domain_batches.get(domain, 0) < limits.max_connections:
                target = self._pick(live, load, d.max_concurrent_batches)
                if target is None:
                    return
                chunk, items = items[:d.batch_size], items[d.batch_size:]
                res = await node.proposer.propose({
                    "op": "assign", "node": target, "domain": domain, "items": chunk, "now": now,
                    "lease": d.lease_seconds, "term": term,
                    "max_connections": limits.max_connections, "max_per_minute": limits.max_per_minute,
                }, timeout)
                if not res.get("batch"):
                    break  # throttled or nothing left for this domain
                self.assigned_batches += 1
                load[target] = load.get(target, 0) + 1
                domain_batches[domain] = domain_batches.get(domain, 0) + 1
                log.info("assigned batch %s (%d recipients of %s) to %s, lease %.0fs",
                         res["batch"], res["n"], domain, target, d.lease_seconds)

    async def expire_leases(self) -> None:
        """Batches whose lease ran out on this leader's own monotonic clock, counted from when it
        applied their assignment or last renewal; named with the renewal count it saw, so a
        renewal committed meanwhile keeps the batch."""
        node, d = self.node, self.node.config.delivery
        mono = time.monotonic()
        leases = node.leases
        held = node.raft.read(lambda st: [(b.id, b.renewals, b.lease) for b in st.batches.values()])
        leases.forget_except({bid for bid, _, _ in held})
        due = [[bid, renewals] for bid, renewals, lease in held
               if leases.since(bid, renewals, mono) > lease + d.lease_expiry_margin]
        if not due:
            return
        res = await node.proposer.propose({"op": "expire", "now": time.time(), "batches": due[:MAX_EXPIRE]},
                                          node.config.intake.commit_timeout)
        if res.get("expired"):
            log.warning("leases expired for batches %s: %d recipients back in the queue",
                        ",".join(res["expired"]), res["returned"])

    async def expire_unsent(self, now: float) -> None:
        """`max_age` for recipients still waiting (never attempted, or not due for a retry)."""
        node, max_age = self.node, self.node.config.delivery.max_age
        if time.monotonic() - self._last_unsent_check < UNSENT_CHECK_INTERVAL:
            return
        self._last_unsent_check = time.monotonic()
        if not node.raft.read(lambda st: st.expire_unsent(now, max_age, 1)):
            return
        res = await node.proposer.propose({"op": "expire_unsent", "now": now, "max_age": max_age},
                                          node.config.intake.commit_timeout)
        if res.get("expired"):
            log.warning("%d recipients expired unsent: older than max_age (%gs)", res["expired"], max_age)

    def _pick(self, live: list[str], load: dict[str, int], per_node: int) -> str | None:
        """The least-loaded live node; ties rotate."""
        self._rr += 1
        order = live[self._rr % len(live):] + live[:self._rr % len(live)]
        best = min(order, key=lambda n: load.get(n, 0))
        return best if load.get(best, 0) < per_node else None
