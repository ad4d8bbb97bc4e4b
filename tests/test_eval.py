"""`clipsearch eval` (issue 12): real encoder processes, labels from folders, file names, CSV;
and end to end through both services (`--search`: indexed by the search service, recall
from its SearchText), over Milvus Lite."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from PIL import Image

from client import SearchClient
from clipsearch.commands_eval import label_pictures
from encoder_service.testmodels import shape_dataset
from tests.conftest import PHOTOS
from tests.servers import RunningService, running

ROOT = Path(__file__).resolve().parents[1]


def run_eval(*args: str) -> str:
    """Runs `clipsearch eval` as a user would; its printed table."""
    out = subprocess.run([sys.executable, "-m", "clipsearch.cli", "eval", *args],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return out.stdout


def test_labels_from_sub_folders_file_names_and_csv(tmp_path: Path) -> None:
    for name in ("golden retriever/1.jpg", "tabby_cat/2.jpg"):
        (tmp_path / "a" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "a" / name)
    labelled = label_pictures(tmp_path / "a", None, "a photo of a {label}.")
    assert labelled.texts == ["a photo of a golden retriever.", "a photo of a tabby cat."]
    imagenet = label_pictures(PHOTOS, None, "a photo of a {label}.")
    assert imagenet.source == "imagenet file names" and len(imagenet.paths) == 200
    assert "a photo of a tench." in imagenet.texts
    (tmp_path / "b").mkdir()
    for name in ("a_red_circle_0003.png", "a_blue_star_0001.png", "unlisted.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "b" / name)
    assert sorted(label_pictures(tmp_path / "b", None, "").texts) == [
        "a blue star", "a red circle", "unlisted"]
    (tmp_path / "captions.csv").write_text("a_red_circle_0003.png,a round red thing\n"
                                           "a_blue_star_0001.png,\"a star, blue\"\n")
    csv_labelled = label_pictures(tmp_path / "b", tmp_path / "captions.csv", "")
    assert sorted(csv_labelled.texts) == ["a round red thing", "a star, blue"]


def test_tiny_model_on_shapes_reports_its_real_recall(encoder_tiny: RunningService,
                                                      tmp_path: Path) -> None:
    folder = tmp_path / "shapes"
    folder.mkdir()
    for i, (image, text) in enumerate(shape_dataset(n_per_class=3, seed=31_337)):
        image.save(folder / f"{text.replace(' ', '_')}_{i:04d}.png")
    report_path = tmp_path / "report.json"
    table = run_eval(str(folder), "--encoder", encoder_tiny.address, "--json",
                        str(report_path))
    report = json.loads(report_path.read_text())
    print(table)
    assert report["images"] == 90 and report["texts"] == 30
    assert report["source"] == "file names"
    assert report["recall"]["@1"] >= 0.9 and report["accuracy"]["top1"] >= 0.9
    assert report["recall_chance"]["@1"] == pytest.approx(3 / 90, rel=1e-6)
    assert "text-to-image recall@1" in table and "zero-shot accuracy top1" in table


def _shapes(folder: Path) -> Path:
    folder.mkdir()
    for i, (image, text) in enumerate(shape_dataset(n_per_class=3, seed=31_337)):
        image.save(folder / f"{text.replace(' ', '_')}_{i:04d}.png")
    return folder


def _search(encoder: RunningService, tmp_path: Path,
            name: str) -> AbstractContextManager[RunningService]:
    """A search service over `encoder` and a fresh Milvus Lite file, collection `name`."""
    return running(["serve", "search", "--encoder", encoder.address, "--milvus",
                    str(tmp_path / "milvus.db"), "--collection", name],
                   tmp_path / f"search-{name}.log")


def test_tiny_model_through_both_services(encoder_tiny: RunningService, tmp_path: Path) -> None:
    """Indexed through the search service, recall from SearchText: the tiny model's real
    recall, and the same as the encoder-only measure on the same pictures (FLAT is exact)."""
    folder = _shapes(tmp_path / "shapes")
    direct, through = tmp_path / "direct.json", tmp_path / "through.json"
    run_eval(str(folder), "--encoder", encoder_tiny.address, "--json", str(direct))
    with _search(encoder_tiny, tmp_path, "eval_tiny") as search:
        table = run_eval(str(folder), "--encoder", encoder_tiny.address, "--search",
                         search.address, "--json", str(through))
        print(table)
        assert SearchClient(search.address).stats().count == 90
    report, alone = json.loads(through.read_text()), json.loads(direct.read_text())
    assert report["through"] == (f"search service at {search.address}, collection "
                                 "eval_tiny (90 images)")
    assert report["images"] == 90 and report["texts"] == 30
    assert report["recall"]["@1"] >= 0.9 and report["accuracy"]["top1"] >= 0.9
    assert report["recall_chance"]["@1"] == pytest.approx(3 / 90, rel=1e-6)
    for measure in ("recall", "accuracy"):
        for k, value in alone[measure].items():
            assert report[measure][k] == pytest.approx(value, abs=1 / 30 + 1e-9), (measure, k)


def test_random_weights_through_both_services_report_chance(encoder_bf16: RunningService,
                                                            tmp_path: Path) -> None:
    """200 ImageNet classes, labels from the file names, the photos indexed through the
    search service; random weights find their label's photo at chance (recall@10 chance
    0.05, top-1 accuracy chance 0.005). (bf16: chance is chance, at half fp32's cost.)"""
    report_path = tmp_path / "report.json"
    with _search(encoder_bf16, tmp_path, "eval_random") as search:
        print(run_eval(str(PHOTOS), "--encoder", encoder_bf16.address, "--search",
                       search.address, "--json", str(report_path)))
    report = json.loads(report_path.read_text())
    assert report["through"].endswith("collection eval_random (200 images)")
    assert report["images"] == 200 and report["texts"] == 200
    assert report["recall_chance"]["@10"] == pytest.approx(0.05)
    assert report["accuracy_chance"]["top1"] == pytest.approx(0.005)
    assert report["accuracy"]["top1"] <= 0.03 and report["recall"]["@10"] <= 0.2


def test_search_service_of_another_model_is_refused(encoder_tiny: RunningService,
                                                    encoder_fp32: RunningService,
                                                    tmp_path: Path) -> None:
    """Stored vectors of one model, queries of another: eval stops and says so."""
    folder = _shapes(tmp_path / "shapes")
    with _search(encoder_fp32, tmp_path, "eval_other") as search:
        out = subprocess.run([sys.executable, "-m", "clipsearch.cli", "eval", str(folder),
                              "--encoder", encoder_tiny.address, "--search", search.address],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "give --encoder the search service's encoder" in out.stderr
