"""Logging for the services: plain lines by default, one JSON object per line when asked."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

# Fields the services attach with `extra=`; shown in both formats.
# caller/peer/target/rows: the audit trail's (clipsearch/audit.py).
EXTRA_FIELDS = ("rpc", "status", "ms", "request_id", "caller", "peer", "target", "rows")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                 "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        entry.update({k: getattr(record, k) for k in EXTRA_FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{k}={getattr(record, k)}" for k in EXTRA_FIELDS if hasattr(record, k))
        return f"{line} {extras}" if extras else line


# grpc's aio server logs here, with a traceback, a handler that ended by an exception it
# did not handle itself: among them one cancelled by the server's own stop (seen in CI: a
# health Watch that a peer opened in the same millisecond as a failed start stopped it).
GRPC_SERVER_LOGGER = "grpc._cython.cygrpc"


class CancelledCallFilter(logging.Filter):
    """Drops grpc's record of a call cancelled (by a stopping server or a departed peer):
    a cancelled call is not an error, and its traceback would read like one."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, asyncio.CancelledError)


def configure_logging(json_lines: bool = False, level: int = logging.INFO) -> None:
    grpc_server = logging.getLogger(GRPC_SERVER_LOGGER)
    if not any(isinstance(f, CancelledCallFilter) for f in grpc_server.filters):
        grpc_server.addFilter(CancelledCallFilter())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else
                         PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
