"""The query-embedding cache: a text's vector, kept so that a repeated query skips the encoder.

Exact: an entry is keyed by the text (byte for byte) and the encoder's model fingerprint
(learned from GetModelInfo when the search service opens), so a vector is only ever reused
for the same text under the same weights; an encoder with other weights never hits.
Bounded in bytes: least recently used entries go first once the vectors, their texts and a
fixed per-entry overhead would pass `max_bytes`. Only vectors are cached, never hits: the
collection may change between two searches, the text's vector cannot.

`QueryCache.encode_texts` has the signature of `EncoderPool.encode_texts` and stands in
front of it: cached texts are answered at once, the others (each distinct text once) go to
the encoder in one call, and per-item failures (empty or over-long texts) pass through
uncached with their index adjusted. It runs on the service's event loop only (no lock).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from clipsearch import metrics

__all__ = ["ENTRY_OVERHEAD", "QueryCache", "TextEncoder", "entry_bytes"]

# The Python objects around one entry beyond the vector's and the text's bytes: the array
# header, the str and tuple objects of the key, the OrderedDict node (measured ~300).
ENTRY_OVERHEAD = 320

TextEncoder = Callable[[Sequence[str], "float | None", str],
                       Awaitable[tuple[np.ndarray, dict[int, str]]]]

_ITEM_INDEX = re.compile(r"^(\w+)\[\d+\]")


def entry_bytes(model: str, text: str, vector: np.ndarray) -> int:
    """What one entry counts against the byte bound."""
    return vector.nbytes + len(text.encode()) + len(model) + ENTRY_OVERHEAD


class QueryCache:
    """An LRU map (model fingerprint, text) -> unit vector, bounded in bytes.

    `model` is the fingerprint the entries are stored and looked up under; while it is
    empty (before the encoder answered GetModelInfo) nothing is cached. `enabled=False` or
    `max_bytes=0` passes every call straight to the encoder."""

    def __init__(self, encode: TextEncoder, max_bytes: int, *, enabled: bool = True,
                 model: str = "") -> None:
        if max_bytes < 0:
            raise ValueError(f"the query cache size must be >= 0 bytes, got {max_bytes}")
        self._encode = encode
        self.max_bytes = max_bytes
        self.enabled = enabled and max_bytes > 0
        self.model = model
        self._entries: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, text: str, model: str | None = None) -> np.ndarray | None:
        """The cached vector of `text` under `model` (default: the current one), counted as
        a hit or a miss; None on a miss."""
        key = (self.model if model is None else model, text)
        vector = self._entries.get(key)
        if vector is None:
            self.misses += 1
            metrics.QUERY_CACHE_LOOKUPS.labels("miss").inc()
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        metrics.QUERY_CACHE_LOOKUPS.labels("hit").inc()
        return vector

    def put(self, text: str, vector: np.ndarray, model: str | None = None) -> None:
        """Stores a copy of `vector` (read-only), evicting the least recently used entries
        until the bound holds; an entry larger than the whole bound is not stored."""
        model = self.model if model is None else model
        if not self.enabled or not model:
            return
        key = (model, text)
        stored = np.array(vector, np.float32, copy=True)
        stored.setflags(write=False)
        size = entry_bytes(model, text, stored)
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= entry_bytes(model, text, old)
        while self._entries and self.bytes + size > self.max_bytes:
            (old_model, old_text), old_vector = self._entries.popitem(last=False)
            self.bytes -= entry_bytes(old_model, old_text, old_vector)
            self.evictions += 1
            metrics.QUERY_CACHE_EVICTIONS.inc()
        self._entries[key] = stored
        self.bytes += size
        self._report()

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
        self._report()

    def _report(self) -> None:
        metrics.QUERY_CACHE_BYTES.set(self.bytes)
        metrics.QUERY_CACHE_ENTRIES.set(len(self._entries))

    async def encode_texts(self, texts: Sequence[str], deadline: float | None = None,
                           request_id: str = "") -> tuple[np.ndarray, dict[int, str]]:
        """The vectors of `texts` and the per-item failures by index, as
        `EncoderPool.encode_texts` returns them, asking the encoder only for texts not in
        the cache (each distinct one once)."""
        if not self.enabled or not self.model or not texts:
            return await self._encode(texts, deadline, request_id)
        model = self.model  # the one the vectors will be stored under, even if it changes
        found: dict[int, np.ndarray] = {}
        missing: dict[str, list[int]] = {}  # text -> its positions, in first-seen order
        for i, text in enumerate(texts):
            vector = self.get(text, model) if text not in missing else None
            if vector is None:
                missing.setdefault(text, []).append(i)
            else:
                found[i] = vector
        failures: dict[int, str] = {}
        encoded: np.ndarray | None = None
        if missing:
            encoded, asked_failures = await self._encode(list(missing), deadline, request_id)
            for j, (text, positions) in enumerate(missing.items()):
                if j in asked_failures:
                    for i in positions:
                        failures[i] = _ITEM_INDEX.sub(rf"\g<1>[{i}]", asked_failures[j], 1)
                else:
                    self.put(text, encoded[j], model)
                    for i in positions:
                        found[i] = encoded[j]
        dimension = (next(iter(found.values())).shape[0] if found
                     else encoded.shape[1] if encoded is not None else 0)
        vectors = np.zeros((len(texts), dimension), np.float32)
        for i, vector in found.items():
            vectors[i] = vector
        return vectors, failures
