"""The node's public HTTP listener (`[[node]] http`), meant to sit behind the operator's load
balancer: RFC 8058 one-click unsubscribe and the injection API (node/inject_api.py), nothing else
of the node. The admin port stays private.

`POST /u/{token}` with `List-Unsubscribe=One-Click` suppresses and answers 2xx only once that is
committed; `GET /u/{token}` only shows a page with a button that POSTs (mail scanners follow links,
so a GET never changes anything); a token no key made gets 404 and changes nothing.
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from raftmail.node.config import Address
from raftmail.node.feedback import FeedbackDesk
from raftmail.node.inject_api import InjectApi

log = logging.getLogger("raftmail.public")

MAX_BODY_BYTES = 4096  # the one-click body is 26 bytes; a form with a few fields fits
SHUTDOWN_SECONDS = 2.0
ONE_CLICK = "One-Click"

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<meta name="robots" content="noindex"><title>{title}</title></head>
<body style="font-family:sans-serif;max-width:32em;margin:3em auto">
<h1>{title}</h1>
{body}
</body></html>
"""
_FORM = """<p>Stop receiving these emails at this address?</p>
<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">Unsubscribe</button></form>"""


def _page(status: int, title: str, body: str) -> web.Response:
    return web.Response(status=status, text=_PAGE.format(title=title, body=body), content_type="text/html",
                        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


class PublicHttp:
    def __init__(self, desk: FeedbackDesk, max_requests: int, inject: InjectApi | None = None) -> None:
        self.desk = desk
        self.inject = inject
        self.busy = asyncio.Semaphore(max_requests)
        self.max_requests = max_requests

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._bounded])
        app.router.add_get("/u/{token}", self._h_get)
        app.router.add_post("/u/{token}", self._h_post)
        app.router.add_get("/healthz", self._h_health)
        if self.inject is not None:
            self.inject.add_routes(app)  # reads its own body, up to [api] max_request_bytes
        return app

    @web.middleware
    async def _bounded(self, request: web.Request, handler) -> web.StreamResponse:
        # At most max_requests at once: the rest are told to come back, the node stays responsive.
        if self.busy.locked():
            return web.Response(status=503, text="busy, try again\n", headers={"Retry-After": "1"})
        async with self.busy:
            try:
                return await handler(request)
            except web.HTTPException:
                raise
            except Exception:
                log.exception("public request %s %s failed", request.method, request.path)
                return web.Response(status=500, text="internal error\n")

    async def _h_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _h_get(self, request: web.Request) -> web.Response:
        if not self.desk.link_valid(request.match_info["token"]):
            return _page(404, "Unknown link", "<p>This unsubscribe link is not valid.</p>")
        return _page(200, "Unsubscribe", _FORM)

    async def _h_post(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        if not self.desk.link_valid(token):
            return _page(404, "Unknown link", "<p>This unsubscribe link is not valid.</p>")
        try:
            form = await request.post()  # urlencoded or multipart, both as RFC 8058 allows
        except ValueError:
            return _page(400, "Bad request", "<p>The request body is not a form.</p>")
        if form.get("List-Unsubscribe") != ONE_CLICK:
            return _page(400, "Bad request", "<p>Expected List-Unsubscribe=One-Click.</p>")
        status, what = await self.desk.unsubscribe(token)
        if status == 200:
            return _page(200, "Unsubscribed", "<p>You will receive no more of these emails.</p>")
        return _page(status, "Not done", f"<p>The unsubscribe was not recorded ({what}).</p>")


async def start_public_http(desk: FeedbackDesk, address: Address, max_requests: int,
                            inject: InjectApi | None = None) -> web.AppRunner:
    runner = web.AppRunner(PublicHttp(desk, max_requests, inject).app(), access_log=None,
                           shutdown_timeout=SHUTDOWN_SECONDS)
    await runner.setup()
    await web.TCPSite(runner, address.host, address.port, reuse_address=True).start()
    return runner
