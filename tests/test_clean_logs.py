"""A healthy run logs no error-level line: an operator reads one as an outage.

Both services on Milvus Lite, 35 s of index and search load with a quiet spell in the
middle (the Lite channel's keepalive pings used to earn a GOAWAY ENHANCE_YOUR_CALM
"too_many_pings" from the embedded server, logged by gRPC core at error level: see
search_service/store.py), then a graceful stop; the test reads both logs."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from pathlib import Path

import pytest

from client import SearchClient
from clipsearch.logs import GRPC_SERVER_LOGGER, configure_logging
from tests.servers import running

RUN_S = 35.0  # busy 5 s, quiet 25 s, busy 5 s
QUIET_S = 25.0  # longer than two keepalive intervals of pymilvus (10 s)
# gRPC core (absl: E1128 13:20:00.1 ...), our plain and JSON formats, pymilvus's own.
ERROR_LINE = re.compile(r"^[EF]\d{4} |^\S+ \S+ (ERROR|CRITICAL) |\"level\": \"(error|critical)\""
                        r"|\[(ERROR|CRITICAL)\]|GOAWAY|too_many_pings|Traceback")
QUERIES = ["a dog", "a red car", "a bird on a branch", "a bowl of soup", "a white cat"]


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if ERROR_LINE.search(line)]


def test_the_pattern_finds_error_lines() -> None:
    found = error_lines(
        "E1128 13:20:00.123456 1234 chttp2_transport.cc:1234] ipv4:127.0.0.1:41234: Received a "
        "GOAWAY with error code ENHANCE_YOUR_CALM and debug data equal to \"too_many_pings\"\n"
        "2026-11-28 13:20:00,123 ERROR clipsearch.search: cannot open\n"
        "2026-11-28 13:20:00,123 [ERROR][_log_rpc_error]: RPC error: [search]\n"
        "2026-11-28 13:20:00,123 INFO clipsearch.serving: rpc done status=OK\n"
        "I1128 13:20:00.123456 1234 trace.cc:91] fine\n")
    assert len(found) == 3


def _load(address: str, until: float, errors: list[BaseException], counts: list[int]) -> None:
    with SearchClient(address, timeout_s=30) as client:
        i = 0
        while time.monotonic() < until:
            try:
                client.search_text(QUERIES[i % len(QUERIES)] + f" {i}", top_k=10)
                counts.append(1)
            except BaseException as exc:  # reported by the test
                errors.append(exc)
                return
            i += 1


def test_healthy_run_logs_no_error_line(tiny_clip: Path, photos: list[Path],
                                        tmp_path: Path) -> None:
    with running(["serve", "encoder", "--model", str(tiny_clip), "--device", "cpu",
                  "--precision", "fp32"], tmp_path / "encoder.log") as encoder, \
         running(["serve", "search", "--encoder", encoder.address, "--milvus",
                  str(tmp_path / "milvus.db")], tmp_path / "search.log") as search:
        started = time.monotonic()
        errors: list[BaseException] = []
        counts: list[int] = []
        with SearchClient(search.address, timeout_s=60) as client:
            summary = client.index_files(photos[:60])
        assert summary.added == 60 and not summary.failures
        busy_until = started + (RUN_S - QUIET_S) / 2
        for phase_end in (busy_until, started + RUN_S):
            threads = [threading.Thread(target=_load, args=(search.address, phase_end, errors,
                                                            counts)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not errors, errors
            if phase_end == busy_until:
                time.sleep(QUIET_S)  # idle: only keepalive traffic, if any
        with SearchClient(search.address) as client:
            assert client.stats().count == 60
        assert time.monotonic() - started >= RUN_S
        assert len(counts) > 50, len(counts)
        search_code, encoder_code = search.stop(), encoder.stop()
    assert (search_code, encoder_code) == (0, 0)
    for service in (search, encoder):
        assert error_lines(service.log()) == [], service.log_path


def test_a_cancelled_call_logs_no_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    """grpc logs a handler cancelled by the server's stop as an unhandled exception, with a
    traceback (a CI run's failed start did, for a health Watch opened in that millisecond);
    the services drop that record, and keep grpc's other errors."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging()
        grpc_server = logging.getLogger(GRPC_SERVER_LOGGER)
        for error in (asyncio.CancelledError(), ValueError("a real bug")):
            try:
                raise error
            except BaseException:
                grpc_server.exception("Exception not handled by _handle_exceptions in "
                                      "servicer method [/grpc.health.v1.Health/Watch]")
        logged = capsys.readouterr().err
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert logged.count("Exception not handled") == 1, logged
    assert "ValueError: a real bug" in logged and "CancelledError" not in logged
