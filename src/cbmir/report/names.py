"""Names as the paper prints them, and the order its tables use.

Config names (``resnet50``, ``breastmnist``) are what jobs record; the paper's names
(``ResNet50``, ``BreastMNIST``) are what readers and the reference CSV use.
"""

from __future__ import annotations

import pandas as pd

#: config model name -> the paper's extractor name, in the paper's column order
PAPER_MODELS: dict[str, str] = {
    "vgg19": "VGG19",
    "resnet50": "ResNet50",
    "densenet121": "DenseNet121",
    "efficientnetv2_m": "EfficientNetV2M",
    "openclip_vitg14": "OpenCLIP",
    "conch": "CONCH",
    "uni": "UNI",
    "medclip": "MedCLIP(ViT)",
    "biomedclip": "BiomedCLIP",
}
#: the paper's datasets (MedMNIST flags) in its table order: six 2D, then two 3D
PAPER_DATASETS: tuple[str, ...] = (
    "breastmnist",
    "pneumoniamnist",
    "retinamnist",
    "dermamnist",
    "bloodmnist",
    "pathmnist",
    "adrenalmnist3d",
    "synapsemnist3d",
)
#: (metric key in metrics.json, column name in CSVs, header in tables), the paper's order
METRICS: tuple[tuple[str, str, str], ...] = (
    ("map@5", "map_at_5", "mAP@5"),
    ("mmv@5", "mmv_at_5", "mMV@5"),
    ("acc@1", "acc_at_1", "ACC@1"),
    ("acc@3", "acc_at_3", "ACC@3"),
    ("acc@5", "acc_at_5", "ACC@5"),
)

#: the further metrics (`retrieval.metrics=all`): (column prefix in CSVs, header prefix)
EXTRA_METRICS: tuple[tuple[str, str], ...] = (
    ("precision_at_", "P@"),
    ("recall_at_", "R@"),
    ("ndcg_at_", "nDCG@"),
    ("mrr", "MRR"),
    ("r_precision", "R-Prec"),
    ("map_at_r", "MAP@R"),
)


def is_metric_key(key: str) -> bool:
    """A metrics.json key that holds a metric (``map@5``, ``mrr``, ``r_precision``, ...)."""
    return "@" in key or key in ("mrr", "r_precision")


def metric_column(key: str) -> str:
    """``map@5`` -> ``map_at_5``: the column name in results.csv."""
    return key.replace("@", "_at_")


_MODEL_FROM_PAPER = {paper.lower(): name for name, paper in PAPER_MODELS.items()}


def model_paper_name(name: str) -> str:
    """``resnet50`` -> ``ResNet50``; models the paper did not test keep their config name."""
    return PAPER_MODELS.get(str(name), str(name))


def model_config_name(paper: str) -> str:
    """``ResNet50`` -> ``resnet50`` (inverse of `model_paper_name`, case-insensitive)."""
    return _MODEL_FROM_PAPER.get(str(paper).lower(), str(paper))


def dataset_paper_name(flag: str) -> str:
    """``breastmnist`` -> ``BreastMNIST`` (medmnist's class name); other data keep their name."""
    from cbmir.data import catalog
    from cbmir.errors import ConfigError

    try:
        return catalog.paper_name(flag)
    except ConfigError:
        return str(flag)


def dataset_config_name(paper: str) -> str:
    """``BreastMNIST`` -> ``breastmnist``."""
    return str(paper).lower()


def model_order(name: str) -> tuple[int, str]:
    order = list(PAPER_MODELS)
    return (order.index(name) if name in order else len(order), str(name))


def sizes_of(jobs: pd.DataFrame) -> list[int | None]:
    """The image sizes of `jobs`, ascending; None (data without a MedMNIST size) last."""
    sizes: list[int | None] = sorted(int(s) for s in jobs["size"].dropna().unique())
    return sizes + ([None] if jobs["size"].isna().any() else [])


def dataset_order(flag: str) -> tuple[int, str]:
    order = list(PAPER_DATASETS)
    return (order.index(flag) if flag in order else len(order), str(flag))
