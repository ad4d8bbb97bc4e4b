"""Where image bytes become pixels: threads of the encoder's process, or worker processes.

Threads share the process's GIL with the towers. On a CPU that costs little (2 cores:
decoding and the model contend for cores, hence `--decode-nice`), but on a lent H200
with 16 cores (results/gpu-notes.md) 16 decoding threads scaled PIL only 5.2x, and a
one-text batch, which launches a few hundred CUDA kernels from Python, each needing the
GIL, took 86-135 ms during a 256-image call instead of 8 ms (2 threads: 8-14 ms, but the
images took 2.5x as long). Worker processes each have an interpreter of their own, so
neither waits for the other; the pixels come back through a pipe (150 KB per image).
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import pickle
import time
import warnings
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.synchronize import Semaphore
from pathlib import Path

import numpy as np

from encoder_service.errors import ModelLoadError
from encoder_service.images import ImageError, PreprocessStages, image_pixels
from encoder_service.priority import background_pool, lower_thread_priority

log = logging.getLogger("clipsearch.encoder")

CRASHED = "decoding this image ended its worker process (it crashed or was killed)"

# (pixels, truncated) for the batcher, or the reason the image cannot be used.
Decoded = tuple[np.ndarray, bool] | str


def prepare_image(data: bytes, stages: PreprocessStages, max_pixels: int) -> Decoded:
    """Decode + the PIL stage of preprocessing; a bad image gives its reason, not a raise."""
    try:
        return image_pixels(data, stages, max_pixels), False
    except ImageError as exc:
        return str(exc)


# ---- in a worker process ----------------------------------------------------------------

_worker_stages: PreprocessStages | None = None
_worker_max_pixels = 0


def _worker_start(stages: bytes, max_pixels: int, nice: int, ready: Semaphore) -> None:
    global _worker_stages, _worker_max_pixels
    # Unpickled here, not by the pool: it imports the model family's module (clip's warns
    # about pkg_resources on import), a warning in the log once per worker otherwise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _worker_stages = pickle.loads(stages)
    _worker_max_pixels = max_pixels
    lower_thread_priority(nice)  # the worker's only thread: the whole process
    ready.release()  # one per worker up; start() waits for all of them


def _worker_decode(data: bytes) -> Decoded:
    assert _worker_stages is not None, "worker started without its stages"
    return prepare_image(data, _worker_stages, _worker_max_pixels)


def _worker_pid() -> int:
    return os.getpid()


# ---- in the encoder ---------------------------------------------------------------------

# Worker processes by default, at most: each took 228 MB PSS (433 MB RSS, much of it
# shared) beside a 672 MB forkserver, measured here with 2 workers; 16 threads already
# decoded 5x one thread's 209 images/s on the H200 machine. More with --decode-threads.
DEFAULT_MAX_PROCESSES = 16
# How long start() waits for every worker's initializer (each imports the model family's
# module; seconds on a loaded CI machine).
WORKERS_UP_SECONDS = 120.0


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota
    (a container's CPU limit; os.cpu_count() would give the whole host's)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    count = count or os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit readable: the affinity mask stands
    return count


def default_workers(configured: int, processes: bool) -> int:
    """`configured` (--decode-threads) or, at 0, one per usable CPU (processes: at most
    DEFAULT_MAX_PROCESSES)."""
    if configured > 0:
        return configured
    cpus = usable_cpus()
    return min(cpus, DEFAULT_MAX_PROCESSES) if processes else cpus


class ImageDecoder:
    """Decodes images for the encoder on `workers` threads or worker processes, each
    `nice` steps below the encoder's OS priority."""

    def __init__(self, workers: int, nice: int, processes: bool) -> None:
        self.workers, self.nice, self.processes = workers, nice, processes
        self._stages: PreprocessStages | None = None
        self._pickled_stages = b""
        self._max_pixels = 0
        self._pool: Executor | None = None
        self._generation = 0  # which pool a failed call ran on, so only one replaces it
        self._ready: Semaphore | None = None  # released by each worker once it is up

    @property
    def kind(self) -> str:
        return "processes" if self.processes else "threads"

    async def start(self, stages: PreprocessStages, max_pixels: int) -> None:
        """Makes the pool; worker processes are started here, so that the first call
        does not pay for them."""
        self._stages, self._max_pixels = stages, max_pixels
        if self.processes:
            try:
                self._pickled_stages = pickle.dumps(stages)
            except Exception as exc:  # a preprocess a worker could not receive
                raise ModelLoadError(f"--decode-in processes: this model's preprocessing "
                                     f"cannot be sent to a worker process ({exc}); use "
                                     f"--decode-in threads") from exc
        self._pool = self._new_pool()
        if self.processes:  # one call per worker: the pool starts them all, at once
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(self._pool, _worker_pid)
                                   for _ in range(self.workers)))
            # The first worker up may have answered every call while the others were
            # still importing: wait for each one's initializer (seen in CI, 1 of 2 up).
            await loop.run_in_executor(None, self._await_workers, WORKERS_UP_SECONDS)

    def _await_workers(self, seconds: float) -> None:
        assert self._ready is not None
        deadline = time.monotonic() + seconds
        for up in range(self.workers):
            if not self._ready.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise ModelLoadError(f"--decode-in processes: {up} of {self.workers} "
                                     f"image-decoding worker processes started within "
                                     f"{seconds:.0f} s")

    def _new_pool(self) -> Executor:
        assert self._stages is not None
        if not self.processes:
            return background_pool(self.workers, "decode", self.nice)
        # forkserver: workers fork from a clean server process, never from this one,
        # whose CUDA context and OpenMP threads a fork would not carry over safely.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["encoder_service.decoding"])
        # Only start() waits on it; a replacement pool's releases are never taken (harmless).
        self._ready = context.Semaphore(0)
        return ProcessPoolExecutor(self.workers, mp_context=context,
                                   initializer=_worker_start,
                                   initargs=(self._pickled_stages, self._max_pixels,
                                             self.nice, self._ready))

    async def decode(self, data: bytes) -> Decoded:
        """The pixels of `data` (or why it cannot be used). A worker process that dies
        breaks its whole pool: the pool is replaced and the image tried once more, so a
        neighbour's crash fails no image, and an image that crashes a worker twice gets
        an error of its own."""
        assert self._pool is not None and self._stages is not None, "start() first"
        loop = asyncio.get_running_loop()
        if not self.processes:
            return await loop.run_in_executor(self._pool, prepare_image, data, self._stages,
                                              self._max_pixels)
        for _ in range(2):
            generation = self._generation
            try:
                return await loop.run_in_executor(self._pool, _worker_decode, data)
            except BrokenProcessPool:
                if generation == self._generation:
                    log.warning("an image-decoding worker process died; starting new ones")
                    self._pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._new_pool()
                    self._generation += 1
        return CRASHED

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
