"""`raftmail status` against a real cluster, and `raftmail start` refusing bad config files."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cluster import PY, SECRET, Cluster, free_ports, run_cli

pytestmark = [pytest.mark.timeout(90)]

NODE_KEYS = {"id", "reachable", "role", "term", "commit_index", "applied_index"}
QUEUE_KEYS = {"pending", "in_flight", "delivered", "deferred", "bounced", "suppressed"}


def status_json(c: Cluster) -> tuple[int, dict]:
    r = run_cli(c.config_path, "status", "--json")
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout)


@pytest.mark.cluster
def test_status_json_has_the_documented_keys_and_exit_codes(make_cluster) -> None:
    c = make_cluster()
    leader = c.leader()
    code, view = status_json(c)
    assert code == 0, view
    assert view["leader"] == leader
    assert [n["id"] for n in view["nodes"]] == c.ids
    for n in view["nodes"]:
        assert NODE_KEYS <= n.keys(), n
        assert n["reachable"] is True
        assert n["role"] in ("leader", "follower")
        assert isinstance(n["term"], int) and isinstance(n["commit_index"], int)
        assert isinstance(n["applied_index"], int)
    assert [n["id"] for n in view["nodes"] if n["role"] == "leader"] == [leader]
    assert QUEUE_KEYS <= view["queue"].keys(), view["queue"]
    assert all(isinstance(view["queue"][k], int) for k in QUEUE_KEYS)

    dead = [n for n in c.ids if n != leader]
    for nid in dead:
        c.kill(nid)
    code, view = status_json(c)
    assert code == 1, view
    by_id = {n["id"]: n for n in view["nodes"]}
    for nid in dead:
        assert by_id[nid]["reachable"] is False, by_id[nid]
    assert by_id[leader]["reachable"] is True
    assert view["leader"] is None  # one node of three is no quorum


@pytest.mark.cluster
def test_status_table_names_every_node(make_cluster) -> None:
    c = make_cluster()
    r = run_cli(c.config_path, "status")
    assert r.returncode == 0, r.stderr
    for nid in c.ids:
        assert nid in r.stdout, r.stdout
    assert f"leader: {c.leader()}" in r.stdout


# -- bad config files: `raftmail start` exits 2 with one line naming the file and the key

def good_config() -> str:
    raft, smtp, admin = free_ports(3)
    return "\n".join([
        "[cluster]", 'name = "cli"', f'secret = "{SECRET}"', 'data_dir = "data"', "",
        "[[node]]", 'id = "n1"', f'raft = "127.0.0.1:{raft}"', f'smtp = "127.0.0.1:{smtp}"',
        f'admin = "127.0.0.1:{admin}"', "",
    ])


def start_node(path: Path, node: str = "n1") -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "raftmail.cli", "start", "--config", str(path), "--node", node],
                          capture_output=True, text=True, timeout=30)


BAD_CONFIGS = {
    "syntax error": (lambda t: t.replace('name = "cli"', 'name = "cli'), "line 2"),
    "unknown key": (lambda t: t + "\n[intake]\nmax_recipient = 10\n", "[intake] max_recipient"),
    "short secret": (lambda t: t.replace(SECRET, "short"), "[cluster] secret"),
    "duplicate port": (lambda t: t.replace(t.split('smtp = "')[1].split('"')[0],
                                           t.split('raft = "')[1].split('"')[0]), "[[node]] n1 smtp"),
    # A documentation address (TEST-NET-1) is on no interface here: every send would fail.
    "source address missing": (lambda t: t + '\n[delivery.pools.brand]\n[[delivery.pools.brand.sources]]\n'
                               'address = "192.0.2.10"\nnode = "n1"\nehlo = "mta1.example.com"\n',
                               "[[delivery.pools.brand.sources]] address"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_start_refuses_a_bad_config_with_one_line(tmp_path: Path, case: str) -> None:
    edit, key = BAD_CONFIGS[case]
    path = tmp_path / "bad.toml"
    path.write_text(edit(good_config()))
    r = start_node(path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(path) in lines[0] and key in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "data").exists()  # refused before touching the data dir


def test_start_refuses_an_unknown_node_id(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(good_config())
    r = start_node(path, "n9")
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(path) in lines[0] and "--node" in lines[0] and "n9" in lines[0], lines[0]


def test_status_of_an_unreachable_cluster_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(good_config())  # nothing listens on its ports
    r = run_cli(path, "status", "--json")
    assert r.returncode == 1, r.stderr
    view = json.loads(r.stdout)
    assert view["leader"] is None
    assert [n["reachable"] for n in view["nodes"]] == [False]


# -- aiosmtpd internals: `raftmail start` on an aiosmtpd lacking one exits 2 with one line

@pytest.mark.cluster
def test_start_refuses_an_aiosmtpd_without_an_internal_intake_relies_on(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(good_config())
    site = tmp_path / "site"
    site.mkdir()
    # Runs at interpreter start, before raftmail is imported: as if aiosmtpd had renamed it.
    (site / "sitecustomize.py").write_text("import aiosmtpd.smtp\ndel aiosmtpd.smtp.SMTP._cb_client_connected\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.Popen([PY, "-m", "raftmail.cli", "start", "--config", str(path), "--node", "n1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:  # the old code runs the node
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the node ran on a broken aiosmtpd:\n{err[-2000:]}")
    assert proc.returncode == 2, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "aiosmtpd 1.4.6" in lines[0] and "SMTP._cb_client_connected" in lines[0], lines[0]
    assert "ready" not in out
    assert not (tmp_path / "data").exists()  # stopped before the node touched anything
