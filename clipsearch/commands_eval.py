"""`clipsearch eval FOLDER`: how well the served model finds the user's own pictures.

Each picture gets a text: its label (the sub-folder it is in, or the class in an ImageNet
file name such as `n01440764_tench.JPEG`), or its caption (a CSV of `file,caption`, or
the file name itself: `a_red_circle_0003.png` -> "a red circle"). Labels are turned into
CLIP's prompt ("a photo of a {label}."); captions are used as they are. The encoder
(`--encoder`) encodes every picture and every distinct text, and two measures follow:

* zero-shot classification: a picture is right when its own text is the most similar of
  all the distinct texts (top-1; top-5 too);
* text-to-image recall@k: a text finds its pictures when one of them is among the k
  pictures most similar to it, over all the pictures.

Each is printed beside its chance level (what random vectors would score).

With `--search ADDRESS` the measure runs through both services, as users search: the
folder is indexed through the search service (its Index stream: the encoder encodes each
picture and the vectors are stored in its Milvus collection), recall@k is that of
SearchText (the search service encodes the text through its encoder and searches the
collection), and zero-shot accuracy compares the vectors the collection stored (read back
with Get) with the encoder's text vectors. Recall is then over everything the collection
holds: a collection of its own (`serve search --collection eval`) measures the folder
alone; its chance level counts every stored picture."""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from client import EncoderClient, SearchClient
from client.search import image_files

TEMPLATE = "a photo of a {label}."
IMAGENET_NAME = re.compile(r"^n\d{8}_(.+)$")
NUMBERED = re.compile(r"^(.*?)[_\- ]?\d+$")
KS = (1, 5, 10)
LABEL_SOURCES = ("sub-folders", "imagenet file names")  # labels, put into the template


@dataclass
class Labelled:
    """Pictures and the text of each."""

    paths: list[Path]
    texts: list[str]
    source: str  # "sub-folders", "imagenet file names", "csv", "file names"


@dataclass
class Report:
    """What `clipsearch eval` measured."""

    model: str
    images: int
    texts: int
    source: str
    template: str
    through: str = "encoder"  # or "search service at ADDRESS, collection C (N images)"
    accuracy: dict[str, float] = field(default_factory=dict)
    accuracy_chance: dict[str, float] = field(default_factory=dict)
    recall: dict[str, float] = field(default_factory=dict)
    recall_chance: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def _words(text: str) -> str:
    return " ".join(text.replace("_", " ").split())


def label_pictures(folder: Path, captions_csv: Path | None, template: str) -> Labelled:
    """Every picture under `folder` with its text (see the module docstring)."""
    paths = image_files(folder)
    if captions_csv is not None:
        with captions_csv.open(newline="") as file:
            rows = {(folder / r[0]).resolve(): r[1] for r in csv.reader(file)
                    if len(r) >= 2 and r[0].strip()}
        pairs = [(p, rows[p.resolve()]) for p in paths if p.resolve() in rows]
        return Labelled([p for p, _ in pairs], [c for _, c in pairs], "csv")
    if paths and all(p.parent != folder for p in paths):
        return Labelled(paths, [template.format(label=_words(p.parent.name)) for p in paths],
                        "sub-folders")
    if paths and all(IMAGENET_NAME.match(p.stem) for p in paths):
        labels = [_words(IMAGENET_NAME.match(p.stem).group(1)) for p in paths]  # type: ignore[union-attr]
        return Labelled(paths, [template.format(label=label) for label in labels],
                        "imagenet file names")
    captions = [_words(m.group(1) if (m := NUMBERED.match(p.stem)) else p.stem)
                for p in paths]
    return Labelled(paths, captions, "file names")


def _recall_chance(sizes: Sequence[int], total: int, k: int) -> float:
    """Expected recall@k of a random ranking: a text with m pictures misses all of them
    with probability C(n-m, k) / C(n, k)."""
    hits = [1 - math.comb(total - m, k) / math.comb(total, k) for m in sizes]
    return float(np.mean(hits))


