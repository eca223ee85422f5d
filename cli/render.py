"""Human tables for the CLI (rich)."""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from raftmail.consensus.domains import domain_of


def print_status(view: dict) -> None:
    console = Console()
    t = Table(title=f"cluster {view['cluster']}")
    for col in ("node", "reachable", "role", "term", "commit", "applied", "lag", "batches", "smtp"):
        t.add_column(col)
    for n in view["nodes"]:
        t.add_row(n["id"], "yes" if n["reachable"] else f"no ({n['error']})", n["role"] or "-",
                  str(n["term"] if n["term"] is not None else "-"),
                  str(n["commit_index"] if n["commit_index"] is not None else "-"),
                  str(n["applied_index"] if n["applied_index"] is not None else "-"),
                  str(n["lag"] if n["lag"] is not None else "-"),
                  str(n["batches_in_flight"] if n["batches_in_flight"] is not None else "-"), n["smtp"])
    console.print(t)
    if view["leader"]:
        console.print(f"leader: {view['leader']}   quorum: {view['in_quorum']} of {len(view['nodes'])} "
                      f"(majority {view['majority']}); can lose {view['can_lose']} more node(s)")
    else:
        console.print("[bold red]no leader with a quorum is reachable: intake answers 4xx[/]")
    q = view.get("queue") or {}
    if q:
        console.print("queue: " + "  ".join(f"{k} {v}" for k, v in q.items()))
    if view.get("delivered_last_minute") is not None:
        console.print(f"delivered in the last full minute: {view['delivered_last_minute']}")
    for domain, b in (view.get("backoff") or {}).items():
        limits = f"{b['max_connections']} connections, {b['max_per_minute'] or 'unlimited'} per minute"
        state = f"[bold red]suspended {b['suspended_for']:.0f}s more[/]" if b["suspended_for"] > 0 else limits
        console.print(f"backoff: {domain} level {b['level']}: {state} ({b['reason']})")
    for address, w in (view.get("warmup") or {}).items():
        busiest = max(w["sites"].values(), default=0)
        console.print(f"warm-up: {address} (pool {w['pool']}, node {w['node']}): {w['cap']} per site today, "
                      f"{len(w['sites'])} site(s) served, busiest {busiest}")
    stats = view.get("stats") or {}
    if stats:
        errors = stats.get("apply_errors", 0)
        console.print(f"commands refused: {stats.get('commands_refused', 0)}   apply errors: "
                      + (f"[bold red]{errors} (a bug: see the nodes' logs)[/]" if errors else "0"))


def print_campaigns(campaigns: list[dict]) -> None:
    t = Table(title="campaigns")
    for col in ("campaign", "state", "recipients", "delivered", "deferred", "bounced", "suppressed",
                "cancelled", "expired", "pending", "in flight", "done"):
        t.add_column(col)
    for c in campaigns:
        k = c["counts"]
        state = "cancelled" if c["cancelled"] else "paused" if c["paused"] else "active"
        t.add_row(c["id"], state, str(c["recipients"]), *(str(k[s]) for s in (
            "delivered", "deferred", "bounced", "suppressed", "cancelled", "expired", "pending", "in_flight")),
            f"{c['percent_done']:.1f}%")
    Console().print(t)


# ------------------------------------------------------------------ live view (status --watch)

FINAL_OUTCOMES = frozenset({"delivered", "bounced", "suppressed", "cancelled", "expired"})
WATCH_WINDOW = 60.0  # seconds of outcome events behind the per-domain rates and campaign estimates
WATCH_MAX_DOMAINS = 10  # busiest destination domains shown
WATCH_BAR_WIDTH = 30


