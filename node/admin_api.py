"""The node's admin HTTP API: status, state reads, campaigns, events and membership changes,
behind one access check (admin token, read-only token, open routes)."""
from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from typing import Awaitable, Callable

from aiohttp import web

from raftmail.consensus.commands import CAMPAIGN_ACTIONS, Noop, campaign_command
from raftmail.consensus.raft import RaftNode
from raftmail.node.bodies import BodyStore, is_digest
from raftmail.node.config import Address
from raftmail.node.membership import MEMBER_LEAVE_MAX_WAIT, Membership
from raftmail.node.webhook import event_dict

log = logging.getLogger("raftmail.node")

MAX_NOOP_TIMEOUT = 30.0  # seconds a /cluster/noop may wait for its commit
MAX_ID_CHARS = 256  # submission and campaign ids in admin URLs
MAX_EVENTS_PER_PAGE = 10000
# Routes anyone who reaches the admin port may call: liveness, readiness without a write, metrics.
# The peer routes carry their own authentication (sealed under the cluster key).
OPEN_ROUTES = frozenset({"/healthz", "/metrics"})
PEER_ROUTE_PREFIX = "/peer/"
# POST bodies the admin routes read: what each key must be when present.
_JOIN_KEYS = ("id", "raft", "smtp", "admin")


