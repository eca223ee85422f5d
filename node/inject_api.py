"""`POST /api/inject/v1` on the public listener: KumoMTA's injection request shape, with a template
and per-recipient substitutions, committed before the reply.

The request becomes one template object in the body store (node/templates.py), stored on a
majority by intake's own path, and submissions of at most `[api] recipients_per_submission`
recipients each, which hold only the addresses and the object's digest. The reply is 200 only
once every part is committed; parts already committed under the same Idempotency-Key are not
queued again, so a retry after a 503 or a lost reply is always safe.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import ipaddress
import json
import logging
import re
import time
from datetime import datetime
from typing import Any, Callable

from aiohttp import web

from raftmail.consensus.commands import NewSubmission
from raftmail.consensus.outcomes import SUPPRESSED
from raftmail.node.auth import verify_password
from raftmail.node.config import ApiSection, Config
from raftmail.node.intake import CAMPAIGN_ID, Intake, unsubscribe_scope
from raftmail.node.templates import OWNED_HEADERS, RenderLimits, build_object, compile_problems

log = logging.getLogger("raftmail.inject")

PATH = "/api/inject/v1"
READ_CHUNK = 65536
MAX_IDEMPOTENCY_KEY = 200
MAX_ADDRESS = 254
MAX_NAME = 256
MAX_KEYS_REMEMBERED = 1024  # API keys that verified, by their hash: scrypt once per key, not per request
RETRY_AFTER = "2"
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")
_ADDRESS_BAD = re.compile(r"[\s<>(),;:\"\\\[\]\x00-\x1f\x7f]")
_MIME_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
_CAMPAIGN_ID = re.compile(CAMPAIGN_ID)


class BadRequest(Exception):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def reply(status: int, *, success: int = 0, failed: list[str] | None = None, errors: list[str] | None = None,
          submission_id: str | None = None, headers: dict | None = None) -> web.Response:
    """KumoMTA's reply fields, plus our submission_id."""
    failed = failed or []
    body = {"success_count": success, "fail_count": len(failed), "failed_recipients": failed,
            "errors": errors or [], "submission_id": submission_id}
    return web.json_response(body, status=status, headers=headers)


