"""Image decoding runs below the model's OS priority (--decode-nice, default 10), so that
decoding threads sharing the cores do not stall the model's OpenMP team; texts tokenize
at normal priority. Checked on a real encoder process, thread by thread, from /proc."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from client import EncoderClient
from encoder_service.config import EncoderConfig
from encoder_service.priority import background_pool, lower_thread_priority
from tests.servers import RunningService, nice_of, running

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="per-thread nice values are a Linux feature")


def _thread_nices(pid: int) -> list[int]:
    """The nice value of each thread of process `pid` (field 19 of /proc/PID/task/TID/stat)."""
    nices = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            nices.append(nice_of(task / "stat"))
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return nices


def _lowered_after_images(service: RunningService, photos: list[Path]) -> list[int]:
    base = os.getpriority(os.PRIO_PROCESS, service.process.pid)
    with EncoderClient(service.address) as client:
        client.encode_images([p.read_bytes() for p in photos[:4]])
        client.encode_texts(["a white dog"])
    return [nice - base for nice in _thread_nices(service.process.pid) if nice != base]


def test_the_default_decodes_ten_steps_below(encoder_tiny: RunningService,
                                             photos: list[Path]) -> None:
    assert EncoderConfig().decode_nice == 10
    lowered = _lowered_after_images(encoder_tiny, photos)
    base = os.getpriority(os.PRIO_PROCESS, encoder_tiny.process.pid)
    # one per decode thread (one per CPU by default); no other thread is lowered
    assert lowered and set(lowered) == {min(19, base + 10) - base}, lowered
    assert len(lowered) <= (os.cpu_count() or 1)


def test_decode_nice_zero_keeps_every_thread_at_the_process_priority(
        tiny_clip: Path, photos: list[Path], tmp_path: Path) -> None:
    with running(["serve", "encoder", "--model", str(tiny_clip), "--device", "cpu",
                  "--precision", "fp32", "--decode-nice", "0"],
                 tmp_path / "encoder.log") as service:
        assert _lowered_after_images(service, photos) == []


def test_pool_threads_are_lowered_and_capped_at_19() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)

    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    for nice, expected in ((3, min(19, base + 3)), (40, 19), (0, base)):
        pool = background_pool(1, "probe", nice)
        try:
            assert pool.submit(own_nice).result(10) == expected
        finally:
            pool.shutdown()
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # caller kept
    assert lower_thread_priority(0) is False
