"""The text protocol's gallery: one row per class prompt, its top-k database images.

Drawn from the run's own `neighbors.npz` (what was scored) with PIL only. A green frame marks
an image of the prompt's class, a red one an image of another class. A failure is logged and
skipped: the metrics are already written and a picture must not fail a benchmark job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cbmir.figures.images import display_image
from cbmir.figures.labels import relevance
from cbmir.figures.png import save_png

log = logging.getLogger(__name__)

TEXT_GALLERY_PNG = "gallery.png"
TILE, PAD, LABEL_WIDTH = 96, 4, 200
HIT, MISS = (40, 160, 60), (200, 40, 40)


def item_picture(image: Any, volume: bool) -> Image.Image:
    """A stored item ((C, H, W) image or (D, H, W) volume: its middle slice) -> RGB tile."""
    picture = Image.fromarray(display_image(image, volume))
    return picture.convert("RGB").resize((TILE, TILE), Image.NEAREST)


def text_grid(
    texts: Sequence[str], tiles: Sequence[Sequence[Image.Image]], hits: np.ndarray, title: str
) -> Image.Image:
    """Rows of (prompt text, k framed tiles)."""
    k = max((len(row) for row in tiles), default=0)
    step = TILE + 2 * PAD
    canvas = Image.new("RGB", (LABEL_WIDTH + k * step, 24 + len(texts) * step), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 6), title, fill="black")
    for r, (text, row) in enumerate(zip(texts, tiles, strict=True)):
        top = 24 + r * step
        draw.text((PAD, top + step // 2 - 6), text[:32], fill="black")
        for c, tile in enumerate(row):
            left = LABEL_WIDTH + c * step
            colour = HIT if hits[r, c] else MISS
            draw.rectangle([left, top, left + step - 1, top + step - 1], fill=colour)
            canvas.paste(tile, (left + PAD, top + PAD))
    return canvas


def write_text_gallery(
    datamodule: Any, output_dir: str | Path, n_queries: int, *, run_name: str = ""
) -> Path | None:
    """`gallery.png`: the top-k database images of every class prompt (`gallery.n_queries=0`
    turns it off)."""
    if not int(n_queries or 0):
        return None
    try:
        return _write(datamodule, Path(output_dir), run_name)
    except Exception as exc:  # noqa: BLE001  (reported, never fatal: see the module docstring)
        log.warning("text gallery not written (%s: %s)", type(exc).__name__, exc)
        return None


def _write(datamodule: Any, output_dir: Path, run_name: str) -> Path:
    with np.load(output_dir / "neighbors.npz") as found:
        indices, texts, query_labels = found["indices"], found["query_texts"], found["query_labels"]
    split = datamodule.database_split
    database = datamodule.dataset(split)
    labels = np.asarray(datamodule.labels(split))
    labels = labels.reshape(len(labels), -1)
    # a prompt's label is its class (one-hot for multi-label data): the metrics' relevance rule
    hits = relevance(query_labels, labels, indices, multilabel=labels.shape[1] > 1)
    volume = bool(datamodule.is_volume)
    tiles = [[item_picture(database[int(i)]["image"], volume) for i in row] for row in indices]
    title = f"{run_name}: text queries, top {indices.shape[1]} of {len(labels)}"
    path = save_png(
        text_grid([str(t) for t in texts], tiles, hits, title), output_dir / TEXT_GALLERY_PNG
    )
    log.info("text gallery: %s", path)
    return path
