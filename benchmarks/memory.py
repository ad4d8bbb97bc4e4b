"""Process memory for the benchmarks, read from /proc (no psutil dependency)."""

from __future__ import annotations

import threading
from pathlib import Path


def status_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    """A memory line of /proc/PID/status in MB (KiB / 1024): VmRSS (resident now) or VmHWM
    (this process's peak; not getrusage's ru_maxrss, which Linux carries over fork and
    exec, so a child would report its parent's peak); 0.0 when the line is missing."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssPeak:
    """Samples a process's RSS every `period_s` in a thread while in the `with` block:
    `before` is its RSS on entry and `peak` the highest seen (MB; both 0.0 for no pid)."""

    def __init__(self, pid: int | None, period_s: float = 0.01) -> None:
        self.pid, self.period_s = pid, period_s
        self.before = self.peak = status_mb(pid) if pid else 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while self.pid and not self._done.wait(self.period_s):
            self.peak = max(self.peak, status_mb(self.pid))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
