"""The stand-in CLIP checkpoints: real architecture, determinism, and working retrieval."""

from __future__ import annotations

import random
from pathlib import Path

import clip
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip.model import build_model

from encoder_service.testmodels import (
    COLOUR_RGB,
    COLOURS,
    SHAPES,
    cached_random_vit_b32,
    cached_tiny_clip,
    caption,
    draw_shape,
    random_vit_b32_state_dict,
    shape_dataset,
)


def test_random_vit_b32_is_the_released_architecture_and_deterministic(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    state_dict = random_vit_b32_state_dict(seed=0)
    assert torch.equal(torch.rand(3), expected_next), "the caller's RNG stream was disturbed"

    # Stored like the released checkpoints: fp16 weights, fp32 norms and embeddings.
    assert state_dict["visual.conv1.weight"].dtype == torch.float16
    assert state_dict["visual.ln_pre.weight"].dtype == torch.float32

    model = build_model(dict(state_dict)).float()  # build_model deletes keys from its argument
    assert sum(p.numel() for p in model.parameters()) == 151_277_313  # ViT-B/32's count
    assert model.visual.input_resolution == 224
    assert model.context_length == 77
    with torch.no_grad():
        image = model.encode_image(torch.randn(1, 3, 224, 224))
        text = model.encode_text(clip.tokenize(["a photo of a dog"]))
    assert image.shape == text.shape == (1, 512)
    assert torch.isfinite(image).all() and torch.isfinite(text).all()

    again, other = random_vit_b32_state_dict(seed=0), random_vit_b32_state_dict(seed=1)
    assert again.keys() == state_dict.keys() == other.keys()
    assert all(torch.equal(again[k], v) for k, v in state_dict.items())
    assert not torch.equal(other["visual.proj"], state_dict["visual.proj"])

    path = cached_random_vit_b32(tmp_path)
    assert path.parent == tmp_path and path.stat().st_size > 300e6
    saved = torch.load(path, map_location="cpu")
    assert all(torch.equal(saved[k], v) for k, v in state_dict.items())


@pytest.fixture(scope="module")
def tiny_clip_path() -> Path:
    # Trains for about two minutes the first time, then comes from the (git-ignored) cache.
    return cached_tiny_clip()


def test_tiny_clip_retrieves_held_out_shapes(tiny_clip_path: Path) -> None:
    assert cached_tiny_clip() == tiny_clip_path
    state_dict = torch.load(tiny_clip_path, map_location="cpu")
    assert state_dict["visual.conv1.weight"].dtype == torch.float16
    model = build_model(state_dict).float()
    assert model.context_length == 77 and model.vocab_size == 49408

    # Held-out pictures, drawn from a seed training never used.
    held_out = shape_dataset(5, seed=4242)
    captions = [caption(colour, shape) for colour in COLOURS for shape in SHAPES]
    labels = torch.tensor([captions.index(c) for _, c in held_out])
    preprocess = clip.clip._transform(model.visual.input_resolution)
    with torch.no_grad():
        images = F.normalize(model.encode_image(torch.stack([preprocess(i) for i, _ in held_out])))
        texts = F.normalize(model.encode_text(clip.tokenize(captions)))
    similarity = texts @ images.T

    recall_at_1 = (labels[similarity.argmax(dim=1)] == torch.arange(len(captions))).float().mean()
    image_to_text = (similarity.argmax(dim=0) == labels).float().mean()
    assert recall_at_1 >= 0.9
    assert image_to_text >= 0.9


def test_draw_shape_is_deterministic_per_seed() -> None:
    def pixels(seed: int) -> np.ndarray:
        return np.asarray(draw_shape("red", "star", random.Random(seed)))

    first = pixels(7)
    assert first.shape == (96, 96, 3)
    assert np.array_equal(first, pixels(7))
    assert not np.array_equal(first, pixels(8))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("colour", COLOURS)
def test_draw_shape_paints_the_colour(colour: str, shape: str) -> None:
    rng = random.Random(0)
    for _ in range(5):
        image = np.asarray(draw_shape(colour, shape, rng, size=64)).astype(int)
        distance = np.abs(image - np.array(COLOUR_RGB[colour])).max(axis=-1)
        # The smallest shape covers about 6% of the picture, jitter moves a channel by <= 20.
        assert (distance <= 20).mean() > 0.04
        assert (distance <= 20).mean() < 0.6  # and the background is not that colour


def test_shape_dataset_covers_every_class() -> None:
    dataset = shape_dataset(2, seed=0)
    assert len(dataset) == 2 * len(COLOURS) * len(SHAPES)
    assert {c for _, c in dataset} == {caption(c, s) for c in COLOURS for s in SHAPES}
    assert caption("red", "circle") == "a red circle"
