"""The paper's published numbers (Mahbod et al. 2024, Tables S.1-S.4) beside measured ones.

The figures ship as package data (`data/mahbod2024_tables.csv`, percentages). Rows line up on
(size, dataset, extractor) through the config names (``ResNet50`` -> ``resnet50``,
``BreastMNIST`` -> ``breastmnist``); only plain jobs (the paper's protocol, no extra
overrides) are compared.
"""

from __future__ import annotations

from importlib import resources

import pandas as pd

from cbmir.report.names import METRICS, dataset_config_name, model_config_name

REFERENCE_FILE = "mahbod2024_tables.csv"


def load_reference() -> pd.DataFrame:
    """The published table: size, dataset/model (config names), *_paper names, metrics in %."""
    source = resources.files("cbmir.report") / "data" / REFERENCE_FILE
    with source.open("r", encoding="utf-8") as handle:
        ref = pd.read_csv(handle)
    ref = ref.rename(columns={"dataset": "dataset_paper", "model": "model_paper"})
    ref["dataset"] = ref["dataset_paper"].map(dataset_config_name)
    ref["model"] = ref["model_paper"].map(model_config_name)
    ref["size"] = ref["size"].astype(int)
    return ref


def compare(measured: pd.DataFrame, reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Measured plain jobs joined with the paper: ``paper_<m>``, ``diff_<m>`` (ours - paper)
    and ``outside_<m>`` (the published value lies outside our 95% interval) per metric."""
    ref = load_reference() if reference is None else reference
    plain = measured[measured["setting"] == ""]
    ref_cols = ["size", "dataset", "model"] + [col for _, col, _ in METRICS]
    merged = plain.merge(
        ref[ref_cols].rename(columns={col: f"paper_{col}" for _, col, _ in METRICS}),
        on=["size", "dataset", "model"],
        how="left",
    )
    for _, col, _ in METRICS:
        merged[f"diff_{col}"] = merged[col] - merged[f"paper_{col}"]
        paper = merged[f"paper_{col}"]
        merged[f"outside_{col}"] = paper.notna() & (
            (paper < merged[f"{col}_low"]) | (paper > merged[f"{col}_high"])
        )
    return merged


def unmeasured(measured: pd.DataFrame, reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Published rows with no finished plain job in this sweep."""
    ref = load_reference() if reference is None else reference
    plain = measured[measured["setting"] == ""][["size", "dataset", "model"]]
    merged = ref.merge(plain, on=["size", "dataset", "model"], how="left", indicator=True)
    return merged[merged["_merge"] == "left_only"].drop(columns="_merge")
