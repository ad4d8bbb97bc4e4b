"""`clipsearch eval` (issue 12): real encoder processes, labels from folders, file names, CSV."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from clipsearch.commands_eval import label_pictures
from encoder_service.testmodels import shape_dataset
from tests.conftest import PHOTOS
from tests.servers import RunningService

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


def test_random_weights_report_chance(encoder_fp32: RunningService, tmp_path: Path) -> None:
    """200 ImageNet classes, labels from the file names: random weights are near chance
    (top-1 chance 0.005)."""
    report_path = tmp_path / "report.json"
    table = run_eval(str(PHOTOS), "--encoder", encoder_fp32.address, "--json",
                        str(report_path))
    report = json.loads(report_path.read_text())
    print(table)
    assert report["images"] == 200 and report["texts"] == 200
    assert report["accuracy_chance"]["top1"] == pytest.approx(0.005)
    assert report["accuracy"]["top1"] <= 0.03 and report["recall"]["@10"] <= 0.2
