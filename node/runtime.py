"""One raftmail node: the I/O shell that wires Raft, the body store, SMTP intake, the admin/peer
HTTP endpoint, the leader's scheduler and the sender together."""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import stat
import sys
import time
from pathlib import Path

from aiohttp import web

from raftmail.consensus.commands import NewSubmission, Submit
from raftmail.consensus.journal import is_no_space
from raftmail.consensus.pysyncobj_compat import check_pysyncobj
from raftmail.consensus.raft import RaftNode
from raftmail.consensus.seal import derive_key
from raftmail.consensus.view import StateView
from raftmail.node.admin_api import AdminApi
from raftmail.node.backup import add_backup_routes
from raftmail.node.bodies import BodyStore
from raftmail.node.bridge import ProposalFailed, Proposer
from raftmail.node.config import Config, ConfigError, check_admin_exposure, load_config
from raftmail.node.feedback import FeedbackDesk
from raftmail.node.inject_api import InjectApi
from raftmail.node.intake import Intake
from raftmail.node.public_http import start_public_http
from raftmail.node.suppression_api import SuppressionApi
from raftmail.node.smtp_server import check_aiosmtpd, start_smtp_server
from raftmail.node.leases import LeaseClock
from raftmail.node.maintenance import Maintenance
from raftmail.node.membership import ClusterView, Membership
from raftmail.node.metrics import NodeMetrics, NodeSources, add_monitoring_routes
from raftmail.node.peer_client import PeerClient
from raftmail.node.peer_server import add_peer_routes
from raftmail.node.peer_wire import PeerCrypto
from raftmail.node.readview import ReadView
from raftmail.node.scheduler import Scheduler, backoff_status, warmup_status
from raftmail.node.sites import check_source_addresses
from raftmail.node.tasks import Tasks
from raftmail.node.webhook import poster_for

log = logging.getLogger("raftmail.node")

