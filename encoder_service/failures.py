"""What a device failure means for a batch: out of memory is retried in smaller batches;
an error that poisons the CUDA context ends the process."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

Item = TypeVar("Item")

# Messages of CUDA errors after which the context is unusable: every later kernel fails
# the same way, so only a new process helps (CUDA runtime API docs, "sticky" errors).
_STICKY = ("illegal memory access", "device-side assert", "illegal instruction",
           "misaligned address", "unspecified launch failure", "an illegal address",
           "uncorrectable ECC error", "hardware stack error", "CUDA error: unknown error")


class DeviceOutOfMemory(RuntimeError):
    """The device had no memory for an item even in a batch of one."""


class DeviceFailed(RuntimeError):
    """The device failed in a way that needs a new process."""


def is_sticky_device_error(exc: BaseException) -> bool:
    """True for a CUDA error that leaves the context unusable (not out-of-memory)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _STICKY)


def release_cached_memory() -> None:
    """Returns the allocator's cached blocks after an OOM, so the halves start clean."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode_splitting_on_oom(encode: Callable[[list[Item]], np.ndarray],
                            batch: list[Item]) -> list[np.ndarray | DeviceOutOfMemory]:
    """`encode(batch)` row by row; when the device runs out of memory the batch is run
    again in halves (recursively), so only an item that fails alone fails. Failed items
    get a DeviceOutOfMemory in their row; any other error propagates."""
    try:
        return list(encode(batch))
    except torch.OutOfMemoryError as exc:
        release_cached_memory()
        if len(batch) == 1:
            return [DeviceOutOfMemory(f"out of device memory for one item: {exc}")]
    middle = len(batch) // 2
    return [*encode_splitting_on_oom(encode, batch[:middle]),
            *encode_splitting_on_oom(encode, batch[middle:])]

