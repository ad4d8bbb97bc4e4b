"""`EncoderClient`: texts and images in, unit float32 vectors out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Unpack

import grpc
import numpy as np

from client.channel import ClientOptions, StubClient
from client.errors import ItemsFailed, from_rpc_error
from clipsearch.encoder.v1 import encoder_pb2, encoder_pb2_grpc

# The name the encoder reports health under, beside "" (clipsearch.serving.Service).
ENCODER_SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name


@dataclass(frozen=True)
class ModelInfo:
    name: str
    dimension: int
    device: str
    precision: str
    max_batch: int
    max_delay_ms: float
    max_items_per_call: int
    context_length: int
    image_resolution: int
    fingerprint: str
    device_note: str = ""  # why `--device auto` runs on the CPU, when it does
    max_message_bytes: int = 0  # largest request the encoder takes (0: not told)


@dataclass(frozen=True)
class EncodeResults:
    """Per-item outcome of one call: `vectors[i]` is valid where `i not in failures`
    (zeros elsewhere); `truncated[i]` says a text was cut to the context length."""

    vectors: np.ndarray
    failures: dict[int, str]
    truncated: list[bool]


def parse_response(response: encoder_pb2.EncodeResponse,
                   dimension: int | None = None) -> EncodeResults:
    """Per-item results of an EncodeText/EncodeImage response. Without `dimension`, it
    is taken from the first vector (0 when every item failed)."""
    if dimension is None:
        dimension = next((len(r.vector.values) for r in response.results
                          if r.HasField("vector")), 0)
    vectors = np.zeros((len(response.results), dimension), np.float32)
    failures: dict[int, str] = {}
    for i, result in enumerate(response.results):
        if result.HasField("error"):
            failures[i] = result.error.message
        else:
            vectors[i] = result.vector.values
    return EncodeResults(vectors, failures, [r.truncated for r in response.results])


class EncoderClient(StubClient):
    """A blocking client of the encoder service.

    >>> client = EncoderClient("localhost:50051")
    >>> client.encode_texts(["a white dog"]).shape
    (1, 512)
    """

    # Calls go only to replicas whose model is loaded (what the encoder reports SERVING).
    health_service = ENCODER_SERVICE

    def __init__(self, address: str, **options: Unpack[ClientOptions]) -> None:
        super().__init__(address, **options)
        self._stub = encoder_pb2_grpc.EncoderStub(self._channel)
        self._info: ModelInfo | None = None

    def model_info(self) -> ModelInfo:
        if self._info is None:
            try:
                info = self._stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(),
                                               timeout=self.timeout_s)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc) from None
            self._info = ModelInfo(info.name, info.dimension, info.device, info.precision,
                                   info.max_batch, info.max_delay_ms, info.max_items_per_call,
                                   info.context_length, info.image_resolution, info.fingerprint,
                                   info.device_note, info.max_message_bytes)
        return self._info

    def encode_texts_results(self, texts: Sequence[str]) -> EncodeResults:
        """Per-item results, bad items included (see EncodeResults)."""
        return self._call(self._stub.EncodeText, encoder_pb2.EncodeTextRequest(texts=texts))

    def encode_images_results(self, images: Sequence[bytes]) -> EncodeResults:
        return self._call(self._stub.EncodeImage, encoder_pb2.EncodeImageRequest(images=images))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) unit vectors; ItemsFailed names any bad text."""
        return _all_or_raise(self.encode_texts_results(texts))

    def encode_images(self, images: Sequence[bytes]) -> np.ndarray:
        """(len(images), dim) unit vectors of encoded image files; ItemsFailed names any bad one."""
        return _all_or_raise(self.encode_images_results(images))

    def _call(self, method: grpc.UnaryUnaryMultiCallable,
              request: encoder_pb2.EncodeTextRequest | encoder_pb2.EncodeImageRequest
              ) -> EncodeResults:
        dimension = self.model_info().dimension
        try:
            response = method(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return parse_response(response, dimension)


def _all_or_raise(results: EncodeResults) -> np.ndarray:
    if results.failures:
        raise ItemsFailed(results.failures)
    return results.vectors
