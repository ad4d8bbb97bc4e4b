"""Calling the encoder: deadlines on every call, retries with backoff on UNAVAILABLE,
round-robin over replicas (a list of addresses, or every address of a DNS name)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from client.channel import balancing_options
from client.encoder import ENCODER_SERVICE, parse_response
from clipsearch.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from clipsearch.serving import REQUEST_ID_KEY, message_options

log = logging.getLogger("clipsearch.search.encoder")

RETRIED = (grpc.StatusCode.UNAVAILABLE,)


class EncoderUnavailable(ConnectionError):
    """No encoder replica answered; the message names them."""


class EncoderRejected(ValueError):
    """The encoder refused the call itself (not an item): status and message kept."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# gRPC target schemes that take a comma-separated list of addresses themselves.
MULTI_ADDRESS_SCHEMES = ("ipv4:", "ipv6:", "unix:")


def split_targets(addresses: str) -> list[str]:
    """The channel targets of `--encoder`: `a:1,b:2` is two targets (one channel each),
    while `ipv4:10.0.0.1:1,10.0.0.2:2` (like `dns:///encoder:50051`) is one target with
    several addresses, balanced inside one channel."""
    text = addresses.strip()
    if text.startswith(MULTI_ADDRESS_SCHEMES):
        return [text]
    return [a.strip() for a in text.split(",") if a.strip()]


class EncoderPool:
    """One aio channel per configured target; calls rotate over them and fail over. Inside
    a channel, calls go round-robin to the addresses whose health is SERVING."""

    def __init__(self, addresses: str, *, token: str = "", tls_ca: str = "", tls_cert: str = "",
                 tls_key: str = "", timeout_s: float = 30.0, retries: int = 3,
                 max_message_mb: float = 64.0) -> None:
        self.addresses = split_targets(addresses)
        if not self.addresses:
            raise ValueError("no encoder address given")
        options = [*message_options(max_message_mb),
                   # dns:/// names resolve to every replica: spread calls over all of
                   # them, but only over those whose model is loaded (health SERVING), so
                   # a replica that is loading or draining gets no calls to refuse.
                   *balancing_options(ENCODER_SERVICE),
                   ("grpc.enable_retries", 0),  # retries are ours, with the deadline in view
                   # A restarted replica is found again within a second or two.
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 2000)]
        credentials = None
        if tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(
                Path(tls_ca).read_bytes() if tls_ca else None,
                Path(tls_key).read_bytes() if tls_key else None,
                Path(tls_cert).read_bytes() if tls_cert else None)
        self._channels = [grpc.aio.secure_channel(a, credentials, options) if credentials
                          else grpc.aio.insecure_channel(a, options) for a in self.addresses]
        self._stubs = [encoder_pb2_grpc.EncoderStub(c) for c in self._channels]
        self._next = itertools.cycle(range(len(self._stubs)))
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s
        self.retries = retries

    @property
    def name(self) -> str:
        return ",".join(self.addresses)

    def _next_index(self) -> int:
        """The next channel in turn that is READY (connected and, with health checking,
        SERVING), asking each one it passes to connect; when none is, the next one not in
        TRANSIENT_FAILURE, else simply the next. So a plain `a:1,b:2` list spares a replica
        that is loading, as one multi-address target does."""
        count = len(self._channels)
        start = next(self._next)
        fallback = None
        for k in range(count):
            index = (start + k) % count
            state = self._channels[index].get_state(try_to_connect=True)
            if state == grpc.ChannelConnectivity.READY:
                return index
            if fallback is None and state != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                fallback = index
        return start if fallback is None else fallback

    async def close(self) -> None:
        await asyncio.gather(*(c.close(None) for c in self._channels))

    async def _call(self, method: str, request: object, deadline: float | None,
                    request_id: str = "", quiet: bool = False) -> object:
        """Calls `method` on the next replica, retrying UNAVAILABLE on the others with
        jittered exponential backoff, never past `deadline` (time.monotonic())."""
        metadata = (*self._metadata, *(((REQUEST_ID_KEY, request_id),) if request_id else ()))
        last_error = ""
        for attempt in range(self.retries + 1):
            index = self._next_index()
            timeout = self.timeout_s
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    break
            try:
                stub_method = getattr(self._stubs[index], method)
                return await stub_method(request, timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise EncoderUnavailable(
                        f"encoder {self.addresses[index]} did not answer within the deadline "
                        f"({timeout:.1f} s)") from exc
                if exc.code() not in RETRIED:
                    raise EncoderRejected(exc.code(), f"encoder {self.addresses[index]}: "
                                                      f"{exc.details()}") from exc
                last_error = f"{self.addresses[index]}: {exc.details()}"
                if not quiet:
                    log.warning("encoder %s unavailable (attempt %d): %s",
                                self.addresses[index], attempt + 1, exc.details())
            if attempt < self.retries:
                await asyncio.sleep(min(1.0, 0.05 * 2 ** attempt) * (0.5 + random.random()))
        raise EncoderUnavailable(f"encoder unavailable ({self.name}): {last_error or 'deadline'}")

    async def model_info(self, deadline: float | None = None,
                         quiet: bool = False) -> encoder_pb2.ModelInfo:
        return await self._call("GetModelInfo", encoder_pb2.GetModelInfoRequest(),  # type: ignore[return-value]
                                deadline, quiet=quiet)

    async def encode_texts(self, texts: Sequence[str], deadline: float | None = None,
                           request_id: str = "") -> tuple[np.ndarray, dict[int, str]]:
        return await self._encode("EncodeText", encoder_pb2.EncodeTextRequest(texts=texts),
                                  deadline, request_id)

    async def encode_images(self, images: Sequence[bytes], deadline: float | None = None,
                            request_id: str = "") -> tuple[np.ndarray, dict[int, str]]:
        return await self._encode("EncodeImage", encoder_pb2.EncodeImageRequest(images=images),
                                  deadline, request_id)

    async def _encode(self, method: str, request: object, deadline: float | None,
                      request_id: str) -> tuple[np.ndarray, dict[int, str]]:
        """The vectors of an encode call and its per-item failures by index."""
        results = parse_response(await self._call(method, request, deadline,  # type: ignore[arg-type]
                                                  request_id))
        return results.vectors, results.failures

    async def wait_ready(self, timeout_s: float) -> encoder_pb2.ModelInfo:
        """GetModelInfo, retried until the encoder has loaded its model or time is up."""
        deadline = time.monotonic() + timeout_s
        log.info("waiting up to %.0f s for encoder %s to serve", timeout_s, self.name)
        for channel in self._channels:  # learn every replica's health before the first call
            channel.get_state(try_to_connect=True)
        while True:
            try:
                return await self.model_info(deadline=min(deadline, time.monotonic() + 10),
                                             quiet=True)
            except EncoderUnavailable:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.5)

