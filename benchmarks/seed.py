"""The seed tutorial's code, as published: the baseline every benchmark compares against.

One image at a time through `preprocess` + `encode_image`, normalised, then one `insert`
per image into a Milvus Lite collection (dimension 512, COSINE, auto id, dynamic field);
a query is `encode_text` + `search` with output_fields=["filepath"]."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pymilvus import MilvusClient

from encoder_service.model import CLIP, build_model, clip


class SeedTutorial:
    def __init__(self, checkpoint: Path, milvus_path: Path, collection: str = "image_embeddings",
                 device: str = "cpu"):
        # As clip.load(name, device=device, jit=False): fp16 weights on CUDA, fp32 on a CPU.
        model = build_model(torch.load(checkpoint, map_location="cpu")).to(device)
        self.model: CLIP = (model.float() if device == "cpu" else model).eval()
        self.device = device
        self.preprocess = clip.clip._transform(self.model.visual.input_resolution)
        self.milvus = MilvusClient(uri=str(milvus_path))
        self.collection = collection
        if self.milvus.has_collection(collection):
            self.milvus.drop_collection(collection)
        self.milvus.create_collection(collection_name=collection, dimension=512,
                                      enable_dynamic_field=True, auto_id=True,
                                      metric_type="COSINE")

    def encode_image(self, image_path: Path) -> list[float]:
        image = self.preprocess(Image.open(image_path)).unsqueeze(0).to(self.device)
        with torch.no_grad():
            features = self.model.encode_image(image)
            features /= features.norm(dim=-1, keepdim=True)
        return list(features.squeeze().tolist())

    def encode_text(self, text: str) -> list[float]:
        with torch.no_grad():
            features = self.model.encode_text(clip.tokenize(text).to(self.device))
            features /= features.norm(dim=-1, keepdim=True)
        return list(features.squeeze().tolist())

    def ingest(self, image_paths: list[Path]) -> float:
        """The tutorial's loop; returns images/s."""
        started = time.perf_counter()
        for image_path in image_paths:
            self.milvus.insert(self.collection, {"vector": self.encode_image(image_path),
                                                 "filepath": str(image_path)})
        return len(image_paths) / (time.perf_counter() - started)

    def search_latencies(self, queries: list[str], top_k: int = 10) -> list[float]:
        """Seconds per query of encode_text + search, one after another."""
        latencies = []
        for query in queries:
            started = time.perf_counter()
            self.milvus.search(self.collection, data=[self.encode_text(query)], limit=top_k,
                               output_fields=["filepath"], search_params={"metric_type": "COSINE"})
            latencies.append(time.perf_counter() - started)
        return latencies

    def close(self) -> None:
        self.milvus.close()


def percentiles_ms(latencies: list[float]) -> dict[str, float]:
    values = np.array(latencies) * 1000
    return {f"p{p}_ms": float(np.percentile(values, p)) for p in (50, 90, 99)}
