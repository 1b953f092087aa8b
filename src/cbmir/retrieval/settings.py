"""Every retrieval setting's rule, stated once.

The pipeline checks a job's `retrieval` config with `RetrievalSettings.from_config` before any
weights are loaded, and `check_database` once the database split's size is known, so a typo
costs seconds, not an embedding run. `knn_search`, the faiss backend, the retrieval callback and
the query tool call the same functions on their arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cbmir.config import check_choice, check_int
from cbmir.errors import ConfigError, DataError
from cbmir.retrieval.metric_names import PAPER_METRICS, check_metrics
from cbmir.schema import typed

#: keys of the text protocol (`retrieval.query=text`, `cbmir.retrieval.text_queries`), not of
#: the image-query callback that `instantiate(cfg.retrieval)` builds
TEXT_QUERY_KEYS = ("query", "prompts")
DISTANCES = ("euclidean", "cosine")
#: `retrieval.query`: the paper's image queries, or one text query per class
QUERY_MODES = ("image", "text")
BACKENDS = ("torch", "faiss")
FAISS_KINDS = ("flat", "ivf", "hnsw")
#: faiss index parameters per kind (build time) and for every kind (search time)
FAISS_BUILD_PARAMS: dict[str, frozenset[str]] = {
    "flat": frozenset(),
    "ivf": frozenset({"nlist", "train_size", "seed"}),
    "hnsw": frozenset({"M", "ef_construction"}),
}
FAISS_SEARCH_PARAMS = frozenset({"nprobe", "ef_search"})
#: `retrieval.search.score_dtype` values
SCORE_DTYPES = ("float16", "bfloat16")
SEARCH_DEVICES = ("auto", "cpu", "cuda")
#: the ACC@k cut-offs the paper reports
PAPER_ACC_KS = (1, 3, 5)


def default_acc_ks(k: object) -> list[int]:
    """`retrieval.acc_ks` by default: the paper's cut-offs that `k` neighbours can answer
    ([1, 3, 5] at k = 5, [1, 3] at k = 3), so a sweep over k needs no acc_ks of its own; an
    explicit list beyond k is an error (`check_acc_ks`). A k that is not a positive integer is
    left to that validation: the paper's list is returned as is."""
    try:
        limit = int(str(k))
    except ValueError:
        return list(PAPER_ACC_KS)
    return [a for a in PAPER_ACC_KS if a <= limit] or list(PAPER_ACC_KS)


#: the positive-integer rule under the name `knn_search` imports it by
positive_int = check_int


def check_distance(distance: Any, key: str = "distance") -> str:
    return check_choice(distance, DISTANCES, key)


def check_k(k: Any, n_database: int | None = None, key: str = "k") -> int:
    """k >= 1, and at most the database rows when their number is known."""
    k = check_int(k, key)
    if n_database is not None and k > n_database:
        raise ConfigError(f"{key}={k} exceeds the {n_database} database rows")
    return k


def check_backend(backend: Any) -> str:
    return check_choice(backend, BACKENDS, "backend")


def check_acc_ks(acc_ks: Sequence[int], k: int, key: str = "acc_ks") -> tuple[int, ...]:
    """ACC@a needs a neighbours: every a is a positive integer <= k (never silently dropped)."""
    values = tuple(check_int(a, f"every {key} entry") for a in acc_ks)
    beyond = [a for a in values if a > k]
    if beyond:
        kept = [a for a in values if a <= k]
        raise ConfigError(
            f"{key}={list(values)} asks for acc@{beyond[0]} but only k={k} neighbours are "
            f"retrieved; raise k or set {key}={kept}"
        )
    return values