class Request:
    """One validated request, in the canonical form the template object stores."""

    def __init__(self, doc: Any, api: ApiSection, intake: Intake) -> None:
        errors: list[str] = []
        if not isinstance(doc, dict):
            raise BadRequest(["body: must be a JSON object"])
        known = {"envelope_sender", "content", "recipients", "substitutions", "template_dialect", "campaign_id",
                 "send_at"}
        errors += [f"{k}: unknown field" for k in doc if k not in known]
        self.sender = doc.get("envelope_sender")
        if not isinstance(self.sender, str) or not self.sender:
            errors.append("envelope_sender: required, an address like news@example.com")
        elif (why := intake.check_sender(self.sender)) or _ADDRESS_BAD.search(self.sender):
            errors.append(f"envelope_sender: {why[10:] if why else 'not an address'}")
        self.content = self._content(doc.get("content"), errors)
        subs = doc.get("substitutions", {})
        if not isinstance(subs, dict):
            errors.append("substitutions: must be an object")
        self.substitutions = subs if isinstance(subs, dict) else {}
        dialect = doc.get("template_dialect", "Jinja")
        if dialect != "Jinja":
            errors.append('template_dialect: only "Jinja" is supported')
        self.campaign = doc.get("campaign_id")
        if self.campaign is not None and (not isinstance(self.campaign, str) or not _CAMPAIGN_ID.fullmatch(self.campaign)):
            errors.append("campaign_id: 1-64 letters, digits, '.', '_', ':' or '-'")
        self.send_at = self._send_at(doc.get("send_at"), errors)
        self.rcpts: list[str] = []
        self.data: list[list] = []  # [name, substitutions] per accepted recipient
        self.failed: list[str] = []
        self._recipients(doc.get("recipients"), api, errors)
        if self.content is not None and not errors:
            limits = RenderLimits(api.max_template_bytes, api.max_rendered_bytes, api.max_render_seconds)
            errors += [f"{field}: {why}" for field, why in compile_problems(self.content, limits).items()]
        if errors:
            raise BadRequest(errors)

    @staticmethod
    def _address(value: Any) -> str | None:
        if not isinstance(value, str) or len(value) > MAX_ADDRESS or _ADDRESS_BAD.search(value):
            return None
        local, at, domain = value.rpartition("@")
        return value if at and local and "." in domain.strip(".") and "@" not in local.replace('"', "") else None

    def _mailbox(self, value: Any, field: str, errors: list[str]) -> list | None:
        """{email, name} (or a bare address) as [email, name or None]."""
        if isinstance(value, str):
            value = {"email": value}
        if not isinstance(value, dict) or self._address(value.get("email")) is None:
            errors.append(f"{field}: must be {{\"email\": \"a@example.com\", \"name\": \"...\"}} with a valid address")
            return None
        name = value.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME or not name.isprintable()):
            errors.append(f"{field}.name: a printable string of at most {MAX_NAME} characters")
            return None
        return [value["email"], name or None]

    def _content(self, c: Any, errors: list[str]) -> dict | None:
        if isinstance(c, str):
            if not c.strip():
                errors.append("content: the message template is empty")
                return None
            return {"raw": c}
        if not isinstance(c, dict):
            errors.append("content: required, an RFC 5322 message template (string) or an object with from, "
                          "subject and text_body or html_body")
            return None
        known = {"from", "reply_to", "subject", "text_body", "html_body", "headers", "attachments"}
        errors += [f"content.{k}: unknown field" for k in c if k not in known]
        out: dict[str, Any] = {"from": self._mailbox(c.get("from"), "content.from", errors)}
        out["reply_to"] = self._mailbox(c["reply_to"], "content.reply_to", errors) if c.get("reply_to") else None
        if not isinstance(c.get("subject"), str):
            errors.append("content.subject: required, a string")
        out["subject"] = c.get("subject")
        for k in ("text_body", "html_body"):
            if c.get(k) is not None and not isinstance(c[k], str):
                errors.append(f"content.{k}: must be a string")
            out[k] = c.get(k)
        if out["text_body"] is None and out["html_body"] is None:
            errors.append("content: needs text_body or html_body")
        headers = c.get("headers", {})
        out["headers"] = []
        if not isinstance(headers, dict):
            errors.append("content.headers: must be an object of header name to value")
        else:
            for name, value in headers.items():
                if not _HEADER_NAME.fullmatch(name) or name.lower() in OWNED_HEADERS:
                    errors.append(f"content.headers.{name}: not a header name the caller may set")
                elif not isinstance(value, str):
                    errors.append(f"content.headers.{name}: must be a string")
                else:
                    out["headers"].append([name, value])
        out["attachments"] = []
        attachments = c.get("attachments", [])
        if not isinstance(attachments, list):
            errors.append("content.attachments: must be a list")
            attachments = []
        for i, a in enumerate(attachments):
            field = f"content.attachments[{i}]"
            if not isinstance(a, dict) or not isinstance(a.get("data"), str):
                errors.append(f"{field}: must be {{data (base64), content_type, file_name}}")
                continue
            try:
                data = base64.b64decode(a["data"], validate=True)
            except (binascii.Error, ValueError):
                errors.append(f"{field}.data: not valid base64")
                continue
            ctype = a.get("content_type", "application/octet-stream")
            if not isinstance(ctype, str) or not _MIME_TYPE.fullmatch(ctype):
                errors.append(f"{field}.content_type: a MIME type like application/pdf")
                continue
            fname = a.get("file_name")
            if fname is not None and (not isinstance(fname, str) or not fname.isprintable() or len(fname) > 255):
                errors.append(f"{field}.file_name: a printable string of at most 255 characters")
                continue
            out["attachments"].append([data, ctype.lower(), fname])
        return out

    @staticmethod
    def _send_at(value: Any, errors: list[str]) -> float | None:
        if value is None:
            return None
        try:
            when = datetime.fromisoformat(value) if isinstance(value, str) else None
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:
            errors.append("send_at: an RFC 3339 time with a zone, like 2026-05-01T09:00:00Z")
            return None
        return when.timestamp()

    def _recipients(self, rcpts: Any, api: ApiSection, errors: list[str]) -> None:
        if not isinstance(rcpts, list) or not rcpts:
            errors.append("recipients: required, a non-empty list of {email, name, substitutions}")
            return
        if len(rcpts) > api.max_recipients:
            errors.append(f"recipients: {len(rcpts)} recipients, at most {api.max_recipients} per request "
                          "([api] max_recipients)")
            return
        for r in rcpts:
            if isinstance(r, str):
                r = {"email": r}
            email = r.get("email") if isinstance(r, dict) else None
            name = r.get("name") if isinstance(r, dict) else None
            subs = r.get("substitutions", {}) if isinstance(r, dict) else None
            if (self._address(email) is None or not isinstance(subs, dict)
                    or (name is not None and (not isinstance(name, str) or len(name) > MAX_NAME
                                              or not name.isprintable()))):
                self.failed.append(email if isinstance(email, str) else json.dumps(r)[:MAX_ADDRESS])
                continue
            self.rcpts.append(email)
            self.data.append([name, subs])
        if not self.rcpts:
            errors.append("recipients: no valid recipient address")

    def scope(self) -> str:
        """Where an unsubscribe from a copy applies: the From: domain, as for SMTP mail."""
        if "raw" in self.content:
            head = self.content["raw"].encode("utf-8", "replace")
        else:
            head = f"From: <{self.content['from'][0]}>\r\n\r\n".encode("utf-8", "replace")
        return unsubscribe_scope(self.sender, re.sub(rb"\r?\n", b"\r\n", head))