class AdminApi:
    def __init__(self, raft: RaftNode, membership: Membership, store: BodyStore, status: Callable[[], Awaitable[dict]],
                 admin_token: str | None, read_token: str | None) -> None:
        self.raft = raft
        self.membership = membership
        self.store = store
        self.status = status
        self.admin_token = admin_token
        self.read_token = read_token

    def app(self) -> web.Application:
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
        return app

    # ---------------------------------------------------------------- access

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
        if self.admin_token is None:
            return None
        given = _bearer(request)
        if given is None:
            return _json(401, {"error": "token required: send Authorization: Bearer <[cluster] admin_token "
                                        "or read_token>"})
        if _same_token(given, self.admin_token):
            return None
        reads = request.method in ("GET", "HEAD") and canonical != "/readyz"
        if self.read_token is not None and _same_token(given, self.read_token):
            return None if reads else _json(403, {"error": "the read-only token cannot change anything: "
                                                           "use admin_token"})
        return _json(401, {"error": "wrong token"})

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
                    return _json(400, {"error": problem})
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("admin request %s %s failed", request.method, request.path)
            return _json(500, {"error": "internal error (logged on the node)"})

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        return admin_refusal(request, self.admin_token)

    # ---------------------------------------------------------------- reads

    async def _h_status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.status())

    async def _h_digest(self, request: web.Request) -> web.Response:
        def read(st):
            return {"digest": st.digest(), "commands_applied": st.applied}
        out = await asyncio.to_thread(self.raft.read, read)
        out["applied_index"] = self.raft.raftLastApplied
        return web.json_response(out)

    async def _h_submission(self, request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        if len(sid) > MAX_ID_CHARS:
            return _json(400, {"error": f"submission id longer than {MAX_ID_CHARS} characters"})

        def read(st):
            sub = st.submissions.get(sid)
            if sub is None:
                return None
            return {"id": sub.id, "campaign": sub.campaign, "sender": sub.sender, "body": sub.body,
                    "size": sub.size, "accepted_at": sub.accepted_at,
                    "recipients": [st.recipient(sid, i) for i in range(len(sub.rcpts))]}
        out = await asyncio.to_thread(self.raft.read, read)  # bounded by one submission's recipients
        if out is None:
            return _json(404, {"error": f"no submission {sid}"})
        out["body_here"] = is_digest(out["body"]) and self.store.has(out["body"])
        return web.json_response(out)

    async def _h_campaigns(self, request: web.Request) -> web.Response:
        out = await asyncio.to_thread(self.raft.read,
                                      lambda st: [st.campaign_summary(c) for c in st.campaigns.values()])
        return web.json_response({"campaigns": out})

    async def _h_events(self, request: web.Request) -> web.Response:
        try:
            after = int(request.query.get("after", "0"))
            limit = int(request.query.get("limit", "1000"))
        except ValueError:
            return _json(400, {"error": "after and limit must be integers"})
        if after < 0 or not 1 <= limit <= MAX_EVENTS_PER_PAGE:
            return _json(400, {"error": f"after must be >= 0 and limit from 1 to {MAX_EVENTS_PER_PAGE}"})
        campaign = request.query.get("campaign") or None
        if campaign is not None and len(campaign) > MAX_ID_CHARS:
            return _json(400, {"error": f"campaign longer than {MAX_ID_CHARS} characters"})
        events, oldest = await asyncio.to_thread(self.raft.read, lambda st: st.events_after(after, limit, campaign))
        return web.json_response({"events": [event_dict(e) for e in events], "oldest": oldest,
                                  "gap": after + 1 < oldest and after > 0})

    # ---------------------------------------------------------------- changes

    async def _h_campaign_action(self, request: web.Request) -> web.Response:
        denied = self._unauthorized(request)
        if denied:
            return denied
        action = request.match_info["action"]
        if action not in CAMPAIGN_ACTIONS:
            return _json(404, {"error": f"unknown action {action[:MAX_ID_CHARS]}"})
        if len(request.match_info["cid"]) > MAX_ID_CHARS:
            return _json(400, {"error": f"campaign id longer than {MAX_ID_CHARS} characters"})
        status, body = await self.membership.commit(campaign_command(action, request.match_info["cid"], time.time()))
        return _json(404 if status == 409 else status, body)

    async def _h_join(self, request: web.Request) -> web.Response:
        denied = self._unauthorized(request)
        if denied:
            return denied
        body = await _json_object(request)
        if body is None or not all(isinstance(body.get(k), str) and body.get(k) for k in _JOIN_KEYS):
            return _json(400, {"error": "join needs id, raft, smtp, admin"})
        return _json(*await self.membership.join(body["id"], body["raft"], body["smtp"], body["admin"]))

    async def _h_leave(self, request: web.Request) -> web.Response:
        denied = self._unauthorized(request)
        if denied:
            return denied
        body = await _json_object(request)
        nid = body.get("id") if body is not None else None
        timeout = body.get("timeout") if body is not None else None
        if not isinstance(nid, str) or not nid or isinstance(timeout, bool) \
                or not (timeout is None or isinstance(timeout, (int, float)) and 0 < timeout <= MEMBER_LEAVE_MAX_WAIT):
            return _json(400, {"error": f"leave needs id and a timeout of at most {MEMBER_LEAVE_MAX_WAIT:.0f} s"})
        return _json(*await self.membership.leave(nid, timeout))

    async def _h_transfer(self, request: web.Request) -> web.Response:
        """{"to": id} names the successor (it must be caught up, else nothing happens); without it
        pysyncobj picks the most caught-up follower. Best effort: poll /status for the result."""
        denied = self._unauthorized(request)
        if denied:
            return denied
        body = await _json_object(request) if request.body_exists else {}
        return _json(*self.membership.transfer((body or {}).get("to")))

    async def _h_noop(self, request: web.Request) -> web.Response:
        """A committed write, to learn that this node can commit now (drill, probes)."""
        try:
            timeout = float(request.query.get("timeout", "2"))
        except ValueError:
            timeout = math.nan
        if not 0 < timeout <= MAX_NOOP_TIMEOUT:  # also refuses nan and inf
            return _json(400, {"error": f"timeout must be a number of seconds, more than 0 and at most "
                                        f"{MAX_NOOP_TIMEOUT:g}"})
        started = time.monotonic()
        status, body = await self.membership.commit(Noop(), timeout=timeout)
        if status == 200:
            return web.json_response({"ok": True, "seconds": round(time.monotonic() - started, 4),
                                      "applied_index": self.raft.raftLastApplied})
        return _json(status, body)


def admin_refusal(request: web.Request, admin_token: str | None) -> web.Response | None:
    """401 unless the request carries the admin token (when one is set): for the calls that change
    state or hand out everything (the middleware checked already; this keeps each such handler
    safe on its own, and the read-only token out)."""
    given = _bearer(request)
    if admin_token and (given is None or not _same_token(given, admin_token)):
        return _json(401, {"error": "admin token required"})
    return None


def _json(status: int, body: dict) -> web.Response:
    return web.json_response(body, status=status)


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
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= MEMBER_LEAVE_MAX_WAIT:
            return f"timeout must be a number of seconds, more than 0 and at most {MEMBER_LEAVE_MAX_WAIT:g}"
    return None