def check_faiss(kind: Any, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """A known index kind and only its own parameters, each an integer of the right range."""
    check_choice(kind, FAISS_KINDS, "faiss index kind")
    params = dict(params or {})
    allowed = FAISS_BUILD_PARAMS[kind] | FAISS_SEARCH_PARAMS
    unknown = set(params) - allowed
    if unknown:
        raise ConfigError(
            f"unknown {kind} index parameters {sorted(unknown)}; allowed {sorted(allowed)}"
        )
    for name, value in params.items():
        if value is not None:
            check_int(value, f"faiss {name}", minimum=0 if name == "seed" else 1)
    return params


def check_faiss_database(kind: str, params: Mapping[str, Any], n_database: int) -> None:
    """IVF trains one centroid per list on database rows: it cannot have more lists than rows."""
    nlist = params.get("nlist")
    if kind == "ivf" and nlist is not None and nlist > n_database:
        raise ConfigError(
            f"faiss nlist={nlist} exceeds the {n_database} database rows; lower it or leave it "
            "unset (default 4 sqrt(N))"
        )


def check_device(device: Any, key: str = "device") -> str:
    """auto, cpu, cuda or cuda:N; cuda only where a CUDA device is present."""
    name = str(device)
    if name.split(":")[0] not in SEARCH_DEVICES or (":" in name and not name.startswith("cuda:")):
        raise ConfigError(f"{key}={device!r}; choose one of {', '.join(SEARCH_DEVICES)} (cuda:N)")
    if name.startswith("cuda") and not _cuda_available():
        raise ConfigError(f"{key}={name} but no CUDA device is available; use auto or cpu")
    return name


def _cuda_available() -> bool:
    """torch's answer, imported only when a setting names cuda (checking a config needs no
    torch otherwise)."""
    import torch

    return torch.cuda.is_available()


def resolve_device(device: Any, key: str = "device") -> str:
    """`check_device`'s device with auto resolved: cuda where present, else cpu."""
    import torch

    name = check_device(device, key)
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class SearchOptions:
    """`retrieval.search`: knn_search options (null: its default)."""

    query_chunk: int | None = None
    db_chunk: int | None = None
    score_dtype: str | None = None  # float16 | bfloat16
    rerank: bool | None = None

    def __post_init__(self) -> None:
        for name in ("query_chunk", "db_chunk"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), f"retrieval.search.{name}")
        if self.score_dtype not in (None, *SCORE_DTYPES):
            raise ConfigError(
                f"retrieval.search.score_dtype must be {', '.join(SCORE_DTYPES)} or null, "
                f"got {self.score_dtype!r}"
            )

    def kwargs(self) -> dict[str, Any]:
        """As knn_search keyword arguments: the unset ones left out, score_dtype a torch dtype."""
        import torch

        out = {name: value for name, value in vars(self).items() if value is not None}
        if "score_dtype" in out:
            out["score_dtype"] = getattr(torch, out["score_dtype"])
        return out


