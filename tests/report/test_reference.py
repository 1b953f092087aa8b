"""The paper's numbers ship with the package and line up with config names and sizes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cbmir.config import config_dir
from cbmir.data import catalog
from cbmir.report.names import (
    METRICS,
    PAPER_MODELS,
    dataset_paper_name,
    model_config_name,
    model_paper_name,
)
from cbmir.report.reference import compare, load_reference, unmeasured
from cbmir.report.tables import comparison_table, fmt_ci, size_table


def test_reference_is_package_data_with_every_published_row() -> None:
    ref = load_reference()
    assert len(ref) == 251  # 6 2D sets x 4 sizes + 2 3D sets x 2 sizes, x 9; one not published
    assert set(ref["model"]) == set(PAPER_MODELS)
    for model in ref["model"].unique():
        assert (config_dir() / "model" / f"{model}.yaml").is_file()
    for flag in ref["dataset"].unique():
        assert (config_dir() / "data" / f"{flag}.yaml").is_file()
        assert int(ref.loc[ref["dataset"] == flag, "size"].max()) == max(catalog.valid_sizes(flag))
    row = ref[(ref["size"] == 28) & (ref["dataset"] == "breastmnist") & (ref["model"] == "vgg19")]
    assert row["acc_at_1"].item() == 79.48 and row["dataset_paper"].item() == "BreastMNIST"


def test_names_map_both_ways() -> None:
    for name, paper in PAPER_MODELS.items():
        assert model_paper_name(name) == paper and model_config_name(paper) == name
    assert model_config_name("MedCLIP(ViT)") == "medclip"
    assert model_paper_name("pixels") == "pixels"
    assert dataset_paper_name("adrenalmnist3d") == "AdrenalMNIST3D"
    assert dataset_paper_name("my_npz") == "my_npz"


def _measured(rows: list[tuple]) -> pd.DataFrame:
    """Jobs as `collect` returns them: (size, dataset, model, setting, acc@1 %, low, high)."""
    out = []
    for size, dataset, model, setting, acc1, low, high in rows:
        row = {
            "size": size,
            "dataset": dataset,
            "model": model,
            "setting": setting,
            "dataset_paper": dataset_paper_name(dataset),
            "model_paper": model_paper_name(model),
        }
        for _, col, _ in METRICS:
            row.update({col: acc1, f"{col}_low": low, f"{col}_high": high})
        out.append(row)
    return pd.DataFrame(out)


def test_comparison_lines_up_size_dataset_and_extractor() -> None:
    measured = _measured(
        [
            (28, "breastmnist", "resnet50", "", 80.0, 73.0, 86.0),  # paper 79.48: inside
            (224, "pathmnist", "uni", "", 80.0, 79.0, 81.0),  # paper 93.69: outside
            (28, "breastmnist", "resnet50", "retrieval=cosine", 10.0, 5.0, 15.0),  # not paper
            (28, "breastmnist", "pixels", "", 70.0, 60.0, 80.0),  # not in the paper
        ]
    )
    cmp = compare(measured).set_index(["size", "dataset", "model"])
    assert len(cmp) == 3  # the cosine job is not the paper's protocol
    resnet = cmp.loc[(28, "breastmnist", "resnet50")]
    assert resnet["paper_acc_at_1"] == 79.48
    assert resnet["diff_acc_at_1"] == pytest.approx(80.0 - 79.48)
    assert not resnet["outside_acc_at_1"]
    uni = cmp.loc[(224, "pathmnist", "uni")]
    ref = load_reference()
    published = ref[
        (ref["size"] == 224) & (ref["dataset"] == "pathmnist") & (ref["model"] == "uni")
    ]
    assert uni["paper_acc_at_1"] == published["acc_at_1"].item()
    assert uni["outside_acc_at_1"] == (not 79.0 <= published["acc_at_1"].item() <= 81.0)
    assert math.isnan(cmp.loc[(28, "breastmnist", "pixels")]["paper_acc_at_1"])
    assert len(unmeasured(measured)) == 251 - 2

    table = comparison_table(compare(measured), 28)
    line = next(row for row in table.splitlines() if "ResNet50 |" in row)
    assert "| 80.00 | 79.48 | +0.52 |" in line
    assert "| 70.00 | — | — |" in next(r for r in table.splitlines() if "pixels" in r)


def test_size_table_shows_intervals_grouped_by_dataset() -> None:
    measured = _measured(
        [
            (28, "breastmnist", "vgg19", "", 83.18, 77.05, 88.46),
            (28, "breastmnist", "uni", "", 83.65, 77.6, 89.1),
            (28, "retinamnist", "vgg19", "", 46.25, np.nan, np.nan),
            (64, "breastmnist", "vgg19", "", 85.0, 80.0, 90.0),
        ]
    )
    table = size_table(measured, 28).splitlines()
    assert table[0].startswith("| Dataset | Extractor | mAP@5 | mMV@5 | ACC@1 | ACC@3 | ACC@5")
    assert table[2].startswith("| BreastMNIST | VGG19 | 83.18 [77.0, 88.5]")
    assert table[3].startswith("|  | UNI | 83.65 [77.6, 89.1]")
    assert table[4].startswith("| RetinaMNIST | VGG19 | 46.25 |")
    assert len(table) == 5  # the 64 px job is in its own table
    assert fmt_ci(float("nan"), 1, 2) == "—"
