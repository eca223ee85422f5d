"""Who is in the cluster, and how members join and leave.

`ClusterView` answers "who are the members, which of them are live, what is a majority" from the
cluster file, the replicated member records and pysyncobj's connections. `Membership` runs a join
or a leave on the leader: the replicated record first, then pysyncobj's membership change, one
node at a time, refused before anything commits when it would leave the cluster without a
working majority."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Mapping

from raftmail.consensus.commands import Command, MemberAdd, MemberLeave, MemberRemove, is_refusal
from raftmail.consensus.raft import RaftNode
from raftmail.node.bridge import Propose, ProposalFailed
from raftmail.node.config import Config

log = logging.getLogger("raftmail.node")

MEMBER_LEAVE_MAX_WAIT = 3600.0  # seconds a leave may wait for the leaving node's batches to move
MEMBERSHIP_CHANGE_ATTEMPTS = 20  # pysyncobj refuses a change while the previous one is uncommitted
MEMBERSHIP_CHANGE_RETRY = 0.25  # seconds between those attempts
STEP_DOWN_TIMEOUT = 10.0  # seconds a leaving leader tries to hand leadership over
APPLIED_WAIT = 5.0  # seconds to wait for a removed node to apply its own removal
JOINER_PROBE_TIMEOUT = 1.0  # seconds to ask a joining node whether it already runs

# An answer to the admin API: HTTP status and JSON body.
Answer = tuple[int, dict]


class ClusterView:
    """The members as this node knows them: the cluster file's nodes plus those that joined at run
    time (replicated), minus removed ones."""

    def __init__(self, config: Config, node_id: str, raft: RaftNode,
                 records: Callable[[], Mapping[str, Mapping[str, str]]] | None = None) -> None:
        self.config = config
        self.id = node_id
        self.raft = raft
        # The replicated member records: the node's read view (no lock), else a locked read.
        self.records = records or (lambda: raft.read(lambda st: {k: dict(v) for k, v in st.members.items()}))

    def members(self) -> dict[str, dict]:
        """id -> {"raft", "smtp", "admin", "status"} of every member that was not removed."""
        out = {n.id: {"raft": str(n.raft), "smtp": str(n.smtp), "admin": str(n.admin), "status": "active"}
               for n in self.config.nodes}
        out.update({k: dict(v) for k, v in self.records().items()})
        return {k: v for k, v in out.items() if v["status"] != "removed"}

    def record(self, nid: str) -> dict | None:
        """A member by id whatever its status (removed ones too): the replicated record, else the
        cluster file's."""
        rec = self.raft.read(lambda st: dict(st.members[nid]) if nid in st.members else None)
        if rec is None:
            n = next((n for n in self.config.nodes if n.id == nid), None)
            if n is not None:
                rec = {"raft": str(n.raft), "smtp": str(n.smtp), "admin": str(n.admin), "status": "active"}
        return rec

    def node_of_addr(self, addr: str | None) -> str | None:
        if not addr:
            return None
        return next((k for k, v in self.members().items() if v["raft"] == addr), None)

    def peer_admins(self) -> list[str]:
        return [v["admin"] for k, v in self.members().items() if k != self.id]

    def majority(self) -> int:
        """Of the Raft membership as it is now (pysyncobj's view, which join/leave change)."""
        return (len(self.raft.otherNodes) + 1) // 2 + 1

    def raft_membership(self) -> set[str]:
        """Raft addresses of the membership as pysyncobj counts it now (a change counts from the
        moment the leader appends it)."""
        return {str(self.raft.selfNode)} | {str(n) for n in self.raft.otherNodes}

    def live_nodes(self) -> list[str]:
        """This node and the active peers its Raft transport is connected to (the leader's view)."""
        connected = set(self.raft.raft_status()["partners_connected"])
        members = self.members()
        live = [k for k, v in members.items() if v["raft"] in connected and v["status"] == "active"]
        return ([self.id] if members.get(self.id, {}).get("status") == "active" else []) + sorted(live)

    def leader(self) -> str | None:
        return self.node_of_addr(self.raft.raft_status()["leader_addr"])


def membership_quorum(action: str, before: set[str], reachable: set[str], addr: str) -> tuple[set[str], int, set[str], int]:
    """Raft arithmetic of one join or leave of `addr`, from the leader's view: (the members that
    can vote through it, how many must, the members of the new membership that are unreachable,
    the new membership's size). The change is safe when len(voters) >= need.

    pysyncobj changes the membership one node at a time, and the leader counts the new membership
    from the moment it appends the change, so the change itself commits only with a majority of
    the new membership. A joining node that is not started yet cannot vote: the old members must
    make that majority alone ({n1,n2,n3} + n4 needs 3 of n1..n3); one that already runs counts
    when it is in `reachable` (a one-member cluster can grow only that way). A leaving node stops itself before
    its removal commits, so the others must make a majority of the membership with it and of the
    one without it ({n1,n2,n3} - n2 needs n1 and n3)."""
    if action == "join":
        after = before | {addr}
        return reachable & after, len(after) // 2 + 1, before - reachable, len(after)
    after = before - {addr}
    return reachable & after, max(len(before), len(after)) // 2 + 1, after - reachable, len(after)


