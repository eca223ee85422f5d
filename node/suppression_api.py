"""Admin routes of the suppression list (behind AdminApi's access check: reads take the read
token, changes the admin token): list, look up, export, add, remove, import in batches."""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any, Awaitable, Callable

from aiohttp import web

from raftmail.consensus.raft import RaftNode
from raftmail.consensus.commands import (MAX_ITEMS_PER_COMMAND, Suppress, SuppressMany, Unsuppress, valid_address,
                                         valid_scope)
from raftmail.consensus.suppression import entry_dict, lookup
from raftmail.node.admin_api import admin_refusal

MAX_LIST = 10000  # entries per GET /suppressions page
EXPORT_CHUNK = 5000  # entries written per chunk of an export

Commit = Callable[..., Awaitable[tuple[int, Any]]]


class SuppressionApi:
    def __init__(self, raft: RaftNode, commit: Commit, admin_token: str | None) -> None:
        self.raft = raft
        self.commit = commit
        self.admin_token = admin_token

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/suppressions", self._h_list)
        r.add_get("/suppressions/export", self._h_export)
        r.add_post("/suppressions", self._h_add)
        r.add_post("/suppressions/remove", self._h_remove)
        r.add_post("/suppressions/import", self._h_import)

    async def _h_list(self, request: web.Request) -> web.Response:
        address = request.query.get("address")
        if address is not None:
            found = await asyncio.to_thread(self.raft.read, lambda st: lookup(st, address))
            return web.json_response({"entries": found})
        try:
            limit = int(request.query.get("limit", "100"))
            offset = int(request.query.get("offset", "0"))
        except ValueError:
            return _error(400, "limit and offset must be integers")
        if not 1 <= limit <= MAX_LIST or offset < 0:
            return _error(400, f"limit must be 1-{MAX_LIST} and offset >= 0")

        def page(st: Any) -> tuple[int, list[dict]]:
            items = itertools.islice(st.suppressed.items(), offset, offset + limit)
            return len(st.suppressed), [entry_dict(k, e) for k, e in items]
        total, entries = await asyncio.to_thread(self.raft.read, page)
        return web.json_response({"total": total, "offset": offset, "entries": entries})

    async def _h_export(self, request: web.Request) -> web.StreamResponse:
        """Every entry, one JSON object per line: copied under the state's lock in one step (a
        million entries take a fraction of a second), written out without it."""
        items = await asyncio.to_thread(self.raft.read, lambda st: list(st.suppressed.items()))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for start in range(0, len(items), EXPORT_CHUNK):
            chunk = "".join(json.dumps(entry_dict(k, e)) + "\n" for k, e in items[start:start + EXPORT_CHUNK])
            await response.write(chunk.encode())
        await response.write_eof()
        return response

    async def _body(self, request: web.Request) -> dict | web.Response:
        denied = admin_refusal(request, self.admin_token)
        if denied:
            return denied
        try:
            body = await request.json()
        except ValueError:
            body = None
        return body if isinstance(body, dict) else _error(400, "the request body must be a JSON object")

    async def _h_add(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        address, scope, reason = body.get("address"), body.get("scope", ""), body.get("reason", "operator")
        if not valid_address(address) or not valid_scope(scope) or not isinstance(reason, str):
            return _error(400, "address must be an email address, scope a domain or empty, reason a string")
        status, answer = await self.commit(Suppress(address, time.time(), reason, scope, "operator"))
        return web.json_response(answer, status=400 if status == 409 else status)

    async def _h_remove(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        address, scope = body.get("address"), body.get("scope", "")
        if not isinstance(address, str) or not address or not valid_scope(scope):
            return _error(400, "address must be a string and scope a domain or empty")
        status, answer = await self.commit(Unsuppress(address, scope))
        if status == 200 and not answer.get("ok"):
            return _error(404, f"{address} is not suppressed" + (f" for {scope}" if scope else ""))
        return web.json_response(answer, status=400 if status == 409 else status)

    async def _h_import(self, request: web.Request) -> web.Response:
        """One batch of an import: {"entries": [[address, scope, reason], ...]}, at most
        MAX_ITEMS_PER_COMMAND rows, committed as one command; bad rows are counted."""
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        rows = body.get("entries")
        if not isinstance(rows, list) or not 0 < len(rows) <= MAX_ITEMS_PER_COMMAND:
            return _error(400, f"entries must be a list of 1-{MAX_ITEMS_PER_COMMAND} [address, scope, reason] rows")
        valid = [(r[0], r[1], r[2]) for r in rows
                 if isinstance(r, list) and len(r) == 3 and valid_address(r[0]) and valid_scope(r[1])
                 and isinstance(r[2], str)]
        invalid = len(rows) - len(valid)
        if not valid:
            return web.json_response({"added": 0, "already": 0, "invalid": invalid})
        status, answer = await self.commit(SuppressMany(time.time(), valid, "import"))
        if status == 200:
            answer = {**answer, "invalid": invalid}
        return web.json_response(answer, status=400 if status == 409 else status)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
