"""The Encoder gRPC service: validates items, preprocesses them off the event loop and
feeds the dynamic batchers that run the model."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import numpy as np
import torch

from clipsearch import lifecycle, metrics
from clipsearch.batcher import BatcherStopped, DynamicBatcher, QueueFull
from clipsearch.encoder.v1 import encoder_pb2
from clipsearch.grpc_options import message_bytes
from clipsearch.serving import Service, serve_until_stopped
from encoder_service.config import EncoderConfig
from encoder_service.decoding import ImageDecoder, default_workers
from encoder_service.device import default_max_batch
from encoder_service.failures import (
    DeviceFailed,
    DeviceOutOfMemory,
    encode_splitting_on_oom,
    is_sticky_device_error,
)
from encoder_service.families.base import EmptyText, TextTokenizer
from encoder_service.images import PreprocessStages
from encoder_service.model import LoadedModel, ModelLoadError, load_model

log = logging.getLogger("clipsearch.encoder")

SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


# What the batchers carry: token tensors (text) or uint8 pixel arrays (images); what they
# give back: a vector per item, or the item's device failure.
Prepared = torch.Tensor | np.ndarray
Row = np.ndarray | DeviceOutOfMemory
RunBatch = Callable[[list[Prepared]], Awaitable[list[Row]]]


class ItemProblem(ValueError):
    """One item of a call is unusable; its neighbours go on."""


def tokenize(text: str, tokenizer: TextTokenizer, max_bytes: int) -> tuple[torch.Tensor, bool]:
    """The reference tokens (the model's own tokenizer, truncating) and whether the text
    was cut."""
    if len(text.encode()) > max_bytes:
        raise ItemProblem(f"text of {len(text.encode())} bytes is over the limit of {max_bytes}")
    try:
        return tokenizer.tokenize(text)
    except EmptyText as exc:
        raise ItemProblem(str(exc)) from exc


class EncoderServicer:
    """Implements clipsearch.encoder.v1.Encoder. UNAVAILABLE until `load` has finished."""

    def __init__(self, config: EncoderConfig) -> None:
        self.config = config
        self.model: LoadedModel | None = None
        self.load_seconds = 0.0
        self._infer = ThreadPoolExecutor(1, thread_name_prefix="infer")  # load, images
        self._text_infer = ThreadPoolExecutor(1, thread_name_prefix="infer-text")
        # Images decode below the model's priority (encoder_service/priority.py), on
        # threads or worker processes (decoding.py), chosen once the device is known;
        # texts tokenize on a thread of their own at normal priority, so that a text
        # search does not queue behind the decoding of image batches.
        self.decoder: ImageDecoder | None = None
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.text_batcher: DynamicBatcher[Prepared, Row] | None = None
        self.image_batcher: DynamicBatcher[Prepared, Row] | None = None
        self.max_batch = config.max_batch
        # Set when the device failed for good: the process stops with a non-zero exit.
        self.failed = asyncio.Event()

    async def load(self) -> None:
        """Loads and warms the model, then starts the batchers."""
        started = time.perf_counter()
        if self.config.torch_threads > 0:
            torch.set_num_threads(self.config.torch_threads)
        loop = asyncio.get_running_loop()
        # A daemon thread: a SIGTERM during a stalled download ends the process at once.
        model = await lifecycle.in_daemon_thread(partial(
            load_model, self.config.model, weights_dir=self.config.weights_dir,
            download=self.config.download, device=self.config.device,
            precision=self.config.precision, weights_mirror=self.config.weights_mirror,
            download_timeout_s=self.config.download_timeout_s))
        self.max_batch = self.config.max_batch or default_max_batch(model.device)
        stages = PreprocessStages.split(model.preprocess)
        image_threads = torch.get_num_threads()
        text_threads = self.config.text_threads or image_threads

        def on_thread(encode: Callable[[list[Prepared]], np.ndarray], pool: ThreadPoolExecutor,
                      threads: int, split_on_oom: bool = True) -> RunBatch:
            # Each tower has its own thread, one batch at a time, so a text search never
            # waits behind a long image batch. The intra-op count is set before every batch
            # (microseconds): OpenMP keeps it per calling thread, but torch also keeps a
            # process-wide count that the other tower's thread writes.
            def rows(batch: list[Prepared]) -> list[Row]:
                torch.set_num_threads(threads)
                try:
                    if split_on_oom:
                        return encode_splitting_on_oom(encode, batch)
                    return list(encode(batch))
                except torch.OutOfMemoryError as exc:  # only when not splitting
                    return [DeviceOutOfMemory(str(exc))] * len(batch)
                except Exception as exc:
                    if is_sticky_device_error(exc):
                        loop.call_soon_threadsafe(self.failed.set)
                        raise DeviceFailed(f"{model.device} failed: {exc}") from exc
                    raise
            return lambda batch: loop.run_in_executor(pool, rows, batch)

        def encode_texts(tokens: list[Prepared]) -> np.ndarray:
            return model.encode_tokens(torch.stack(tokens))  # type: ignore[arg-type]

        def encode_images(pixels: list[Prepared]) -> np.ndarray:
            with model.on_stream("image"):  # the pixels' copy too
                return model.encode_images(stages.batch(pixels, model.device))  # type: ignore[arg-type]

        run_texts = on_thread(encode_texts, self._text_infer, text_threads)
        run_images = on_thread(encode_images, self._infer, image_threads)
        # Each tower warms on its own thread (cuBLAS handles and workspaces are per
        # thread and stream), at batch 1 and at max_batch, so the first call pays no
        # lazy setup and a max_batch that does not fit fails here, before SERVING.
        await asyncio.gather(
            _warm_up(on_thread(encode_texts, self._text_infer, text_threads, False),
                     _full_length_tokens(model), self.max_batch, "text", model),
            _warm_up(on_thread(encode_images, self._infer, image_threads, False),
                     _blank_pixels(model), self.max_batch, "image", model))
        decode_in = self.config.decode_in
        if decode_in == "auto":  # threads on a CPU, where cores, not the GIL, are scarce
            decode_in = "processes" if model.device.type == "cuda" else "threads"
        processes = decode_in == "processes"
        self.decoder = ImageDecoder(default_workers(self.config.decode_threads, processes),
                                    self.config.decode_nice, processes)
        await self.decoder.start(stages, self.config.max_pixels)
        self.load_seconds = time.perf_counter() - started
        log.info("model %s loaded in %.1f s: family=%s device=%s precision=%s dimension=%d "
                 "fingerprint=%s max_batch=%d tokenizer=%s context=%d image=%dx%d",
                 model.name, self.load_seconds, model.traits.family, model.device,
                 model.precision, model.dimension, model.fingerprint, self.max_batch,
                 model.tokenizer.kind, model.context_length, model.traits.image.width,
                 model.traits.image.height)
        log.info("intra-op threads: %d for image batches, %d for text batches; images "
                 "decode on %d %s", image_threads, text_threads, self.decoder.workers,
                 self.decoder.kind)

        def batcher(tower: str, run: RunBatch) -> DynamicBatcher[Prepared, Row]:
            def observe(size: int, seconds: float) -> None:
                metrics.BATCH_SIZE.labels(tower).observe(size)
                metrics.BATCH_SECONDS.labels(tower).observe(seconds)
            made: DynamicBatcher[Prepared, Row] = DynamicBatcher(
                run, max_batch=self.max_batch, max_queue=self.config.max_queue,
                max_delay_s=self.config.max_delay_ms / 1000, on_batch=observe)
            metrics.QUEUE_DEPTH.labels(tower).set_function(lambda: made.depth)
            return made

        self.text_batcher = batcher("text", run_texts)
        self.image_batcher = batcher("image", run_images)
        metrics.MODEL_LOAD_SECONDS.set(self.load_seconds)
        self.text_batcher.start()
        self.image_batcher.start()
        self.model = model

    async def close(self) -> None:
        for batcher in (self.text_batcher, self.image_batcher):
            if batcher is not None:
                await batcher.stop()
        for pool in (self._infer, self._text_infer, self._tokenize):
            pool.shutdown(wait=False, cancel_futures=True)
        if self.decoder is not None:
            self.decoder.close()

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
        prepared = await loop.run_in_executor(self._tokenize, _tokenize_all, texts,
                                              model.tokenizer, self.config.max_text_bytes)
        assert self.text_batcher is not None
        return await self._encode(self.text_batcher, "texts", prepared, model, context)

    async def EncodeImage(self, request: encoder_pb2.EncodeImageRequest,
                          context: grpc.aio.ServicerContext) -> encoder_pb2.EncodeResponse:
        model = await self._ready(context)
        await self._check_count(len(request.images), "images", context)
        assert self.decoder is not None
        # Each image decodes on the pool, in parallel with the model running other batches.
        prepared = await asyncio.gather(*(self.decoder.decode(data)
                                          for data in request.images))
        assert self.image_batcher is not None
        return await self._encode(self.image_batcher, "images", prepared, model, context)

    async def _encode(self, batcher: DynamicBatcher[Prepared, Row], what: str,
                      prepared: Sequence[tuple[Prepared, bool] | str], model: LoadedModel,
                      context: grpc.aio.ServicerContext) -> encoder_pb2.EncodeResponse:
        good = [p for p in prepared if not isinstance(p, str)]
        vectors: list[Row] = []
        if good:
            try:
                vectors = await batcher.submit([t for t, _ in good], context.time_remaining())
            except QueueFull as exc:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"encoder overloaded: {exc}; retry with backoff")
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    "the deadline passed before the batch ran")
            except (BatcherStopped, DeviceFailed) as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; retry on another "
                                    "replica")
        out_of_memory = next((v for v in vectors if isinstance(v, DeviceOutOfMemory)), None)
        if out_of_memory is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{out_of_memory}; retry later with fewer items per call")
        response = encoder_pb2.EncodeResponse(model=model.name)
        rows = iter(vectors)
        for index, item in enumerate(prepared):
            result = response.results.add()
            if isinstance(item, str):
                metrics.ITEM_ERRORS.labels(what[:-1]).inc()
                result.error.code = INVALID_ARGUMENT
                result.error.message = f"{what}[{index}]: {item}"
            else:
                result.vector.values.extend(next(rows).tolist())  # type: ignore[union-attr]
                result.truncated = item[1]
        return response

    async def GetModelInfo(self, request: encoder_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> encoder_pb2.ModelInfo:
        model = await self._ready(context)
        traits, image = model.traits, model.traits.image
        return encoder_pb2.ModelInfo(
            name=model.name, dimension=model.dimension, device=str(model.device),
            precision=model.precision, max_batch=self.max_batch,
            max_delay_ms=self.config.max_delay_ms,
            max_items_per_call=self.config.max_items_per_call,
            max_message_bytes=message_bytes(self.config.max_message_mb),
            context_length=model.context_length, image_resolution=model.image_resolution,
            fingerprint=model.fingerprint, device_note=model.device_note,
            family=traits.family, architecture=traits.architecture,
            tokenizer=traits.tokenizer.kind, text_truncation=traits.tokenizer.truncation,
            preprocess=encoder_pb2.ImagePreprocess(
                height=image.height, width=image.width, resize_mode=image.resize_mode,
                interpolation=image.interpolation, center_crop=image.crop,
                mean=list(image.mean), std=list(image.std)))


def _tokenize_all(texts: list[str], tokenizer: TextTokenizer,
                  max_bytes: int) -> list[tuple[torch.Tensor, bool] | str]:
    out: list[tuple[torch.Tensor, bool] | str] = []
    for text in texts:
        try:
            out.append(tokenize(text, tokenizer, max_bytes))
        except ItemProblem as exc:
            out.append(str(exc))
    return out


def _full_length_tokens(model: LoadedModel) -> torch.Tensor:
    """Tokens that fill the context: the longest text there is."""
    return model.tokenizer.longest()


def _blank_pixels(model: LoadedModel) -> np.ndarray:
    image = model.traits.image
    return np.zeros((image.height, image.width, 3), dtype=np.uint8)


async def _warm_up(run: RunBatch, item: Prepared, max_batch: int, tower: str,
                   model: LoadedModel) -> None:
    """Runs `tower` at batch 1 and at max_batch; a max_batch that does not fit in the
    device's memory is a startup error naming the flag to lower."""
    for size in sorted({1, max_batch}):
        rows = await run([item] * size)
        if any(isinstance(row, DeviceOutOfMemory) for row in rows):
            raise ModelLoadError(f"--max-batch {max_batch} does not fit in the memory of "
                                 f"{model.device} ({tower} tower, {model.precision}); "
                                 f"lower --max-batch")


async def serve(config: EncoderConfig) -> int:
    """Runs the encoder until SIGTERM/SIGINT. Listens at once with health NOT_SERVING,
    loads the model, then serves. Returns the process exit code."""
    servicer = EncoderServicer(config)
    log.info("encoder model %s", config.model)
    return await serve_until_stopped(Service(config, SERVICE, servicer), servicer.load(),
                                     servicer.close, "encoder", (ModelLoadError,),
                                     failed=servicer.failed)
