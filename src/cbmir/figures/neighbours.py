"""The retrieval picture: one row per query, the query then its k neighbours, captioned.

Captions carry the label name and the distance; border colours mark relevant neighbours
(green) and irrelevant ones (red) whenever the query's label is known, grey otherwise. Own
collections (`data=folder|csv`) name each case by its file; MedMNIST rows by their row number.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbmir.figures.grid import Cell
from cbmir.figures.labels import label_text, relevance


@dataclass
class QueryResult:
    """One query and its ranked neighbours (rows of the database split)."""

    name: str
    image: np.ndarray
    indices: np.ndarray
    distances: np.ndarray
    label: np.ndarray | None = None
    file: str | None = None  # the query's source file (own collections)

    def hits(self, database_labels: np.ndarray, multilabel: bool) -> list[bool] | None:
        """Whether each neighbour is relevant to the query (None: its label is unknown)."""
        if self.label is None:
            return None
        query, rows = np.asarray(self.label).reshape(1, -1), np.asarray(self.indices)
        return relevance(query, database_labels, rows.reshape(1, -1), multilabel)[0].tolist()


def neighbour_cells(
    results: Sequence[QueryResult],
    fetch: Callable[[int], np.ndarray],
    database_labels: np.ndarray,
    names: Mapping[int, str],
    multilabel: bool,
    database_files: Sequence[str] | None = None,
) -> list[list[Cell]]:
    """Cells of the grid (`grid.render_grid` draws them); `fetch(row)` returns a database
    item's display picture.

    With `database_files` (own collections) a neighbour is captioned by its file name, which
    says more than its row number; the tile keeps its three caption lines either way.
    """
    rows = []
    for result in results:
        query_lines = [
            f"query {result.name}",
            label_text(result.label, names, multilabel)
            if result.label is not None
            else "label unknown",
        ]
        if result.file is not None:
            query_lines.append(Path(result.file).name)
        query_cell = Cell(result.image, query_lines, role="query")
        hits = result.hits(database_labels, multilabel)
        if hits is None:
            roles = ["unknown"] * len(result.indices)
        else:
            roles = ["hit" if h else "miss" for h in hits]
        cells = [query_cell]
        for rank, (row, dist, role) in enumerate(
            zip(result.indices, result.distances, roles, strict=True), start=1
        ):
            cells.append(
                Cell(
                    fetch(int(row)),
                    [
                        f"#{rank} · {_case_name(int(row), database_files)}",
                        label_text(database_labels[int(row)], names, multilabel),
                        f"d = {float(dist):.4g}",
                    ],
                    role=role,
                )
            )
        rows.append(cells)
    return rows


def _case_name(row: int, files: Sequence[str] | None) -> str:
    return Path(files[row]).name if files is not None else f"row {row}"
