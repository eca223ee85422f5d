"""A node's housekeeping loops: fetch bodies it lacks, delete bodies nothing references, say when
a peer runs with another cluster secret, and stop when the cluster removed this node."""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from raftmail.consensus.raft import RaftNode
from raftmail.consensus.view import StateView
from raftmail.node.bodies import BodyRepair, BodyStore, collect_unreferenced
from raftmail.node.membership import ClusterView
from raftmail.node.peer_client import PeerClient

log = logging.getLogger("raftmail.node")

BODY_REPAIR_INTERVAL = 1.0  # seconds between scans for bodies this node lacks
BODY_REPAIR_PARALLEL = 16  # fetches in flight at once
PEER_PROBE_INTERVAL = 5.0  # seconds between checks that every peer shares our cluster secret
REMOVAL_CHECK_INTERVAL = 1.0  # seconds between checks whether this node was removed


class Maintenance:
    def __init__(self, raft: RaftNode, state_view: Callable[[], StateView], store: BodyStore, view: ClusterView,
                 peers: PeerClient, fetch_body: Callable[[str], Awaitable[bytes | None]], interval: float,
                 body_gc_grace: float) -> None:
        self.raft = raft  # for the reads of body digests, in a worker thread
        self.state_view = state_view
        self.store = store
        self.view = view
        self.peers = peers
        self.fetch_body = fetch_body
        self.interval = interval
        self.body_gc_grace = body_gc_grace
        self.peers_rejecting: list[str] = []

    async def repair_bodies(self) -> None:
        """Fetch bodies of unfinished submissions that this node lacks (it was down, restored
        from a snapshot, or a body it held was lost), so any node can deliver any batch."""
        slots = asyncio.Semaphore(BODY_REPAIR_PARALLEL)
        repair = BodyRepair(self.store)

        async def fetch(digest: str) -> None:
            async with slots:
                await self.fetch_body(digest)
        while True:
            await asyncio.sleep(BODY_REPAIR_INTERVAL)
            if self.store.space_problem():
                continue  # nowhere to put them (logged once, and in /metrics): fetch nothing
            try:
                # In a worker thread: the loop never waits for the apply lock.
                read = await asyncio.to_thread(self.raft.read, repair.state_read())
                missing = await asyncio.to_thread(repair.missing, read)
                await asyncio.gather(*(fetch(d) for d in missing))
            except Exception:
                log.exception("body repair failed")

    async def collect_bodies(self) -> None:
        """Delete bodies that no live submission references (counted in the replicated state)
        once they are older than [storage] body_gc_grace_seconds."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                referenced = await asyncio.to_thread(self.raft.read, lambda st: set(st.body_refs))
                await asyncio.to_thread(collect_unreferenced, self.store, referenced, self.body_gc_grace)
            except Exception:
                log.exception("body collection failed")

    async def probe_peers(self) -> None:
        """pysyncobj drops a peer with another secret without a word: say it, on both sides (the
        probed node logs the failed authentication too)."""
        while True:
            await asyncio.sleep(PEER_PROBE_INTERVAL)
            rejecting = []
            for nid, info in self.view.members().items():
                if nid != self.view.id and await self.peers.probe(info["admin"]) in (401, 403):
                    rejecting.append(nid)
            for nid in sorted(set(rejecting) - set(self.peers_rejecting)):
                log.error("peer %s refuses this node's cluster secret: the two run with different "
                          "secrets and cannot replicate to each other", nid)
            self.peers_rejecting = rejecting

    async def stop_when_removed(self, stop: asyncio.Event) -> None:
        """A node removed from the cluster (raftmail leave) stops serving by itself."""
        me = self.view.id
        while True:
            await asyncio.sleep(REMOVAL_CHECK_INTERVAL)
            if self.state_view().members.get(me, {}).get("status") == "removed":
                log.warning("node %s was removed from the cluster: stopping", me)
                stop.set()
                return
