"""MedMNIST facts, read from `medmnist.INFO` so they never drift from the installed release."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from medmnist import INFO

from cbmir.config import is_int
from cbmir.errors import ConfigError

SPLITS: tuple[str, ...] = ("train", "val", "test")
FLAGS_3D: tuple[str, ...] = tuple(f for f, i in INFO.items() if i["python_class"].endswith("3D"))
FLAGS_2D: tuple[str, ...] = tuple(f for f in INFO if f not in FLAGS_3D)


def _info(flag: str) -> dict:
    return INFO[check_flag(flag)]


def check_flag(flag: str) -> str:
    """Normalise a dataset name ("breastmnist" or "BreastMNIST") or raise a ConfigError."""
    key = str(flag).strip().lower()
    if key in INFO:
        return key
    hint = difflib.get_close_matches(key, list(INFO), n=1)
    did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
    raise ConfigError(
        f"Unknown MedMNIST dataset '{flag}'.{did_you_mean} Valid flags: "
        f"2D: {', '.join(FLAGS_2D)}; 3D: {', '.join(FLAGS_3D)}."
    )


def is_3d(flag: str) -> bool:
    return check_flag(flag) in FLAGS_3D


def valid_sizes(flag: str) -> tuple[int, ...]:
    """Image sizes with a published file: 28 plus every `url_{size}` entry in INFO."""
    info = _info(flag)
    return (28, *sorted(int(k[4:]) for k in info if k.startswith("url_")))


def _or_list(values: tuple[int, ...]) -> str:
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else f"{', '.join(text[:-1])} or {text[-1]}"


def check_flag_size(flag: str, size: int) -> str:
    """Validate a (dataset, size) choice before any heavy work; returns the normalised flag."""
    key = check_flag(flag)
    sizes = valid_sizes(key)
    kind = "3D" if key in FLAGS_3D else "2D"
    if not (is_int(size) and size in sizes):
        raise ConfigError(
            f"{key} is a {kind} dataset: sizes {_or_list(sizes)}, not {size!r}. "
            f"Valid data.size values: {', '.join(map(str, sizes))}."
        )
    return key


def size_suffix(size: int) -> str:
    """medmnist's file/INFO-key suffix: '' for 28 px, '_{size}' otherwise."""
    return "" if size == 28 else f"_{size}"


def label_names(flag: str) -> dict[int, str]:
    return {int(k): v for k, v in _info(flag)["label"].items()}


def name_map(names: Mapping[Any, Any] | Sequence[Any]) -> dict[int, str]:
    """`data.label_names` as {class id: name}: a mapping's keys are the ids (YAML may give
    them as text), a list's positions are."""
    if isinstance(names, Mapping):
        return {int(k): str(v) for k, v in names.items()}
    return {i: str(v) for i, v in enumerate(names)}


def is_multilabel(flag: str) -> bool:
    return "multi-label" in _info(flag)["task"]


def task(flag: str) -> str:
    return _info(flag)["task"]


def n_channels(flag: str) -> int:
    return int(_info(flag)["n_channels"])


def paper_name(flag: str) -> str:
    """The name used in papers and by medmnist's classes, e.g. 'BreastMNIST', 'AdrenalMNIST3D'."""
    return _info(flag)["python_class"]


def n_samples(flag: str) -> dict[str, int]:
    """Images per split; medmnist asserts these counts when loading."""
    return {split: int(n) for split, n in _info(flag)["n_samples"].items()}


def url_and_md5(flag: str, size: int) -> tuple[str, str]:
    key = check_flag_size(flag, size)
    suffix = size_suffix(size)
    return INFO[key][f"url{suffix}"], INFO[key][f"MD5{suffix}"]
