"""The audit trail: one structured log line (logger `clipsearch.audit`) for every call that
changes data or reads the collection in bulk: the calls needing the `index` or `admin`
scope (Index, one line per stream; Delete; FindDuplicates).

Each line has: `rpc`, `caller` (the token's name), `peer`, `target` (the ids or the
filter, or for Index the tally of the stream's items), `rows` (rows deleted, rows added,
groups found), `status`, `request_id` and `ms`. Never a token or an image.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

log = logging.getLogger("clipsearch.audit")

MAX_IDS_SHOWN = 20


def _filter_text(request: Any) -> str:
    if not (hasattr(request, "HasField") and "filter" in request.DESCRIPTOR.fields_by_name
            and request.HasField("filter")):
        return "filter={}"
    as_dict = MessageToDict(request.filter, preserving_proto_field_name=True)
    return "filter=" + json.dumps(as_dict, sort_keys=True, ensure_ascii=False,
                                  separators=(",", ":"))


def describe_request(request: Any) -> str:
    """What a unary request of an audited call names: its ids, else its filter (and the
    threshold of FindDuplicates)."""
    if not isinstance(request, Message):
        return ""
    fields = request.DESCRIPTOR.fields_by_name
    parts = []
    if "ids" in fields and len(request.ids):  # type: ignore[attr-defined]
        ids = list(request.ids)  # type: ignore[attr-defined]
        shown = ",".join(ids[:MAX_IDS_SHOWN])
        more = f",... ({len(ids)} ids)" if len(ids) > MAX_IDS_SHOWN else ""
        parts.append(f"ids={shown}{more}")
    else:
        parts.append(_filter_text(request))
    if "threshold" in fields:
        parts.append(f"threshold={request.threshold:g}")  # type: ignore[attr-defined]
    return " ".join(parts)


class Tally:
    """What an audited call answered: rows deleted, Index items by status, groups found."""

    def __init__(self) -> None:
        self.responses = 0
        self.rows = 0
        self.by_status: dict[str, int] = {}

    def add(self, response: Any) -> None:
        """Counts one response message."""
        self.responses += 1
        if not isinstance(response, Message):
            return
        fields = response.DESCRIPTOR.fields_by_name
        if "deleted" in fields:
            self.rows += int(response.deleted)  # type: ignore[attr-defined]
        elif "status" in fields and fields["status"].enum_type is not None:
            value = fields["status"].enum_type.values_by_number.get(
                response.status)  # type: ignore[attr-defined]
            name = value.name if value is not None else str(response.status)  # type: ignore[attr-defined]
            self.by_status[name] = self.by_status.get(name, 0) + 1
            if name == "ADDED":
                self.rows += 1
        else:
            self.rows += 1  # a streamed result (a group of duplicates)

    def summary(self) -> str:
        """Index's `items=N ADDED=a EXISTING=e FAILED=f`; empty for other calls."""
        if not self.by_status:
            return ""
        counts = " ".join(f"{k}={v}" for k, v in sorted(self.by_status.items()))
        return f"items={self.responses} {counts}"


def record(rpc: str, caller: str, peer: str, target: str, rows: int, status: str,
           request_id: str, ms: float) -> None:
    """Writes one audit line."""
    log.info("audit", extra={"rpc": rpc, "caller": caller, "peer": peer, "target": target,
                             "rows": rows, "status": status, "request_id": request_id,
                             "ms": round(ms, 2)})
