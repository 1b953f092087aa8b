"""Build a sweep's report: CSV, Markdown tables, bar charts (and the paper beside them).

Writes into ``SWEEP_DIR/report/`` by default (all files atomically)::

    results.csv            one row per job: names, status, metrics in % with 95% CI, timings
    comparison.csv         (--reference) measured beside published, difference, outside-CI flag
    report.md              everything below in one page
    tables/size_<S>.md     per image size: dataset x extractor x mAP@5 ... ACC@5 (like S.1-S.4)
    tables/comparison_<S>.md, tables/timings.md, tables/problems.md
    figures/<metric>_<dataset>.png, figures/<metric>_overview.png
    significance.csv       paired tests between extractors per dataset, size and metric (Holm)
    tables/significance_<S>.md  bold: best; italic: not significantly worse than the best
    friedman.csv, figures/cd_<metric>_<S>.png   ranks across datasets, critical differences
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cbmir.figures.png import save_png
from cbmir.figures.report_plots import dataset_figure, metric_column, overview_figure
from cbmir.io_utils import write_text
from cbmir.report import tables
from cbmir.report.collect import collect, finished
from cbmir.report.names import METRICS, sizes_of
from cbmir.report.reference import compare, load_reference, unmeasured
from cbmir.report.stats_report import Significance, sweep_significance

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What a report run produced (paths, frames and the Markdown shown to the user)."""

    sweep_dir: Path
    out_dir: Path
    jobs: pd.DataFrame
    done: pd.DataFrame
    comparison: pd.DataFrame | None = None
    size_tables: dict[int | None, str] = field(default_factory=dict)
    extra_tables: dict[int | None, str] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    significance: Significance | None = None
    markdown: str = ""

    @property
    def problems(self) -> pd.DataFrame:
        return self.jobs[self.jobs["status"] != "finished"]

    def summary(self) -> str:
        counts = self.jobs["status"].value_counts()
        return (
            f"{len(self.jobs)} jobs: {counts.get('finished', 0)} finished, "
            f"{counts.get('failed', 0)} failed, {counts.get('incomplete', 0)} incomplete"
        )


def build_report(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    reference: bool = False,
    metric: str = "acc@1",
) -> Report:
    """Gather `sweep_dir`'s jobs and write the report files into `out_dir`."""
    sweep = Path(sweep_dir).resolve()
    out = Path(out_dir).resolve() if out_dir else sweep / "report"
    jobs = collect(sweep, exclude=out)
    done = finished(jobs)
    report = Report(sweep_dir=sweep, out_dir=out, jobs=jobs, done=done)
    ref = load_reference() if reference else None

    _clear_previous(out)
    write_text(out / "results.csv", jobs.to_csv(index=False))
    for size in sizes_of(done):  # None last: data without a MedMNIST size (data=npz)
        report.size_tables[size] = tables.size_table(done, size)
        name = f"size_{size}.md" if size is not None else "other_data.md"
        write_text(out / "tables" / name, report.size_tables[size])
        extra = tables.extra_table(done, size)
        if extra:  # jobs with retrieval.metrics beyond the paper's
            report.extra_tables[size] = extra
            write_text(out / "tables" / name.replace(".md", "_more.md"), extra)
    if ref is not None:
        report.comparison = compare(done, ref)
        write_text(out / "comparison.csv", report.comparison.to_csv(index=False))
        for size in _compared_sizes(report.comparison):
            write_text(
                out / "tables" / f"comparison_{size}.md",
                tables.comparison_table(report.comparison, size),
            )
    if not done.empty:
        write_text(out / "tables" / "timings.md", tables.timing_table(done))
        report.significance = _write_significance(done, sweep, out, report.figures)
    if not report.problems.empty:
        write_text(out / "tables" / "problems.md", tables.problem_table(report.problems))

    plain = done[done["setting"] == ""]
    col, _ = metric_column(metric)
    if not plain.empty and plain[col].notna().any():
        stem = col.replace("_at_", "")
        for dataset in dict.fromkeys(plain["dataset"]):
            path = out / "figures" / f"{stem}_{dataset}.png"
            report.figures.append(save_png(dataset_figure(plain, dataset, metric, ref), path))
        path = out / "figures" / f"{stem}_overview.png"
        report.figures.append(save_png(overview_figure(plain, metric, ref), path))

    report.markdown = _markdown(report, ref)
    write_text(out / "report.md", report.markdown)
    log.info("report: %s -> %s", report.summary(), out)
    return report


def _write_significance(done: pd.DataFrame, sweep: Path, out: Path, figures: list[Path]):
    """significance.csv, the marked tables, friedman.csv and one CD diagram per metric and size."""
    from cbmir.figures.cd_diagram import cd_figure

    result = sweep_significance(done, sweep)
    if not result.pairs.empty:
        write_text(out / "significance.csv", result.pairs.to_csv(index=False))
    for size, table in result.tables.items():
        name = f"significance_{size}.md" if size is not None else "significance_other_data.md"
        write_text(out / "tables" / name, table)
    if not result.friedman.empty:
        write_text(out / "friedman.csv", result.friedman.to_csv(index=False))
    for key, size, fr in result.cd_inputs:
        stem = key.replace("@", "")
        title = (
            f"{key} at {size_title(size)}: mean ranks over {fr.n_datasets} datasets "
            f"(Friedman p = {fr.pvalue:.3g}; bars: Nemenyi p >= 0.05)"
        )
        fig = cd_figure(fr.avg_ranks, fr.nemenyi, fr.critical_difference, title)
        figures.append(save_png(fig, out / "figures" / f"cd_{stem}_{size}.png"))
    return result


