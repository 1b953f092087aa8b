"""A 2D map of a run's database embeddings, coloured by class: how an extractor lays out classes.

t-SNE as in the paper's code (scikit-learn), UMAP where `umap-learn` is installed. Embeddings are
read from the store entry the run searched (memory-mapped, never recomputed); large databases
are subsampled with a seed. Cosine runs are L2-normalised first, so Euclidean distances on the
map's input rank like the run's cosine distances. Above 50 dimensions PCA to 50 comes first
(the usual t-SNE recipe: faster, and it drops noise directions).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from cbmir.errors import ConfigError, DataError
from cbmir.figures.labels import NO_LABEL, names_from_config
from cbmir.figures.png import save_png
from cbmir.io_utils import write_npz
from cbmir.store import EmbeddingStore, StoredEmbeddings

METHODS = ("tsne", "umap")
PCA_DIMS = 50
MULTIPLE = "several labels"


@dataclass
class MapSource:
    """What to draw: embeddings, labels, names and a caption, from a run dir or a store entry."""

    entry: StoredEmbeddings
    names: dict[int, str]
    distance: str
    caption: str
    is_run: bool


def umap_available() -> bool:
    return importlib.util.find_spec("umap") is not None


def open_source(path: str | Path) -> MapSource:
    """A finished run's database entry (via metrics.json), or a store entry directory itself."""
    path = Path(path).expanduser()
    if (path / "metrics.json").is_file():
        metrics = json.loads((path / "metrics.json").read_text())
        recorded = Path(str(metrics.get("database_entry", "")))
        cfg = (
            OmegaConf.load(path / "config_resolved.yaml")
            if (path / "config_resolved.yaml").is_file()
            else None
        )
        store_root = Path(str(cfg.paths.store)).expanduser() if cfg is not None else recorded.parent
        for candidate in (recorded, store_root / recorded.name):
            if EmbeddingStore(candidate.parent).has(candidate.name):
                entry = EmbeddingStore(candidate.parent).load(candidate.name)
                break
        else:
            raise DataError(
                f"the database embeddings of {path} ({recorded}) are gone from the store; "
                "re-run the benchmark to embed them again"
            )
        data_cfg = cfg.data if cfg is not None else {}
        distance = str(metrics.get("distance", "euclidean"))
        run_name = cfg.get("run_name", path.name) if cfg is not None else path.name
    elif EmbeddingStore(path.parent).has(path.name):
        entry = EmbeddingStore(path.parent).load(path.name)
        data_cfg = {}
        name = entry.manifest.get("data", {}).get("name")
        from cbmir.data import catalog

        if name and str(name).lower() in catalog.FLAGS_2D + catalog.FLAGS_3D:
            data_cfg = {"flag": str(name)}
        distance = "euclidean"
        run_name = entry.manifest.get("extractor", {}).get("name", path.name)
    else:
        raise DataError(
            f"{path} is neither a finished cbmir run (metrics.json) nor a store entry "
            "(manifest.json + embeddings.npy)"
        )
    data = entry.manifest.get("data", {})
    caption = f"{run_name}: {data.get('name', '?')} {data.get('split', '?')} embeddings"
    names = names_from_config(data_cfg, entry.labels, data.get("source_sha256"))
    return MapSource(entry, names, distance, caption, is_run=(path / "metrics.json").is_file())


def class_names(labels: np.ndarray, names: dict[int, str]) -> np.ndarray:
    """One legend entry per point; multi-label points with several labels share one entry."""
    labels = np.asarray(labels).reshape(len(labels), -1)
    if labels.shape[1] == 1:
        return np.asarray([names.get(int(v), str(int(v))) for v in labels[:, 0]], dtype=object)
    positive = labels != 0
    out = [
        NO_LABEL if n == 0 else MULTIPLE if n > 1 else names.get(int(i), str(int(i)))
        for n, i in zip(positive.sum(axis=1), positive.argmax(axis=1), strict=True)
    ]
    return np.asarray(out, dtype=object)


