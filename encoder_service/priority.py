"""Threads that yield the cores to the model: image decoding at a lower OS priority.

On a CPU the model runs each layer as an OpenMP team of one thread per core, and a team
waits at every barrier for its slowest thread. A decoding thread sharing a core stalls
the whole team: on 2 cores, one decoding thread at the model's priority made a bf16
ViT-B/32 batch of 32 take 2.5x as long, two made it 3.7x; at nice +10 the same threads
cost it 1.0-1.15x and still decoded 23-49 images/s in the model's gaps, more than it
encodes (measured here, results/benchmarks.md, Ingest). A lower priority only matters
while the cores are contended: when the model waits for pixels, decoding has the
cores to itself, so it cannot starve.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("clipsearch.encoder")


def lower_thread_priority(increment: int) -> bool:
    """Raises the calling thread's nice value by `increment` (Linux keeps one per thread;
    raising it needs no privilege). False where it could not be done."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return False
    thread = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + increment))
    except OSError as exc:
        log.warning("cannot lower the priority of thread %d: %s", thread, exc)
        return False
    return True


def background_pool(threads: int, name: str, nice: int) -> ThreadPoolExecutor:
    """A pool of `threads` threads, each `nice` steps below the process's priority."""
    return ThreadPoolExecutor(threads, thread_name_prefix=name,
                              initializer=lower_thread_priority, initargs=(nice,))
