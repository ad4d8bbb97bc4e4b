"""Opening untrusted image bytes safely: the formats accepted, header checks, full decode.

Shared by both tiers and free of torch: the search service checks headers at Index
(cheap, before calling the encoder); the encoder decodes fully."""

from __future__ import annotations

import io

from PIL import Image

# Only these decoders run on caller bytes: PIL can open many more (EPS would start
# Ghostscript), which has no place behind a network port.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Pillow's process-wide bomb guard fires inside Image.open with its own limit; the
# per-call `max_pixels` check below replaces it, with a message that names the size.
Image.MAX_IMAGE_PIXELS = None

__all__ = ["ACCEPTED_FORMATS", "ImageError", "open_image", "probe_image"]


class ImageError(ValueError):
    """These bytes cannot be used as an image; the message says why."""


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Opens and fully decodes `data` (the first frame of an animation). The pixel count
    is checked from the header, before decoding, so a decompression bomb costs nothing."""
    image = probe_image(data, max_pixels)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot decode {image.format} data: {exc}") from exc
    return image


def probe_image(data: bytes, max_pixels: int) -> Image.Image:
    """Opens `data` and checks its header only (format, size, pixel limit): cheap, for
    callers that leave the full decode to the encoder."""
    if not data:
        raise ImageError("empty: zero bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"not an image in a supported format ({', '.join(ACCEPTED_FORMATS)})"
                         ) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"too many pixels: {width}x{height} = {width * height} "
                         f"is over the limit of {max_pixels}")
    if width == 0 or height == 0:
        raise ImageError(f"empty image: {width}x{height}")
    return image
