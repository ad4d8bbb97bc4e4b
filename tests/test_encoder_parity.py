"""The encoder's vectors equal the seed's reference code, at every batch size and precision."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import pytest
import torch

from client import EncoderClient
from encoder_service.model import clip, encode_text_trimmed, load_model
from tests.conftest import Reference
from tests.servers import RunningService
from tests.vectors import cosines

TOKENIZER = clip.clip._tokenizer
# Each of these is one BPE token, so n words make n tokens.
WORDS = ["dog", "photo", "white", "red", "small", "big", "house", "tree", "sky", "car", "running",
         "quickly", "over", "the", "a", "of", "blue", "green", "cat", "field", "garden", "beach",
         "mountain", "night", "city", "road"]


def text_with_tokens(n: int, seed: int) -> str:
    """A text whose BPE encoding is exactly n tokens (common words are one token each)."""
    rng = np.random.default_rng(seed)
    text = " ".join(rng.choice(WORDS, n))
    assert len(TOKENIZER.encode(text)) == n
    return text


@pytest.fixture(scope="module")
def photo_bytes(photos: list[Path]) -> list[bytes]:
    return [p.read_bytes() for p in photos]


@pytest.fixture(scope="module")
def reference_images(reference_photo_vectors: np.ndarray) -> np.ndarray:
    return reference_photo_vectors


def test_images_match_reference_fp32(encoder_fp32: RunningService, photo_bytes: list[bytes],
                                     reference_images: np.ndarray) -> None:
    with EncoderClient(encoder_fp32.address) as client:
        served = np.concatenate([client.encode_images(photo_bytes[i:i + 50])
                                 for i in range(0, len(photo_bytes), 50)])
    assert served.shape == (200, 512)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    assert cosines(served, reference_images).min() >= 0.99999


def test_images_match_reference_bf16(encoder_bf16: RunningService, photo_bytes: list[bytes],
                                     reference_images: np.ndarray) -> None:
    with EncoderClient(encoder_bf16.address) as client:
        assert client.model_info().precision == "bf16"
        served = np.concatenate([client.encode_images(photo_bytes[i:i + 50])
                                 for i in range(0, len(photo_bytes), 50)])
    assert cosines(served, reference_images).min() >= 0.999


def test_texts_of_every_length_match_reference(encoder_fp32: RunningService,
                                               reference_model: Reference) -> None:
    # 1..75 BPE tokens fill 3..77 positions; 76 and 100 tokens overflow and are truncated.
    texts = [text_with_tokens(n, seed=n) for n in (*range(1, 76), 76, 100)]
    with EncoderClient(encoder_fp32.address) as client:
        results = client.encode_texts_results(texts)
    assert not results.failures
    assert results.truncated == [False] * 75 + [True, True]
    assert cosines(results.vectors, reference_model.texts(texts)).min() >= 0.99999


def test_texts_match_reference_bf16(encoder_bf16: RunningService,
                                    reference_model: Reference) -> None:
    texts = [text_with_tokens(n, seed=n) for n in range(1, 76, 5)]
    with EncoderClient(encoder_bf16.address) as client:
        served = client.encode_texts(texts)
    assert cosines(served, reference_model.texts(texts)).min() >= 0.999


def test_trimmed_text_tower_equals_full_length(reference_model: Reference) -> None:
    """Cutting the batch at its last end-of-text token gives CLIP's own encode_text."""
    texts = ["a dog", text_with_tokens(20, seed=1), text_with_tokens(40, seed=2)]
    tokens = clip.tokenize(texts)
    with torch.inference_mode():
        full = reference_model.model.encode_text(tokens)
        trimmed = encode_text_trimmed(reference_model.model, tokens)
    assert int(tokens.argmax(dim=-1).max()) + 1 == 42  # the batch really was cut (77 -> 42)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)


def test_batch_size_never_changes_a_vector(encoder_fp32: RunningService,
                                           photo_bytes: list[bytes]) -> None:
    images = photo_bytes[:32]
    texts = [text_with_tokens(n, seed=n) for n in range(1, 33)]
    with EncoderClient(encoder_fp32.address) as client:
        batched_images = client.encode_images(images)
        batched_texts = client.encode_texts(texts)
        # 32 concurrent one-item calls: the batcher forms batches of other sizes.
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            single_images = np.concatenate(list(pool.map(lambda b: client.encode_images([b]),
                                                          images)))
            single_texts = np.concatenate(list(pool.map(lambda t: client.encode_texts([t]),
                                                         texts)))
    np.testing.assert_allclose(single_images, batched_images, atol=2e-5)
    np.testing.assert_allclose(single_texts, batched_texts, atol=2e-5)


def test_bf16_weights_are_exactly_bf16_autocast(tiny_clip: Path) -> None:
    """Keeping matmul weights in bf16 changes speed, not results: bit-identical vectors."""
    autocast = load_model(str(tiny_clip), device="cpu", precision="fp32")
    autocast.precision = "bf16"  # fp32 weights, bf16 autocast: what torch would do alone
    stored = load_model(str(tiny_clip), device="cpu", precision="bf16")
    assert stored.model.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    tokens = clip.tokenize(["a red circle", "a green star on a white background"])
    pixels = torch.randn(3, 3, stored.image_resolution, stored.image_resolution)
    np.testing.assert_array_equal(stored.encode_tokens(tokens), autocast.encode_tokens(tokens))
    np.testing.assert_array_equal(stored.encode_images(pixels), autocast.encode_images(pixels))


def test_split_preprocessing_is_bit_identical(reference_model: Reference,
                                              photos: list[Path]) -> None:
    """The service's two-stage preprocessing (PIL on the decode threads, tensor math
    batched on the model thread) gives exactly clip's preprocess output."""
    from PIL import Image

    from encoder_service.images import PreprocessStages

    stages = PreprocessStages.split(reference_model.preprocess)
    images = [Image.open(p) for p in photos[:12]]  # greyscale ones included
    batched = stages.batch([stages.pixels(image) for image in images])
    expected = torch.stack([reference_model.preprocess(image) for image in images])
    assert torch.equal(batched, expected)
