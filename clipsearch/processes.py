"""Starting real service processes on loopback ports (tests, benchmarks, `clipsearch up`)."""

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

__all__ = ["RunningService", "free_port", "health_status", "running", "start_service"]


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
