"""`cbmir-plot`: figures from a finished run's stored embeddings.

cbmir-plot embeddings RUN_DIR                 # t-SNE -> RUN_DIR/embeddings_tsne.png
cbmir-plot embeddings RUN_DIR --method umap --max-points 20000 --out maps/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

from cbmir.config import check_int
from cbmir.errors import ConfigError
from cbmir.runner import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbmir-plot", description="Figures of stored embeddings.")
    commands = parser.add_subparsers(dest="command", required=True)
    emb = commands.add_parser(
        "embeddings",
        help="2D map (t-SNE / UMAP) of a run's database embeddings, coloured by class",
        description=(
            "Map a run's database embeddings to 2D (t-SNE as in the paper's code; UMAP when "
            "umap-learn is installed), coloured by class with label names. Writes "
            "embeddings_<method>.png and the coordinates (.npz) into RUN_DIR or --out."
        ),
    )
    emb.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run output dir or store entry")
    emb.add_argument(
        "--method",
        choices=("tsne", "umap", "all"),
        default="tsne",
        help="tsne (default), umap (needs umap-learn) or all (every installed method)",
    )
    emb.add_argument(
        "--max-points",
        type=int,
        default=5000,
        help="seeded random subsample of larger databases (0: all points; t-SNE is O(n log n))",
    )
    emb.add_argument("--seed", type=int, default=0, help="subsample and layout seed")
    emb.add_argument("--out", type=Path, default=None, help="a .png file or a directory")
    emb.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PCA/t-SNE (default: all; 1 is far faster on a busy machine)",
    )
    return parser


def embeddings(args: argparse.Namespace, console: Console) -> int:
    from cbmir.figures.embedding_map import METHODS, plot_embeddings, umap_available

    if args.threads is not None:
        check_int(args.threads, "--threads")
    check_int(args.max_points, "--max-points", minimum=0)
    if not args.run_dir.is_dir():
        raise ConfigError(f"{args.run_dir} is not a directory")
    if args.method == "all":
        methods = [m for m in METHODS if m != "umap" or umap_available()]
        if "umap" not in methods:
            console.print(Text("note: umap-learn is not installed; UMAP skipped", style="yellow"))
        if args.out is not None and args.out.suffix.lower() == ".png":
            raise ConfigError("--method all writes one file per method: give --out a directory")
    else:
        methods = [args.method]
    for method in methods:
        path = plot_embeddings(
            args.run_dir, method, args.max_points or None, args.seed, args.out, args.threads
        )
        console.print(Text(f"{method}: {path}"))
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    console = Console(soft_wrap=True)
    sys.exit(run_command("cbmir-plot", lambda: embeddings(args, console)))


if __name__ == "__main__":
    main()
