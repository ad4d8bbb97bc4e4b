"""Every kind of bad input gets a clear status or per-item error, and the server goes on."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from client import EncoderClient, InvalidArgument, ItemsFailed
from clipsearch.encoder.v1 import encoder_pb2
from tests.conftest import Reference
from tests.images import format_variants, png_bomb
from tests.servers import RunningService, health_status

METHOD = "/clipsearch.encoder.v1.Encoder/"


def raw_call(address: str, method: str, payload: bytes, max_send_mb: int = 100) -> bytes:
    """Sends bytes as they are, so the test can send what no well-behaved client would."""
    options = [("grpc.max_send_message_length", max_send_mb << 20)]
    with grpc.insecure_channel(address, options) as channel:
        call = channel.unary_unary(METHOD + method, request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        return bytes(call(payload, timeout=60))


def test_every_format_and_colour_mode_matches_reference(encoder_fp32: RunningService,
                                                       reference_model: Reference,
                                                       photos: list[Path]) -> None:
    variants = format_variants(photos[3])
    with EncoderClient(encoder_fp32.address) as client:
        served = client.encode_images(list(variants.values()))
    for (name, data), vector in zip(variants.items(), served, strict=True):
        cosine = float(vector @ reference_model.image(data))
        assert cosine >= 0.99999, name


def test_bad_images_fail_alone(encoder_fp32: RunningService, photos: list[Path]) -> None:
    good = photos[0].read_bytes()
    bad = {1: b"", 2: b"this is not an image", 3: good[: len(good) // 2], 4: png_bomb()}
    items = [good, bad[1], bad[2], bad[3], bad[4], good]
    with EncoderClient(encoder_fp32.address) as client:
        results = client.encode_images_results(items)
        alone = client.encode_images([good])[0]
    assert sorted(results.failures) == [1, 2, 3, 4]
    assert results.failures[1] == "images[1]: empty: zero bytes"
    assert "not an image" in results.failures[2]
    assert "truncated" in results.failures[3]
    assert "too many pixels: 30000x30000" in results.failures[4]
    # The neighbours of the bad items are encoded as if alone.
    np.testing.assert_allclose(results.vectors[[0, 5]], [alone, alone], atol=2e-5)


def test_bad_texts(encoder_fp32: RunningService) -> None:
    with EncoderClient(encoder_fp32.address) as client:
        results = client.encode_texts_results(["a dog", "", "   ", "x" * 5000, "a cat"])
        assert sorted(results.failures) == [1, 2, 3]
        assert results.failures[1] == "texts[1]: empty text (no tokens)"
        assert "over the limit of 4096" in results.failures[3]
        with pytest.raises(ItemsFailed) as raised:
            client.encode_texts(["fine", ""])
        assert raised.value.failures == {1: "texts[1]: empty text (no tokens)"}
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(InvalidArgument, match="no texts given"):
            client.encode_texts([])
        with pytest.raises(InvalidArgument, match="3000 texts in one call; at most 256"):
            client.encode_texts(["a dog"] * 3000)
        with pytest.raises(InvalidArgument, match="no images given"):
            client.encode_images([])


def test_text_that_is_not_utf8_is_invalid_argument(encoder_fp32: RunningService) -> None:
    good = encoder_pb2.EncodeTextRequest(texts=["a dog"]).SerializeToString()
    bad_text = b"\xff\xfeabc"
    payload = good + b"\x0a" + bytes([len(bad_text)]) + bad_text  # texts[1] = invalid UTF-8
    with pytest.raises(grpc.RpcError) as raised:
        raw_call(encoder_fp32.address, "EncodeText", payload)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "texts[1] is not valid UTF-8 (byte 0)"
    with pytest.raises(grpc.RpcError) as raised:
        raw_call(encoder_fp32.address, "EncodeText", b"\x0a\x50abc")  # length past the end
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_message_over_size_limit_is_resource_exhausted(encoder_tiny: RunningService) -> None:
    # encoder_tiny runs with --max-message-mb 4.
    payload = encoder_pb2.EncodeImageRequest(images=[b"\0" * (5 << 20)]).SerializeToString()
    with pytest.raises(grpc.RpcError) as raised:
        raw_call(encoder_tiny.address, "EncodeImage", payload)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert health_status(encoder_tiny.address) == "SERVING"


def test_server_still_serving_after_bad_input(encoder_fp32: RunningService,
                                              photos: list[Path]) -> None:
    with EncoderClient(encoder_fp32.address) as client:
        client.encode_images_results([b"", png_bomb(), b"junk"])
        assert client.encode_images([photos[0].read_bytes()]).shape == (1, 512)
    assert health_status(encoder_fp32.address) == "SERVING"