class InjectApi:
    def __init__(self, config: Config, intake: Intake, read_state: Callable[[Callable], Any]) -> None:
        self.api = config.api
        self.intake = intake
        self.read_state = read_state
        self._known_keys: dict[bytes, str] = {}
        self.counters = {"requests": 0, "accepted": 0, "recipients": 0, "refused_400": 0, "refused_401": 0,
                         "refused_413": 0, "refused_503": 0}
        self.in_allowed_network = functools.lru_cache(maxsize=4096)(self._in_allowed_network)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(PATH, self.handle)

    def _in_allowed_network(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.removeprefix("::ffff:") if "." in address else address)
        except ValueError:
            return False
        return any(ip in net for net in self.api.allow_networks if net.version == ip.version)

    async def caller(self, request: web.Request) -> str | None:
        """The caller's name ("" in allow_networks, else its key's name), or None if refused."""
        if self.in_allowed_network(request.remote or ""):
            return ""
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or "." not in key or len(key) > 512:
            return None
        digest = hashlib.sha256(key.encode("utf-8", "replace")).digest()
        if digest in self._known_keys:
            return self._known_keys[digest]
        name, _, secret = key.strip().partition(".")
        stored = self.api.keys.get(name)
        if stored is None or not await asyncio.to_thread(verify_password, secret, stored):
            return None
        if len(self._known_keys) >= MAX_KEYS_REMEMBERED:
            self._known_keys.clear()
        self._known_keys[digest] = name
        return name

    async def _body(self, request: web.Request) -> bytes | None:
        """The request body, or None when it is over max_request_bytes (stops reading there)."""
        limit = self.api.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            return None
        chunks, size = [], 0
        async for chunk in request.content.iter_chunked(READ_CHUNK):
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def handle(self, request: web.Request) -> web.Response:
        self.counters["requests"] += 1
        caller = await self.caller(request)
        if caller is None:
            self.counters["refused_401"] += 1
            return reply(401, errors=["authorization: callers outside [api] allow_networks need "
                                      "Authorization: Bearer KEY (raftmail apikey NAME makes one)"],
                         headers={"WWW-Authenticate": 'Bearer realm="raftmail"'})
        body = await self._body(request)
        if body is None:
            self.counters["refused_413"] += 1
            return reply(413, errors=[f"body: larger than [api] max_request_bytes ({self.api.max_request_bytes})"])
        idem = request.headers.get("Idempotency-Key")
        try:
            if idem is not None and not (0 < len(idem) <= MAX_IDEMPOTENCY_KEY and idem.isascii() and idem.isprintable()):
                raise BadRequest([f"Idempotency-Key: 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters"])
            try:
                doc = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BadRequest([f"body: not valid JSON: {e}"]) from None
            req = Request(doc, self.api, self.intake)
        except BadRequest as e:
            self.counters["refused_400"] += 1
            return reply(400, errors=e.errors)
        return await self.inject(req, caller, idem)

    async def inject(self, req: Request, caller: str, idem: str | None) -> web.Response:
        intake, per = self.intake, self.api.recipients_per_submission
        base = intake.new_submission_id()
        scope = hashlib.sha256(f"api\0{caller}\0{req.sender.lower()}\0{idem or base}".encode()).hexdigest()
        # With a key, the retry's parts land in the same campaign as the first try's.
        campaign = req.campaign or (f"api-{scope[:20]}" if idem else base)
        if intake.campaign_cancelled(campaign):
            return reply(409, failed=req.failed, errors=[f"campaign_id: campaign {campaign} is cancelled; "
                                                         "nothing was queued"])
        deadline = time.monotonic() + intake.limits.commit_timeout
        blob = build_object(req.content, req.substitutions, req.data, time.time())
        digest, refusal = await intake.store_body(blob, deadline, req.sender)
        if refusal:
            return self._unavailable(refusal, idem)
        from_scope = req.scope()
        entries = [NewSubmission(f"{base}.{k}", campaign, req.sender, digest, len(blob), req.rcpts[i:i + per],
                                 hashlib.sha256(f"{scope}\0{k}".encode()).hexdigest()[:32], from_scope,
                                 req.send_at, i)
                   for k, i in enumerate(range(0, len(req.rcpts), per))]
        results = await asyncio.gather(*(intake.commit(e, deadline) for e in entries))
        problems = [r for r in results if isinstance(r, str) or r[0] not in ("ok", "duplicate")]
        if problems:
            first = problems[0]
            if isinstance(first, str):
                return self._unavailable(first, idem)
            if first[0] == "cancelled":
                return reply(409, failed=req.failed, errors=[f"campaign_id: campaign {first[1]} is cancelled"])
            if first[0] == "full":
                return self._unavailable("the cluster's queue is full", idem)
            return reply(400, failed=req.failed, errors=[f"refused: {first[1]}"])
        sids = [r[1] for r in results]
        # A locked read that walks every recipient of the request: in a worker thread, off the loop.
        suppressed = await asyncio.to_thread(
            self.read_state, lambda st: [st.submissions[s].rcpts[i] for s in sids if s in st.submissions
                                         for i, v in enumerate(st.submissions[s].states) if v == SUPPRESSED])
        dup = sum(r[0] == "duplicate" for r in results)
        submission_id = sids[0].rpartition(".")[0]
        failed = req.failed + suppressed
        self.counters["accepted"] += 1
        self.counters["recipients"] += len(req.rcpts) - len(suppressed)
        log.info("injected %s: %d recipients in %d parts (%d already queued under this Idempotency-Key), "
                 "campaign %s%s", submission_id, len(req.rcpts), len(entries), dup, campaign,
                 f", send at {req.send_at}" if req.send_at else "")
        return reply(200, success=len(req.rcpts) - len(suppressed), failed=failed, submission_id=submission_id)

    def _unavailable(self, why: str, idem: str | None) -> web.Response:
        self.counters["refused_503"] += 1
        hint = ("retry with the same Idempotency-Key: parts already committed are not queued again" if idem
                else "nothing may have been queued, or a part; send an Idempotency-Key to make retries safe")
        return reply(503, errors=[f"not committed on a majority: {why.split(' ', 2)[-1] if why[:1] == '4' else why}",
                                  hint], headers={"Retry-After": RETRY_AFTER})
