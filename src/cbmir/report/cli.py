"""`cbmir-report SWEEP_DIR [--out DIR] [--reference] [--wandb]`: a sweep's tables and figures;
`cbmir-report A B --compare [--out DIR]`: two sweeps job by job, with paired tests."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cbmir.runner import run_command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cbmir-report",
        description=(
            "Gather every job of a `cbmir -m` sweep into results.csv, Markdown tables laid out "
            "like the paper's (one per size: dataset x extractor x mAP@5, mMV@5, ACC@1/3/5 in %, "
            "with 95%% bootstrap intervals), runtimes, and bar charts."
        ),
    )
    p.add_argument(
        "sweep_dir",
        nargs="+",
        help="the sweep directory (e.g. logs/retrieval/multiruns/paper); two with --compare",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="compare sweep A with sweep B job by job (same size, dataset, extractor): paired "
        "bootstrap interval of A - B and a sign-flip permutation test per metric, Holm-corrected",
    )
    p.add_argument("--out", default=None, help="output folder (default: SWEEP_DIR/report)")
    p.add_argument(
        "--reference",
        action="store_true",
        help="set the published numbers (Mahbod et al. 2024) beside the measured ones",
    )
    p.add_argument("--wandb", action="store_true", help="log a summary run to W&B (sweep group)")
    p.add_argument("--wandb-project", default=None, help="W&B project (default: the jobs' own)")
    p.add_argument("--wandb-entity", default=None, help="W&B entity (team or user)")
    p.add_argument("--metric", default="acc@1", help="metric of the bar charts (default acc@1)")
    p.add_argument("--quiet", action="store_true", help="print the summary line only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if len(args.sweep_dir) != (2 if args.compare else 1):
        p.error("give one SWEEP_DIR, or two with --compare")
    if args.compare:
        sweep_a, sweep_b = args.sweep_dir
        return run_command("cbmir-report", lambda: _compare(sweep_a, sweep_b, args.out, args.quiet))
    return run_command("cbmir-report", lambda: _report(args))


def _report(args: argparse.Namespace) -> int:
    from cbmir.report.build import build_report

    report = build_report(args.sweep_dir[0], args.out, reference=args.reference, metric=args.metric)
    if not args.quiet:
        from cbmir.report.build import size_title

        for size, table in report.size_tables.items():
            print(f"\n{size_title(size)} (%, 95% bootstrap CI)\n{table}")
            marked = report.significance.tables.get(size) if report.significance else None
            if marked:
                print(f"{size_title(size)}: **best**, *not significantly worse* (Holm)\n{marked}")
        if not report.problems.empty:
            from cbmir.report.tables import problem_table

            print(f"\nFailed or incomplete jobs\n{problem_table(report.problems)}")
    print(f"cbmir-report: {report.summary()} -> {report.out_dir}")
    if args.wandb:
        from cbmir.report.wandb_summary import flush, log_summary

        run_dir = log_summary(report, project=args.wandb_project, entity=args.wandb_entity)
        flush()
        print(f"cbmir-report: W&B summary run in {run_dir}")
    return 0


def _compare(sweep_a: str, sweep_b: str, out: str | None, quiet: bool) -> int:
    from cbmir.report.build import build_comparison

    path, markdown = build_comparison(sweep_a, sweep_b, out)
    if not quiet:
        print(markdown)
    print(f"cbmir-report: comparison -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
