"""Weights downloads that heal (issue 17, defect 2): against a real HTTP server on loopback
that serves a small checkpoint under its SHA-256, as OpenAI's URLs do, and misbehaves on
purpose: cut short, other bytes, stalled, several downloaders at once, a damaged file."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipsearch.cli import build_parser
from clipsearch.options import from_namespace
from encoder_service import weights
from encoder_service.config import EncoderConfig
from encoder_service.model import ModelLoadError, clip, load_model
from encoder_service.weights import WeightsError, ensure_weights
from tests.servers import start_service
from tests.weights_server import WeightsServer, save_small_clip, serving


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return save_small_clip(tmp_path_factory.mktemp("ckpt") / "small.pt").read_bytes()


@pytest.fixture
def server(checkpoint: bytes) -> Iterator[WeightsServer]:
    with serving(WeightsServer(checkpoint)) as state:
        yield state


def leftovers(folder: Path) -> list[str]:
    """Temporary files a download left behind."""
    return sorted(p.name for p in folder.glob("*.part"))


def test_the_hash_comes_from_the_url() -> None:
    url = clip.clip._MODELS["ViT-B/32"]
    digest = weights.expected_sha256(url)
    assert digest is not None and len(digest) == 64 and digest in url
    assert weights.expected_sha256("https://example.com/models/model.pt") is None
    assert weights.source_url(url, "http://mirror.local/clip/") == \
        f"http://mirror.local/clip/{digest}/ViT-B-32.pt"
    assert weights.source_url(url, "") == url


def test_download_is_checked_renamed_and_reported(server: WeightsServer, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="clipsearch.encoder.weights")
    server.modes = ["slow"]
    path = ensure_weights(server.url, tmp_path, progress_interval_s=0.2)
    assert path == tmp_path / "ViT-B-32.pt"
    assert path.read_bytes() == server.body
    assert path.stat().st_mode & 0o777 == 0o644  # readable by the encoder's other users
    assert leftovers(tmp_path) == []
    assert server.downloads() == 1
    progress = [r.getMessage() for r in caplog.records if "bytes (" in r.getMessage()]
    assert any(f"of {len(server.body)} bytes (" in m and "%)" in m for m in progress)
    assert progress[-1].startswith("downloaded") and "(100%)" in progress[-1]
    assert 2 <= len(progress) <= 20, progress  # a modest rate, not one line per chunk
    # The verified hash is remembered beside the file: a restart does not hash it again,
    # and does not download it again.
    assert (tmp_path / "ViT-B-32.pt.sha256").read_text().startswith(server.sha256)
    assert ensure_weights(server.url, tmp_path) == path
    assert server.downloads() == 1


def test_truncated_download_keeps_nothing_and_heals_on_the_next_try(
        server: WeightsServer, tmp_path: Path) -> None:
    server.modes = ["truncate", "ok"]
    with pytest.raises(WeightsError, match=r"broke off after \d+ of \d+ bytes"):
        ensure_weights(server.url, tmp_path)
    assert not (tmp_path / "ViT-B-32.pt").exists() and leftovers(tmp_path) == []
    assert ensure_weights(server.url, tmp_path).read_bytes() == server.body


def test_wrong_bytes_are_refused(server: WeightsServer, tmp_path: Path) -> None:
    server.modes = ["wrong"]
    with pytest.raises(WeightsError, match=f"has sha256 [0-9a-f]{{64}}, not the {server.sha256}"):
        ensure_weights(server.url, tmp_path)
    assert not (tmp_path / "ViT-B-32.pt").exists() and leftovers(tmp_path) == []


def test_stalled_download_times_out(server: WeightsServer, tmp_path: Path) -> None:
    server.modes = ["stall"]
    started = time.monotonic()
    with pytest.raises(WeightsError, match=r"stalled: no data for 1 s after \d+ of \d+ bytes"):
        ensure_weights(server.url, tmp_path, timeout_s=1)
    assert time.monotonic() - started < 15
    assert not (tmp_path / "ViT-B-32.pt").exists() and leftovers(tmp_path) == []


def test_damaged_file_is_downloaded_again(server: WeightsServer, tmp_path: Path) -> None:
    path = tmp_path / "ViT-B-32.pt"
    path.write_bytes(server.body[:1000])  # what an interrupted direct download leaves
    assert ensure_weights(server.url, tmp_path).read_bytes() == server.body
    assert server.downloads() == 1
    # Damaged later in place (same size): the remembered hash no longer applies.
    damaged = bytearray(server.body)
    damaged[-1] ^= 0xFF
    time.sleep(0.01)
    path.write_bytes(bytes(damaged))
    assert ensure_weights(server.url, tmp_path).read_bytes() == server.body
    assert server.downloads() == 2


def test_with_downloads_off(server: WeightsServer, tmp_path: Path,
                            caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(WeightsError, match="downloads are off"):
        ensure_weights(server.url, tmp_path, download=False)
    # A file that is not the published one is the operator's business: used, with a warning.
    (tmp_path / "ViT-B-32.pt").write_bytes(b"my own weights")
    assert ensure_weights(server.url, tmp_path, download=False).read_bytes() == b"my own weights"
    assert "not the published" in caplog.text
    assert server.downloads() == 0


def test_concurrent_processes_download_once(server: WeightsServer, tmp_path: Path) -> None:
    """Four replicas sharing one volume: one downloads, the others wait for it."""
    server.modes = ["slow"]
    stale = tmp_path / ".ViT-B-32.pt.dead1234.part"  # from a download killed earlier
    stale.write_bytes(b"x" * 100)
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO)\n"
            "from encoder_service.weights import ensure_weights\n"
            "print(ensure_weights(sys.argv[1], sys.argv[2]))")
    processes = [subprocess.Popen([sys.executable, "-c", code, server.url, str(tmp_path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, outputs
    assert {out.strip() for out, _ in outputs} == {str(tmp_path / "ViT-B-32.pt")}
    assert server.downloads() == 1, server.requests
    assert (tmp_path / "ViT-B-32.pt").read_bytes() == server.body
    assert leftovers(tmp_path) == []


def test_mirror_and_timeout_are_encoder_options(server: WeightsServer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Flag, environment variable and default of each come from EncoderConfig, as the
    encoder parses them, and reach the loader: the URL names OpenAI's host, the mirror
    serves the same <sha256>/<file> layout."""
    published = f"https://openaipublic.invalid/clip/models/{server.sha256}/ViT-B-32.pt"
    monkeypatch.setitem(clip.clip._MODELS, "ViT-B/32", published)

    def config(*argv: str) -> EncoderConfig:
        return from_namespace(EncoderConfig, build_parser().parse_args(["serve", "encoder",
                                                                        *argv]))
    assert (config().weights_mirror, config().download_timeout_s) == ("", 60.0)
    monkeypatch.setenv(weights.MIRROR_ENV, server.base)
    monkeypatch.setenv(weights.TIMEOUT_ENV, "5")
    options = config()
    assert (options.weights_mirror, options.download_timeout_s) == (server.base, 5.0)
    flags = config("--weights-mirror", "http://flag.invalid", "--download-timeout-s", "2")
    assert (flags.weights_mirror, flags.download_timeout_s) == ("http://flag.invalid", 2.0)
    model = load_model("ViT-B/32", weights_dir=str(tmp_path), device="cpu", precision="fp32",
                       weights_mirror=options.weights_mirror,
                       download_timeout_s=options.download_timeout_s)
    assert model.dimension == 64
    assert server.requests == [f"/clip/models/{server.sha256}/ViT-B-32.pt"]
    with pytest.raises(WeightsError, match=r"timeout of 0 s \(--download-timeout-s"):
        ensure_weights(server.url, tmp_path / "other", timeout_s=0)