def subsample(n: int, max_points: int | None, seed: int) -> np.ndarray:
    """Sorted rows to draw: all of them, or a seeded random `max_points` of them."""
    if max_points is None or max_points <= 0 or n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def project(
    embeddings: np.ndarray, method: str, distance: str, seed: int, threads: int | None = None
) -> np.ndarray:
    """float32 [n, D] -> [n, 2] map coordinates, on `threads` BLAS/OpenMP threads (None: all).

    Fewer threads help on a busy machine: sklearn's t-SNE slows down by an order of magnitude
    when its OpenMP threads compete with other processes for the cores.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        return _project(embeddings, method, distance, seed)


def _project(embeddings: np.ndarray, method: str, distance: str, seed: int) -> np.ndarray:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose {', '.join(METHODS)}")
    x = np.asarray(embeddings, dtype=np.float64)
    if len(x) < 5:
        raise DataError(f"{len(x)} points are too few for a map (need at least 5)")
    if distance == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norms > 0, norms, 1.0)
    if x.shape[1] > PCA_DIMS:
        from sklearn.decomposition import PCA

        x = PCA(n_components=PCA_DIMS, random_state=seed).fit_transform(x)
    if method == "umap":
        if not umap_available():
            raise ConfigError("--method umap needs umap-learn: pip install umap-learn")
        import umap

        reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(x) - 1))
        return np.asarray(reducer.fit_transform(x), dtype=np.float32)
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, (len(x) - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(x).astype(np.float32)


def draw_map(coords: np.ndarray, classes: np.ndarray, order: list[str], title: str):
    """Scatter coloured by class, legend of label names with counts; returns the figure
    (matplotlib's object API: no display, no global backend or figure list)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    cmap = colormaps["tab10" if len(order) <= 10 else "tab20" if len(order) <= 20 else "turbo"]
    fig = Figure(figsize=(8.5, 6.5), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    size = max(2.0, min(18.0, 6000.0 / max(len(coords), 1)))
    for i, name in enumerate(order):
        mask = classes == name
        colour = cmap(i if len(order) <= 20 else i / max(len(order) - 1, 1))
        ax.scatter(
            coords[mask, 0],
            coords[mask, 1],
            s=size,
            color=colour,
            alpha=0.75,
            linewidths=0,
            label=f"{name} ({int(mask.sum())})",
        )
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        fontsize=8,
        markerscale=2,
        frameon=False,
        title="class (points)",
    )
    return fig


def plot_embeddings(
    source_path: str | Path,
    method: str = "tsne",
    max_points: int | None = 5000,
    seed: int = 0,
    out: str | Path | None = None,
    threads: int | None = None,
) -> Path:
    """Write `embeddings_<method>.png` (and the coordinates as `.npz`) for a run or entry."""
    source = open_source(source_path)
    if method == "umap" and not umap_available():
        raise ConfigError("--method umap needs umap-learn: pip install umap-learn")
    rows = subsample(len(source.entry.labels), max_points, seed)
    embeddings = np.asarray(source.entry.embeddings[rows])
    classes = class_names(source.entry.labels[rows], source.names)
    coords = project(embeddings, method, source.distance, seed, threads)
    order = [source.names[i] for i in sorted(source.names) if source.names[i] in set(classes)]
    order += sorted({c for c in classes if c not in order})
    label = {"tsne": "t-SNE", "umap": "UMAP"}[method]
    shown = (
        f"{len(rows)} of {len(source.entry.labels)}"
        if len(rows) < len(source.entry.labels)
        else f"{len(rows)}"
    )
    title = f"{label} of {source.caption} ({shown} points, {source.distance}, seed {seed})"
    if out is None:  # beside the run's results; never inside a (content-addressed) store entry
        base = Path(source_path) if source.is_run else Path.cwd()
        target = base / f"embeddings_{method}.png"
    else:
        target = Path(out)
        if target.suffix.lower() != ".png":
            target = target / f"embeddings_{method}.png"
    save_png(draw_map(coords, classes, order, title), target)
    write_npz(
        target.with_suffix(".npz"), rows=rows, coords=coords, labels=source.entry.labels[rows]
    )
    return target
