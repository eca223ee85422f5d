"""One raftmail node: the I/O shell that wires Raft, the body store, SMTP intake, the admin/peer
HTTP endpoint, the leader's scheduler and the sender together."""
from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import secrets
import signal
import stat
import sys
import time
from pathlib import Path

from aiohttp import web

from raftmail.consensus.journal import is_no_space
from raftmail.consensus.raft import RaftNode
from raftmail.consensus.seal import derive_key
from raftmail.node.backup import add_backup_routes
from raftmail.node.bodies import BodyRepair, BodyStore, collect_unreferenced, is_digest
from raftmail.node.bridge import ProposalFailed, Proposer
from raftmail.node.config import Address, Config, ConfigError, check_admin_exposure
from raftmail.node.intake import Intake, check_aiosmtpd, start_smtp_server
from raftmail.node.leases import LeaseClock
from raftmail.node.metrics import NodeMetrics, add_monitoring_routes
from raftmail.node.peers import PeerClient, PeerCrypto, add_peer_routes
from raftmail.node.webhook import event_dict, poster_for

log = logging.getLogger("raftmail.node")

BODY_REPAIR_INTERVAL = 1.0  # seconds between scans for bodies this node lacks
BODY_REPAIR_PARALLEL = 16  # fetches in flight at once
ADMIN_SHUTDOWN_SECONDS = 2.0  # requests still running at stop get this long to finish
PEER_PROBE_INTERVAL = 5.0  # seconds between checks that every peer shares our cluster secret
MEMBER_LEAVE_MAX_WAIT = 3600.0  # seconds a leave may wait for the leaving node's batches to move
RAFT_KEY_PURPOSE = b"raftmail raft frames v2"
MAX_NOOP_TIMEOUT = 30.0  # seconds a /cluster/noop may wait for its commit
MAX_ID_CHARS = 256  # submission and campaign ids in admin URLs
MAX_LEAVE_TIMEOUT = MEMBER_LEAVE_MAX_WAIT  # the longest wait a /cluster/leave may ask for
# Routes anyone who reaches the admin port may call: liveness, readiness without a write, metrics.
# The peer routes carry their own authentication (sealed under the cluster key).
OPEN_ROUTES = frozenset({"/healthz", "/metrics"})
PEER_ROUTE_PREFIX = "/peer/"


