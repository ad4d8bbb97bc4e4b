"""CLIP checkpoints for machines without the released weights.

Two kinds, both saved as plain state dicts in the released layout (fp16 where
``clip.model.convert_weights`` puts it), which ``clip.model.build_model`` rebuilds:

* a randomly initialised ViT-B/32: the real architecture and sizes, meaningless embeddings;
  good for shape, memory and speed checks.
* a tiny CLIP trained in a couple of minutes on generated pictures of coloured shapes
  ("a red circle"); its text-to-image retrieval really works on that domain, so search
  quality can be tested end to end.

Load them with ``build_model(torch.load(path, map_location="cpu"))`` (then ``.float()`` on CPU):
``clip.load(path)`` fails on any state-dict file in openai-clip 1.0.1, because its failed
``torch.jit.load`` leaves the file position moved (openai/CLIP#396).
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from clip.model import convert_weights
from PIL import Image, ImageDraw

from encoder_service.model import CLIP, build_model, clip  # imports clip without its warning

# Bump when the data or training recipe changes, so cached models are retrained.
TINY_CLIP_VERSION = 1
CACHE_ENV = "CLIPSEARCH_TEST_MODEL_CACHE"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "models"

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Fully saturated and far apart in hue, so jitter and resizing never make two of them meet.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "green": (30, 150, 45),
    "blue": (30, 70, 215),
    "yellow": (240, 205, 20),
    "purple": (130, 40, 170),
    "orange": (250, 130, 15),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)

# ViT-B/32 as released: clip.model.build_model infers exactly these from its state dict.
VIT_B32 = dict(
    embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
    context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
    transformer_layers=12,
)  # fmt: skip
# build_model derives heads as width // 64, so widths are 64; context and vocabulary stay at
# the released sizes so that clip.tokenize works unchanged.
TINY_CLIP = dict(
    embed_dim=64, image_resolution=32, vision_layers=4, vision_width=64, vision_patch_size=8,
    context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
    transformer_layers=2,
)  # fmt: skip


@contextmanager
def _seeded(seed: int, threads: int | None = None) -> Iterator[None]:
    """Seeded, deterministic torch inside the block; the caller's RNG and settings survive it."""
    deterministic, n_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(n_threads)


