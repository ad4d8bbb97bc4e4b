"""How an Index stream is cut into batches. Each batch is one encoder call and one Milvus
write, so it must fit what the encoder takes: at most its max_items_per_call images, and
images whose bytes fit in one request message. Cutting by count alone put 32 phone photos
of 4-10 MB (128-320 MB) into one call past the 64 MiB message limit, and the whole batch
failed together; cut by bytes too, in-flight memory is also bounded (--index-pipeline
calls of at most one message each)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from clipsearch.grpc_options import message_bytes
from clipsearch.serving import MalformedRequest

# Room in an encoder request beyond its images' bytes: protobuf's tag and length per image
# (at most 6 bytes for a 64 MiB field) and the message's own few bytes, with margin.
PER_IMAGE_FRAMING = 16
REQUEST_FRAMING = 4096


class EncoderLimits(Protocol):
    """What an encoder's ModelInfo says it takes in one call (0: not told)."""

    max_items_per_call: int
    max_message_bytes: int


@dataclass(frozen=True)
class CallLimits:
    """The most one Index batch (one encoder call) may carry."""

    items: int
    message_bytes: int  # the request message limit it must fit in

    @classmethod
    def fitting(cls, index_batch: int, max_message_mb: float,
                encoder: EncoderLimits) -> CallLimits:
        """--index-batch within the encoder's item limit, and the smaller of this
        service's and the encoder's message limits."""
        items = index_batch
        if encoder.max_items_per_call > 0:
            items = min(items, encoder.max_items_per_call)
        message = message_bytes(max_message_mb)
        if encoder.max_message_bytes > 0:
            message = min(message, encoder.max_message_bytes)
        return cls(items, message)

    @property
    def image_bytes(self) -> int:
        """Image bytes one call may carry, in all: the message less its framing."""
        return self.message_bytes - REQUEST_FRAMING - PER_IMAGE_FRAMING * self.items

    def too_large(self, size: int) -> str:
        """Why an image of `size` bytes cannot be sent at all, or ""."""
        if size <= self.image_bytes:
            return ""
        return (f"image of {size} bytes is larger than one encoder call can carry "
                f"({self.image_bytes} bytes within the message limit of "
                f"{self.message_bytes} bytes: the smaller of the encoder's and this "
                f"service's --max-message-mb)")


def _image_size(item: Any) -> int:
    return 0 if isinstance(item, MalformedRequest) else len(item.image)


async def batches(requests: AsyncIterator[Any], limits: CallLimits,
                  pause_s: float = 0.02) -> AsyncIterator[list[Any]]:
    """Groups a request stream into lists within `limits`: a batch closes at its item
    limit, before an image that would take it past its bytes (an image too large for any
    call is a batch of its own, which the check fails), and at a pause in the stream (a
    slow or interactive client), so no item waits for the next."""
    iterator = requests.__aiter__()
    pending: asyncio.Task[Any] | None = None
    batch: list[Any] = []
    size = 0
    while True:
        if pending is None:
            pending = asyncio.ensure_future(iterator.__anext__())
        done, _ = await asyncio.wait({pending}, timeout=pause_s if batch else None)
        if not done:
            yield batch
            batch, size = [], 0
            continue
        pending = None
        try:
            item = done.pop().result()
        except StopAsyncIteration:
            if batch:
                yield batch
            return
        item_size = _image_size(item)
        if batch and size + item_size > limits.image_bytes:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item_size
        if len(batch) >= limits.items:
            yield batch
            batch, size = [], 0