ADMIN_SHUTDOWN_SECONDS = 2.0  # requests still running at stop get this long to finish
HAND_OVER_SECONDS = 2.0  # a stopping leader waits this long for a follower to take over
RAFT_KEY_PURPOSE = b"raftmail raft frames v2"


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
        self.peers = PeerClient(self.crypto, max_body_bytes=config.max_body_bytes(),
                                max_background_bytes=config.cluster.max_background_push_bytes)
        self.auth_failures = 0
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
        # What the event loop reads of the replicated state, made by the tick thread after it applies.
        self.read_view = ReadView(node_id, self.raft.is_leader)
        self.raft.read(self.read_view.publish)
        self.raft.on_tick = self.read_view.publish
        self.raft.on_tick_wanted = self.read_view.heads_wanted
        self.view = ClusterView(config, node_id, self.raft, records=lambda: self.read_view.current.members)
        self.maintenance = Maintenance(self.raft, self.view_now, self.store, self.view, self.peers, self.body,
                                       interval=config.storage.maintenance_interval_seconds,
                                       body_gc_grace=config.storage.body_gc_grace_seconds)
        self.tasks = Tasks()
        self.bodies_fetched = 0
        self.metric_sources = NodeSources(node_id, config.cluster.name, config.monitoring, self.raft, self.view_now,
                                          self.view.members, self.storage_problems, self.store,
                                          lambda: self.bodies_fetched, self.tasks)
        self.metrics = NodeMetrics(self.metric_sources, frozenset(config.delivery.domains))
        self.leases = LeaseClock()
        self.raft.on_applied = self.leases.observe

    # ---------------------------------------------------------------- helpers used by parts

    async def replicate_body(self, digest: str, data: bytes, timeout: float) -> int:
        need = self.view.majority() - 1
        if need <= 0:
            return 0
        return await self.peers.push(digest, data, self.view.peer_admins(), need, timeout)

    async def body(self, digest: str) -> bytes | None:
        """A body by hash: from our store, else fetched from a peer (and kept)."""
        data = self.store.recent(digest) or await asyncio.to_thread(self.store.get, digest)
        if data is not None:
            return data
        data = await self.peers.fetch(digest, self.view.peer_admins())
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

    def view_now(self) -> StateView:
        """The replicated state as the tick thread last published it (no lock)."""
        return self.read_view.current

    # ---------------------------------------------------------------- status

    async def status(self) -> dict:
        rs = self.raft.raft_status()
        v = self.read_view.current
        now_min = int(time.time() // 60)
        replicated = {
            "queue": v.queue_counts(),
            "batches_in_flight": dict(v.node_batches),
            "delivered_last_minute": v.delivered_minutes.get(now_min - 1, 0),
            "delivered_this_minute": v.delivered_minutes.get(now_min, 0),
            "submissions": v.submissions,
            "campaigns": v.campaigns,
            "suppressed": v.suppressed,
            "backoff": backoff_status(v, self.config.delivery, time.time()),
            "warmup": warmup_status(v, self.config.delivery, time.time()),
            "stats": dict(v.stats),
            "commands_applied": v.applied,
            # Commands applied that the view above does not show yet (it follows within a tick).
            "view_behind": max(0, self.raft.state.applied - v.applied),
        }
        body_count, body_bytes = await asyncio.to_thread(self.store.stats)  # a walk of the store
        return {
            "id": self.id,
            "cluster": self.config.cluster.name,
            "role": rs["role"],
            "term": rs["term"],
            "commit_index": rs["commit_index"],
            "applied_index": rs["applied_index"],
            "leader_commit_index": rs["leader_commit_index"],
            "leader": self.view.node_of_addr(rs["leader_addr"]),
            "has_quorum": rs["has_quorum"],
            "connected": sorted(self.view.node_of_addr(a) or a for a in rs["partners_connected"]),
            # The replicated membership (not who is reachable now): id -> active or leaving.
            "members": {nid: m["status"] for nid, m in sorted(self.view.members().items())},
            "leader_changes": rs["leader_changes"],
            "log_len": rs["log_len"],
            "uptime": round(time.time() - self.started, 1),
            "intake": dict(self.intake.counters),
            "intake_connections": dict(self.intake.connections),
            "bodies": {"count": body_count, "bytes": body_bytes, "fetched": self.bodies_fetched},
            "peer_auth_failures": self.auth_failures,
            "peers_rejecting_secret": self.maintenance.peers_rejecting,
            "raft_auth_failures": rs["auth_failures"],
            "raft_oversized_frames": rs["oversized_frames"],
            "raft_refused_connections": rs["refused_connections"],
            "disk_full": self.storage_problems(),
            # This process announced its incarnation through the log: until then it takes no batch.
            "takes_batches": self.sender.announced(),
            "task_crashes": self.tasks.crashes,
            "feedback": dict(self.feedback.counters),
            "inject": dict(self.inject.counters),
            **replicated,
        }

    def admin_app(self) -> web.Application:
        cluster = self.config.cluster
        membership = Membership(self.view, self.raft, self.proposer.propose, self.config.intake.commit_timeout,
                                self.config.raft.election_timeout_max, self.config.delivery.lease_seconds,
                                cluster.admin_token)
        app = AdminApi(self.raft, membership, self.store, self.status, cluster.admin_token, cluster.read_token).app()
        SuppressionApi(self.raft, membership.commit, cluster.admin_token).add_routes(app)
        add_monitoring_routes(app, self.metrics, self.started)
        add_backup_routes(app, self.raft, cluster.admin_token, cluster.name, self.id, self.body)
        add_peer_routes(app, self.store, self.crypto, max_body_bytes=self.config.max_body_bytes(),
                        on_auth_failure=self._peer_auth_failed, max_requests=cluster.max_peer_requests)
        return app

    def _peer_auth_failed(self, peer: str) -> None:
        self.auth_failures += 1  # peers.py logs it, at most once per interval and source

    # ---------------------------------------------------------------- life cycle

    async def reload_dkim(self) -> None:
        """SIGHUP: sign with the [[delivery.dkim]] entries the cluster file holds now (a new
        selector, a new brand) without a restart; a file that does not load changes nothing."""
        try:
            entries = (await asyncio.to_thread(load_config, self.config.path)).delivery.dkim
            self.sender.use_dkim(entries)
        except (ConfigError, ValueError, OSError) as e:
            log.error("SIGHUP: DKIM keys not reloaded, still signing as before: %s", e)
            return
        log.info("SIGHUP: DKIM keys reloaded: %s",
                 ", ".join(f"{e.domain}/{e.selector}" + (" (default)" if e.default else "") for e in entries) or "none")

    async def run(self) -> None:
        from raftmail.node.sender import Sender
        from raftmail.node.templates import RenderLimits

        loop = asyncio.get_running_loop()
        self.read_view.attach(loop)
        r = self.config.raft
        # Each SMTP connection has at most one submission waiting, on top of the other commands.
        self.proposer = Proposer(self.raft, loop, r.max_commands_in_flight + self.config.intake.max_connections,
                                 max_entries_in_flight=r.max_entries_in_flight, max_entry_bytes=r.max_entry_bytes)
        self.intake = Intake(self.config, self.id, self.store, self.commit_submission, self.replicate_body,
                             self.view.majority, campaign_cancelled=self.campaign_cancelled,
                             storage_problems=self.storage_problems, in_quorum=self.raft.in_quorum,
                             applied_answer=self.applied_answer)
        sources = self.metric_sources
        sources.propose, sources.intake_connections = self.proposer.propose, lambda: self.intake.connections
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.tasks.start(self.reload_dkim(), "dkim reload"))

        # Before the admin port opens: /status reads them.
        c = self.config
        self.feedback = FeedbackDesk(c, self.id, self.proposer.propose)
        sources.feedback_counters = lambda: self.feedback.counters
        self.inject = InjectApi(c, self.intake, self.raft.read)
        self.scheduler = Scheduler(self.view_now, self.read_view.with_heads, self.proposer.propose, c.delivery,
                                   c.intake, c.storage, self.leases,
                                   self.view.live_nodes, self.raft.is_leader, lambda: self.raft.raftCurrentTerm)
        api = c.api
        self.sender = Sender(self.id, self.incarnation, c.delivery, c.feedback, c.intake.commit_timeout, self.view_now,
                             self.proposer.propose, self.raft.read, self.raft.raft_status, self.leases.applied_at,
                             self.body, self.tasks, self.metrics,
                             RenderLimits(api.max_template_bytes, api.max_rendered_bytes, api.max_render_seconds))
        runner = web.AppRunner(self.admin_app(), access_log=None, shutdown_timeout=ADMIN_SHUTDOWN_SECONDS)
        await runner.setup()
        site = web.TCPSite(runner, self.me.admin.host, self.me.admin.port, reuse_address=True)
        await site.start()
        smtp = await start_smtp_server(self.intake, self.me.smtp.host, self.me.smtp.port,
                                       hostname=self.config.delivery.helo_name, observer=self.metrics,
                                       feedback=self.feedback)
        public = None if self.me.http is None else await start_public_http(
            self.feedback, self.me.http, self.config.feedback.max_http_requests, self.inject)
        m = self.maintenance
        for name, loop_fn in (("body repair", m.repair_bodies), ("body collection", m.collect_bodies),
                              ("peer probe", m.probe_peers), ("scheduler", self.scheduler.run),
                              ("sender", self.sender.run)):
            self.tasks.keep(loop_fn, name)
        self.tasks.start(m.stop_when_removed(stop), "removal watch")
        self.webhook = poster_for(c.monitoring, self.data_dir / "webhook.cursor", self.raft,
                                  lambda: self.read_view.current.event_seq, c.cluster.name, self.id)
        if self.webhook is not None:
            sources.webhook = self.webhook
            self.tasks.keep(self.webhook.run, "webhook")
        log.info("node %s up: smtp %s, admin %s, raft %s%s", self.id, self.me.smtp, self.me.admin, self.me.raft,
                 f", public http {self.me.http}" if self.me.http else "")
        print(f"raftmail node {self.id} ready: smtp {self.me.smtp} admin {self.me.admin} raft {self.me.raft}",
              flush=True)
        await stop.wait()
        log.info("node %s stopping", self.id)
        self.scheduler.stopping = True
        await self._hand_over_leadership()
        smtp.close()  # stop taking new mail; transactions in progress finish below
        await asyncio.wait_for(smtp.wait_closed(), self.config.intake.commit_timeout + 1) \
            if hasattr(smtp, "wait_closed") else None
        await self.sender.stop()
        await self.tasks.stop()
        if public is not None:
            await public.cleanup()
        await runner.cleanup()
        await self.peers.close()
        self.raft.stop()

    async def _hand_over_leadership(self, timeout: float = HAND_OVER_SECONDS) -> None:
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

    def campaign_cancelled(self, campaign: str) -> bool:
        """From the applied state: whether `campaign` exists and is cancelled."""
        def read(st):
            camp = st.campaigns.get(campaign)
            return camp is not None and camp.cancelled
        return bool(self.raft.read(read))

    def applied_answer(self, entry: NewSubmission) -> list | None:
        """A submission's answer as this node's applied state shows it (None if it does not)."""
        return self.raft.read(lambda st: st.submission_answer(entry.id, entry.key, entry.rcpts))

    async def commit_submission(self, entry: NewSubmission, timeout: float) -> list:
        """Commit one submission; [status, detail]. The proposer's group commit packs it with
        whatever else this node proposes meanwhile."""
        i = self.config.intake
        result = await self.proposer.propose(
            Submit(time.time(), i.dedupe_window_seconds, i.max_queued_recipients, [entry], i.dedupe_max_keys), timeout)
        if not isinstance(result, list) or len(result) != 1:
            raise ProposalFailed(f"unexpected result {result!r}", unknown=True)
        return result[0]


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
    check_source_addresses(config.delivery, node_id, str(config.path))
    # Three busy threads share the GIL (event loop, Raft tick, disk workers): hand it over more
    # often than every 5 ms, or each Raft round trip waits on it several times.
    sys.setswitchinterval(0.0005)
    # Before anything starts: no fix of ours may silently stop applying because a library changed.
    check_aiosmtpd()
    check_pysyncobj()
    node = MailNode(config, node_id, secrets.token_hex(8))
    _warn_if_readable(config)  # after every refusal, which must stay the only line printed
    asyncio.run(node.run())
