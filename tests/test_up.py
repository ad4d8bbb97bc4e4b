"""`clipsearch up` owns its children, and scripts/demo.sh ends by itself.

Every process tree here carries a unique CLIPSEARCH_TEST_TAG in its environment, so the
tests find all of it (up, both services, anything they start) in /proc afterwards; the
ports are free ones, checked for listeners at the end."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import TAG_ENV, free_port, health_status, tagged_processes, wait_gone

ROOT = Path(__file__).resolve().parents[1]
GONE_WITHIN_S = 15.0


@dataclass
class Up:
    """A `clipsearch up` started by a test."""

    process: subprocess.Popen[bytes]
    tag: str
    ports: list[int]  # search, encoder
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        return [pid for pid in tagged_processes(self.tag) if pid != self.process.pid]


def _tagged_env(tag: str, **extra: str) -> dict[str, str]:
    return {**os.environ, TAG_ENV: tag, **extra}


def start_up(tmp_path: Path, model: Path | str, *extra: str) -> Up:
    tag = uuid.uuid4().hex
    search_port, encoder_port = free_port(), free_port()
    log_path = tmp_path / f"up-{tag[:8]}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "clipsearch.cli", "up", "--model", str(model),
             "--device", "cpu", "--precision", "fp32", "--milvus", str(tmp_path / "up.db"),
             "--port", str(search_port), "--encoder-port", str(encoder_port), *extra],
            stdout=log, stderr=subprocess.STDOUT, env=_tagged_env(tag))
    return Up(process, tag, [search_port, encoder_port], log_path)


def wait_ready(up: Up, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert up.process.poll() is None, f"up exited with {up.process.returncode}:\n{up.log()}"
        if health_status(f"127.0.0.1:{up.ports[0]}") == "SERVING":
            return
        time.sleep(0.3)
    raise TimeoutError(f"up not ready after {timeout_s} s:\n{up.log()}")


@pytest.fixture
def up_tiny(tmp_path: Path, tiny_clip: Path) -> Iterator[Up]:
    up = start_up(tmp_path, tiny_clip)
    try:
        wait_ready(up)
        yield up
    finally:
        for pid in tagged_processes(up.tag):  # whatever a failed test left
            os.kill(pid, signal.SIGKILL)
        up.process.wait()


def assert_all_gone(up: Up) -> None:
    processes, ports = wait_gone(up.tag, up.ports, GONE_WITHIN_S)
    assert not processes, f"still running {GONE_WITHIN_S} s later: {processes}\n{up.log()}"
    assert not ports, f"still listening {GONE_WITHIN_S} s later: {ports}\n{up.log()}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_stops_both_services_and_up_exits_0(up_tiny: Up, sig: int) -> None:
    children = up_tiny.children()
    assert len(children) == 2, f"expected an encoder and a search service: {children}"
    up_tiny.process.send_signal(sig)
    assert up_tiny.process.wait(GONE_WITHIN_S) == 0, up_tiny.log()
    assert_all_gone(up_tiny)
    log = up_tiny.log()
    # Each service went through its graceful stop (health NOT_SERVING, drain), not a kill.
    assert log.count("stopping: health NOT_SERVING") == 2, log
    assert "Traceback" not in log, log


def test_sigkill_of_up_stops_both_services(up_tiny: Up) -> None:
    children = up_tiny.children()
    assert len(children) == 2, f"expected an encoder and a search service: {children}"
    up_tiny.process.kill()
    up_tiny.process.wait()
    assert_all_gone(up_tiny)


def test_a_service_that_cannot_start_is_named_and_the_other_stopped(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.pt"
    up = start_up(tmp_path, missing)
    assert up.process.wait(180) == 1, up.log()
    log = up.log()
    lines = [line for line in log.splitlines()
             if line.startswith("clipsearch up: the encoder service could not start:")]
    assert len(lines) == 1, log
    assert str(missing) in lines[0], log  # the encoder's own reason, naming the path
    assert "Traceback" not in log, log
    assert_all_gone(up)


def test_demo_script_ends_by_itself_and_leaves_nothing(tmp_path: Path, tiny_clip: Path,
                                                       photos: list[Path]) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos[:24]:
        shutil.copy(photo, folder / photo.name)
    tag = uuid.uuid4().hex
    ports = [free_port(), free_port()]
    grid = tmp_path / "grid.png"
    env = _tagged_env(tag, CLIPSEARCH_DEMO_DB=str(tmp_path / "demo.db"),
                      CLIPSEARCH_DEMO_GRID=str(grid), CLIPSEARCH_SEARCH_PORT=str(ports[0]),
                      CLIPSEARCH_ENCODER_PORT=str(ports[1]), CLIPSEARCH_ENCODER_DEVICE="cpu")
    done = subprocess.run([str(ROOT / "scripts" / "demo.sh"), str(tiny_clip), str(folder),
                           "a dog"], env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"contact sheet: {grid}" in done.stdout, output
    assert grid.stat().st_size > 1000, output
    assert "24 added" in output, output
    processes, listening = wait_gone(tag, ports, 0)  # demo.sh waited for everything
    assert not processes and not listening, (processes, listening, output)


def test_demo_script_fails_fast_with_the_services_message(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    ports = [free_port(), free_port()]
    env = _tagged_env(tag, CLIPSEARCH_DEMO_DB=str(tmp_path / "demo.db"),
                      CLIPSEARCH_DEMO_GRID=str(tmp_path / "grid.png"),
                      CLIPSEARCH_SEARCH_PORT=str(ports[0]),
                      CLIPSEARCH_ENCODER_PORT=str(ports[1]), CLIPSEARCH_ENCODER_DEVICE="cpu")
    missing = tmp_path / "no-such-model.pt"
    done = subprocess.run([str(ROOT / "scripts" / "demo.sh"), str(missing), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "clipsearch up: the encoder service could not start:" in output, output
    assert str(missing) in output, output
    assert "Traceback" not in output, output
    processes, listening = wait_gone(tag, ports, 0)
    assert not processes and not listening, (processes, listening, output)
