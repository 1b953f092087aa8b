"""A run's gallery: a few example queries with their neighbours, as a PNG and a W&B table;
and, for own collections, `neighbors.csv`: every query's neighbours by file path and label name.

Written after the metrics, from the run's own `neighbors.npz` and the DataModule's images, so
it shows exactly what was scored. Queries are drawn with the run's seed, classes in turn, so
every class of a small set appears. `gallery.n_queries=0` turns it off. Collections
(`data=folder|csv`) name cases by their source files (`split_files`); MedMNIST rows are indices.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cbmir.errors import DataError
from cbmir.figures.grid import render_grid
from cbmir.figures.images import display_image
from cbmir.figures.labels import label_text, relevance
from cbmir.figures.neighbours import QueryResult, neighbour_cells
from cbmir.figures.png import save_png
from cbmir.io_utils import write_text

log = logging.getLogger(__name__)

GALLERY_PNG = "gallery.png"
NEIGHBORS_CSV = "neighbors.csv"
NEIGHBOR_COLUMNS = (
    "query_row",
    "query_file",
    "query_label",
    "rank",
    "neighbor_row",
    "neighbor_file",
    "neighbor_label",
    "distance",
    "hit",
)
DEFAULT_N_QUERIES = 8


def pick_queries(labels: np.ndarray, n: int, seed: int, multilabel: bool) -> np.ndarray:
    """Up to `n` query rows, seeded; single-label sets take the classes in turn.

    Returned sorted by (class, row) so the grid reads class by class.
    """
    labels = np.asarray(labels).reshape(len(labels), -1)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    if multilabel:
        return np.sort(rng.choice(len(labels), size=n, replace=False))
    classes = np.unique(labels[:, 0])
    shuffled = [rng.permutation(np.flatnonzero(labels[:, 0] == c)) for c in classes]
    # classes in turn: every class's depth-th row before any class's (depth + 1)-th
    turns = sorted(
        (depth, c, int(row)) for c, rows in enumerate(shuffled) for depth, row in enumerate(rows)
    )
    chosen = np.asarray([row for _, _, row in turns[:n]])
    return chosen[np.lexsort((chosen, labels[chosen, 0]))]


def write_gallery(
    datamodule: Any,
    output_dir: str | Path,
    n_queries: int | None = DEFAULT_N_QUERIES,
    *,
    seed: int | None = 0,
    run_name: str = "",
    distance: str = "?",
    loggers: Sequence[Any] = (),
) -> Path | None:
    """Draw `gallery.png` into the run's output dir and log a W&B table to any WandbLogger.

    Takes only what it draws: the run's DataModule (images, labels, names), its output dir (with
    `neighbors.npz`), and the seed, name and distance for the query choice and the title.
    A failure here is logged and skipped: the run's metrics are already written, and a picture
    must not turn a finished benchmark job into a failed one.
    """
    n = int(n_queries or 0)
    if n <= 0:
        return None
    try:
        caption = (run_name, distance)
        return _write_gallery(datamodule, Path(output_dir), n, int(seed or 0), caption, loggers)
    except Exception as exc:  # noqa: BLE001  (reported, never fatal: see docstring)
        log.warning("gallery not written (%s: %s)", type(exc).__name__, exc)
        return None


def _write_gallery(
    datamodule: Any,
    output_dir: Path,
    n: int,
    seed: int,
    caption: tuple[str, str],
    loggers: Sequence[Any],
) -> Path:
    indices, distances, query_labels = _read_neighbours(output_dir)
    query_split, database_split = datamodule.query_split, datamodule.database_split
    queries, database = datamodule.dataset(query_split), datamodule.dataset(database_split)
    volume, multilabel = bool(datamodule.is_volume), bool(datamodule.multilabel)
    names = datamodule.label_names
    query_files = datamodule.split_files(query_split)
    database_files = datamodule.split_files(database_split)
    rows = pick_queries(query_labels, n, seed, multilabel)
    results = [
        QueryResult(
            name=f"{query_split}[{i}]",
            image=display_image(queries[int(i)]["image"], volume),
            indices=indices[i],
            distances=distances[i],
            label=query_labels[i],
            file=query_files[int(i)] if query_files is not None else None,
        )
        for i in rows
    ]

    def fetch(row: int) -> np.ndarray:
        return display_image(database[row]["image"], volume)

    run_name, distance = caption
    title = (
        f"{run_name}: {len(rows)} {query_split} queries, top {indices.shape[1]} "
        f"of {len(database)} {database_split} images by {distance} distance"
    )
    if volume:
        title += " (middle slices)"
    cells = neighbour_cells(results, fetch, database.labels, names, multilabel, database_files)
    image = render_grid(cells, title=title)
    path = save_png(image, output_dir / GALLERY_PNG)
    log.info("gallery: %s", path)
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            table = wandb_table(results, fetch, database.labels, names, multilabel, database_files)
            import wandb

            logger.experiment.log({"gallery/table": table, "gallery/grid": wandb.Image(str(path))})
    return path


def _read_neighbours(output_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, distances, query labels) of the run's `neighbors.npz`: what was scored."""
    with np.load(output_dir / "neighbors.npz") as found:
        return found["indices"], found["distances"], found["query_labels"]