@dataclass(frozen=True)
class FaissSettings:
    """`retrieval.faiss`: the index kind and its parameters (`check_faiss`)."""

    kind: str = "flat"
    params: dict[str, int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_faiss(self.kind, self.params)


@dataclass
class PromptsSchema:
    """`retrieval.prompts` of the text protocol (`PromptSettings`)."""

    templates: list[str] | None = None  # null: DEFAULT_TEMPLATES
    classes: dict[Any, Any] | None = None  # class id -> a description or a list of them


#: CLIP-style templates; `{}` is replaced by the class name or description
DEFAULT_TEMPLATES = (
    "a medical image of {}.",
    "an image showing {}.",
    "a photo of {}.",
    "{}.",
)


@dataclass(frozen=True)
class PromptSettings:
    """Validated `retrieval.prompts`: templates, and per-class descriptions replacing names."""

    templates: tuple[str, ...]
    classes: dict[int, tuple[str, ...]]

    @classmethod
    def from_config(cls, prompts: Mapping[str, Any] | None) -> PromptSettings:
        conf = typed(PromptsSchema, prompts, "retrieval.prompts")
        templates = DEFAULT_TEMPLATES if conf.templates is None else tuple(conf.templates)
        if not templates:
            raise ConfigError(
                "retrieval.prompts.templates must be a non-empty list of sentences with {} where "
                "the class name goes, got []"
            )
        for template in templates:
            if template.count("{}") != 1:
                raise ConfigError(
                    f"every retrieval.prompts.templates entry needs exactly one {{}} (the class "
                    f"name), got {template!r}"
                )
        return cls(templates, _class_descriptions(conf.classes or {}))

    def class_prompts(self, label_names: Mapping[int, str]) -> dict[int, list[str]]:
        """Every class's prompts (templates x its descriptions, default its label name)."""
        unknown = sorted(set(self.classes) - set(label_names))
        if unknown:
            raise ConfigError(
                f"retrieval.prompts.classes names class ids {unknown} that the data does not "
                f"have; its classes: {dict(sorted(label_names.items()))}"
            )
        out = {}
        for cid, name in sorted(label_names.items()):
            descriptions = self.classes.get(cid) or (str(name),)
            if not all(d.strip() for d in descriptions):
                raise DataError(f"class {cid} has an empty name or description; name it in "
                                "retrieval.prompts.classes")  # fmt: skip
            out[cid] = [t.format(d) for d in descriptions for t in self.templates]
        return out


def _class_descriptions(classes: Mapping[Any, Any]) -> dict[int, tuple[str, ...]]:
    """{class id: description or list of descriptions} -> {id: (descriptions...)}."""
    out: dict[int, tuple[str, ...]] = {}
    for key, value in classes.items():
        try:
            cid = int(key)  # an id from YAML, or a string one from JSON
        except (TypeError, ValueError):
            raise ConfigError(f"retrieval.prompts.classes key {key!r} is not a class id") from None
        values = (value,) if isinstance(value, str) else tuple(value or ())
        if not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise ConfigError(
                f"retrieval.prompts.classes[{cid}] must be a description or a non-empty list of "
                f"them, got {value!r}"
            )
        out[cid] = values
    return out


@dataclass(frozen=True)
class RetrievalSettings:
    """A `retrieval` config (configs/retrieval/paper.yaml): its keys and types, checked by
    `typed` (a misspelt or mistyped key fails before any weights load, and
    `instantiate(cfg.retrieval)` passes every key to the callback), and every value rule
    (`__post_init__`), so the pipeline and a direct `RetrievalCallback` check the same way."""

    _target_: str = "cbmir.retrieval.callback.RetrievalCallback"
    k: int = 5
    distance: str = "euclidean"
    acc_ks: list[int] = field(default_factory=lambda: list(PAPER_ACC_KS))  # a tuple once checked
    metrics: Any = field(default_factory=lambda: list(PAPER_METRICS))  # `all` or a list
    device: str = "auto"
    search: SearchOptions | None = field(default_factory=SearchOptions)  # null: the defaults
    backend: str = "torch"
    faiss: FaissSettings | None = field(default_factory=FaissSettings)  # null: the defaults
    query: str = "image"  # text protocol (`cbmir.retrieval.text_queries`) ...
    prompts: PromptsSchema | None = None  # ... and its prompts (`PromptSettings`)

    def __post_init__(self) -> None:
        check_k(self.k, key="retrieval.k")
        if check_backend(self.backend) == "faiss":
            from cbmir.retrieval.faiss_backend import require_faiss

            require_faiss()  # not installed: say so now, not after the embedding
        check_distance(self.distance, "retrieval.distance")
        check_device(self.device, "retrieval.device")
        check_choice(self.query, QUERY_MODES, "retrieval.query")
        checked = {
            "acc_ks": check_acc_ks(self.acc_ks, self.k, "retrieval.acc_ks"),
            "metrics": check_metrics(self.metrics, "retrieval.metrics"),
            "search": self.search or SearchOptions(),
            "faiss": self.faiss or FaissSettings(),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_config(cls, conf: Mapping[str, Any]) -> RetrievalSettings:
        """Check every key of a `retrieval` config (a DictConfig or dict); ConfigError names it."""
        return typed(cls, conf, "retrieval")

    def check_database(self, n_database: int) -> None:
        """The rules that need the database split's size."""
        check_k(self.k, n_database, key="retrieval.k")
        if self.backend == "faiss":
            check_faiss_database(self.faiss.kind, self.faiss.params, n_database)