class Membership:
    """Join and leave, run on the leader (only it sees which members really answer)."""

    def __init__(self, view: ClusterView, raft: RaftNode, propose: Propose, commit_timeout: float,
                 election_timeout_max: float, lease_seconds: float, admin_token: str | None) -> None:
        self.view = view
        self.raft = raft
        self.propose = propose
        self.commit_timeout = commit_timeout
        self.election_timeout_max = election_timeout_max
        self.default_leave_wait = lease_seconds * 3
        self.admin_token = admin_token

    async def commit(self, command: Command, timeout: float | None = None) -> Answer:
        """A command committed through the log, as an answer: 503 when it did not commit in time,
        409 when the state machine refused it."""
        try:
            result = await self.propose(command, timeout or self.commit_timeout)
        except ProposalFailed as e:
            return 503, {"error": f"not committed: {e.reason}"}
        status = 409 if is_refusal(result) else 200
        return status, result

    async def join(self, nid: str, raft_addr: str, smtp: str, admin: str) -> Answer:
        owner = self.view.node_of_addr(raft_addr)
        if owner not in (None, nid):
            return 409, {"error": f"raft address {raft_addr} belongs to member {owner}"}
        known = self.view.record(nid)
        if known and known["status"] != "removed" and known["raft"] != raft_addr:
            return 409, {"error": f"{nid} is a member with raft address {known['raft']}"}
        redirect = self._not_leader()
        if redirect is not None:
            return redirect
        in_raft = raft_addr in self.view.raft_membership()
        if in_raft and known and known["status"] == "active":
            return 200, {"ok": True, "already": True, "members": len(self.view.raft_membership()),
                         "message": f"{nid} is a member already"}
        if not in_raft:
            running = await asyncio.to_thread(self._answers, admin)
            refusal = self._quorum_refusal("join", nid, raft_addr, joiner_running=running)
            if refusal is not None:
                return 409, refusal
        # Replicated first (retried, it changes nothing), so every node knows its addresses before
        # it dials in; a leaving member that joins again stays.
        answer = await self.commit(MemberAdd(nid, raft_addr, smtp, admin))
        if answer[0] != 200:
            return answer
        if not in_raft:
            ok, reason = await self._raft_change(self.raft.addNodeToCluster, raft_addr)
            if not ok:
                return 503, {"error": f"raft membership change refused: {reason}; run join again"}
        log.warning("member %s (%s) added to the cluster", nid, raft_addr)
        return 200, {"ok": True, "members": len(self.view.raft_membership())}

    async def leave(self, nid: str, timeout: float | None) -> Answer:
        """Its batches move first (they finish, or their lease expires and the scheduler
        reassigns), then the replicated removal, then pysyncobj's."""
        timeout = self.default_leave_wait if timeout is None else timeout
        member = self.view.record(nid)
        if member is None:
            return 404, {"error": f"{nid} is not a member"}
        redirect = self._not_leader()
        if redirect is not None:
            return redirect
        addresses = (member["raft"], member["smtp"], member["admin"])
        if member["raft"] not in self.view.raft_membership():
            # Removed already (a retried leave), or never in the Raft membership: the replicated
            # record follows, nothing else to do.
            for command in (MemberLeave(nid, *addresses), MemberRemove(nid)):
                if member["status"] != "removed":
                    answer = await self.commit(command)
                    if answer[0] != 200:
                        return answer
            return 200, {"ok": True, "already": True, "members": len(self.view.raft_membership()),
                         "message": f"{nid} is not in the cluster (removed)"}
        refusal = self._quorum_refusal("leave", nid, member["raft"], started=member["status"] != "active")
        if refusal is not None:
            return 409, refusal
        if member["status"] == "active":
            answer = await self.commit(MemberLeave(nid, *addresses))
            if answer[0] != 200:
                return answer
        deadline = time.monotonic() + timeout
        while self.raft.read(lambda st: any(b.node == nid for b in st.batches.values())):
            if time.monotonic() > deadline:
                return 503, {"error": f"{nid} still holds batches; it gets no new ones: run leave again to finish"}
            await asyncio.sleep(0.2)
        if nid == self.view.id:
            # The leader leaves: another member takes over and finishes (the retried leave there).
            new = await self._step_down()
            if new is None:
                return 503, {"error": f"{nid} could not hand leadership over; run leave again"}
            return 409, {"error": f"{nid} handed leadership to {new}; continue the leave there",
                         "leader": new, "continue": True}
        # Asked again now: batches may have taken long, and the node stops once removal commits.
        redirect = self._not_leader()
        if redirect is not None:
            return redirect
        refusal = self._quorum_refusal("leave", nid, member["raft"], started=True)
        if refusal is not None:
            return 409, refusal
        if self.view.record(nid)["status"] != "removed":
            # Committed while it is still a member, so it applies it and stops itself. It must have
            # applied it before it leaves the Raft membership: after that nobody tells it anything.
            answer = await self.commit(MemberRemove(nid))
            if answer[0] != 200:
                return answer
            await self._wait_applied(member["admin"], self.raft.raftLastApplied)
        ok, reason = await self._raft_change(self.raft.removeNodeFromCluster, member["raft"])
        if not ok:
            return 503, {"error": f"raft membership change refused: {reason}; run leave again"}
        log.warning("member %s (%s) removed from the cluster", nid, member["raft"])
        return 200, {"ok": True, "members": len(self.view.raft_membership())}

    def transfer(self, to: object = None) -> Answer:
        """Hand leadership to member `to` (a caught-up follower), or to the follower pysyncobj
        picks when None."""
        target = None
        if to is not None:
            member = self.view.members().get(to) if isinstance(to, str) else None
            if member is None or to == self.view.id:
                return 400, {"error": f"to must name another member; {str(to)[:64]!r} is not one"}
            target = member["raft"]
        if not self.raft.is_leader():
            return 409, {"error": "not the leader"}
        self.raft.transferLeadership(target)
        return 200, {"ok": True, "from": self.view.id, "to": to, "term": self.raft.raftCurrentTerm}

    def _not_leader(self) -> Answer | None:
        if self.raft.is_leader():
            return None
        leader = self.view.leader()
        if leader is None or leader == self.view.id:
            return 503, {"error": "no leader: the cluster has no working majority now, so its "
                                  "membership cannot change; nothing was changed"}
        return 409, {"error": f"{self.view.id} is not the leader; ask {leader}", "leader": leader}

    def _answers(self, admin: str) -> bool:
        """Whether a node's admin port answers /status now (a joining node already started)."""
        from raftmail.node.client import get_json
        try:
            get_json(admin, "/status", JOINER_PROBE_TIMEOUT, self.admin_token)
            return True
        except (OSError, ValueError):
            return False

    def _quorum_refusal(self, action: str, nid: str, raft_addr: str, started: bool = False,
                        joiner_running: bool = False) -> dict | None:
        """Why this join or leave would leave the cluster without a working majority, judged from
        the leader's real connectivity (peers connected and answering, and a joining node that
        already runs); None when it is safe."""
        me = str(self.raft.selfNode)
        reachable = {me} | set(self.raft.responsive_partners(2 * self.election_timeout_max))
        if joiner_running:
            reachable.add(raft_addr)
        voters, need, missing, size = membership_quorum(action, self.view.raft_membership(), reachable, raft_addr)
        if len(voters) >= need:
            return None
        name = lambda addr: self.view.node_of_addr(addr) or addr  # noqa: E731
        up, down = sorted(name(a) for a in voters), sorted(name(a) for a in missing)
        why = (f"{action} {nid} would leave the cluster without a working majority: "
               + (f"the {size} members with {nid} need {need} up to commit"
                  + (", " if joiner_running else f", {nid} is not started yet (start it first, then join it), ")
                  if action == "join" else
                  f"removing {nid} needs {need} of the other members up (it stops before its removal commits), ")
               + f"but the leader {self.view.id} reaches only {len(voters)} ({', '.join(up) or 'none'}); "
               f"unreachable: {', '.join(down) or 'none'}. Bring them back and run {action} again")
        why += f"; {nid} stays leaving (no new batches)" if started else "; nothing was changed"
        return {"error": why, "refused": action, "need": need, "reachable": up, "unreachable": down}

    async def _wait_applied(self, admin: str, index: int, timeout: float = APPLIED_WAIT) -> None:
        """Until the node at `admin` has applied `index` (or stopped answering, or timeout)."""
        from raftmail.node.client import get_json
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                st = await asyncio.to_thread(get_json, admin, "/status", 1.0, self.admin_token)
            except (OSError, ValueError):
                return  # gone already: nothing left to tell it
            if (st.get("applied_index") or 0) >= index:
                return
            await asyncio.sleep(0.1)

    async def _step_down(self, timeout: float = STEP_DOWN_TIMEOUT) -> str | None:
        """This leader hands leadership to a caught-up follower; the new leader's id, or None."""
        deadline = time.monotonic() + timeout
        asked = 0.0
        while time.monotonic() < deadline:
            if not self.raft.is_leader():
                leader = self.view.leader()
                if leader not in (None, self.view.id):
                    return leader
            elif time.monotonic() - asked > 0.5:  # refused while no follower is fully caught up
                self.raft.transferLeadership()
                asked = time.monotonic()
            await asyncio.sleep(0.05)
        return None

    async def _raft_change(self, change: Callable, raft_addr: str) -> tuple[bool, str]:
        loop = asyncio.get_running_loop()
        err: Any = None
        for _attempt in range(MEMBERSHIP_CHANGE_ATTEMPTS):
            fut = loop.create_future()

            def done(result, error, fut=fut):
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(error))
            change(raft_addr, callback=done)
            try:
                err = await asyncio.wait_for(fut, self.commit_timeout)
            except asyncio.TimeoutError:
                return False, "timeout"
            if err == 0:
                return True, ""
            await asyncio.sleep(MEMBERSHIP_CHANGE_RETRY)
        return False, f"error {err}"
