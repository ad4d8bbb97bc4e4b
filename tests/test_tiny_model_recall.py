"""Retrieval quality through the running encoder, with the tiny CLIP trained on shapes."""

from __future__ import annotations

import io

import numpy as np

from client import EncoderClient
from encoder_service.testmodels import COLOURS, SHAPES, caption, shape_dataset
from tests.servers import RunningService


def test_text_to_image_recall_at_1(encoder_tiny: RunningService) -> None:
    held_out = shape_dataset(n_per_class=3, seed=987_654)  # seeds unlike training's
    captions = [caption(c, s) for c in COLOURS for s in SHAPES]
    images = []
    for image, _ in held_out:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        images.append(buffer.getvalue())
    labels = np.array([captions.index(text) for _, text in held_out])
    with EncoderClient(encoder_tiny.address) as client:
        image_vectors = np.concatenate([client.encode_images(images[i:i + 64])
                                        for i in range(0, len(images), 64)])
        text_vectors = client.encode_texts(captions)
    best_image = np.argmax(text_vectors @ image_vectors.T, axis=1)
    recall_at_1 = float(np.mean(labels[best_image] == np.arange(len(captions))))
    print(f"recall@1 {recall_at_1:.3f}")
    assert recall_at_1 >= 0.9, recall_at_1