class MailNode:
    def __init__(self, config: Config, node_id: str, incarnation: str) -> None:
        self.config = config
        # This process's random id, announced through the log: batches are leased to it, so a
        # restarted node knows its previous process's batches without comparing clocks.
        self.incarnation = incarnation
        self.me = config.node(node_id)
        self.id = node_id
        self.data_dir = config.node_data_dir(node_id)
        writable = _check_writable(config, self.data_dir)
        self.started = time.time()
        self.store = BodyStore(self.data_dir / "bodies", cache_bytes=config.storage.body_cache_bytes)
        if not writable:
            self.store.mark_no_space(0)
        self.crypto = PeerCrypto(config.cluster.secret, config.cluster.name)
        self.peers = PeerClient(self.crypto, max_body_bytes=config.intake.max_message_bytes,
                                max_background_bytes=config.cluster.max_background_push_bytes)
        self.auth_failures = 0
        self.peers_rejecting: list[str] = []
        r = config.raft
        # Constructed in the main thread, before the loop: our own tick thread runs it.
        self.raft = RaftNode(
            str(self.me.raft), [str(n.raft) for n in config.nodes], self.data_dir / "raft",
            # A key derived from the secret through the one slow step, never the secret itself.
            password=derive_key(config.cluster.secret, config.cluster.name, RAFT_KEY_PURPOSE).hex(),
            election_timeout_min=r.election_timeout_min, election_timeout_max=r.election_timeout_max,
            heartbeat_interval=r.heartbeat_interval, connection_timeout=r.connection_timeout,
            compaction_min_entries=r.compaction_min_entries,
            compaction_min_seconds=r.compaction_min_seconds,
            snapshot_chunk_bytes=r.snapshot_chunk_bytes,
            max_frame_bytes=r.max_frame_bytes, max_pending_connections=r.max_pending_connections,
            handshake_timeout=r.handshake_timeout, journal_reserve_bytes=r.journal_reserve_bytes,
            commands_queue_size=max(1000, r.max_commands_in_flight * 4),
            fsync_journal=config.cluster.fsync,
        )
        self.metrics = NodeMetrics(self)
        self.leases = LeaseClock()
        self.raft.on_applied = self.leases.observe

    # ---------------------------------------------------------------- helpers used by parts

    def members(self) -> dict[str, dict]:
        """Every member that was not removed: the cluster file's nodes plus those that joined
        at run time (replicated), id -> {"raft", "smtp", "admin", "status"}."""
        out = {n.id: {"raft": str(n.raft), "smtp": str(n.smtp), "admin": str(n.admin), "status": "active"}
               for n in self.config.nodes}
        out.update(self.raft.read(lambda st: {k: dict(v) for k, v in st.members.items()}))
        return {k: v for k, v in out.items() if v["status"] != "removed"}

    def node_of_addr(self, addr: str | None) -> str | None:
        if not addr:
            return None
        return next((k for k, v in self.members().items() if v["raft"] == addr), None)

    def peer_admins(self) -> list[str]:
        return [v["admin"] for k, v in self.members().items() if k != self.id]

    def majority(self) -> int:
        """Of the Raft membership as it is now (pysyncobj's view, which join/leave change)."""
        return (len(self.raft.otherNodes) + 1) // 2 + 1

    def live_nodes(self) -> list[str]:
        """This node and the active peers its Raft transport is connected to (the leader's view)."""
        connected = set(self.raft.raft_status()["partners_connected"])
        members = self.members()
        live = [k for k, v in members.items() if v["raft"] in connected and v["status"] == "active"]
        return ([self.id] if members.get(self.id, {}).get("status") == "active" else []) + sorted(live)

    async def replicate_body(self, digest: str, data: bytes, timeout: float) -> int:
        need = self.majority() - 1
        if need <= 0:
            return 0
        return await self.peers.push(digest, data, self.peer_admins(), need, timeout)

    async def body(self, digest: str) -> bytes | None:
        """A body by hash: from our store, else fetched from a peer (and kept)."""
        data = self.store.recent(digest) or await asyncio.to_thread(self.store.get, digest)
        if data is not None:
            return data
        data = await self.peers.fetch(digest, self.peer_admins())
        if data is not None:
            await asyncio.to_thread(self.store.put_verified, digest, data)
            self.bodies_fetched += 1
        return data

    def storage_problems(self) -> dict[str, str]:
        """What this node cannot store now for want of disk space, by store ("journal",
        "snapshot", "bodies"); empty when all is well."""
        problems = self.raft.storage_problems()
        bodies = self.store.space_problem()
        if bodies:
            problems["bodies"] = bodies
        return problems

    # ---------------------------------------------------------------- status

    def status(self) -> dict:
        rs = self.raft.raft_status()

        def read(st):
            per_node: dict[str, int] = {}
            for b in st.batches.values():
                per_node[b.node] = per_node.get(b.node, 0) + 1
            now_min = int(time.time() // 60)
            return {
                "queue": st.queue_counts(),
                "batches_in_flight": per_node,
                "delivered_last_minute": st.delivered_minutes.get(now_min - 1, 0),
                "delivered_this_minute": st.delivered_minutes.get(now_min, 0),
                "submissions": len(st.submissions),
                "campaigns": len(st.campaigns),
                "suppressed": len(st.suppressed),
                "stats": dict(st.stats),
                "commands_applied": st.applied,
            }
        body_count, body_bytes = self.store.stats()
        return {
            "id": self.id,
            "cluster": self.config.cluster.name,
            "role": rs["role"],
            "term": rs["term"],
            "commit_index": rs["commit_index"],
            "applied_index": rs["applied_index"],
            "leader_commit_index": rs["leader_commit_index"],
            "leader": self.node_of_addr(rs["leader_addr"]),
            "has_quorum": rs["has_quorum"],
            "connected": sorted(self.node_of_addr(a) or a for a in rs["partners_connected"]),
            "leader_changes": rs["leader_changes"],
            "log_len": rs["log_len"],
            "uptime": round(time.time() - self.started, 1),
            "intake": dict(self.intake.counters),
            "intake_connections": dict(getattr(self.intake, "connections", {})),
            "bodies": {"count": body_count, "bytes": body_bytes, "fetched": self.bodies_fetched},
            "peer_auth_failures": self.auth_failures,
            "peers_rejecting_secret": self.peers_rejecting,
            "raft_auth_failures": rs["auth_failures"],
            "raft_oversized_frames": rs["oversized_frames"],
            "raft_refused_connections": rs["refused_connections"],
            "disk_full": self.storage_problems(),
            # This process announced its incarnation through the log: until then it takes no batch.
            "takes_batches": self.sender.announced(),
            **self.raft.read(read),
        }

    # ---------------------------------------------------------------- admin HTTP

    def admin_app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        r = app.router
        r.add_get("/status", self._h_status)
        r.add_get("/state/digest", self._h_digest)
        r.add_get("/state/submissions/{sid}", self._h_submission)
        r.add_get("/campaigns", self._h_campaigns)
        r.add_post("/campaigns/{cid}/{action}", self._h_campaign_action)
        r.add_get("/events", self._h_events)
        r.add_post("/cluster/join", self._h_join)
        r.add_post("/cluster/leave", self._h_leave)
        r.add_post("/cluster/transfer", self._h_transfer)
        r.add_post("/cluster/noop", self._h_noop)
        add_monitoring_routes(app, self)
        add_backup_routes(app, self)
        add_peer_routes(app, self.store, self.crypto, max_body_bytes=self.config.intake.max_message_bytes,
                        on_auth_failure=self._peer_auth_failed, max_requests=self.config.cluster.max_peer_requests)
        return app

    def _peer_auth_failed(self, peer: str) -> None:
        self.auth_failures += 1  # peers.py logs it, at most once per interval and source

    # ---------------------------------------------------------------- admin access

    def _access_refused(self, request: web.Request) -> web.Response | None:
        """None when the request may go on, else the 401/403 answer.

        With no admin_token (allowed only on a loopback admin address) every route is open. With
        one, every route but the open ones needs it; read_token may only read (GET, and /readyz
        without a write)."""
        route = request.match_info.route.resource
        canonical = route.canonical if route is not None else request.path
        if canonical.startswith(PEER_ROUTE_PREFIX) or canonical in OPEN_ROUTES:
            return None
        if canonical == "/readyz" and "write" not in request.query:
            return None
        admin, read = self.config.cluster.admin_token, self.config.cluster.read_token
        if admin is None:
            return None
        given = _bearer(request)
        if given is None:
            return web.json_response({"error": "token required: send Authorization: Bearer <[cluster] admin_token "
                                               "or read_token>"}, status=401)
        if _same_token(given, admin):
            return None
        reads = request.method in ("GET", "HEAD") and canonical != "/readyz"
        if read is not None and _same_token(given, read):
            return None if reads else web.json_response(
                {"error": "the read-only token cannot change anything: use admin_token"}, status=403)
        return web.json_response({"error": "wrong token"}, status=401)

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        """Access check first, then the request's own parameters; an unexpected error answers
        500 with no traceback (it is logged here instead)."""
        refused = self._access_refused(request)
        if refused is not None:
            return refused
        try:
            if request.method == "POST":
                problem = await _json_body_problem(request)
                if problem:
                    return web.json_response({"error": problem}, status=400)
            return await handler(request)
        except web.HTTPException:
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("admin request %s %s failed", request.method, request.path)
            return web.json_response({"error": "internal error (logged on the node)"}, status=500)

    async def _h_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _h_digest(self, request: web.Request) -> web.Response:
        def read(st):
            return {"digest": st.digest(), "commands_applied": st.applied}
        out = await asyncio.to_thread(self.raft.read, read)
        out["applied_index"] = self.raft.raftLastApplied
        return web.json_response(out)

    async def _h_submission(self, request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        if len(sid) > MAX_ID_CHARS:
            return web.json_response({"error": f"submission id longer than {MAX_ID_CHARS} characters"}, status=400)

        def read(st):
            sub = st.submissions.get(sid)
            if sub is None:
                return None
            return {"id": sub.id, "campaign": sub.campaign, "sender": sub.sender, "body": sub.body,
                    "size": sub.size, "accepted_at": sub.accepted_at,
                    "recipients": [st.recipient(sid, i) for i in range(len(sub.rcpts))]}
        out = self.raft.read(read)
        if out is None:
            return web.json_response({"error": f"no submission {sid}"}, status=404)
        out["body_here"] = is_digest(out["body"]) and self.store.has(out["body"])
        return web.json_response(out)

    async def _h_campaigns(self, request: web.Request) -> web.Response:
        out = self.raft.read(lambda st: [st.campaign_summary(c) for c in st.campaigns.values()])
        return web.json_response({"campaigns": out})

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        """State-changing calls need the cluster file's admin token, when one is set (the
        middleware checked already; this keeps each handler safe on its own)."""
        token = self.config.cluster.admin_token
        given = _bearer(request)
        if token and (given is None or not _same_token(given, token)):
            return web.json_response({"error": "admin token required"}, status=401)
        return None

    async def _propose_json(self, command: dict, timeout: float | None = None) -> web.Response:
        try:
            result = await self.proposer.propose(command, timeout or self.config.intake.commit_timeout)
        except ProposalFailed as e:
            return web.json_response({"error": f"not committed: {e.reason}"}, status=503)
        status = 409 if isinstance(result, dict) and "error" in result else 200
        return web.json_response(result, status=status)

    async def _h_events(self, request: web.Request) -> web.Response:
        try:
            after = int(request.query.get("after", "0"))
            limit = int(request.query.get("limit", "1000"))
        except ValueError:
            return web.json_response({"error": "after and limit must be integers"}, status=400)
        if after < 0 or not 1 <= limit <= 10000:
            return web.json_response({"error": "after must be >= 0 and limit from 1 to 10000"}, status=400)
        campaign = request.query.get("campaign") or None
        if campaign is not None and len(campaign) > MAX_ID_CHARS:
            return web.json_response({"error": f"campaign longer than {MAX_ID_CHARS} characters"}, status=400)
        events, oldest = self.raft.read(lambda st: st.events_after(after, limit, campaign))
        return web.json_response({"events": [event_dict(e) for e in events], "oldest": oldest,
                                  "gap": after + 1 < oldest and after > 0})

    async def _h_join(self, request: web.Request) -> web.Response:
        denied = self._unauthorized(request)
        if denied:
            return denied
        body = await _json_object(request)
        if body is None or not all(isinstance(body.get(k), str) and body.get(k) for k in ("id", "raft", "smtp", "admin")):
            return web.json_response({"error": "join needs id, raft, smtp, admin"}, status=400)
        nid, raft_addr = body["id"], body["raft"]
        owner = self.node_of_addr(raft_addr)
        if owner not in (None, nid):
            return web.json_response({"error": f"raft address {raft_addr} belongs to member {owner}"}, status=409)
        known = self._member_record(nid)
        if known and known["status"] != "removed" and known["raft"] != raft_addr:
            return web.json_response({"error": f"{nid} is a member with raft address {known['raft']}"},
                                     status=409)
        redirect = self._not_leader()
        if redirect is not None:
            return redirect
        in_raft = raft_addr in self._raft_membership()
        if in_raft and known and known["status"] == "active":
            return web.json_response({"ok": True, "already": True, "members": len(self._raft_membership()),
                                      "message": f"{nid} is a member already"})
        if not in_raft:
            refusal = self._quorum_refusal("join", nid, raft_addr)
            if refusal is not None:
                return web.json_response(refusal, status=409)
        # Replicated first (retried, it changes nothing), so every node knows its addresses before
        # it dials in; a leaving member that joins again stays.
        resp = await self._propose_json({"op": "member_add", "id": nid, "raft": raft_addr,
                                         "smtp": body["smtp"], "admin": body["admin"]})
        if resp.status != 200:
            return resp
        if not in_raft:
            ok, reason = await self._membership_change(self.raft.addNodeToCluster, raft_addr)
            if not ok:
                return web.json_response({"error": f"raft membership change refused: {reason}; "
                                                   f"run join again"}, status=503)
        log.warning("member %s (%s) added to the cluster", nid, raft_addr)
        return web.json_response({"ok": True, "members": len(self._raft_membership())})

    async def _h_leave(self, request: web.Request) -> web.Response:
        denied = self._unauthorized(request)
        if denied:
            return denied
        body = await _json_object(request)
        nid = body.get("id") if body is not None else None
        timeout = body.get("timeout", self.config.delivery.lease_seconds * 3) if body is not None else None
        if not isinstance(nid, str) or not nid or isinstance(timeout, bool) \
                or not isinstance(timeout, (int, float)) or not 0 < timeout <= MEMBER_LEAVE_MAX_WAIT:
            return web.json_response({"error": f"leave needs id and a timeout of at most "
                                               f"{MEMBER_LEAVE_MAX_WAIT:.0f} s"}, status=400)
        member = self._member_record(nid)
        if member is None:
            return web.json_response({"error": f"{nid} is not a member"}, status=404)
        redirect = self._not_leader()
        if redirect is not None:
            return redirect
        if member["raft"] not in self._raft_membership():
            # Removed already (a retried leave), or never in the Raft membership: the replicated
            # record follows, nothing else to do.
            for op in ("member_leave", "member_remove"):
                if member["status"] != "removed":
                    resp = await self._propose_json({"op": op, "id": nid, **{k: member[k] for k in ("raft", "smtp", "admin")}})
                    if resp.status != 200:
                        return resp
            return web.json_response({"ok": True, "already": True, "members": len(self._raft_membership()),
                                      "message": f"{nid} is not in the cluster (removed)"})
        refusal = self._quorum_refusal("leave", nid, member["raft"], started=member["status"] != "active")
        if refusal is not None:
            return web.json_response(refusal, status=409)
        if member["status"] == "active":
            resp = await self._propose_json({"op": "member_leave", "id": nid, **{k: member[k] for k in ("raft", "smtp", "admin")}})
            if resp.status != 200:
                return resp
        # Its batches move first: they finish, or their lease expires and the scheduler reassigns.
        deadline = time.monotonic() + timeout
        while self.raft.read(lambda st: any(b.node == nid for b in st.batches.values())):
            if time.monotonic() > deadline:
                return web.json_response({"error": f"{nid} still holds batches; it gets no new ones: "
                                                   f"run leave again to finish"}, status=503)
            await asyncio.sleep(0.2)
        if nid == self.id:
            # The leader leaves: another member takes over and finishes (the retried leave there).
            new = await self._step_down()
            if new is None:
                return web.json_response({"error": f"{nid} could not hand leadership over; run leave again"},
                                         status=503)
            return web.json_response({"error": f"{nid} handed leadership to {new}; continue the leave there",
                                      "leader": new, "continue": True}, status=409)
        # Asked again now: batches may have taken long, and the node stops once removal commits.
        redirect = self._not_leader()
        if redirect is not None:
            return redirect
        refusal = self._quorum_refusal("leave", nid, member["raft"], started=True)
        if refusal is not None:
            return web.json_response(refusal, status=409)
        if self._member_record(nid)["status"] != "removed":
            # Committed while it is still a member, so it applies it and stops itself. It must have
            # applied it before it leaves the Raft membership: after that nobody tells it anything.
            resp = await self._propose_json({"op": "member_remove", "id": nid})
            if resp.status != 200:
                return resp
            await self._wait_applied(member["admin"], self.raft.raftLastApplied)
        ok, reason = await self._membership_change(self.raft.removeNodeFromCluster, member["raft"])
        if not ok:
            return web.json_response({"error": f"raft membership change refused: {reason}; run leave again"},
                                     status=503)
        log.warning("member %s (%s) removed from the cluster", nid, member["raft"])
        return web.json_response({"ok": True, "members": len(self._raft_membership())})

    def _member_record(self, nid: str) -> dict | None:
        """A member by id whatever its status (removed ones too): the replicated record, else the
        cluster file's."""
        rec = self.raft.read(lambda st: dict(st.members[nid]) if nid in st.members else None)
        if rec is None:
            n = next((n for n in self.config.nodes if n.id == nid), None)
            if n is not None:
                rec = {"raft": str(n.raft), "smtp": str(n.smtp), "admin": str(n.admin), "status": "active"}
        return rec

    def _raft_membership(self) -> set[str]:
        """Raft addresses of the membership as pysyncobj counts it now (a change counts from the
        moment the leader appends it)."""
        return {str(self.raft.selfNode)} | {str(n) for n in self.raft.otherNodes}

    def _not_leader(self) -> web.Response | None:
        """Membership changes run on the leader: only it sees which members really answer."""
        if self.raft.is_leader():
            return None
        leader = self.node_of_addr(self.raft.raft_status()["leader_addr"])
        if leader is None or leader == self.id:
            return web.json_response({"error": "no leader: the cluster has no working majority now, so its "
                                               "membership cannot change; nothing was changed"}, status=503)
        return web.json_response({"error": f"{self.id} is not the leader; ask {leader}", "leader": leader},
                                 status=409)

    def _quorum_refusal(self, action: str, nid: str, raft_addr: str, started: bool = False) -> dict | None:
        """Why this join or leave would leave the cluster without a working majority, judged from
        the leader's real connectivity (peers connected and answering); None when it is safe."""
        me = str(self.raft.selfNode)
        reachable = {me} | set(self.raft.responsive_partners(2 * self.config.raft.election_timeout_max))
        voters, need, missing, size = membership_quorum(action, self._raft_membership(), reachable, raft_addr)
        if len(voters) >= need:
            return None
        name = lambda addr: self.node_of_addr(addr) or addr  # noqa: E731
        up, down = sorted(name(a) for a in voters), sorted(name(a) for a in missing)
        why = (f"{action} {nid} would leave the cluster without a working majority: "
               + (f"the {size} members with {nid} need {need} up to commit, {nid} is not started yet, "
                  if action == "join" else
                  f"removing {nid} needs {need} of the other members up (it stops before its removal commits), ")
               + f"but the leader {self.id} reaches only {len(voters)} ({', '.join(up) or 'none'}); "
               f"unreachable: {', '.join(down) or 'none'}. Bring them back and run {action} again")
        why += f"; {nid} stays leaving (no new batches)" if started else "; nothing was changed"
        return {"error": why, "refused": action, "need": need, "reachable": up, "unreachable": down}

    async def _wait_applied(self, admin: str, index: int, timeout: float = 5.0) -> None:
        """Until the node at `admin` has applied `index` (or stopped answering, or timeout)."""
        from raftmail.node.client import get_json
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                st = await asyncio.to_thread(get_json, admin, "/status", 1.0, self.config.cluster.admin_token)
            except (OSError, ValueError):
                return  # gone already: nothing left to tell it
            if (st.get("applied_index") or 0) >= index:
                return
            await asyncio.sleep(0.1)

    async def _step_down(self, timeout: float = 10.0) -> str | None:
        """This leader hands leadership to a caught-up follower; the new leader's id, or None."""
        deadline = time.monotonic() + timeout
        asked = 0.0
        while time.monotonic() < deadline:
            if not self.raft.is_leader():
                leader = self.node_of_addr(self.raft.raft_status()["leader_addr"])
                if leader not in (None, self.id):
                    return leader
            elif time.monotonic() - asked > 0.5:  # refused while no follower is fully caught up
                self.raft.transferLeadership()
                asked = time.monotonic()
            await asyncio.sleep(0.05)
        return None

    async def _membership_change(self, change, raft_addr: str) -> tuple[bool, str]:
        loop = asyncio.get_running_loop()
        for _attempt in range(20):  # pysyncobj refuses while a previous change is uncommitted
            fut = loop.create_future()

            def done(result, err, fut=fut):
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(err))
            change(raft_addr, callback=done)
            try:
                err = await asyncio.wait_for(fut, self.config.intake.commit_timeout)
            except asyncio.TimeoutError:
                return False, "timeout"
            if err == 0:
                return True, ""
            await asyncio.sleep(0.25)
        return False, f"error {err}"

    async def _h_transfer(self, request: web.Request) -> web.Response:
        denied = self._unauthorized(request)
        if denied:
            return denied
        if not self.raft.is_leader():
            return web.json_response({"error": "not the leader"}, status=409)
        self.raft.transferLeadership()
        return web.json_response({"ok": True, "from": self.id, "term": self.raft.raftCurrentTerm})

    async def _h_noop(self, request: web.Request) -> web.Response:
        """A committed write, to learn that this node can commit now (drill, probes)."""
        try:
            timeout = float(request.query.get("timeout", "2"))
        except ValueError:
            timeout = math.nan
        if not 0 < timeout <= MAX_NOOP_TIMEOUT:  # also refuses nan and inf
            return web.json_response({"error": f"timeout must be a number of seconds, more than 0 and at most "
                                               f"{MAX_NOOP_TIMEOUT:g}"}, status=400)
        started = time.time()
        resp = await self._propose_json({"op": "noop"}, timeout=timeout)
        if resp.status == 200:
            return web.json_response({"ok": True, "seconds": round(time.time() - started, 4),
                                      "applied_index": self.raft.raftLastApplied})
        return resp

    async def _h_campaign_action(self, request: web.Request) -> web.Response:
        denied = self._unauthorized(request)
        if denied:
            return denied
        action = request.match_info["action"]
        if action not in ("pause", "resume", "cancel"):
            return web.json_response({"error": f"unknown action {action[:MAX_ID_CHARS]}"}, status=404)
        if len(request.match_info["cid"]) > MAX_ID_CHARS:
            return web.json_response({"error": f"campaign id longer than {MAX_ID_CHARS} characters"}, status=400)
        resp = await self._propose_json({"op": action, "campaign": request.match_info["cid"], "now": time.time()})
        if resp.status == 409:
            resp.set_status(404)
        return resp

    # ---------------------------------------------------------------- maintenance

    async def repair_bodies(self) -> None:
        """Fetch bodies of unfinished submissions that this node lacks (it was down, restored
        from a snapshot, or a body it held was lost), so any node can deliver any batch."""
        slots = asyncio.Semaphore(BODY_REPAIR_PARALLEL)
        repair = BodyRepair(self.store)

        async def fetch(digest: str) -> None:
            async with slots:
                await self.body(digest)
        while True:
            await asyncio.sleep(BODY_REPAIR_INTERVAL)
            if self.store.space_problem():
                continue  # nowhere to put them (logged once, and in /metrics): fetch nothing
            try:
                # Unfinished = waiting (st.open) or in flight (held by a batch): no scan of the
                # finished ones, which may be many.
                wanted = self.raft.read(lambda st: {st.submissions[sid].body for sid in st.open}
                                        | {st.submissions[sid].body for b in st.batches.values()
                                           for sid, _ in b.items})
                missing = await asyncio.to_thread(repair.missing, wanted)
                await asyncio.gather(*(fetch(d) for d in missing))
            except Exception:
                log.exception("body repair failed")

    async def probe_peers(self) -> None:
        """pysyncobj drops a peer with another secret without a word: say it, on both sides (the
        probed node logs the failed authentication too)."""
        while True:
            await asyncio.sleep(PEER_PROBE_INTERVAL)
            rejecting = []
            for nid, info in self.members().items():
                if nid != self.id and await self.peers.probe(info["admin"]) in (401, 403):
                    rejecting.append(nid)
            for nid in sorted(set(rejecting) - set(self.peers_rejecting)):
                log.error("peer %s refuses this node's cluster secret: the two run with different "
                          "secrets and cannot replicate to each other", nid)
            self.peers_rejecting = rejecting

    async def collect_bodies(self) -> None:
        """Delete bodies that no live submission references (counted in the replicated state)
        once they are older than [storage] body_gc_grace_seconds."""
        while True:
            await asyncio.sleep(self.config.storage.maintenance_interval_seconds)
            try:
                referenced = self.raft.read(lambda st: set(st.body_refs))
                await asyncio.to_thread(collect_unreferenced, self.store, referenced,
                                        self.config.storage.body_gc_grace_seconds)
            except Exception:
                log.exception("body collection failed")

    # ---------------------------------------------------------------- life cycle

    async def run(self) -> None:
        from raftmail.node.scheduler import Scheduler
        from raftmail.node.sender import Sender

        loop = asyncio.get_running_loop()
        self.bodies_fetched = 0
        r = self.config.raft
        # Each SMTP connection has at most one submission waiting, on top of the other commands.
        self.proposer = Proposer(self.raft, loop, r.max_commands_in_flight + self.config.intake.max_connections,
                                 max_entries_in_flight=r.max_entries_in_flight, max_entry_bytes=r.max_entry_bytes)
        self.intake = Intake(self.config, self.id, self.store, self.commit_submission, self.replicate_body,
                             self.majority, campaign_cancelled=self.campaign_cancelled)
        self.intake.storage_problems = self.storage_problems
        self.metrics.watch_intake(self.intake)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        # Before the admin port opens: /status reads them.
        self.scheduler = Scheduler(self)
        self.sender = Sender(self)
        runner = web.AppRunner(self.admin_app(), access_log=None, shutdown_timeout=ADMIN_SHUTDOWN_SECONDS)
        await runner.setup()
        site = web.TCPSite(runner, self.me.admin.host, self.me.admin.port, reuse_address=True)
        await site.start()
        smtp = await start_smtp_server(self.intake, self.me.smtp.host, self.me.smtp.port,
                                       hostname=self.config.delivery.helo_name)
        tasks = [asyncio.create_task(c) for c in (self.repair_bodies(), self.collect_bodies(), self.probe_peers(),
                                                  self.scheduler.run(), self.sender.run())]
        log.info("node %s up: smtp %s, admin %s, raft %s", self.id, self.me.smtp, self.me.admin, self.me.raft)
        print(f"raftmail node {self.id} ready: smtp {self.me.smtp} admin {self.me.admin} raft {self.me.raft}",
              flush=True)
        tasks.append(asyncio.create_task(self._leave_when_removed(stop)))
        self.webhook = poster_for(self)
        if self.webhook is not None:
            tasks.append(asyncio.create_task(self.webhook.run()))
        await stop.wait()
        log.info("node %s stopping", self.id)
        self.scheduler.stopping = True
        await self._hand_over_leadership()
        smtp.close()  # stop taking new mail; transactions in progress finish below
        await asyncio.wait_for(smtp.wait_closed(), self.config.intake.commit_timeout + 1) \
            if hasattr(smtp, "wait_closed") else None
        await self.sender.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        await self.peers.close()
        self.raft.stop()

    async def _hand_over_leadership(self, timeout: float = 2.0) -> None:
        """A leader that stops asks a follower to take over first, so the outcomes this node still
        reports, and everyone else's, do not wait out an election."""
        if not self.raft.is_leader() or not self.raft.otherNodes:
            return
        self.raft.transferLeadership()
        deadline = time.monotonic() + timeout
        while self.raft.is_leader() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("leadership handed over before stopping" if not self.raft.is_leader()
                 else "leadership not handed over in time; stopping anyway")

    async def _leave_when_removed(self, stop: asyncio.Event) -> None:
        """A node removed from the cluster (raftmail leave) stops serving by itself."""
        while True:
            await asyncio.sleep(1.0)
            if self.raft.read(lambda st: st.members.get(self.id, {}).get("status")) == "removed":
                log.warning("node %s was removed from the cluster: stopping", self.id)
                stop.set()
                return

    def campaign_cancelled(self, campaign: str) -> bool:
        """From the applied state: whether `campaign` exists and is cancelled."""
        def read(st):
            camp = st.campaigns.get(campaign)
            return camp is not None and camp.cancelled
        return bool(self.raft.read(read))

    async def commit_submission(self, entry: dict, timeout: float) -> list:
        """Commit one submission; [status, detail]. The proposer's group commit packs it with
        whatever else this node proposes meanwhile."""
        result = await self.proposer.propose(
            {"op": "submit", "subs": [entry], "now": time.time(),
             "window": self.config.intake.dedupe_window_seconds,
             "max_dedupe": self.config.intake.dedupe_max_keys,
             "max_queued": self.config.intake.max_queued_recipients}, timeout)
        if not isinstance(result, list) or len(result) != 1:
            raise ProposalFailed(f"unexpected result {result!r}", unknown=True)
        return result[0]


def membership_quorum(action: str, before: set[str], reachable: set[str], addr: str) -> tuple[set[str], int, set[str], int]:
    """Raft arithmetic of one join or leave of `addr`, from the leader's view: (the members that
    can vote through it, how many must, the members of the new membership that are unreachable,
    the new membership's size). The change is safe when len(voters) >= need.

    pysyncobj changes the membership one node at a time, and the leader counts the new membership
    from the moment it appends the change, so the change itself commits only with a majority of
    the new membership. A joining node is not started yet: until it is, the old members must make
    that majority alone ({n1,n2,n3} + n4 needs 3 of n1..n3). A leaving node stops itself before
    its removal commits, so the others must make a majority of the membership with it and of the
    one without it ({n1,n2,n3} - n2 needs n1 and n3)."""
    if action == "join":
        after = before | {addr}
        return reachable & before, len(after) // 2 + 1, before - reachable, len(after)
    after = before - {addr}
    return reachable & after, max(len(before), len(after)) // 2 + 1, after - reachable, len(after)


async def _json_object(request: web.Request) -> dict | None:
    """A request's JSON object body, or None when it is not one."""
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _same_token(given: str, expected: str) -> bool:
    # Constant time: the comparison must not tell an attacker how many leading characters match.
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


# POST bodies the admin routes read: what each key must be when present.
_JOIN_KEYS = ("id", "raft", "smtp", "admin")


async def _json_body_problem(request: web.Request) -> str | None:
    """Why a POST body is not acceptable (not a JSON object, a malformed field), or None."""
    if not request.body_exists:
        return None
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return "the request body must be a JSON object"
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    for key in _JOIN_KEYS:
        if key in body and (not isinstance(body[key], str) or not 0 < len(body[key]) <= MAX_ID_CHARS):
            return f"{key} must be a string of 1-{MAX_ID_CHARS} characters"
    for key in ("raft", "smtp", "admin"):
        if key in body:
            try:
                Address.parse(body[key])
            except ValueError as e:
                return f"{key}: {e}"
    if "timeout" in body:
        t = body["timeout"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= MAX_LEAVE_TIMEOUT:
            return f"timeout must be a number of seconds, more than 0 and at most {MAX_LEAVE_TIMEOUT:g}"
    return None


def _check_writable(config: Config, path: Path) -> bool:
    """Refuse a data dir the node cannot write; False (not an error) when only space is lacking:
    the node then starts refusing submissions, and takes them again once space is freed."""
    probe = path / ".write-probe"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            # Made by an older build (0755): the journal and bodies inside are nobody else's business.
            path.chmod(0o700)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        if is_no_space(e):
            probe.unlink(missing_ok=True)
            log.error("disk full at start: %s (%s); refusing submissions until there is space", path, e.strerror)
            return False
        raise ConfigError(config.path, "[cluster] data_dir", f"{path} is not writable: {e.strerror}") from None
    return True


def _warn_if_readable(config: Config) -> None:
    try:
        mode = stat.S_IMODE(config.path.stat().st_mode)
    except OSError:
        return
    if mode & 0o004:
        log.warning("%s is readable by every user of this machine (mode %o) and holds the cluster secret: "
                    "chmod o-r it (0640 or 0600)", config.path, mode)


def run_node(config: Config, node_id: str) -> None:
    # Before any file is made: the journal, metadata, bodies and their folders are ours alone.
    os.umask(0o077)
    check_admin_exposure(config, node_id)
    # Three busy threads share the GIL (event loop, Raft tick, disk workers): hand it over more
    # often than every 5 ms, or each Raft round trip waits on it several times.
    sys.setswitchinterval(0.0005)
    check_aiosmtpd()  # before anything starts: intake must not run on internals that are gone
    node = MailNode(config, node_id, secrets.token_hex(8))
    _warn_if_readable(config)  # after every refusal, which must stay the only line printed
    asyncio.run(node.run())
