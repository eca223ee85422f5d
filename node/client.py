"""Talking to nodes' admin endpoints from the CLI (and tests): status, campaigns, actions."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from raftmail.node.config import Config


def read_token(config: Config) -> str | None:
    """The token the CLI sends to read: the read-only one when the file has it."""
    return config.cluster.read_token or config.cluster.admin_token


def _auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def get_json(admin: str, path: str, timeout: float = 2.0, token: str | None = None) -> Any:
    req = urllib.request.Request(f"http://{admin}{path}", headers=_auth_headers(token))
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _refusal(e: urllib.error.HTTPError) -> str:
    try:
        return f"HTTP {e.code}: {json.loads(e.read()).get('error', e.reason)}"
    except (ValueError, AttributeError):
        return f"HTTP {e.code}: {e.reason}"


def get_json_all(nodes: Sequence[tuple[str, str]], path: str, timeout: float = 2.0,
                 token: str | None = None) -> dict[str, Any]:
    """{node id: answer, or {"error": "..."} when unreachable or refused}, asked in parallel."""
    def one(admin: str) -> Any:
        try:
            return get_json(admin, path, timeout, token)
        except urllib.error.HTTPError as e:
            return {"error": _refusal(e)}
        except (OSError, ValueError) as e:
            return {"error": str(getattr(e, "reason", e))}
    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        answers = list(pool.map(one, [a for _, a in nodes]))
    return {nid: ans for (nid, _), ans in zip(nodes, answers)}


def first_answer(answers: dict[str, Any]) -> Any:
    for ans in answers.values():
        if isinstance(ans, dict) and "error" not in ans:
            return ans
    return None


def cluster_status(config: Config, answers: dict[str, Any]) -> dict:
    """One view of the cluster from every node's own status."""
    nodes = []
    for n in config.nodes:
        a = answers.get(n.id) or {"error": "no answer"}
        reachable = "error" not in a
        nodes.append({"id": n.id, "reachable": reachable, "error": a.get("error"),
                      "role": a.get("role") if reachable else None, "term": a.get("term"),
                      "commit_index": a.get("commit_index"), "applied_index": a.get("applied_index"),
                      "leader": a.get("leader"), "has_quorum": a.get("has_quorum"),
                      "batches_in_flight": (a.get("batches_in_flight") or {}).get(n.id, 0) if reachable else None,
                      "smtp": str(n.smtp), "admin": str(n.admin)})
    claims = [x for x in nodes if x["reachable"] and x["role"] == "leader" and x["has_quorum"]]
    leader = max(claims, key=lambda x: x["term"] or 0) if claims else None
    leader_id = leader["id"] if leader else None
    following = [x for x in nodes if x["reachable"] and (x["id"] == leader_id or x["leader"] == leader_id)]
    majority = config.majority()
    for x in nodes:
        x["lag"] = (leader["commit_index"] - x["applied_index"]) if leader and x["reachable"] \
            and x["applied_index"] is not None else None
    src = answers.get(leader_id) if leader_id else first_answer(answers)
    healthy = leader is not None and len(following) >= majority
    return {
        "cluster": config.cluster.name,
        "leader": leader_id,
        "healthy": healthy,
        "majority": majority,
        "in_quorum": len(following),
        "can_lose": max(0, len(following) - majority) if healthy else 0,
        "nodes": nodes,
        "queue": (src or {}).get("queue", {}),
        "batches_in_flight": (src or {}).get("batches_in_flight", {}),
        "delivered_last_minute": (src or {}).get("delivered_last_minute"),
        "stats": (src or {}).get("stats", {}),
        "backoff": (src or {}).get("backoff", {}),
        "warmup": (src or {}).get("warmup", {}),
    }


def post_campaign_action(config: Config, campaign_id: str, action: str, timeout: float = 10.0) -> tuple[bool, str]:
    """Ask nodes in turn until one commits the command."""
    headers = {"Content-Type": "application/json", **_auth_headers(config.cluster.admin_token)}
    last = "no node answered"
    for n in config.nodes:
        req = urllib.request.Request(f"http://{n.admin}/campaigns/{campaign_id}/{action}", data=b"{}",
                                     headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = json.loads(r.read())
                extra = f" ({body['cancelled']} recipients cancelled)" if "cancelled" in body else ""
                return True, f"campaign {campaign_id}: {action} committed{extra}"
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read()).get("error", str(e))
            except ValueError:
                msg = str(e)
            if e.code in (401, 403, 404):
                return False, f"error: {msg}"
            last = f"{n.id}: {msg}"
        except (OSError, ValueError) as e:
            last = f"{n.id}: {getattr(e, 'reason', e)}"
    return False, f"error: {action} not committed: {last}"


