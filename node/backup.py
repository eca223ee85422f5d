"""Online backup of a live cluster and restore into a new one.

A backup file is an uncompressed tar, read and written as a stream: `manifest.json` first (cluster,
index, term, counts per state, the sha256 of every part), then `state.msgpack` (the state machine's
own snapshot blob, taken under the apply lock at one applied index), then one `bodies/<sha256>`
member per body the state references. Intake and delivery go on while the bodies stream; only the
state serialisation holds the apply lock. Nothing in the file is ever unpickled.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

from aiohttp import web

from raftmail.consensus.journal import fsync_dir
from raftmail.consensus.raft import RaftNode
from raftmail.consensus.raft_snapshot import encode_snapshot
from raftmail.consensus.restore import restored_state
from raftmail.consensus.state import MailState
from raftmail.node.admin_api import admin_refusal
from raftmail.node.bodies import BodyStore, is_digest
from raftmail.node.config import Config

FORMAT = "raftmail-backup"
VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.msgpack"
BODY_PREFIX = "bodies/"
MAX_MANIFEST_BYTES = 256 * 2**20  # a manifest names every body: 64 hex + a little per body
READ_CHUNK = 1 << 20  # bytes hashed at a time while verifying
# The restored log starts at these entries (no-ops); pysyncobj resumes after the snapshot's last.
# Term 1, not 0: a node that joins later starts with its own no-op at index 1 in term 0, and a
# match there would let the leader send it the entries after the snapshot without the snapshot.
_NOOP = b"\x01"
RESTORED_PREV = (_NOOP, 1, 1)
RESTORED_LAST = (_NOOP, 2, 1)


class BackupError(Exception):
    """A backup file that is not whole: the message names the bad part."""


# ---------------------------------------------------------------------------------- writing


class _Chunks(io.RawIOBase):
    """What tarfile writes, kept until the route sends it (one member at a time)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.parts.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = 0
    return info


def add_backup_routes(app: web.Application, raft: RaftNode, admin_token: str | None, cluster: str, node_id: str,
                      body: Callable[[str], Awaitable[bytes | None]]) -> None:
    """GET /backup: the state at one applied index and every body it references, as a tar stream."""
    busy = asyncio.Lock()  # one backup at a time per node: each streams every body

    async def handler(request: web.Request) -> web.StreamResponse:
        # The file holds every address and body: never served by a cluster without an admin token.
        if not admin_token:
            return web.json_response({"error": "backup needs [cluster] admin_token in the cluster file"}, status=403)
        refused = admin_refusal(request, admin_token)
        if refused is not None:
            return refused
        if busy.locked():
            return web.json_response({"error": "a backup is already running on this node"}, status=409)
        async with busy:
            return await _stream_backup(raft, cluster, node_id, body, request)

    app.router.add_get("/backup", handler)


def _capture(raft: RaftNode) -> tuple[bytes, dict]:
    """The state at one applied index, packed under the apply lock (compression comes after)."""
    def read(st: MailState) -> tuple[bytes, dict]:
        bodies = list(dict.fromkeys(s.body for s in st.submissions.values() if is_digest(s.body)))
        return st._packed(), {"index": raft.raftLastApplied, "commands_applied": st.applied,
                              "counts": st.queue_counts(), "batches": len(st.batches),
                              "submissions": len(st.submissions), "campaigns": len(st.campaigns),
                              "suppressed": len(st.suppressed), "archived": len(st.archived),
                              "bodies": bodies}
    packed, info = raft.read(read)
    return zlib.compress(packed, 1), info


