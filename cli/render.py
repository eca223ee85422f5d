"""Human tables for the CLI (rich)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table


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
