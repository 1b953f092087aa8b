"""A grid of captioned, bordered image tiles with exact pixel geometry.

Each cell is a square tile (the image scaled to fit, nearest-neighbour when enlarged so that
28 px pixels stay visible) inside a coloured border, with caption lines underneath. The size of
a grid is a formula of its layout (`GridLayout.size`), not whatever a plotting library chose.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: border colours by role: the query, a relevant neighbour, an irrelevant one, label unknown
COLOURS = {
    "query": (31, 119, 180),
    "hit": (44, 160, 44),
    "miss": (214, 39, 40),
    "unknown": (170, 170, 170),
}
BACKGROUND = (255, 255, 255)
TILE_BACKGROUND = (0, 0, 0)
TEXT = (20, 20, 20)


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid; every size below is derived from these fields."""

    tile: int = 112
    border: int = 4
    pad: int = 8
    font_size: int = 12
    line_height: int = 15
    caption_lines: int = 3
    title_height: int = 24

    @property
    def cell_width(self) -> int:
        return self.tile + 2 * self.border

    @property
    def cell_height(self) -> int:
        return self.tile + 2 * self.border + self.caption_lines * self.line_height

    def size(self, n_rows: int, n_cols: int, title: bool = False) -> tuple[int, int]:
        """(width, height) in pixels of a grid of n_rows x n_cols cells."""
        width = self.pad + n_cols * (self.cell_width + self.pad)
        height = self.pad + n_rows * (self.cell_height + self.pad)
        return width, height + (self.title_height if title else 0)

    def origin(self, row: int, col: int, title: bool = False) -> tuple[int, int]:
        """Top-left pixel of a cell's border."""
        top = self.pad + (self.title_height if title else 0)
        return (
            self.pad + col * (self.cell_width + self.pad),
            top + row * (self.cell_height + self.pad),
        )


@dataclass
class Cell:
    """One tile: an image (uint8 H x W or H x W x 3), caption lines and a border role."""

    image: np.ndarray
    lines: Sequence[str]
    role: str = "unknown"


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans from matplotlib's bundled fonts (found without importing matplotlib)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)


def _fit(text: str, font, width: int) -> str:
    """Shorten `text` with an ellipsis until it fits `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _tile_image(image: np.ndarray, tile: int) -> Image.Image:
    """Scale to fit a tile x tile square, keeping the aspect ratio, centred on black."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    scale = min(tile / picture.width, tile / picture.height)
    new = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    picture = picture.resize(new, resample)
    canvas = Image.new("RGB", (tile, tile), TILE_BACKGROUND)
    canvas.paste(picture, ((tile - new[0]) // 2, (tile - new[1]) // 2))
    return canvas


def render_grid(
    rows: Sequence[Sequence[Cell]], layout: GridLayout | None = None, title: str | None = None
) -> Image.Image:
    """Draw rows of cells (ragged rows leave blank space) into one RGB image."""
    layout = layout or GridLayout()
    n_cols = max((len(r) for r in rows), default=0)
    canvas = Image.new("RGB", layout.size(len(rows), n_cols, bool(title)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(layout.font_size)
    if title:
        title_font = _font(layout.font_size + 2)
        width = canvas.width - 2 * layout.pad
        draw.text(
            (layout.pad, layout.pad // 2 + 2), _fit(title, title_font, width), TEXT, title_font
        )
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            x, y = layout.origin(r, c, bool(title))
            colour = COLOURS.get(cell.role, COLOURS["unknown"])
            draw.rectangle(
                [x, y, x + layout.cell_width - 1, y + layout.cell_width - 1], fill=colour
            )
            canvas.paste(
                _tile_image(cell.image, layout.tile), (x + layout.border, y + layout.border)
            )
            text_y = y + layout.cell_width + 1
            for i, line in enumerate(list(cell.lines)[: layout.caption_lines]):
                draw.text(
                    (x, text_y + i * layout.line_height),
                    _fit(str(line), font, layout.cell_width),
                    TEXT,
                    font,
                )
    return canvas
