"""A service that listens beyond loopback with nothing authenticating its callers says so
at start (issue 17, defect 6); real encoder processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipsearch.serving import is_loopback
from tests.servers import running, start_service
from tests.weights_server import save_small_clip

WARNING = "beyond loopback, with no --token and no client certificates"


def test_loopback_hosts() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]")
    assert is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("")
    assert not is_loopback("no-such-host.invalid")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_small_clip(tmp_path_factory.mktemp("model") / "small.pt")


def test_open_service_on_every_interface_warns(model: Path, tmp_path: Path) -> None:
    with running(["serve", "encoder", "--model", str(model), "--device", "cpu",
                  "--host", "0.0.0.0", "--metrics-port", "0"], tmp_path / "open.log") as service:
        log = service.log()  # SERVING by now, so well past the start
    assert "WARNING" in log and WARNING in log
    assert f"listening on 0.0.0.0:{service.port}" in log


@pytest.mark.parametrize("flags", [["--host", "0.0.0.0", "--token", "s3cret"],
                                   ["--host", "127.0.0.1"]], ids=["token", "loopback"])
def test_no_warning_with_a_token_or_on_loopback(flags: list[str], tmp_path: Path) -> None:
    # An encoder without weights: it listens, then fails its load at once (exit 2).
    service = start_service(["serve", "encoder", "--model", "ViT-B/32", "--no-download",
                             "--weights-dir", str(tmp_path), *flags], tmp_path / "e.log",
                            wait=False)
    assert service.process.wait(120) == 2
    log = service.log()
    assert "listening on" in log and WARNING not in log
