"""A contact sheet of search hits, like the seed's 5x2 grid of 150 px thumbnails, with
each tile labelled by rank and score."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from client.search import Hit

TILE = 150
LABEL = 18


def contact_sheet(hits: Sequence[Hit], out: str | Path, columns: int = 5,
                  title: str = "") -> Path:
    """Writes a PNG of the hits' images (read from their uris, on this machine)."""
    rows = max(1, -(-len(hits) // columns))
    top = LABEL + 4 if title else 0
    sheet = Image.new("RGB", (columns * TILE, top + rows * (TILE + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 4), title, fill="black")
    for rank, hit in enumerate(hits):
        x, y = (rank % columns) * TILE, top + (rank // columns) * (TILE + LABEL)
        try:
            with Image.open(hit.uri) as image:
                thumb = ImageOps.fit(image.convert("RGB"), (TILE, TILE))
        except (OSError, ValueError):
            thumb = Image.new("RGB", (TILE, TILE), "#ccc")
            ImageDraw.Draw(thumb).text((8, TILE // 2), "not readable here", fill="black")
        sheet.paste(thumb, (x, y))
        draw.text((x + 4, y + TILE + 3), f"#{rank + 1}  {hit.score:.3f}", fill="black")
    path = Path(out)
    sheet.save(path)
    return path