def measure(image_vectors: np.ndarray, text_of_image: np.ndarray,
            text_vectors: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """(accuracy top-1/top-5, recall@1/5/10) for unit vectors; text_of_image[i] is the
    index of picture i's text among the rows of text_vectors."""
    similarity = text_vectors @ image_vectors.T  # (texts, images)
    by_image = np.argsort(-similarity.T, axis=1, kind="stable")
    accuracy = {f"top{k}": float(np.mean([text_of_image[i] in by_image[i, :k]
                                          for i in range(len(by_image))]))
                for k in (1, 5) if k <= similarity.shape[0]}
    by_text = np.argsort(-similarity, axis=1, kind="stable")
    recall = {f"@{k}": float(np.mean([np.any(text_of_image[by_text[t, :k]] == t)
                                       for t in range(len(by_text))]))
              for k in KS if k <= similarity.shape[1]}
    return accuracy, recall


def evaluate(client: EncoderClient, labelled: Labelled, template: str,
             batch: int = 32) -> Report:
    """Encodes the pictures and texts through the encoder and measures them."""
    info = client.model_info()
    vectors, kept, failed = [], [], {}
    for start in range(0, len(labelled.paths), batch):
        chunk = labelled.paths[start:start + batch]
        results = client.encode_images_results([p.read_bytes() for p in chunk])
        for i, path in enumerate(chunk):
            if i in results.failures:
                failed[str(path)] = results.failures[i]
            else:
                vectors.append(results.vectors[i])
                kept.append(start + i)
    texts = sorted({labelled.texts[i] for i in kept})
    if len(texts) < 2:
        raise SystemExit(f"error: {len(texts)} distinct label(s) or caption(s) among "
                         f"{len(kept)} readable pictures; eval needs at least 2")
    text_vectors = np.concatenate([client.encode_texts(texts[i:i + batch])
                                   for i in range(0, len(texts), batch)])
    text_of_image = np.array([texts.index(labelled.texts[i]) for i in kept])
    accuracy, recall = measure(np.stack(vectors), text_of_image, text_vectors)
    sizes = np.bincount(text_of_image, minlength=len(texts)).tolist()
    return Report(
        model=f"{info.name} ({info.fingerprint})", images=len(kept), texts=len(texts),
        source=labelled.source, template=template if labelled.source in LABEL_SOURCES else "",
        accuracy=accuracy,
        accuracy_chance={f"top{k}": min(k, len(texts)) / len(texts) for k in (1, 5)
                         if k <= len(texts)},
        recall=recall,
        recall_chance={f"@{k}": _recall_chance(sizes, len(kept), k) for k in KS
                       if k <= len(kept)},
        failed=failed)


def _text_indices(texts: list[str], of_picture: list[str]) -> np.ndarray:
    position = {text: i for i, text in enumerate(texts)}
    return np.array([position[t] for t in of_picture])


def evaluate_through_search(encoder: EncoderClient, search: SearchClient, labelled: Labelled,
                            template: str, search_address: str = "",
                            batch: int = 32) -> Report:
    """Indexes the pictures through the search service and measures recall@k with
    SearchText and zero-shot accuracy with the stored vectors (see the module docstring)."""
    info, stats = encoder.model_info(), search.stats()
    if stats.model_fingerprint != info.fingerprint:
        raise SystemExit(f"error: the search service serves {stats.model} "
                         f"({stats.model_fingerprint}), the encoder {info.name} "
                         f"({info.fingerprint}): give --encoder the search service's encoder")
    summary = search.index_files(labelled.paths)
    failed = {f.uri: f.reason for f in summary.failures}
    if summary.error:
        raise SystemExit(f"error: indexing broke off: {summary.error}")
    kept = [i for i, p in enumerate(labelled.paths) if str(p.resolve()) in summary.ids]
    ids = [summary.ids[str(labelled.paths[i].resolve())] for i in kept]
    texts = sorted({labelled.texts[i] for i in kept})
    if len(texts) < 2:
        raise SystemExit(f"error: {len(texts)} distinct label(s) or caption(s) among "
                         f"{len(kept)} indexed pictures; eval needs at least 2")
    text_of_image = _text_indices(texts, [labelled.texts[i] for i in kept])
    # Pictures with the same bytes share an id (a content hash): a hit on it finds each.
    texts_of_id: dict[str, set[int]] = {}
    for image_id, text in zip(ids, text_of_image, strict=True):
        texts_of_id.setdefault(image_id, set()).add(int(text))
    stored: dict[str, np.ndarray] = {}
    unique = list(texts_of_id)
    for start in range(0, len(unique), 256):
        for item in search.get(unique[start:start + 256], with_vectors=True).items:
            if item.vector is not None:
                stored[item.id] = item.vector
    text_vectors = np.concatenate([encoder.encode_texts(texts[i:i + batch])
                                   for i in range(0, len(texts), batch)])
    accuracy, _ = measure(np.stack([stored[i] for i in ids]), text_of_image, text_vectors)
    total = search.stats().count
    deepest = min(max(KS), total)
    first_hit = []  # per text: the rank of its first picture among SearchText's hits
    for t, text in enumerate(texts):
        hits = search.search_text(text, top_k=deepest)
        first_hit.append(next((rank for rank, hit in enumerate(hits)
                               if t in texts_of_id.get(hit.id, ())), deepest))
    sizes = [sum(t in found for found in texts_of_id.values()) for t in range(len(texts))]
    return Report(
        model=f"{info.name} ({info.fingerprint})", images=len(kept), texts=len(texts),
        source=labelled.source, template=template if labelled.source in LABEL_SOURCES else "",
        through=f"search service at {search_address or '?'}, collection {stats.collection} "
                f"({total} images)",
        accuracy=accuracy,
        accuracy_chance={f"top{k}": min(k, len(texts)) / len(texts) for k in (1, 5)
                         if k <= len(texts)},
        recall={f"@{k}": float(np.mean(np.array(first_hit) < k)) for k in KS if k <= total},
        recall_chance={f"@{k}": _recall_chance(sizes, total, k) for k in KS if k <= total},
        failed=failed)


def print_table(report: Report) -> None:
    print(f"model {report.model}: {report.images} pictures, {report.texts} distinct texts "
          f"from {report.source}" + (f", prompt {report.template!r}" if report.template else "")
          + f"; through the {report.through}")
    print(f"{'measure':<28}{'value':>8}{'chance':>9}")
    for name, value in report.accuracy.items():
        print(f"{'zero-shot accuracy ' + name:<28}{value:>8.3f}"
              f"{report.accuracy_chance[name]:>9.3f}")
    for name, value in report.recall.items():
        print(f"{'text-to-image recall' + name:<28}{value:>8.3f}{report.recall_chance[name]:>9.3f}")
    for path, why in report.failed.items():
        print(f"skipped {path}: {why}", file=sys.stderr)


def _eval(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    labelled = label_pictures(folder, Path(args.captions) if args.captions else None,
                              args.template)
    if not labelled.paths:
        print(f"error: no labelled pictures under {folder}", file=sys.stderr)
        return 2
    with EncoderClient(args.encoder, token=args.token, timeout_s=args.timeout) as client:
        if args.search:
            with SearchClient(args.search, token=args.token, timeout_s=args.timeout) as search:
                report = evaluate_through_search(client, search, labelled, args.template,
                                                 args.search)
        else:
            report = evaluate(client, labelled, args.template)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds `eval` to the `clipsearch` command."""
    command = commands.add_parser(
        "eval", help="zero-shot accuracy and text-to-image recall@1/5/10 of the served model "
                     "on a folder of labelled or captioned pictures")
    command.add_argument("folder")
    command.add_argument("--captions", default="", metavar="CSV",
                         help="file,caption rows (file relative to FOLDER)")
    command.add_argument("--template", default=TEMPLATE,
                         help="prompt for labels (CLIP's: %(default)r)")
    command.add_argument("--encoder", default="127.0.0.1:50051", help="encoder address")
    command.add_argument("--search", default="", metavar="ADDRESS",
                         help="also index FOLDER through this search service and measure "
                              "recall with its SearchText (use a collection of its own: "
                              "recall is over everything the collection holds)")
    command.add_argument("--token", default="",
                         help="bearer token of the encoder (and of the search service: "
                              "it must allow indexing)")
    command.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    command.add_argument("--json", default="", metavar="FILE", help="also write the report")
    command.set_defaults(handler=_eval)