def post_json(admin: str, path: str, body: dict, token: str | None, timeout: float = 10.0) -> tuple[int, Any]:
    """POST JSON to one node's admin endpoint; (HTTP status, decoded body). Status 0 = unreachable."""
    headers = {"Content-Type": "application/json", **_auth_headers(token)}
    req = urllib.request.Request(f"http://{admin}{path}", data=json.dumps(body).encode(), headers=headers,
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, {"error": str(e)}
    except (OSError, ValueError) as e:
        return 0, {"error": str(getattr(e, "reason", e))}


MEMBERSHIP_HOPS = 4  # leader redirects one join/leave follows (a leaving leader hands over once)


def membership_change(config: Config, node_id: str, action: str, timeout: float = 60.0) -> tuple[bool, str]:
    """`join` or `leave` node_id, asked of the leader (the only node that sees which members
    really answer); a retried call finishes what an earlier one started."""
    target = config.node(node_id)
    body = {"id": node_id, "raft": str(target.raft), "smtp": str(target.smtp), "admin": str(target.admin),
            "timeout": timeout}
    admins = {n.id: str(n.admin) for n in config.nodes}
    view = cluster_status(config, get_json_all(list(admins.items()), "/status"))
    ask = view["leader"]
    if ask is None:
        down = [x["id"] for x in view["nodes"] if not x["reachable"]]
        return False, (f"error: {action} {node_id} refused: no leader with a working majority"
                       + (f" (unreachable: {', '.join(down)})" if down else "") + "; nothing was changed")
    for _hop in range(MEMBERSHIP_HOPS):
        status, answer = post_json(admins[ask], f"/cluster/{action}", body, config.cluster.admin_token,
                                   timeout=timeout + 15)
        if status == 200:
            return True, f"{node_id}: {answer.get('message') or action + ' committed'} (asked {ask})"
        nxt = answer.get("leader")
        if status == 409 and nxt in admins and (nxt != ask or answer.get("continue")):
            ask = nxt  # not the leader (any more), or a leaving leader handed over: go on there
            continue
        if answer.get("refused"):
            return False, f"refused by the leader {ask}: {answer['error']}"
        return False, f"error: {action} {node_id} failed: {ask}: {answer.get('error', status)}"
    return False, f"error: {action} {node_id} failed: leadership kept moving; run {action} again"


def run_drill(config: Config, timeout: float = 30.0, poll: float = 0.02) -> dict:
    """Ask the leader to step down; time the election and the first committed write after it;
    check every node's applied index catches up."""
    import time
    nodes = [(n.id, str(n.admin)) for n in config.nodes]
    token = read_token(config)
    before = cluster_status(config, get_json_all(nodes, "/status", token=token))
    old = before["leader"]
    if old is None:
        return {"ok": False, "error": "no leader with a quorum before the drill", "before": before}
    admin = dict(nodes)
    t0 = time.monotonic()
    status, answer = post_json(admin[old], "/cluster/transfer", {}, config.cluster.admin_token)
    if status != 200:
        return {"ok": False, "error": f"leader {old} refused to step down: {answer.get('error', status)}"}
    elected = accepting = None
    new = None
    others = [nid for nid, _ in nodes if nid != old]
    while time.monotonic() - t0 < timeout and accepting is None:
        view = cluster_status(config, get_json_all(nodes, "/status", timeout=1.0, token=token))
        if elected is None and view["leader"] and view["leader"] != old:
            elected, new = time.monotonic() - t0, view["leader"]
        if elected is not None:
            for nid in others:
                st, _ = post_json(admin[nid], "/cluster/noop?timeout=1", {}, config.cluster.admin_token, timeout=2)
                if st == 200:
                    accepting = time.monotonic() - t0
                    break
        time.sleep(poll)
    caught_up = None
    if accepting is not None:
        target = None
        while time.monotonic() - t0 < timeout:
            sts = get_json_all(nodes, "/status", timeout=1.0, token=token)
            live = {k: v for k, v in sts.items() if "error" not in v}
            target = target or max(v["commit_index"] for v in live.values())
            if all(v["applied_index"] >= target for v in live.values()):
                caught_up = time.monotonic() - t0
                break
            time.sleep(poll)
    return {"ok": accepting is not None and caught_up is not None, "old_leader": old, "new_leader": new,
            "elected_seconds": elected, "accepting_seconds": accepting, "caught_up_seconds": caught_up,
            "nodes": len(nodes)}
