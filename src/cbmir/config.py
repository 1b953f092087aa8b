"""Plain-config helpers of the core layer: where the Hydra configs live, OmegaConf -> plain
data, typed settings (`typed`), yes/no words, multirun. Resolvers are registered by the entry
points (`cbmir.resolvers`)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, KeyValidationError, ValidationError

from cbmir.errors import ConfigError

Schema = TypeVar("Schema")


def config_dir() -> Path:
    """`configs/` of a source checkout, or the copy packaged inside an installed wheel."""
    packaged = Path(__file__).parent / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs"


def to_plain(value: Any) -> Any:
    """OmegaConf containers (at any depth) -> plain dicts/lists: JSON-able identities, kwargs."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


def typed(schema: type[Schema], conf: Any, key: str) -> Schema:
    """`conf` (a config node or plain mapping; None: the defaults) as the dataclass `schema`.

    OmegaConf checks every value's type and rejects unknown keys; the schema's `__post_init__`
    then checks ranges and cross-key rules. Run at the start of a job rather than merged in at
    compose time, so a bad setting is a `ConfigError` of that job (one line, error.json, exit
    code 2; a sweep goes on) and not a Hydra failure of the whole launch. OmegaConf's errors
    become a `ConfigError` naming `key` and what it accepts here, and only here.
    """
    plain = to_plain(conf or {})
    _check_mappings(schema, plain, key)
    try:
        node = OmegaConf.merge(_writable(OmegaConf.structured(schema)), plain)
        return OmegaConf.to_object(node)  # type: ignore[return-value]
    except ConfigKeyError as exc:
        parent = _unless_none(_field_type(schema, _parent_key(exc.full_key)))
        allowed = ", ".join(f.name for f in dataclasses.fields(parent))
        raise ConfigError(f"unknown key {_join(key, exc.full_key)}; allowed: {allowed}") from None
    except KeyValidationError as exc:  # a mapping key of the wrong type
        where = _parent_key(exc.full_key)
        wanted = _describe(typing.get_args(_unless_none(_field_type(schema, where)))[0])
        raise ConfigError(f"{_join(key, where)} keys must be {wanted}, got {exc.key!r}") from None
    except ValidationError as exc:
        wanted = _describe(_field_type(schema, exc.full_key))
        raise ConfigError(
            f"{_join(key, exc.full_key)} must be {wanted}, got {exc.value!r}"
        ) from None


def _check_mappings(schema: Any, conf: Any, key: str) -> None:
    """A mapping where the schema has one: OmegaConf's own error here names no key."""
    if not isinstance(conf, Mapping):
        raise ConfigError(f"{key} must be a mapping, got {conf!r}")
    hints = typing.get_type_hints(schema)
    for name, value in conf.items():
        kind = _unless_none(hints.get(name))
        if value is None or kind is None:
            continue  # null where allowed (OmegaConf checks that), or an unknown key
        if dataclasses.is_dataclass(kind):
            _check_mappings(kind, value, _join(key, name))
        elif typing.get_origin(kind) is dict and not isinstance(value, Mapping):
            raise ConfigError(f"{_join(key, name)} must be a mapping, got {value!r}")


def _writable(node: DictConfig) -> DictConfig:
    """Frozen dataclasses become read-only nodes that a merge cannot fill; `to_object` builds
    them frozen again."""
    OmegaConf.set_readonly(node, None)
    for name in node:
        child = node._get_node(name)
        if isinstance(child, DictConfig) and not child._is_none():
            _writable(child)
    return node


def _join(prefix: str, full_key: str) -> str:
    return f"{prefix}.{full_key}" if prefix else full_key


def _parent_key(full_key: str) -> str:
    return full_key.rpartition(".")[0]


def _field_type(schema: Any, full_key: str) -> Any:
    """The annotated type at `full_key` ("faiss.kind", "acc_ks[1]") of a dataclass schema."""
    annotation: Any = schema
    for part in filter(None, re.split(r"\.|\[", full_key)):
        annotation = _unless_none(annotation)
        if part.endswith("]"):  # a list item: the list's element type
            annotation = typing.get_args(annotation)[0]
        elif dataclasses.is_dataclass(annotation):
            annotation = typing.get_type_hints(annotation)[part]
        else:  # a dict entry: the dict's value type
            annotation = typing.get_args(annotation)[-1]
    return annotation


def _unless_none(annotation: Any) -> Any:
    """`X | None` -> X (a node that may be null holds an X)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return args[0] if optional and len(args) == 1 else annotation


#: what a value of each scalar type is called in an error message
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe(annotation: Any) -> str:
    """`int | None` -> "an integer or null", `list[int]` -> "a list of integer(s)", ..."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) if a is not type(None) else "null" for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}(s)"
    if origin is dict or dataclasses.is_dataclass(annotation):
        return "a mapping"
    return _TYPE_WORDS.get(annotation, str(annotation))


#: the words a yes/no setting says "yes" with (huggingface_hub reads its flags the same way)
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


def is_true(value: object) -> bool:
    """One reading of yes/no settings and environment flags: `true`, `1`, `yes`, `on`."""
    return str(value).strip().lower() in TRUE_WORDS


def is_multirun() -> bool:
    """Whether this process runs a Hydra multirun (a sweep): failed jobs do not stop it, and
    `resume=auto` resumes."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


#: the class `cfg.embedder` builds (`cbmir.embedding.build_embedder`)
EMBEDDER_TARGET = "cbmir.embedding.FrozenEmbedder"


def numeric_precision(precision: str | int) -> str | None:
    """Lightning's `precision` as it bears on the embeddings: None for float32 ("32-true",
    "32", 32), otherwise its canonical name ("bf16-mixed", "16-mixed", "64-true", ...)."""
    name = str(precision).lower()
    name = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}.get(
        name, name
    )
    return None if name == "32-true" else name
