"""The search tier runs without torch: the search service and every client command work in
processes where importing torch, torchvision or clip fails (a meta-path blocker installed by
a sitecustomize module on PYTHONPATH), against an encoder started normally."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import RunningService, start_service

BLOCKED = ("torch", "torchvision", "clip")
SITECUSTOMIZE = f'''
"""Test blocker: this process must not import {", ".join(BLOCKED)}."""
import sys

BLOCKED = {set(BLOCKED)!r}


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked: this process must run without torch")
        return None


sys.meta_path.insert(0, NoTorch())
'''


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    blocker = tmp_path_factory.mktemp("no-torch")
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": str(blocker)}


@pytest.fixture(scope="module")
def search_no_torch(encoder_tiny: RunningService, no_torch_env: dict[str, str],
                    tmp_path_factory: pytest.TempPathFactory,
                    logs_dir: Path) -> Iterator[RunningService]:
    milvus = tmp_path_factory.mktemp("milvus-no-torch") / "milvus.db"
    service = start_service(["serve", "search", "--encoder", encoder_tiny.address,
                             "--milvus", str(milvus)], logs_dir / "search-no-torch.log",
                            env=no_torch_env)
    try:
        yield service
    finally:
        assert service.stop() == 0, service.log()


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clipsearch.cli", *args],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_the_blocker_blocks(no_torch_env: dict[str, str]) -> None:
    for module in BLOCKED:
        done = subprocess.run([sys.executable, "-c", f"import {module}"],
                              env={**os.environ, **no_torch_env}, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode != 0, module
        assert "blocked: this process must run without torch" in done.stderr


def test_search_service_and_client_commands_without_torch(
        search_no_torch: RunningService, no_torch_env: dict[str, str], photos: list[Path],
        tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos[:12]:
        shutil.copy(photo, folder / photo.name)
    env = {**no_torch_env, "CLIPSEARCH_ADDRESS": search_no_torch.address}

    health = _cli(env, "health")
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING"), health.stderr

    index = _cli(env, "index", str(folder), "--quiet")
    assert index.returncode == 0, index.stderr
    assert "12 added" in index.stdout, index.stdout

    grid = tmp_path / "grid.png"
    search = _cli(env, "search", "a dog", "--top-k", "5", "--json", "--grid", str(grid))
    assert search.returncode == 0, search.stderr
    hits = json.loads(search.stdout)
    assert len(hits) == 5
    assert {Path(h["uri"]).parent for h in hits} == {folder}
    assert grid.stat().st_size > 1000

    by_image = _cli(env, "search", "--image", str(folder / photos[0].name), "--json")
    assert by_image.returncode == 0, by_image.stderr
    assert json.loads(by_image.stdout)[0]["uri"] == str(folder / photos[0].name)

    stats = _cli(env, "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["count"] == 12

    deleted = _cli(env, "delete", "--id", hits[0]["id"])
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.strip() == "deleted 1"

    # The Python client library too.
    code = ("from client import SearchClient\n"
            f"with SearchClient({search_no_torch.address!r}) as c:\n"
            "    print(c.stats().count)\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **no_torch_env},
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "11"), done.stderr
    assert "blocked" not in search_no_torch.log()
