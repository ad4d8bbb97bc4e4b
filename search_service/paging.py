"""Search options shared by every search RPC: min_score, pages (AIP-158), collapsing.

A page token is opaque and stateless: base64url of a version byte, the position of the
page's first hit (uint32) and 12 bytes of a hash of the query, so the service keeps no
state and any replica can serve the next page. The hash covers the RPC name, the model
fingerprint and the request with its paging fields (top_k, page_size, page_token)
cleared, serialised deterministically; a token presented with any other query (another
text, image, id, parts, filter, min_score or collapse_threshold) does not match and is
refused. Tokens are not secret: forging one only reaches a position the caller could
ask for anyway.

Milvus serves positions up to offset + limit = 16384 (the server's limit; Lite is held
to the same): that is the deepest reachable position (`MAX_POSITION`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Any

from search_service.store import MAX_TOP_K

__all__ = [
    "MAX_POSITION",
    "PageRequest",
    "PagingError",
    "check_collapse",
    "check_min_score",
    "make_token",
    "page_request",
    "query_hash",
    "read_token",
]

MAX_POSITION = MAX_TOP_K  # offset + limit of one Milvus search
DEFAULT_TOP_K = 10
_VERSION = 1
_HASH_BYTES = 12
_TOKEN = struct.Struct(">BI12s")
_PAGING_FIELDS = ("top_k", "page_size", "page_token")


class PagingError(ValueError):
    """A malformed search option or page token: INVALID_ARGUMENT."""


@dataclass(frozen=True)
class PageRequest:
    """What one search call asks of the ranked list, validated."""

    offset: int  # position of the first hit wanted, from 0
    limit: int  # hits on this page
    paged: bool  # the caller asked for pages: answer a next_page_token
    min_score: float | None  # cosine cut-off, or None
    collapse: float  # 0: off; else the cosine at or above which hits are one group
    fingerprint: bytes  # the query hash the tokens carry

    def next_token(self, returned: int, more: bool) -> str:
        """The next_page_token after a page of `returned` hits (`more`: rows follow)."""
        position = self.offset + returned
        if not (self.paged and more) or returned == 0 or position >= MAX_POSITION:
            return ""
        return make_token(position, self.fingerprint)


def query_hash(method: str, request: Any, model_fingerprint: str) -> bytes:
    """The hash a page token binds to: everything in `request` but its paging fields."""
    query = type(request)()
    query.CopyFrom(request)
    for name in _PAGING_FIELDS:
        query.ClearField(name)
    digest = hashlib.sha256()
    for part in (method.encode(), model_fingerprint.encode()):
        digest.update(len(part).to_bytes(4, "big") + part)
    digest.update(query.SerializeToString(deterministic=True))
    return digest.digest()[:_HASH_BYTES]


def make_token(offset: int, fingerprint: bytes) -> str:
    """An opaque token for the page starting at `offset` of the query `fingerprint`."""
    raw = _TOKEN.pack(_VERSION, offset, fingerprint[:_HASH_BYTES])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_token(token: str, fingerprint: bytes) -> int:
    """The offset in `token`; PagingError when it is malformed or from another query."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, offset, bound = _TOKEN.unpack(raw)
    except (binascii.Error, ValueError, struct.error):
        raise PagingError("page_token is malformed (pass next_page_token unchanged)") from None
    if version != _VERSION:
        raise PagingError("page_token is malformed (pass next_page_token unchanged)")
    if bound != fingerprint[:_HASH_BYTES]:
        raise PagingError("page_token belongs to another query: page tokens are bound to "
                          "the query (text, image, id or parts, filter, min_score, "
                          "collapse_threshold, model) that made them")
    if offset >= MAX_POSITION:
        raise PagingError(f"page_token points past the deepest reachable position "
                          f"({MAX_POSITION})")
    return int(offset)


def check_min_score(request: Any) -> float | None:
    """The request's min_score (None when unset); PagingError outside [-1, 1]."""
    if not request.HasField("min_score"):
        return None
    value = float(request.min_score)
    if not (math.isfinite(value) and -1.0 <= value <= 1.0):
        raise PagingError(f"min_score must be within [-1, 1], got {value}")
    return value


def check_collapse(value: float) -> float:
    """collapse_threshold: 0 (off) or in (0, 1]; PagingError otherwise."""
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise PagingError(f"collapse_threshold must be within [0, 1] (0: off), got {value}")
    return float(value)


def page_request(method: str, request: Any, model_fingerprint: str,
                 max_top_k: int) -> PageRequest:
    """Validates a search request's top_k, page_size, page_token, min_score and
    collapse_threshold; raises PagingError (INVALID_ARGUMENT) on a bad one."""
    limit_max = min(max_top_k, MAX_TOP_K)
    if not 0 <= request.page_size <= limit_max:
        raise PagingError(f"page_size must be between 0 and {limit_max}, "
                          f"got {request.page_size}")
    size = request.page_size or request.top_k or DEFAULT_TOP_K
    if not 1 <= size <= limit_max:
        raise PagingError(f"top_k must be between 1 and {limit_max}, got {request.top_k}")
    min_score = check_min_score(request)
    collapse = check_collapse(request.collapse_threshold)
    fingerprint = query_hash(method, request, model_fingerprint)
    offset = read_token(request.page_token, fingerprint) if request.page_token else 0
    limit = min(size, MAX_POSITION - offset)
    return PageRequest(offset=offset, limit=limit,
                       paged=bool(request.page_size or request.page_token),
                       min_score=min_score, collapse=collapse, fingerprint=fingerprint)
