"""Starting real service processes on loopback ports, for the tests and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Unpack

from client.channel import TlsFiles
from clipsearch.health import health_status

__all__ = ["TAG_ENV", "RunningService", "free_port", "health_status", "listening", "running",
           "start_service", "tagged_processes", "wait_gone"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningService:
    process: subprocess.Popen[bytes]
    address: str
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout_s: float = 180.0, **tls: Unpack[TlsFiles]) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log()}")
            if health_status(self.address, **tls) == "SERVING":
                return
            time.sleep(0.2)
        raise TimeoutError(f"service at {self.address} not SERVING after {timeout_s} s:\n"
                           f"{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def start_service(args: list[str], log_path: Path, port: int | None = None,
                  env: dict[str, str] | None = None, wait: bool = True,
                  tls: TlsFiles | None = None) -> RunningService:
    """Runs `clipsearch <args> --port PORT` as a child process, logging to `log_path`."""
    port = port or free_port()
    command = [sys.executable, "-m", "clipsearch.cli", *args, "--port", str(port)]
    log_file = log_path.open("ab")
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})})
    service = RunningService(process, f"127.0.0.1:{port}", port, log_path)
    if wait:
        try:
            service.wait_serving(**(tls or {}))
        except BaseException:
            service.stop(signal.SIGKILL)
            raise
    return service


@contextlib.contextmanager
def running(args: list[str], log_path: Path, **kwargs: object) -> Iterator[RunningService]:
    service = start_service(args, log_path, **kwargs)  # type: ignore[arg-type]
    try:
        yield service
    finally:
        service.stop()


# ---- what a test leaves behind ---------------------------------------------------------------

TAG_ENV = "CLIPSEARCH_TEST_TAG"  # set on a process tree to find all of it again


def tagged_processes(tag: str) -> list[int]:
    """Live processes (not zombies) whose environment has TAG_ENV=tag: a process started
    with it and everything that inherited it."""
    needle = f"{TAG_ENV}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone, or not ours
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def nice_of(stat: Path) -> int:
    """The nice value in a /proc/PID/stat or /proc/PID/task/TID/stat file (field 19)."""
    text = stat.read_text()
    return int(text[text.rindex(")") + 2:].split()[16])  # fields after "pid (comm) "


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on host:port."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def wait_gone(tag: str, ports: list[int], timeout_s: float) -> tuple[list[int], list[int]]:
    """Waits until no process carries `tag` and nothing listens on `ports`; returns what
    is still there after `timeout_s` (two empty lists when all is gone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = tagged_processes(tag), [p for p in ports if listening(p)]
        if not any(left) or time.monotonic() > deadline:
            return left
        time.sleep(0.2)
