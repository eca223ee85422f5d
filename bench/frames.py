"""CPU per Raft frame: pysyncobj's own framing (pickle, zlib level 3) against raftmail's msgpack
frames (consensus/raft_wire.py), both sealed and opened with the same FrameSealer, in one run.

    .venv/bin/python bench/frames.py [--runs 5] [--frames 20000]

Each figure is the median over the runs of the CPU time (time.process_time) to encode, seal,
open and decode one frame; the ratio divides msgpack's by pickle's from the same run. The
messages are the shapes pysyncobj sends most: a heartbeat, append_entries with one and with three
entries (shaped like a group of three submissions' metadata), and the
follower's answer."""
from __future__ import annotations

import argparse
import os
import statistics
import time
import zlib

import msgpack
import pysyncobj.pickle as pysyncobj_pickle

from raftmail.consensus import raft_wire
from raftmail.consensus.seal import FrameSealer

# Shaped like a group entry: a few submissions' metadata (ids, sender, digest, recipients).
def group_entry() -> bytes:
    return msgpack.packb([["submit", f"1a23e3ee{i:03x}-n2-{i}-{os.urandom(3).hex()}", "news@example.com",
                           os.urandom(32).hex(), 2048,
                           [f"{os.urandom(4).hex()}.{k}@example{k % 4}.com" for k in range(10)]]
                          for i in range(3)])


ENTRIES = [group_entry() for _ in range(3)]
MESSAGES = {
    "heartbeat": {"type": "append_entries", "term": 7, "commit_index": 120345, "entries": [],
                  "prevLogIdx": 120345, "prevLogTerm": 7},
    "append_entries, 1 entry": {"type": "append_entries", "term": 7, "commit_index": 120345,
                                "entries": [(ENTRIES[0], 120346, 7)], "prevLogIdx": 120345, "prevLogTerm": 7},
    "append_entries, 3 entries": {"type": "append_entries", "term": 7, "commit_index": 120345,
                                  "entries": [(ENTRIES[i], 120346 + i, 7) for i in range(3)],
                                  "prevLogIdx": 120345, "prevLogTerm": 7},
    "next_node_idx (answer)": {"type": "next_node_idx", "next_node_idx": 120349, "success": True, "term": 7},
}


def per_frame(encode, decode, sealer: FrameSealer, message: dict, frames: int) -> float:
    started = time.process_time()
    for _ in range(frames):
        sealed = sealer.encrypt_at_time(encode(message), 1000)
        sealer.extract_timestamp(sealed)
        decode(sealer.decrypt(sealed))
    return (time.process_time() - started) / frames * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--frames", type=int, default=20000)
    args = parser.parse_args()
    sealer = FrameSealer("bench-frames-password", lambda what: None)
    framings = {
        "pickle+zlib": (lambda m: zlib.compress(pysyncobj_pickle.dumps(m), 3),
                        lambda d: pysyncobj_pickle.loads(zlib.decompress(d))),
        "msgpack": (raft_wire.dumps, raft_wire.loads),
    }
    print(f"| message | pickle+zlib µs/frame | msgpack µs/frame | ratio | bytes pickle+zlib | bytes msgpack |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, message in MESSAGES.items():
        assert raft_wire.loads(raft_wire.dumps(message)) == message
        medians = {}
        for framing, (encode, decode) in framings.items():
            medians[framing] = statistics.median(per_frame(encode, decode, sealer, message, args.frames)
                                                 for _ in range(args.runs))
        sizes = [len(encode(message)) for encode, _ in framings.values()]
        print(f"| {name} | {medians['pickle+zlib']:.1f} | {medians['msgpack']:.1f} | "
              f"{medians['msgpack'] / medians['pickle+zlib']:.2f}× | {sizes[0]} | {sizes[1]} |")


if __name__ == "__main__":
    main()