def build_comparison(
    sweep_a: str | Path, sweep_b: str | Path, out_dir: str | Path | None = None
) -> tuple[Path, str]:
    """compare.csv and compare.md of sweep A against sweep B (default: A/compare-<B's name>)."""
    from cbmir.report.stats_report import compare_sweeps, compare_table

    a, b = Path(sweep_a).resolve(), Path(sweep_b).resolve()
    out = Path(out_dir).resolve() if out_dir else a / f"compare-{b.name}"
    done_a = finished(collect(a, exclude=out))
    done_b = finished(collect(b, exclude=out))
    table = compare_sweeps(done_a, a, done_b, b)
    markdown = "\n".join(
        [
            f"# {a.name} (A) against {b.name} (B)\n",
            f"A: `{a}`; B: `{b}`. Jobs matched by size, dataset and extractor; metrics in %; "
            "A - B with its paired bootstrap 95% interval over the shared queries; p: paired "
            "sign-flip permutation test, Holm-corrected over the jobs of each metric (* below "
            "0.05).\n",
            compare_table(table),
        ]
    )
    write_text(out / "compare.csv", table.to_csv(index=False))
    write_text(out / "compare.md", markdown)
    return out / "compare.md", markdown


def size_title(size: int | None) -> str:
    return f"{size} x {size} px" if size is not None else "Other data (no MedMNIST size)"


def _clear_previous(out: Path) -> None:
    """Remove an earlier report's tables and figures, so none outlives its jobs."""
    for pattern in (
        "tables/*.md",
        "figures/*.png",
        "comparison.csv",
        "significance.csv",
        "friedman.csv",
    ):
        for path in out.glob(pattern):
            path.unlink()


def _compared_sizes(comparison: pd.DataFrame) -> list[int]:
    """Sizes with at least one published number to compare with."""
    paper = comparison[[f"paper_{col}" for _, col, _ in METRICS]].notna().any(axis=1)
    return sorted(int(s) for s in comparison.loc[paper, "size"].unique())


def _unverified_jobs(done: pd.DataFrame) -> list[str]:
    """Jobs on real-looking data that failed MedMNIST's checksum (run with data.verify=false)."""
    if "data_verified" not in done:
        return []
    failed = done["data_verified"].map(lambda v: isinstance(v, (bool, np.bool_)) and not v) & ~done[
        "synthetic"
    ].astype(bool)
    return list(done.loc[failed, "job"])


def _significance_markdown(report: Report) -> list[str]:
    sig = report.significance
    assert sig is not None
    parts = []
    if not sig.friedman.empty:
        parts.append("## Across datasets: Friedman test and Nemenyi critical differences\n")
        shown = sig.friedman[["size", "metric", "n_datasets", "n_extractors", "friedman_p"]]
        rows = [[r.size, r.metric, r.n_datasets, r.n_extractors, f"{r.friedman_p:.3g}"]
                for r in shown.itertuples()]  # fmt: skip
        header = ["Size", "Metric", "Datasets", "Extractors", "Friedman p"]
        parts.append(tables.markdown_table(header, rows, "rlrrr"))
        parts.append("Average ranks per extractor: `friedman.csv`; diagrams: `figures/cd_*.png`.\n")
    parts += [f"> {note}\n" for note in sig.notes]
    return parts


def _markdown(report: Report, ref: pd.DataFrame | None) -> str:
    done = report.done
    parts = [
        f"# Sweep report: {report.sweep_dir.name}\n",
        f"`{report.sweep_dir}`: {report.summary()}.\n",
        "Metrics in percent, as the paper; brackets: 95% bootstrap interval over the test "
        "queries (1000 resamples).\n",
    ]
    if done["synthetic"].any() or (~done["pretrained"]).any():
        parts.append(
            "> **Not comparable to the paper:** some jobs ran on synthetic data "
            "(a cbmir-synth file) or random weights (`model.pretrained=false`).\n"
        )
    unverified = _unverified_jobs(done)
    if unverified:
        parts.append(
            "> **Unverified data:** the data file of "
            + ", ".join(f"`{job}`" for job in unverified)
            + " does not match MedMNIST's published checksum (`data.verify=false`).\n"
        )
    compared = _compared_sizes(report.comparison) if report.comparison is not None else []
    for size, table in report.size_tables.items():
        parts += [f"## {size_title(size)}\n", table]
        if size in report.extra_tables:
            parts += ["Further metrics (`retrieval.metrics`, docs/statistics.md):\n"]
            parts.append(report.extra_tables[size])
        if size in compared:
            parts += [
                f"### {size} px beside the paper (Mahbod et al. 2024)\n",
                "Δ = ours - paper; † the published value lies outside our 95% interval.\n",
                tables.comparison_table(report.comparison, size),
            ]
        sig_tables = report.significance.tables if report.significance else {}
        if size in sig_tables:
            parts += [
                f"### {size_title(size)}: which extractor is best?\n",
                "Mean over queries in %. **Bold**: the best extractor; *italic*: not "
                "significantly worse than it (paired sign-flip permutation test on the same "
                "queries, Holm-corrected over all pairs of the dataset, alpha = 0.05; "
                "`significance.csv` has every pair with its paired bootstrap interval).\n",
                sig_tables[size],
            ]
    if report.significance is not None:
        parts += _significance_markdown(report)
    if ref is not None:
        missing = unmeasured(done, ref)
        if len(missing):
            parts.append(f"{len(missing)} of the paper's {len(ref)} results have no job here.\n")
    if not done.empty:
        parts += ["## Runtime\n", tables.timing_table(done)]
    if not report.problems.empty:
        parts += ["## Failed or incomplete jobs\n", tables.problem_table(report.problems)]
    if report.figures:
        parts.append("## Figures\n")
        parts += [
            f"![{p.stem}]({p.relative_to(report.out_dir).as_posix()})\n" for p in report.figures
        ]
    return "\n".join(parts)
