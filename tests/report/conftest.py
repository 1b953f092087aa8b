"""A small real sweep directory for the report tests, made in process (no subprocess): the
pipeline itself runs each job (raw pixels on synthetic BreastMNIST), as a sweep would."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import compose_config


@pytest.fixture(scope="session")
def made_sweep(tmp_path_factory, make_synthetic) -> Path:
    """`sweep/` with three finished jobs whose files the pipeline wrote: pixels at 28 and
    64 px, and one of the paper's extractors (ResNet50, random weights) at 28 px."""
    from cbmir.pipeline import run_retrieval

    make_synthetic("breastmnist", 28)
    root = make_synthetic("breastmnist", 64).parent
    base = tmp_path_factory.mktemp("report-sweep")
    sweep = base / "sweep"
    for model, size in (("pixels", 28), ("pixels", 64), ("resnet50", 28)):
        run_retrieval(
            compose_config(
                [
                    f"model={model}",
                    "model.pretrained=false",
                    f"data.size={size}",
                    "data.synthetic=true",
                    "data.download=false",
                    f"paths.synthetic_root={root}",
                    f"paths.store={base / 'store'}",
                    f"paths.output_dir={sweep / f'{model}-breastmnist-{size}'}",
                    "gallery.n_queries=0",
                ]
            )
        )
    return sweep


@pytest.fixture(scope="session")
def npz_job(tmp_path_factory, digits_npz) -> Path:
    """One finished job on a custom npz (scikit-learn's digits): data without a size."""
    from cbmir.pipeline import run_retrieval

    base = tmp_path_factory.mktemp("npz-job")
    job = base / "pixels-digits"
    run_retrieval(
        compose_config(
            [
                "model=pixels",
                "data=npz",
                f"data.path={digits_npz}",
                f"paths.store={base / 'store'}",
                f"paths.output_dir={job}",
                "gallery.n_queries=0",
            ]
        )
    )
    return job