async def _stream_backup(raft: RaftNode, cluster: str, node_id: str, body: Callable[[str], Awaitable[bytes | None]],
                         request: web.Request) -> web.StreamResponse:
    blob, info = await asyncio.to_thread(_capture, raft)
    bodies = info.pop("bodies")
    manifest = {
        "format": FORMAT, "version": VERSION, "cluster": cluster, "node": node_id,
        "term": raft.raft_status()["term"], **info, "created_at": time.time(),
        "parts": [{"name": STATE, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}]
        + [{"name": BODY_PREFIX + d, "sha256": d} for d in bodies],
    }
    resp = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
    await resp.prepare(request)
    out = _Chunks()
    tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)
    raw = json.dumps(manifest, indent=1).encode()
    for name, data in ((MANIFEST, raw), (STATE, blob)):
        tar.addfile(_member(name, len(data)), io.BytesIO(data))
        await resp.write(out.take())
    del blob
    for digest in bodies:
        data = await body(digest)
        if data is None:  # the stream stops short: the client's check refuses the file
            raise RuntimeError(f"body {digest} is in no store of the cluster; backup abandoned")
        tar.addfile(_member(BODY_PREFIX + digest, len(data)), io.BytesIO(data))
        await resp.write(out.take())
    tar.close()
    await resp.write(out.take())
    await resp.write_eof()
    return resp


DOWNLOAD_TIMEOUT = 60.0  # seconds without a byte from the node before the download gives up
PROGRESS_EVERY = 1.0  # seconds between progress lines