def wandb_table(
    results: Sequence[QueryResult],
    fetch: Callable[[int], np.ndarray],
    database_labels: np.ndarray,
    names: Mapping[int, str],
    multilabel: bool,
    database_files: Sequence[str] | None = None,
) -> Any:
    """One row per query: its image and label, then image, label, distance, hit per rank; with
    `database_files` (own collections) also the query's and each neighbour's file path."""
    import wandb

    k = len(results[0].indices) if results else 0
    with_files = database_files is not None
    columns = ["query", "query image", "query label"] + (["query file"] if with_files else [])
    for rank in range(1, k + 1):
        columns += [f"#{rank} image", f"#{rank} label", f"#{rank} distance", f"#{rank} hit"]
        columns += [f"#{rank} file"] if with_files else []
    table = wandb.Table(columns=columns)
    for result in results:
        hits = result.hits(database_labels, multilabel) or [None] * k
        row: list[Any] = [
            result.name,
            wandb.Image(result.image),
            label_text(result.label, names, multilabel) if result.label is not None else None,
        ]
        row += [result.file] if with_files else []
        for db_row, dist, hit in zip(result.indices, result.distances, hits, strict=True):
            row += [
                wandb.Image(fetch(int(db_row)), caption=f"row {int(db_row)}"),
                label_text(database_labels[int(db_row)], names, multilabel),
                float(dist),
                hit,
            ]
            row += [database_files[int(db_row)]] if with_files else []
        table.add_data(*row)
    return table


def write_neighbor_table(datamodule: Any, output_dir: str | Path) -> Path | None:
    """`neighbors.csv`: one line per (query, rank) with both files, label names, the distance
    and the hit, read from the run's `neighbors.npz` (its arrays stay as they are).

    Only for DataModules whose rows are files (own collections); MedMNIST rows are indices,
    which `neighbors.npz` already holds, so nothing is written for them.
    """
    query_split, database_split = datamodule.query_split, datamodule.database_split
    query_files = datamodule.split_files(query_split)
    database_files = datamodule.split_files(database_split)
    if query_files is None or database_files is None:
        return None
    output_dir = Path(output_dir)
    indices, distances, query_labels = _read_neighbours(output_dir)
    database_labels = datamodule.labels(database_split)
    if len(query_files) != len(query_labels) or len(database_files) != len(database_labels):
        raise DataError(
            f"{output_dir / 'neighbors.npz'} does not match the {query_split}/{database_split} "
            f"files of {datamodule.name} ({len(query_labels)} vs {len(query_files)} queries)."
        )
    names, multilabel = datamodule.label_names, bool(datamodule.multilabel)
    hits = relevance(query_labels, database_labels, indices, multilabel)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(NEIGHBOR_COLUMNS)
    for q, query_file in enumerate(query_files):
        query_label = label_text(query_labels[q], names, multilabel)
        for rank, (row, dist) in enumerate(zip(indices[q], distances[q], strict=True), start=1):
            writer.writerow(
                [
                    q,
                    query_file,
                    query_label,
                    rank,
                    int(row),
                    database_files[int(row)],
                    label_text(database_labels[int(row)], names, multilabel),
                    repr(float(dist)),
                    int(hits[q, rank - 1]),
                ]
            )
    return write_text(output_dir / NEIGHBORS_CSV, buffer.getvalue())