def test_named_model_loads_through_the_checked_download(
        server: WeightsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoder's loader uses it: a damaged ViT-B-32.pt is replaced and loads."""
    monkeypatch.setitem(clip.clip._MODELS, "ViT-B/32", server.url)
    (tmp_path / "ViT-B-32.pt").write_bytes(server.body[: len(server.body) // 3])
    model = load_model("ViT-B/32", weights_dir=str(tmp_path), device="cpu", precision="fp32")
    assert model.dimension == 64
    assert server.downloads() == 1
    server.modes = ["wrong"]
    (tmp_path / "ViT-B-32.pt").unlink()
    with pytest.raises(ModelLoadError, match=r"CLIP weights for ViT-B/32 not found .* not the"):
        load_model("ViT-B/32", weights_dir=str(tmp_path), device="cpu", precision="fp32")


def test_encoder_with_a_stalled_download_exits_with_the_reason(server: WeightsServer,
                                                               tmp_path: Path) -> None:
    """A real encoder process: the mirror and the timeout come from its environment, and a
    stalled download ends the process (exit 2) with a message, rather than hanging."""
    server.modes = ["stall"]
    service = start_service(
        ["serve", "encoder", "--model", "ViT-B/32", "--weights-dir", str(tmp_path)],
        tmp_path / "encoder.log", wait=False,
        env={weights.MIRROR_ENV: server.base, weights.TIMEOUT_ENV: "1"})
    try:
        assert service.process.wait(120) == 2
    finally:
        service.stop()
    log = service.log()
    assert server.requests[-1].endswith("/ViT-B-32.pt")  # OpenAI's hash, asked of the mirror
    assert "stalled: no data for 1 s" in log and "cannot start" in log
    assert leftovers(tmp_path) == []
