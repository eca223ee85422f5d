"""The ceiling for one Python intake: an aiosmtpd server on 127.0.0.1 that answers 250 to every
message and stores nothing, only counts.

Run as its own process (it then has a core to itself, like a raftmail node):
    python plain_smtpd.py --port PORT
It prints "READY <port>" once listening; then each line "stats" on stdin is answered with one JSON
line {"messages": N, "recipients": N, "bytes": N}; "quit" or end of input stops it. The harness
also uses it as the delivery destination when Postfix's smtp-sink is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys

from aiosmtpd.controller import Controller

LOOPBACK = "127.0.0.1"
SERVER_NAME = "plain-smtpd.bench.test"  # fixed, so the greeting never waits for a DNS lookup
DEFAULT_DATA_SIZE_LIMIT = 64 * 2**20
DEFAULT_READY_TIMEOUT = 10.0


class CountingHandler:
    """Accepts every message; keeps only counts."""

    def __init__(self) -> None:
        self.messages = 0
        self.recipients = 0
        self.bytes = 0

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.messages += 1
        self.recipients += len(envelope.rcpt_tos)  # type: ignore[attr-defined]
        self.bytes += len(envelope.original_content or b"")  # type: ignore[attr-defined]
        return "250 OK"

    def stats(self) -> dict[str, int]:
        return {"messages": self.messages, "recipients": self.recipients, "bytes": self.bytes}


def serve(port: int, data_size_limit: int = DEFAULT_DATA_SIZE_LIMIT) -> None:
    handler = CountingHandler()
    controller = Controller(handler, hostname=LOOPBACK, port=port, server_hostname=SERVER_NAME,
                            data_size_limit=data_size_limit, ready_timeout=DEFAULT_READY_TIMEOUT)
    controller.start()
    try:
        print(f"READY {controller.port}", flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                print(json.dumps(handler.stats()), flush=True)
            elif command == "quit":
                break
    finally:
        controller.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--data-size-limit", type=int, default=DEFAULT_DATA_SIZE_LIMIT)
    args = parser.parse_args()
    serve(args.port, args.data_size_limit)


if __name__ == "__main__":
    main()