def _state_dict(model: CLIP) -> dict[str, torch.Tensor]:
    # The released checkpoints keep LayerNorms, embeddings and logit_scale in fp32, the rest fp16.
    convert_weights(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _atomic_save(state_dict: dict[str, torch.Tensor], out: Path) -> Path:
    """torch.save via a temporary file and os.replace, so readers never see half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state_dict, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is for anyone to read
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def random_vit_b32_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A ViT-B/32 state dict with CLIP's own random initialisation, the same for the same seed."""
    with _seeded(seed):
        return _state_dict(CLIP(**VIT_B32))


def save_random_vit_b32(out: Path, seed: int = 0) -> Path:
    return _atomic_save(random_vit_b32_state_dict(seed), Path(out))


# --- generated captioned images ------------------------------------------------------------


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def _outline(shape: str, r: float) -> list[tuple[float, float]]:
    """Polygon vertices as (radius, angle) pairs around the origin, r the outer radius."""
    if shape == "square":
        return [(r, math.pi / 4 + k * math.pi / 2) for k in range(4)]
    if shape == "triangle":
        return [(r, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    if shape == "star":
        return [(r if k % 2 == 0 else 0.42 * r, -math.pi / 2 + k * math.pi / 5) for k in range(10)]
    if shape == "cross":
        w = 0.32 * r  # half the arm width
        corners = [(w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r), (w, -r)]
        corners += [(w, -w), (r, -w), (r, w), (w, w)]
        return [(math.hypot(x, y), math.atan2(y, x)) for x, y in corners]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw_shape(colour: str, shape: str, rng: random.Random, size: int = 96) -> Image.Image:
    """One randomly placed, sized and rotated shape of that colour on a pale background."""
    if rng.random() < 0.5:  # white to light grey, slightly tinted
        grey = rng.randint(205, 255)
        background = tuple(min(255, grey + rng.randint(-8, 8)) for _ in range(3))
    else:  # any pale colour
        background = tuple(rng.randint(195, 255) for _ in range(3))
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOUR_RGB[colour])

    r = rng.uniform(0.22, 0.42) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        turn = rng.uniform(0, 2 * math.pi)
        points = [(d * math.cos(a + turn), d * math.sin(a + turn)) for d, a in _outline(shape, r)]
        draw.polygon([(cx + x, cy + y) for x, y in points], fill=fill)
    return image


def shape_dataset(n_per_class: int, seed: int) -> list[tuple[Image.Image, str]]:
    """n_per_class (image, caption) pairs for every colour and shape, grouped by class."""
    rng = random.Random(seed)
    return [
        (draw_shape(colour, shape, rng), caption(colour, shape))
        for colour in COLOURS
        for shape in SHAPES
        for _ in range(n_per_class)
    ]


def retrieval_accuracy(model: CLIP, dataset: list[tuple[Image.Image, str]]) -> tuple[float, float]:
    """(text-to-image recall@1, image-to-text accuracy) over the dataset's distinct captions.

    A caption hits when its most similar image has that caption; an image hits when its most
    similar caption is its own.
    """
    captions = sorted({c for _, c in dataset})
    preprocess = clip.clip._transform(model.visual.input_resolution)
    with torch.no_grad():
        images = torch.stack([preprocess(image) for image, _ in dataset])
        image_features = F.normalize(model.encode_image(images).float(), dim=-1)
        text_features = F.normalize(model.encode_text(clip.tokenize(captions)).float(), dim=-1)
    labels = torch.tensor([captions.index(c) for _, c in dataset])
    similarity = text_features @ image_features.T
    recall = (labels[similarity.argmax(dim=1)] == torch.arange(len(captions))).float().mean()
    accuracy = (similarity.argmax(dim=0) == labels).float().mean()
    return recall.item(), accuracy.item()


# --- the tiny trained CLIP -----------------------------------------------------------------


def train_tiny_clip(
    out: Path,
    seed: int = 0,
    steps: int = 1200,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train a tiny CLIP on generated coloured shapes with CLIP's contrastive loss; save to out."""
    say = log or (lambda _: None)
    started = time.perf_counter()
    resolution = TINY_CLIP["image_resolution"]
    preprocess = clip.clip._transform(resolution)
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    tokens = clip.tokenize([caption(colour, shape) for colour, shape in pairs])
    n_classes, groups = len(pairs), 4
    rng = random.Random(10_000 + seed)  # held-out sets use other seeds

    def batch() -> torch.Tensor:
        # Fresh pictures every step (drawing is cheap), so the model cannot memorise any.
        # Each group holds one image of every class, so the batch has no false negatives
        # and the plain CLIP loss applies within it.
        images = [draw_shape(colour, shape, rng) for _ in range(groups) for colour, shape in pairs]
        return torch.stack([preprocess(image) for image in images])

    with _seeded(seed, threads=1):
        model = CLIP(**TINY_CLIP).train()
        # The captions use a dozen of the 49408 token embeddings; updating the whole table
        # every step would cost more than the rest of the model, and random rows are distinct.
        model.token_embedding.weight.requires_grad_(False)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=2e-3, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
        target = torch.arange(n_classes)
        for step in range(1, steps + 1):
            image_features = F.normalize(model.encode_image(batch()), dim=-1)
            text_features = F.normalize(model.encode_text(tokens), dim=-1)
            logits = model.logit_scale.exp() * image_features.view(groups, n_classes, -1)
            logits = logits @ text_features.T  # [group, image, text]
            loss = (
                F.cross_entropy(logits.flatten(0, 1), target.repeat(groups))
                + F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), target.repeat(groups))
            ) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():  # as in CLIP: cap the temperature at 100
                model.logit_scale.clamp_(0, math.log(100))
            if step % 100 == 0 or step == steps:
                elapsed = time.perf_counter() - started
                say(f"step {step}/{steps}  loss {loss.item():.4f}  {elapsed:.0f}s")
        state_dict = _state_dict(model.eval())

    _atomic_save(state_dict, Path(out))
    # Check what was saved, fp16 and all, the way the encoder service will load it.
    saved = build_model(torch.load(out, map_location="cpu")).float()
    recall, accuracy = retrieval_accuracy(saved, shape_dataset(5, seed=20_000 + seed))
    say(f"saved {out}: held-out recall@1 {recall:.3f}, image-to-text accuracy {accuracy:.3f}, "
        f"{time.perf_counter() - started:.0f}s in all")  # fmt: skip
    return Path(out)


def _cache_dir(cache_dir: Path | None) -> Path:
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def cached_tiny_clip(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The trained tiny CLIP, trained on first use and kept under the cache directory."""
    path = _cache_dir(cache_dir) / f"tiny-clip-v{TINY_CLIP_VERSION}-seed{seed}.pt"
    return path if path.exists() else train_tiny_clip(path, seed=seed)


def cached_random_vit_b32(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The random ViT-B/32, created on first use and kept under the cache directory."""
    path = _cache_dir(cache_dir) / f"random-vit-b32-seed{seed}.pt"
    return path if path.exists() else save_random_vit_b32(path, seed=seed)
