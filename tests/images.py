"""Image bytes of every kind the encoder must take or refuse, made with Pillow."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def format_variants(photo: Path) -> dict[str, bytes]:
    """One real photo in each accepted encoding and colour mode."""
    rgb = Image.open(photo).convert("RGB")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    frames = [rgb.convert("P"), rgb.rotate(90).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    return {
        "jpeg": photo.read_bytes(),
        "png": encode(rgb, "PNG"),
        "webp": encode(rgb, "WEBP", quality=90),
        "gif-animated": gif.getvalue(),
        "greyscale-jpeg": encode(rgb.convert("L"), "JPEG"),
        "cmyk-jpeg": encode(rgb.convert("CMYK"), "JPEG"),
        "rgba-png": encode(rgba, "PNG"),
        "bmp": encode(rgb, "BMP"),
    }


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 30000) -> bytes:
    """A valid 1-bit greyscale PNG of side x side pixels: ~100 KB that decodes to side² pixels."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body)
            + _chunk(b"IEND", b""))
