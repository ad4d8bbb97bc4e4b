"""CPU seconds a process tree has used, from /proc: where a run's cores went, by process
(an encoder's decoding workers are its children)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (an encoder's decode
    workers are its children), from /proc."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])  # utime, stime
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += ticks.get(current, 0)
        todo += children.get(current, [])
    return total / os.sysconf("SC_CLK_TCK")


@contextmanager
def cpu_window(pids: dict[str, int]) -> Iterator[dict[str, float]]:
    """CPU seconds each process tree of `pids` (by name) used during the block, and this
    process's own as "client"; the yielded dict is filled when the block ends."""
    spent: dict[str, float] = {}
    before = {who: tree_cpu_seconds(pid) for who, pid in pids.items()}
    client_before = time.process_time()  # every thread of this process
    yield spent
    spent.update({who: tree_cpu_seconds(pid) - before[who] for who, pid in pids.items()})
    spent["client"] = time.process_time() - client_before
