"""Pictures of retrieval: query + neighbour grids, shared by `cbmir-query` and run galleries.

Rendering is plain PIL with exact pixel geometry (`GridLayout.size`), so a grid's size is known
before it is drawn and tests can check it. Matplotlib is only used by `cbmir-plot`.
"""

from cbmir.viz.grid import Cell, GridLayout, render_grid, save_png
from cbmir.viz.images import display_image
from cbmir.viz.labels import label_text, names_from_config, relevance
from cbmir.viz.neighbours import QueryResult, neighbour_grid

__all__ = [
    "Cell",
    "GridLayout",
    "QueryResult",
    "display_image",
    "label_text",
    "names_from_config",
    "neighbour_grid",
    "relevance",
    "render_grid",
    "save_png",
]
