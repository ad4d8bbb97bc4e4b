"""The Encoder gRPC service: validates items, preprocesses them off the event loop and
feeds the dynamic batchers that run the model."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import numpy as np
import torch

from clipsearch import metrics
from clipsearch.encoder.v1 import encoder_pb2
from clipsearch.serving import Service, serve_until_stopped
from encoder_service.batcher import BatcherStopped, DynamicBatcher, QueueFull
from encoder_service.config import EncoderConfig
from encoder_service.images import ImageError, PreprocessStages, image_pixels
from encoder_service.model import LoadedModel, ModelLoadError, clip, load_model

log = logging.getLogger("clipsearch.encoder")

SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


# What the batchers carry: token tensors (text) or uint8 pixel arrays (images).
Prepared = torch.Tensor | np.ndarray
RunBatch = Callable[[list[Prepared]], Awaitable[list[np.ndarray]]]


class ItemProblem(ValueError):
    """One item of a call is unusable; its neighbours go on."""


def tokenize(text: str, context_length: int, max_bytes: int) -> tuple[torch.Tensor, bool]:
    """The reference tokens (clip.tokenize, truncating) and whether the text was cut."""
    if len(text.encode()) > max_bytes:
        raise ItemProblem(f"text of {len(text.encode())} bytes is over the limit of {max_bytes}")
    bpe = clip.clip._tokenizer.encode(text)
    if not bpe:
        raise ItemProblem("empty text (no tokens)")
    tokens = clip.tokenize(text, context_length=context_length, truncate=True)[0]
    return tokens, len(bpe) + 2 > context_length


class EncoderServicer:
    """Implements clipsearch.encoder.v1.Encoder. UNAVAILABLE until `load` has finished."""

    def __init__(self, config: EncoderConfig) -> None:
        self.config = config
        self.model: LoadedModel | None = None
        self.load_seconds = 0.0
        self._infer = ThreadPoolExecutor(1, thread_name_prefix="infer")  # load, images
        self._text_infer = ThreadPoolExecutor(1, thread_name_prefix="infer-text")
        self._decode = ThreadPoolExecutor(config.decode_threads or os.cpu_count() or 1,
                                          thread_name_prefix="decode")
        self.text_batcher: DynamicBatcher[Prepared, np.ndarray] | None = None
        self.image_batcher: DynamicBatcher[Prepared, np.ndarray] | None = None
        self.stages: PreprocessStages | None = None

    async def load(self) -> None:
        """Loads and warms the model, then starts the batchers."""
        started = time.perf_counter()
        if self.config.torch_threads > 0:
            torch.set_num_threads(self.config.torch_threads)
        model = await asyncio.get_running_loop().run_in_executor(self._infer, partial(
            load_model, self.config.model, weights_dir=self.config.weights_dir,
            download=self.config.download, device=self.config.device,
            precision=self.config.precision))
        await asyncio.get_running_loop().run_in_executor(self._infer, _warm_up, model)
        self.load_seconds = time.perf_counter() - started
        log.info("model %s loaded in %.1f s: device=%s precision=%s dimension=%d fingerprint=%s",
                 model.name, self.load_seconds, model.device, model.precision, model.dimension,
                 model.fingerprint)
        loop = asyncio.get_running_loop()

        image_threads = torch.get_num_threads()
        text_threads = self.config.text_threads or image_threads
        log.info("intra-op threads: %d for image batches, %d for text batches",
                 image_threads, text_threads)

        def on_thread(encode: Callable[[list[Prepared]], np.ndarray], pool: ThreadPoolExecutor,
                      threads: int) -> RunBatch:
            # Each tower has its own thread, one batch at a time, so a text search never
            # waits behind a long image batch. The intra-op count is set before every batch
            # (microseconds): OpenMP keeps it per calling thread, but torch also keeps a
            # process-wide count that the other tower's thread writes.
            def rows(batch: list[Prepared]) -> list[np.ndarray]:
                torch.set_num_threads(threads)
                return list(encode(batch))
            return lambda batch: loop.run_in_executor(pool, rows, batch)

        def batcher(tower: str, run: RunBatch) -> DynamicBatcher[Prepared, np.ndarray]:
            def observe(size: int, seconds: float) -> None:
                metrics.BATCH_SIZE.labels(tower).observe(size)
                metrics.BATCH_SECONDS.labels(tower).observe(seconds)
            made: DynamicBatcher[Prepared, np.ndarray] = DynamicBatcher(
                run, max_batch=self.config.max_batch, max_queue=self.config.max_queue,
                max_delay_s=self.config.max_delay_ms / 1000, on_batch=observe)
            metrics.QUEUE_DEPTH.labels(tower).set_function(lambda: made.depth)
            return made

        stages = PreprocessStages.split(model.preprocess)
        self.stages = stages
        self.text_batcher = batcher("text", on_thread(
            lambda tokens: model.encode_tokens(torch.stack(tokens)),  # type: ignore[arg-type]
            self._text_infer, text_threads))
        self.image_batcher = batcher("image", on_thread(
            lambda pixels: model.encode_images(stages.batch(pixels)),  # type: ignore[arg-type]
            self._infer, image_threads))
        metrics.MODEL_LOAD_SECONDS.set(self.load_seconds)
        self.text_batcher.start()
        self.image_batcher.start()
        self.model = model

    async def close(self) -> None:
        for batcher in (self.text_batcher, self.image_batcher):
            if batcher is not None:
                await batcher.stop()
        for pool in (self._infer, self._text_infer):
            pool.shutdown(wait=False, cancel_futures=True)
        self._decode.shutdown(wait=False, cancel_futures=True)

    async def _ready(self, context: grpc.aio.ServicerContext) -> LoadedModel:
        if self.model is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "the encoder is still loading its model; retry shortly")
        assert self.model is not None
        return self.model

    async def _check_count(self, count: int, what: str, context: grpc.aio.ServicerContext) -> None:
        if count == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no {what} given")
        if count > self.config.max_items_per_call:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{count} {what} in one call; at most "
                                f"{self.config.max_items_per_call} are accepted (split the call)")

    async def EncodeText(self, request: encoder_pb2.EncodeTextRequest,
                         context: grpc.aio.ServicerContext) -> encoder_pb2.EncodeResponse:
        model = await self._ready(context)
        texts = list(request.texts)
        await self._check_count(len(texts), "texts", context)
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self._decode, _tokenize_all, texts,
                                              model.context_length, self.config.max_text_bytes)
        assert self.text_batcher is not None
        return await self._encode(self.text_batcher, "texts", prepared, model, context)

    async def EncodeImage(self, request: encoder_pb2.EncodeImageRequest,
                          context: grpc.aio.ServicerContext) -> encoder_pb2.EncodeResponse:
        model = await self._ready(context)
        await self._check_count(len(request.images), "images", context)
        loop = asyncio.get_running_loop()
        assert self.stages is not None
        decode = partial(_prepare_image, stages=self.stages, max_pixels=self.config.max_pixels)
        # Each image decodes on the pool, in parallel with the model running other batches.
        prepared = await asyncio.gather(*(loop.run_in_executor(self._decode, decode, data)
                                          for data in request.images))
        assert self.image_batcher is not None
        return await self._encode(self.image_batcher, "images", prepared, model, context)

    async def _encode(self, batcher: DynamicBatcher[Prepared, np.ndarray], what: str,
                      prepared: Sequence[tuple[Prepared, bool] | str], model: LoadedModel,
                      context: grpc.aio.ServicerContext) -> encoder_pb2.EncodeResponse:
        good = [p for p in prepared if not isinstance(p, str)]
        vectors: list[np.ndarray] = []
        if good:
            try:
                vectors = await batcher.submit([t for t, _ in good], context.time_remaining())
            except QueueFull as exc:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"encoder overloaded: {exc}; retry with backoff")
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    "the deadline passed before the batch ran")
            except BatcherStopped as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        response = encoder_pb2.EncodeResponse(model=model.name)
        rows = iter(vectors)
        for index, item in enumerate(prepared):
            result = response.results.add()
            if isinstance(item, str):
                metrics.ITEM_ERRORS.labels(what[:-1]).inc()
                result.error.code = INVALID_ARGUMENT
                result.error.message = f"{what}[{index}]: {item}"
            else:
                result.vector.values.extend(next(rows).tolist())
                result.truncated = item[1]
        return response

    async def GetModelInfo(self, request: encoder_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> encoder_pb2.ModelInfo:
        model = await self._ready(context)
        return encoder_pb2.ModelInfo(
            name=model.name, dimension=model.dimension, device=str(model.device),
            precision=model.precision, max_batch=self.config.max_batch,
            max_delay_ms=self.config.max_delay_ms,
            max_items_per_call=self.config.max_items_per_call,
            context_length=model.context_length, image_resolution=model.image_resolution,
            fingerprint=model.fingerprint)


def _tokenize_all(texts: list[str], context_length: int,
                  max_bytes: int) -> list[tuple[torch.Tensor, bool] | str]:
    out: list[tuple[torch.Tensor, bool] | str] = []
    for text in texts:
        try:
            out.append(tokenize(text, context_length, max_bytes))
        except ItemProblem as exc:
            out.append(str(exc))
    return out


def _prepare_image(data: bytes, *, stages: PreprocessStages,
                   max_pixels: int) -> tuple[Prepared, bool] | str:
    """Decode + the PIL stage of preprocessing (runs on the decode pool, no torch)."""
    try:
        return image_pixels(data, stages, max_pixels), False
    except ImageError as exc:
        return str(exc)


def _warm_up(model: LoadedModel) -> None:
    """One pass through each tower, so the first caller does not pay for lazy setup."""
    side = model.image_resolution
    model.encode_images(torch.zeros(1, 3, side, side))
    model.encode_tokens(clip.tokenize(["a photo"], context_length=model.context_length))


async def serve(config: EncoderConfig) -> int:
    """Runs the encoder until SIGTERM/SIGINT. Listens at once with health NOT_SERVING,
    loads the model, then serves. Returns the process exit code."""
    servicer = EncoderServicer(config)
    log.info("encoder model %s", config.model)
    return await serve_until_stopped(Service(config, SERVICE, servicer), servicer.load(),
                                     servicer.close, "encoder", (ModelLoadError,))
