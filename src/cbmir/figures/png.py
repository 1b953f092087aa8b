"""One PNG writer for every picture: PIL grids and matplotlib figures alike."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from cbmir.io_utils import write_bytes


def save_png(picture: Image.Image | Any, path: str | Path) -> Path:
    """Write a PIL image or a matplotlib `Figure` (on the Agg canvas, at its own dpi) atomically:
    a reader never sees half a picture."""
    buffer = io.BytesIO()
    if isinstance(picture, Image.Image):
        picture.save(buffer, format="PNG")
    else:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(picture)  # no display, no global backend switch
        picture.savefig(buffer, format="png", dpi="figure")
    return write_bytes(Path(path), buffer.getvalue())