def fetch_backup(config: Config, out: Path, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Download a backup from the first node of `config` that answers, into a temporary name next
    to `out`; check every part; rename it to `out` only when whole. Returns the manifest."""
    import http.client
    import urllib.error
    import urllib.request
    headers = {"Authorization": f"Bearer {config.cluster.admin_token}"} if config.cluster.admin_token else {}
    tmp = out.with_name(out.name + ".partial")
    errors = []
    for n in config.nodes:
        req = urllib.request.Request(f"http://{n.admin}/backup", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT) as r, open(tmp, "wb") as f:
                started = last = time.monotonic()
                total = 0
                while chunk := r.read(READ_CHUNK):
                    f.write(chunk)
                    total += len(chunk)
                    if time.monotonic() - last >= PROGRESS_EVERY:
                        last = time.monotonic()
                        progress(f"{n.id}: {total / 2**20:.1f} MiB in {last - started:.0f} s")
                f.flush()
                os.fsync(f.fileno())
        except urllib.error.HTTPError as e:
            errors.append(f"{n.id}: HTTP {e.code} {e.read()[:200].decode(errors='replace')}")
            continue
        except (OSError, http.client.HTTPException) as e:  # unreachable, or the stream stopped short
            errors.append(f"{n.id}: {getattr(e, 'reason', None) or type(e).__name__}")
            continue
        progress(f"{n.id}: {total / 2**20:.1f} MiB received; checking every part")
        try:
            manifest = read_backup(tmp)
        except BackupError as e:
            errors.append(f"{n.id}: {e}")
            continue
        os.replace(tmp, out)
        return manifest
    tmp.unlink(missing_ok=True)
    raise BackupError("no node gave a whole backup: " + "; ".join(errors))


# ---------------------------------------------------------------------------------- reading


def read_backup(path: Path, on_part: Callable[[str, bytes], None] | None = None) -> dict:
    """Check every part of a backup file against its manifest; return the manifest.

    `on_part(name, data)` gets each checked part (one at a time: memory holds one body). Raises
    BackupError naming the bad, missing or unexpected part."""
    try:
        tar = tarfile.open(path, mode="r|")
    except (tarfile.TarError, OSError) as e:
        raise BackupError(f"{path}: not a backup file ({e})") from None
    with tar:
        members = iter(tar)
        manifest = _read_manifest(tar, members)
        expected = {p["name"]: p for p in manifest["parts"]}
        seen: set[str] = set()
        current = MANIFEST
        try:
            for m in members:
                current = m.name
                part = expected.get(m.name)
                if part is None or m.name in seen or not m.isfile():
                    raise BackupError(f"part {m.name}: not listed in the manifest (or listed twice)")
                f = tar.extractfile(m)
                h = hashlib.sha256()
                keep = [] if on_part is not None else None
                n = 0
                while chunk := f.read(READ_CHUNK):
                    h.update(chunk)
                    n += len(chunk)
                    if keep is not None:
                        keep.append(chunk)
                if n != m.size:
                    raise BackupError(f"part {m.name}: truncated ({n} of {m.size} bytes)")
                if h.hexdigest() != part["sha256"]:
                    raise BackupError(f"part {m.name}: sha256 {h.hexdigest()} does not match the manifest")
                seen.add(m.name)
                if on_part is not None:
                    on_part(m.name, b"".join(keep))
        except BackupError:
            raise
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise BackupError(f"part {current}: unreadable or truncated ({e})") from None
    missing = [n for n in expected if n not in seen]
    if missing:
        raise BackupError(f"part {missing[0]}: missing (file truncated?); {len(missing)} part(s) missing")
    return manifest


def _read_manifest(tar: tarfile.TarFile, members: Iterator[tarfile.TarInfo]) -> dict:
    try:
        first = next(members, None)
        if first is None or first.name != MANIFEST or not first.isfile() or first.size > MAX_MANIFEST_BYTES:
            raise BackupError(f"part {MANIFEST}: missing or not first")
        raw = tar.extractfile(first).read()
        manifest = json.loads(raw)
    except BackupError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise BackupError(f"part {MANIFEST}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION \
            or not isinstance(manifest.get("parts"), list) or not all(
                isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("sha256"), str)
                for p in manifest["parts"]):
        raise BackupError(f"part {MANIFEST}: not a {FORMAT} version {VERSION} manifest")
    parts = manifest["parts"]
    body_ok = all(p["name"].startswith(BODY_PREFIX) and p["sha256"] == p["name"][len(BODY_PREFIX):]
                  and is_digest(p["sha256"]) for p in parts if p["name"] != STATE)
    if [p["name"] for p in parts].count(STATE) != 1 or not body_ok:
        raise BackupError(f"part {MANIFEST}: lists parts that are not the state or bodies")
    return manifest


# ---------------------------------------------------------------------------------- restoring


def restore(config: Config, path: Path, now: float, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Seed every node's data dir of `config` from a backup file. Refuses a data dir that is not
    empty; builds everything in temporary dirs and renames them at the end, so a failure leaves
    nothing half restored. Returns the restored queue counts."""
    targets = [config.node_data_dir(n.id) for n in config.nodes]
    for d in targets:
        if d.exists() and any(d.iterdir()):
            raise BackupError(f"data dir {d} is not empty; restore only seeds a new cluster")
    progress("checking the backup file")
    manifest = read_backup(path)
    temps = [d.with_name(d.name + ".restoring") for d in targets]
    try:
        for t in temps:
            if t.exists():
                shutil.rmtree(t)  # a previous restore's leftovers (our own temp name)
            (t / "raft").mkdir(parents=True)
        stores = [BodyStore(t / "bodies") for t in temps]
        restored: dict[str, Any] = {}
        done = [0]

        def on_part(name: str, data: bytes) -> None:
            if name == STATE:
                st, returned = restored_state(MailState.from_snapshot(data), now)
                snap = encode_snapshot(st.to_snapshot(), RESTORED_LAST, RESTORED_PREV,
                                       [str(n.raft) for n in config.nodes])
                for t in temps:
                    with open(t / "raft" / "snapshot.bin", "wb") as f:
                        f.write(snap)
                        f.flush()
                        os.fsync(f.fileno())
                    fsync_dir(t / "raft")
                restored.update(counts=st.queue_counts(), returned=returned)
                return
            digest = name[len(BODY_PREFIX):]
            for s in stores:
                s.put_verified(digest, data)
            done[0] += 1
            if done[0] % 500 == 0:
                progress(f"{done[0]} bodies written")

        progress("writing data dirs")
        read_backup(path, on_part)  # checked again while writing: the file may change in between
        for t, d in zip(temps, targets):
            if d.exists():
                d.rmdir()  # empty, checked above
            t.rename(d)
            fsync_dir(d.parent)  # the renamed dirs survive a crash right after the restore
    except BaseException:
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)
        raise
    return {"manifest": manifest, "counts": restored["counts"], "bodies": done[0],
            "returned": restored["returned"]}
