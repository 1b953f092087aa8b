"""`cbmir-query --text "..." --run RUN_DIR`: a stored run's top-k images for any sentence.

The sentence goes through the text tower of the run's model (same weights and seed); the run's
database entry is searched by cosine similarity, as in the text protocol (docs/text.md). The
entry must hold image features in the model's shared image-text space: for models whose
image-retrieval features are not (CONCH), only a text-protocol run's entry qualifies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cbmir.errors import ConfigError

from .database import Database


def check_shared_space(db: Database) -> None:
    """Refuse an entry whose features are not the ones text vectors are compared with."""
    from cbmir.extractors.text import SHARED_SPACE, check_text_tower

    check_text_tower(db.cfg.model, str(db.cfg.model.get("name", "?")))
    target = str(db.cfg.model.get("_target_"))
    query = OmegaConf.select(db.cfg, "retrieval.query", default="image")
    if target in SHARED_SPACE and query != "text":
        raise ConfigError(
            f"the database of {db.run_dir} holds {db.cfg.model.name}'s image-retrieval features, "
            "which are not in its image-text space; search a run of the text protocol "
            "(cbmir retrieval.query=text ...) instead: it stores the projected features"
        )


def text_encoder_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's model config as the text protocol uses it (without the volume settings)."""
    from cbmir.extractors.text import shared_space_config
    from cbmir.volumes import split_model_config

    return shared_space_config(split_model_config(cfg.model)[0])


def search_text(db: Database, sentences: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosine distances [Q, k], database rows [Q, k]) of each sentence."""
    from cbmir.extractors.text import build_text_encoder
    from cbmir.retrieval.settings import check_k
    from cbmir.retrieval.text_queries import class_similarity, nearest

    assert db.entry is not None
    check_k(k, len(db.entry.labels), key="-k")
    encoder = build_text_encoder(text_encoder_config(db.cfg))
    vectors = encoder.encode_text(sentences)
    distances, indices = nearest(class_similarity(vectors, db.entry.embeddings).T, k)
    return distances.numpy(), indices.numpy()


def text_query(args: Any, out: Any, err: Any) -> int:
    """The `--text` branch of `cbmir-query`: tables on the console and one PNG grid."""
    from rich.table import Table

    from cbmir.figures.png import save_png
    from cbmir.figures.text_gallery import item_picture, text_grid

    from .database import open_database

    if args.run is None:
        raise ConfigError("--text needs --run RUN_DIR: a finished run of a model with a text tower")
    sentences = [t for t in args.text if t.strip()]
    if not sentences:
        raise ConfigError("--text needs a non-empty sentence")
    overrides = [item for item in args.inputs if "=" in item]
    db = open_database(args.run, None, overrides)
    check_shared_space(db)
    k = args.k or int(db.cfg.retrieval.k)
    distances, indices = search_text(db, sentences, k)
    dm = db.datamodule
    database = dm.dataset(db.split)
    labels = np.asarray(db.entry.labels).reshape(len(db.entry.labels), -1)
    names = db.label_names
    for q, sentence in enumerate(sentences):
        table = Table(title=f"text query: {sentence!r}", title_justify="left")
        for column in ("rank", "row", "label", "cosine distance"):
            table.add_column(column)
        for rank, (row, dist) in enumerate(zip(indices[q], distances[q], strict=True), 1):
            label = ", ".join(names.get(int(v), str(v)) for v in labels[row][:1])
            table.add_row(str(rank), str(int(row)), label, f"{float(dist):.6g}")
        out.print(table)
    tiles = [
        [item_picture(database[int(r)]["image"], dm.is_volume) for r in row] for row in indices
    ]
    hits = np.ones(indices.shape, dtype=bool)  # a sentence has no class: plain frames
    title = f"{db.cfg.model.name} · {dm.name} {db.split} ({len(database)} images) · text"
    path = save_png(text_grid(sentences, tiles, hits, title), args.out)
    out.print(f"grid: {path}")
    return 0
