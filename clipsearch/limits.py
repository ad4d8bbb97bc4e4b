"""Per-caller limits: a token bucket (calls per second, with a burst) and a number of calls
at once, for each token name and scope.

Each (token name, scope) has its own bucket and its own count, so a caller over its limit
is refused (RESOURCE_EXHAUSTED with `retry-after-ms` in the trailing metadata) while every
other token's calls go on as before. Limits are set per scope:

    --rate-limit "search=50/100,index=5,admin=1"    # RATE per second [/ BURST]
    --concurrency-limit "search=16,index=2,admin=1"

`*=` sets every scope not named; a scope left out has no limit. An Index stream counts as
one call and holds its concurrency slot until it ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from clipsearch.access import SCOPES

RETRY_AFTER_KEY = "retry-after-ms"
# How long to suggest waiting when a caller has all its concurrent calls running: there is
# no telling when one ends, so a short pause.
CONCURRENCY_RETRY_S = 0.1


@dataclass(frozen=True)
class ScopeLimit:
    """The limits of one scope, per token name: 0 means none."""

    rate: float = 0.0  # calls per second
    burst: float = 0.0  # bucket size: calls that may come at once after a quiet spell
    concurrency: int = 0


def _parse_pairs(text: str, what: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        scope, sep, value = part.partition("=")
        scope = scope.strip()
        if not sep or (scope not in SCOPES and scope != "*"):
            raise ValueError(f"{what}: expected SCOPE=VALUE with SCOPE one of "
                             f"{', '.join(SCOPES)} or *, got {part!r}")
        pairs[scope] = value.strip()
    return pairs


def parse_limits(rate_text: str, concurrency_text: str) -> dict[str, ScopeLimit]:
    """The limit of each scope from `--rate-limit` and `--concurrency-limit`."""
    rates: dict[str, tuple[float, float]] = {}
    for scope, value in _parse_pairs(rate_text, "--rate-limit").items():
        rate_s, _, burst_s = value.partition("/")
        try:
            rate = float(rate_s)
            burst = float(burst_s) if burst_s else max(1.0, rate)
        except ValueError:
            raise ValueError(f"--rate-limit: {scope}={value!r} is not RATE or RATE/BURST"
                             ) from None
        if not (rate >= 0 and burst >= 1 and math.isfinite(rate) and math.isfinite(burst)):
            raise ValueError(f"--rate-limit: {scope}={value!r}: the rate must be >= 0 and "
                             f"the burst >= 1")
        rates[scope] = (rate, burst)
    concurrency: dict[str, int] = {}
    for scope, value in _parse_pairs(concurrency_text, "--concurrency-limit").items():
        try:
            concurrency[scope] = int(value)
        except ValueError:
            raise ValueError(f"--concurrency-limit: {scope}={value!r} is not a whole number"
                             ) from None
        if concurrency[scope] < 0:
            raise ValueError(f"--concurrency-limit: {scope}={value!r} is negative")
    limits = {}
    for scope in SCOPES:
        rate, burst = rates.get(scope, rates.get("*", (0.0, 0.0)))
        limits[scope] = ScopeLimit(rate, burst, concurrency.get(scope, concurrency.get("*", 0)))
    return limits


class TokenBucket:
    """`rate` tokens a second into a bucket of `burst`; a call takes one."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._level, self._at = burst, clock()

    def take(self) -> float:
        """0.0 when a token was taken; else the seconds until one will be there."""
        now = self._clock()
        self._level = min(self.burst, self._level + (now - self._at) * self.rate)
        self._at = now
        if self._level >= 1.0:
            self._level -= 1.0
            return 0.0
        return (1.0 - self._level) / self.rate if self.rate > 0 else math.inf


@dataclass(frozen=True)
class Refusal:
    """Why a call was refused, and when a retry may succeed."""

    reason: str  # "rate" or "concurrency"
    message: str
    retry_after_s: float


class Limits:
    """The buckets and running-call counts of every (token name, scope). Used from the
    event loop only, so it needs no lock."""

    def __init__(self, per_scope: dict[str, ScopeLimit],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_scope = per_scope
        self._clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._running: dict[tuple[str, str], int] = {}

    @property
    def enabled(self) -> bool:
        """Whether any scope has a limit."""
        return any(limit.rate or limit.concurrency for limit in self.per_scope.values())

    def admit(self, name: str, scope: str) -> Refusal | None:
        """None when the call may run (then `release` must follow), else the refusal."""
        limit = self.per_scope.get(scope, ScopeLimit())
        key = (name, scope)
        if limit.concurrency and self._running.get(key, 0) >= limit.concurrency:
            return Refusal("concurrency", f"token {name!r} already has {limit.concurrency} "
                           f"{scope} call(s) running, its limit", CONCURRENCY_RETRY_S)
        if limit.rate:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(limit.rate, limit.burst, self._clock)
            wait = bucket.take()
            if wait > 0:
                return Refusal("rate", f"token {name!r} is over its {scope} rate limit of "
                               f"{limit.rate:g}/s (burst {limit.burst:g})", wait)
        self._running[key] = self._running.get(key, 0) + 1
        return None

    def release(self, name: str, scope: str) -> None:
        """A call admitted by `admit` has ended."""
        key = (name, scope)
        left = self._running.get(key, 0) - 1
        if left > 0:
            self._running[key] = left
        else:
            self._running.pop(key, None)