class WatchModel:
    """What the live view shows, folded from successive polls of the cluster."""

    def __init__(self, window: float = WATCH_WINDOW, max_domains: int = WATCH_MAX_DOMAINS) -> None:
        self.window = window
        self.max_domains = max_domains
        self.view: dict = {}
        self.ready: dict[str, tuple[bool | None, str]] = {}
        self.campaigns: list[dict] = []
        self.recent: deque[tuple[float, str, str, str]] = deque()  # (t, domain, outcome, campaign)
        self.now = 0.0

    def update(self, view: dict, ready: dict[str, tuple[bool | None, str]], campaigns: list[dict],
               events: list[dict], now: float) -> None:
        self.view, self.ready, self.campaigns, self.now = view, ready, campaigns, now
        for e in events:
            if e["t"] > now - self.window:
                self.recent.append((e["t"], domain_of(e["recipient"]), e["outcome"], e["campaign"]))
        while self.recent and self.recent[0][0] <= now - self.window:
            self.recent.popleft()

    def domain_rates(self) -> list[tuple[str, float, float, float]]:
        """(domain, delivered, deferred, bounced) per minute over the window, busiest first."""
        per: dict[str, list[int]] = {}
        for _t, domain, outcome, _c in self.recent:
            row = per.setdefault(domain, [0, 0, 0])
            if outcome in ("delivered", "deferred", "bounced"):
                row[("delivered", "deferred", "bounced").index(outcome)] += 1
        scale = 60.0 / self.window
        rows = [(d, r[0] * scale, r[1] * scale, r[2] * scale) for d, r in per.items()]
        return sorted(rows, key=lambda r: -(r[1] + r[2] + r[3]))[:self.max_domains]

    def campaign_rows(self) -> list[dict]:
        """Campaigns not finished, with the fraction done and an estimate of the seconds left
        (None when nothing finished within the window)."""
        finals: dict[str, int] = {}
        for _t, _d, outcome, cid in self.recent:
            if outcome in FINAL_OUTCOMES:
                finals[cid] = finals.get(cid, 0) + 1
        rows = []
        for c in self.campaigns:
            k = c["counts"]
            done = sum(k.get(s, 0) for s in FINAL_OUTCOMES)
            if done >= c["recipients"] or c["cancelled"]:
                continue
            span = self.now - max(self.now - self.window, c["created_at"])
            rate = finals.get(c["id"], 0) / span if span > 0 else 0.0
            left = c["recipients"] - done
            rows.append({"id": c["id"], "state": "paused" if c["paused"] else "sending", "done": done,
                         "total": c["recipients"], "deferred": k.get("deferred", 0),
                         "eta": left / rate if rate > 0 and not c["paused"] else None})
        return rows


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _health(ready: tuple[bool | None, str] | None) -> str:
    if ready is None or ready[0] is None:
        return "[red]unreachable[/]"
    return "[green]ready[/]" if ready[0] else f"[yellow]not ready[/]: {escape(ready[1])}"


def render_watch(model: WatchModel) -> Group:
    """The live view: nodes, queue, per-domain rates, campaigns in progress."""
    view = model.view
    parts: list = []
    if view.get("leader"):
        parts.append(Text.from_markup(
            f"cluster [bold]{escape(view['cluster'])}[/]   leader {escape(view['leader'])}   quorum "
            f"{view['in_quorum']} of {len(view['nodes'])}   can lose {view['can_lose']} more node(s)   "
            f"{time.strftime('%H:%M:%S', time.localtime(model.now))}"))
    else:
        parts.append(Text.from_markup(f"cluster [bold]{escape(view.get('cluster', '?'))}[/]   "
                                      "[bold red]no leader with a quorum: intake answers 4xx[/]"))
    nodes = Table(box=None, pad_edge=False)
    for col in ("node", "role", "term", "applied", "lag", "batches", "health"):
        nodes.add_column(col)
    for n in view.get("nodes", []):
        nodes.add_row(n["id"], n["role"] or "-", _dash(n["term"]), _dash(n["applied_index"]), _dash(n["lag"]),
                      _dash(n["batches_in_flight"]), _health(model.ready.get(n["id"])))
    parts.append(nodes)
    q = view.get("queue") or {}
    if q:
        parts.append(Text("queue: " + "  ".join(f"{k} {v}" for k, v in q.items())))
    rates = model.domain_rates()
    if rates:
        domains = Table(title=f"per domain, per minute (last {model.window:g}s)", box=None, pad_edge=False,
                        title_justify="left")
        for col in ("domain", "delivered", "deferred", "bounced"):
            domains.add_column(col, justify="left" if col == "domain" else "right")
        for d, dl, df, bo in rates:
            domains.add_row(d, f"{dl:.0f}", f"[yellow]{df:.0f}[/]" if df else "0", f"{bo:.0f}")
        parts.append(domains)
    camps = model.campaign_rows()
    if camps:
        table = Table(title="campaigns in progress", box=None, pad_edge=False, title_justify="left")
        for col in ("campaign", "state", "progress", "done", "deferred", "left"):
            table.add_column(col)
        for c in camps:
            table.add_row(c["id"], c["state"], ProgressBar(total=c["total"], completed=c["done"], width=WATCH_BAR_WIDTH),
                          f"{c['done']}/{c['total']} ({100.0 * c['done'] / c['total']:.1f}%)",
                          str(c["deferred"]), _duration(c["eta"]))
        parts.append(table)
    else:
        parts.append(Text("no campaign in progress"))
    return Group(*parts)


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def run_watch(fetch: Callable[[], tuple[dict, dict, list, list]], interval: float = 1.0,
              console: Console | None = None) -> None:
    """Redraw the live view every `interval` seconds until Ctrl-C. `fetch()` returns (cluster
    view, readiness per node, campaigns, new outcome events)."""
    model = WatchModel()
    console = console or Console()
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                started = time.monotonic()
                view, ready, campaigns, events = fetch()
                model.update(view, ready, campaigns, events, time.time())
                live.update(render_watch(model), refresh=True)
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass
