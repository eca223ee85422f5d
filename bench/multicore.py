"""A measured prototype of step 1 of docs/multicore.md: a node's SMTP intake in worker processes
beside its core process.

    .venv/bin/python bench/multicore.py --runs 3 --messages 3000

Each node runs as a *core* process (the whole node as `raftmail start` runs it: Raft, state
machine, proposer, scheduler, sender; its own SMTP port stays idle) and `--workers` *intake
worker* processes that listen together on one more port with SO_REUSEPORT. A worker runs
aiosmtpd with raftmail's intake decisions (`node/intake.py`), writes each body into the node's
body store and pushes it to the peers itself, then asks the core over a Unix socket to commit
the submission and answers the client from the core's reply: 250 only after a majority commit,
as a single-process node does.

What the prototype leaves out, and a product version would need: a worker asks nothing of the
applied state synchronously (a submission to a cancelled campaign is refused when the state
machine applies it, not at DATA; a commit whose answer was lost is answered 451 "not confirmed",
which the client's retry resolves through the idempotency key); no supervision of workers; the
core still listens on its own SMTP port.

The measurement runs the same load (smtp-source, else the Python generator; 2 KB messages, 20
sessions, split over the nodes) into a cluster of single-process nodes and into a cluster of split nodes, alternating,
and reports accepted messages per second and the CPU per message of core processes and workers
(`/proc/PID/stat`, from the start of the load to its end). The core's share of a split node's
CPU bounds what the split can gain on a machine with enough cores: one node could accept about
1 / share times as fast before its core process is saturated.

`core` and `worker` are the subcommands the measurement starts; they are not for operators.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import secrets
import statistics
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack  # noqa: E402

from bench.lib.cases import committed_recipients  # noqa: E402
from bench.lib.cluster import Cluster, ClusterSpec  # noqa: E402
from bench.lib.cpu import cpu_seconds  # noqa: E402
from bench.lib.peers import Load, drive, find_tool, start_destination  # noqa: E402
from bench.lib.procs import BenchError, Child, free_port, spawn, wait_port  # noqa: E402
from bench.lib.report import describe_tree  # noqa: E402
from raftmail.consensus.commands import NewSubmission  # noqa: E402
from raftmail.node.bodies import BodyStore  # noqa: E402
from raftmail.node.bridge import ProposalFailed  # noqa: E402
from raftmail.node.config import Config, load_config  # noqa: E402
from raftmail.node.intake import Intake  # noqa: E402
from raftmail.node.logs import setup_logging  # noqa: E402
from raftmail.node.peer_client import PeerClient  # noqa: E402
from raftmail.node.peer_wire import PeerCrypto  # noqa: E402
from raftmail.node.runtime import MailNode  # noqa: E402
from raftmail.node.smtp_server import start_smtp_server  # noqa: E402

HERE = Path(__file__).resolve()
_LEN = struct.Struct(">I")
MAX_REQUEST_BYTES = 1 << 20   # a request carries one submission's metadata, never a body
STATE_REFRESH_SECONDS = 0.1   # how stale a worker's view of quorum and membership may be
WORKER_READY_SECONDS = 20.0


def socket_path(config: Config, node_id: str) -> Path:
    return config.node_data_dir(node_id) / "core.sock"


async def read_frame(reader: asyncio.StreamReader) -> Any:
    size = _LEN.unpack(await reader.readexactly(_LEN.size))[0]
    if size > MAX_REQUEST_BYTES:
        raise ValueError(f"frame of {size} bytes")
    return msgpack.unpackb(await reader.readexactly(size), raw=False)


def frame(value: Any) -> bytes:
    data = msgpack.packb(value, use_bin_type=True)
    return _LEN.pack(len(data)) + data


# -- the core process ---------------------------------------------------------------------------

class CoreNode(MailNode):
    """A whole node, plus a Unix socket on which its intake workers ask it to commit."""

    async def run(self) -> None:
        path = socket_path(self.config, self.id)
        path.unlink(missing_ok=True)
        tasks: set[asyncio.Task] = set()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    request = await read_frame(reader)
                    task = asyncio.create_task(self._answer(request, writer))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_unix_server(serve, path=str(path))
        try:
            await super().run()
        finally:
            server.close()

    async def _answer(self, request: dict, writer: asyncio.StreamWriter) -> None:
        reply: dict[str, Any] = {"id": request["id"]}
        if request["op"] == "commit":
            try:
                reply["result"] = await self.commit_submission(NewSubmission.from_wire(request["entry"]),
                                                               float(request["timeout"]))
            except ProposalFailed as e:
                reply["failed"], reply["unknown"] = str(e), e.unknown
        else:  # "state"
            reply.update(quorum=self.raft.in_quorum(), majority=self.view.majority(),
                         peers=self.view.peer_admins())
        writer.write(frame(reply))


def core_main(config_path: str, node_id: str) -> None:
    config = load_config(config_path)
    setup_logging("info", "text", node_id)
    os.umask(0o077)
    sys.setswitchinterval(0.0005)  # as run_node does
    node = CoreNode(config, node_id, secrets.token_hex(8))
    asyncio.run(node.run())


# -- an intake worker ---------------------------------------------------------------------------

class CoreLink:
    """A worker's one connection to its core: requests by id, answered in any order."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future] = {}
        self.next_id = 0
        self.quorum, self.majority, self.peers = False, 2, []

    async def connect(self, path: Path) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(str(path))
        self._reader = asyncio.create_task(self._read())  # held: the loop keeps tasks only weakly
        await self.refresh()

    async def _read(self) -> None:
        try:
            while True:
                reply = await read_frame(self.reader)
                future = self.waiting.pop(reply["id"], None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            os._exit(1)  # the core is gone: so is this node

    async def ask(self, request: dict, timeout: float) -> dict:
        self.next_id += 1
        request["id"] = self.next_id
        future = self.waiting[self.next_id] = asyncio.get_running_loop().create_future()
        self.writer.write(frame(request))
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self.waiting.pop(request["id"], None)

    async def refresh(self) -> None:
        state = await self.ask({"op": "state"}, 5.0)
        self.quorum, self.majority, self.peers = state["quorum"], state["majority"], state["peers"]

    async def keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(STATE_REFRESH_SECONDS)
            await self.refresh()

    async def commit(self, entry: NewSubmission, timeout: float) -> list:
        try:
            reply = await self.ask({"op": "commit", "entry": entry.to_wire(), "timeout": timeout}, timeout + 1.0)
        except asyncio.TimeoutError:
            raise ProposalFailed("no answer from the core", unknown=True) from None
        if "failed" in reply:
            raise ProposalFailed(reply["failed"], unknown=reply["unknown"])
        return reply["result"]


async def worker_run(config: Config, node_id: str, index: int, port: int) -> None:
    link = CoreLink()
    await link.connect(socket_path(config, node_id))
    peers = PeerClient(PeerCrypto(config.cluster.secret, config.cluster.name),
                       max_body_bytes=config.max_body_bytes(),
                       max_background_bytes=config.cluster.max_background_push_bytes)

    async def replicate_body(digest: str, data: bytes, timeout: float) -> int:
        need = link.majority - 1
        return 0 if need <= 0 else await peers.push(digest, data, link.peers, need, timeout)

    store = BodyStore(config.node_data_dir(node_id) / "bodies")
    intake = Intake(config, f"{node_id}w{index}", store, link.commit, replicate_body, lambda: link.majority,
                    in_quorum=lambda: link.quorum)
    me = config.node(node_id)
    await start_smtp_server(intake, me.smtp.host, port, hostname=config.delivery.helo_name, reuse_port=True)
    print(f"worker {index} of {node_id} ready on {port}", flush=True)
    await link.keep_fresh()


def worker_main(config_path: str, node_id: str, index: int, port: int) -> None:
    config = load_config(config_path)
    setup_logging("info", "text", f"{node_id}w{index}")
    os.umask(0o077)
    asyncio.run(worker_run(config, node_id, index, port))


# -- the measurement ----------------------------------------------------------------------------

def one_run(root: Path, nodes: int, workers: int, messages: int, generator: str, python: str) -> dict[str, float]:
    """workers = 0: single-process nodes, the product as it is."""
    destination = start_destination(root / "dest")
    command = "{python} -m raftmail.cli start --config {config} --node {node}" if workers == 0 else \
        f"{{python}} {HERE} core --config {{config}} --node {{node}}"
    cluster = Cluster(root / "cluster", ClusterSpec(relay_port=destination.port, nodes=nodes), python,
                      node_command=command)
    children: list[Child] = []
    try:
        leader = cluster.start_all()
        ports = cluster.smtp_ports()
        if workers:
            ports = []
            for node_id in cluster.ids:
                port = free_port()
                for index in range(workers):
                    argv = [python, str(HERE), "worker", "--config", str(cluster.config_path), "--node", node_id,
                            "--index", str(index), "--port", str(port)]
                    children.append(spawn(f"worker-{node_id}-{index}", argv, root / f"worker-{node_id}-{index}.log"))
                wait_port(port, WORKER_READY_SECONDS, f"the intake workers of {node_id}")
                ports.append(port)
        core_pids = [p.pid for p in cluster.procs.values()]
        worker_pids = [c.pid for c in children]
        core0, workers0 = cpu_seconds(core_pids), cpu_seconds(worker_pids)
        result = drive(ports, Load(messages=messages, sessions=20, tolerate_refusals=True), generator, python)
        core1, workers1 = cpu_seconds(core_pids), cpu_seconds(worker_pids)
        if result.error:
            raise BenchError(result.error)
        for child in children:
            if not child.alive():
                raise BenchError(f"{child.name} died: {child.log_tail()}")
        # Every 250 a worker gave must be committed: the leader already counts those recipients.
        committed_recipients(cluster, leader, result)
        accepted = result.messages_ok
        return {"rate": accepted / result.elapsed, "refused": result.refused,
                "core_ms": 1000 * (core1 - core0) / accepted, "workers_ms": 1000 * (workers1 - workers0) / accepted}
    finally:
        for child in children:
            child.stop()
        cluster.stop_all()
        destination.stop()


def measure(args: argparse.Namespace) -> None:
    # smtp-source is the load of record (bench/install-peers.sh); the Python one is for a check.
    generator = "smtp-source" if find_tool("smtp-source") else "python"
    layouts = [(nodes, workers) for nodes in args.nodes for workers in (0, args.workers)]
    samples: dict[tuple[int, int], list[dict[str, float]]] = {layout: [] for layout in layouts}
    for run in range(args.runs):
        # Alternate which layout goes first: the machine drifts between runs.
        for nodes, workers in (layouts if run % 2 == 0 else list(reversed(layouts))):
            with tempfile.TemporaryDirectory(prefix="raftmail-multicore-") as tmp:
                sample = one_run(Path(tmp), nodes, workers, args.messages, generator, args.python)
            samples[(nodes, workers)].append(sample)
            print(f"run {run + 1}/{args.runs} nodes={nodes} workers={workers}: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in sample.items()), file=sys.stderr, flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# Intake workers beside the core (bench/multicore.py), {stamp}\n")
    print(f"- raftmail: {describe_tree()}; {os.cpu_count()} CPUs; {args.messages} × 2 KB per run, "
          f"20 sessions, {generator}; median of {args.runs} runs (range)\n")
    print("| nodes | layout | accepted msg/s | core CPU ms/msg | workers CPU ms/msg | core's share |")
    print("|---:|---|---:|---:|---:|---:|")
    for nodes, workers in layouts:
        s = samples[(nodes, workers)]

        def cell(key: str) -> str:
            values = [x[key] for x in s]
            return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"
        share = statistics.median(x["core_ms"] / (x["core_ms"] + x["workers_ms"]) for x in s)
        layout = "one process per node" if workers == 0 else f"core + {workers} intake worker(s) per node"
        rate = statistics.median(x["rate"] for x in s)
        print(f"| {nodes} | {layout} | {rate:.0f} | {cell('core_ms')} | {cell('workers_ms')} | {share:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    core = sub.add_parser("core")
    worker = sub.add_parser("worker")
    for p in (core, worker):
        p.add_argument("--config", required=True)
        p.add_argument("--node", required=True)
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--port", type=int, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=1, help="intake workers per node in the split layout")
    parser.add_argument("--nodes", type=lambda s: [int(n) for n in s.split(",")], default=[1, 3],
                        help="cluster sizes to measure, comma separated (default 1,3)")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    if args.command == "core":
        core_main(args.config, args.node)
    elif args.command == "worker":
        worker_main(args.config, args.node, args.index, args.port)
    else:
        measure(args)


if __name__ == "__main__":
    main()
