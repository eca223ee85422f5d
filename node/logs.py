"""Logging: one event per line with the node id, human text by default or JSON."""
from __future__ import annotations

import json
import logging
import re
import sys
import time

# Characters that must never reach a terminal or log viewer raw: C0 and C1 controls (ESC starts
# colour and cursor sequences; CR and LF forge lines), DEL, line and paragraph separators,
# bidirectional overrides, and lone surrogates (undecodable bytes an SMTP client sent).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069"
                     "\ud800-\udfff]")


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every unsafe character written as a Python-style escape (ESC -> \\x1b)."""
    return _UNSAFE.sub(_escape_one, text)


class _TextFormatter(logging.Formatter):
    """The text line, its message escaped: addresses, logins and reply texts come from clients
    and receivers. A traceback (exc_info) keeps its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class _JsonFormatter(logging.Formatter):
    def __init__(self, node_id: str | None) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        out = {"t": round(record.created, 3), "level": record.levelname.lower(), "node": self.node_id,
               "logger": record.name, "msg": escape_controls(record.getMessage())}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "info", fmt: str = "text", node_id: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter(node_id))
    else:
        handler.setFormatter(_TextFormatter(
            f"%(asctime)s {node_id or '-'} %(levelname)s %(name)s: %(message)s"))
        logging.Formatter.converter = time.gmtime
    # Our lines name no source file, thread or process: skip collecting them for every record
    # (the logging HOWTO's "Optimization" section); a sending node logs a line per recipient.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pysyncobj's warnings and errors are surfaced, never swallowed; its debug chatter is not.
    logging.getLogger("pysyncobj").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
