"""`cbmir-query`: search a stored database with any image and see the neighbours.

    cbmir-query scan.png --run logs/retrieval/runs/2026-01-01_12-00-00
    cbmir-query --index 3 --index 17 --run RUN_DIR --out neighbours.png
    cbmir-query volume.npy data=adrenalmnist3d model=resnet50   # store entry found by key

Arguments containing `=` are config overrides (Hydra group choices without --run; plain
`key.path=value` changes of the run's resolved config with --run).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from cbmir.errors import ConfigError, DataError
from cbmir.retrieval.settings import DISTANCES, check_k, resolve_device
from cbmir.runner import run_command

DEFAULT_OUT = Path("cbmir-query.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cbmir-query",
        description=(
            "Embed query images with the extractor a database was built with and print + draw "
            "their k nearest neighbours. The database is never re-embedded."
        ),
        epilog="Arguments with '=' are config overrides, e.g. data=breastmnist model=pixels.",
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="QUERY|KEY=VALUE",
        help="query pictures (PNG, JPEG, BMP, TIFF) or .npy arrays (volumes for 3D "
        "databases), and config overrides",
    )
    parser.add_argument(
        "-i",
        "--index",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="also query row N of --split (repeatable); its label is known, so hits are marked",
    )
    parser.add_argument(
        "--split", default=None, help="split for --index (default: the config's query split)"
    )
    parser.add_argument(
        "--run", type=Path, metavar="RUN_DIR", help="a finished cbmir run's output directory"
    )
    parser.add_argument(
        "--store-entry",
        type=Path,
        metavar="DIR",
        help="an embedding store entry to search (checked against the extractor and data)",
    )
    parser.add_argument("-k", type=int, default=None, help="neighbours (default: the run's k)")
    parser.add_argument(
        "--distance",
        choices=DISTANCES,
        default=None,
        help="default: the run's distance",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"PNG grid to write (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="reject queries whose channels, size or bit depth differ from the database's",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (query embedding)")
    parser.add_argument("--tile", type=int, default=112, help="tile side in the grid, pixels")
    parser.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="SENTENCE",
        help="search the --run's database with words (repeatable; models with a text tower: "
        "docs/text.md)",
    )
    return parser


def _split_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    files, overrides = [], []
    for item in inputs:
        if "=" in item and not Path(item).exists():
            overrides.append(item)
        else:
            files.append(Path(item))
    return files, overrides


def _check_args(args: argparse.Namespace, files: list[Path]) -> None:
    """Everything checkable before a config is read or a model built."""
    if not files and not args.index:
        raise ConfigError("give at least one query: a picture/.npy file or --index N")
    missing = [str(f) for f in files if not f.exists()]  # a folder: a DICOM series
    if missing:
        raise DataError(f"query file(s) not found: {', '.join(missing)}")
    if args.k is not None:
        check_k(args.k, key="-k")  # against the database size once it is open
    resolve_device(args.device, "--device")
    if args.tile < 8:
        raise ConfigError(f"--tile must be at least 8 pixels, not {args.tile}")
    if args.run is not None and not args.run.is_dir():
        raise DataError(f"--run {args.run} is not a directory")


def _say(console: Console, text: str, style: str = "") -> None:
    console.print(Text(text, style=style))


def _table(item, indices, distances, database_labels, names, multilabel: bool, files=None) -> Table:
    """rank, database row, label name, distance (and hit, when the query's label is known; and
    the file path, for own collections)."""
    from cbmir.figures.labels import label_text, relevance

    known = item.label is not None
    label = label_text(item.label, names, multilabel) if known else "unknown"
    table = Table(title=f"query {item.name} · label: {label}", title_justify="left")
    for column in ("rank", "row", "label", "distance"):
        table.add_column(column, justify="left" if column == "label" else "right")
    if files is not None:  # the name here; the whole path below the table (`_file_lines`)
        table.add_column("file", justify="left", no_wrap=True)
    if known:
        query_label = item.label.reshape(1, -1)
        hits = relevance(query_label, database_labels, indices.reshape(1, -1), multilabel)[0]
        table.add_column("hit", justify="center")
    for rank, (row, dist) in enumerate(zip(indices, distances, strict=True), start=1):
        cells = [str(rank), str(int(row)), label_text(database_labels[row], names, multilabel)]
        cells.append(f"{float(dist):.6g}")
        if files is not None:
            cells.append(Path(files[int(row)]).name)
        if known:
            cells.append("yes" if hits[rank - 1] else "no")
        table.add_row(*cells)
    return table


def query(args: argparse.Namespace, out: Console, err: Console) -> int:
    if args.out.suffix.lower() != ".png":  # image and --text queries alike
        raise ConfigError(f"--out must name a .png file, not {args.out}")
    if args.text:
        from cbmir.query.text import text_query

        return text_query(args, out, err)
    files, overrides = _split_inputs(args.inputs)
    _check_args(args, files)

    from cbmir.query.database import attach_embedder, build_embedder, open_database

    db = open_database(args.run, args.store_entry, overrides)  # config + data: cheap checks first

    from cbmir.figures.grid import GridLayout, render_grid
    from cbmir.figures.images import display_image
    from cbmir.figures.neighbours import QueryResult, neighbour_cells
    from cbmir.figures.png import save_png
    from cbmir.query.engine import check_reproduces, embed_queries, search
    from cbmir.query.inputs import QueryItem, load_query

    dm = db.datamodule
    window = getattr(getattr(dm, "settings", None), "window", None)  # own collections
    items: list[QueryItem] = [load_query(f, db.spec, args.strict, window) for f in files]
    query_files: list[str | None] = [str(f) for f in files]  # shown for own collections
    if args.index:
        split = args.split or dm.query_split
        if split not in dm.splits:
            raise ConfigError(f"--split {split}: the dataset has {', '.join(dm.splits)}")
        source = dm.dataset(split)
        bad = [i for i in args.index if not 0 <= i < len(source)]
        if bad:
            raise ConfigError(f"--index {bad[0]} is outside {split} (rows 0..{len(source) - 1})")
        items += [
            QueryItem(f"{split}[{i}]", source[i]["image"], source.labels[i]) for i in args.index
        ]
        split_files = dm.split_files(split)
        query_files += [split_files[i] if split_files is not None else None for i in args.index]
    for item in items:
        for note in item.notes:
            _say(err, f"note: {item.name}: {note}", "yellow")

    embedder = build_embedder(db.cfg, db.spec.volume)
    attach_embedder(db, embedder)
    database = dm.dataset(db.split)
    check_reproduces(embedder, database[0]["image"], db.entry.embeddings[0], db.cfg, args.device)
    k = args.k or int(db.cfg.retrieval.k)
    distance = args.distance or str(db.cfg.retrieval.distance)
    embeddings = embed_queries(embedder, [it.image for it in items], db.cfg, args.device)
    distances, indices = search(embeddings, db.entry.embeddings, k, distance)

    names, multi = db.label_names, db.multilabel
    extractor_name = db.entry.manifest.get("extractor", {}).get("name", "?")
    _say(
        out,
        f"database: {len(database)} {db.split} images of {dm.name} ({extractor_name}, "
        f"{distance}, k={k})",
        "bold",
    )
    _say(out, f"store entry: {db.entry.path}")
    database_files = dm.split_files(db.split)
    results = []
    for q, item in enumerate(items):
        query_file = query_files[q] if database_files is not None else None
        table = _table(
            item, indices[q], distances[q], database.labels, names, multi, database_files
        )
        out.print(table)
        if database_files is not None:  # plain lines: a table would wrap or cut the paths
            _say(out, f"query file: {query_file or '(given)'}")
            for rank, row in enumerate(indices[q], start=1):
                _say(out, f"#{rank} file: {database_files[int(row)]}")
        results.append(
            QueryResult(
                item.name,
                display_image(item.image, db.spec.volume),
                indices[q],
                distances[q],
                item.label,
                query_file,
            )
        )

    def fetch(row: int):
        return display_image(database[row]["image"], db.spec.volume)

    layout = GridLayout(tile=args.tile)
    title = f"{extractor_name} · {dm.name} {db.split} ({len(database)} images) · {distance}"
    if db.spec.volume:
        title += " · volumes shown by their middle slice"
    cells = neighbour_cells(results, fetch, database.labels, names, multi, database_files)
    image = render_grid(cells, layout, title)
    path = save_png(image, args.out)
    _say(out, f"grid: {path} ({image.width} x {image.height} px)")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    sys.exit(run_command("cbmir-query", lambda: query(args, out, err)))


if __name__ == "__main__":
    main()
