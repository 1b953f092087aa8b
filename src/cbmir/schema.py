"""Typed settings: a config node checked against a dataclass schema whose fields are its keys.

OmegaConf checks every value's type and rejects unknown keys; the schema's `__post_init__` then
checks ranges and cross-key rules. The schemas are applied when a job starts rather than merged
in at compose time, so a bad setting is a `ConfigError` of that job (one line, error.json, exit
code 2; a sweep goes on) and not a Hydra failure of the whole launch, and the composed config
(fingerprints, store keys) stays what the yaml files say. `typed` is the one place where
OmegaConf's errors become a `ConfigError` naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, KeyValidationError, ValidationError

from cbmir.config import to_plain
from cbmir.errors import ConfigError

Schema = TypeVar("Schema")


def typed(schema: type[Schema], conf: Any, key: str) -> Schema:
    """`conf` (a config node or plain mapping; None: the defaults) as the dataclass `schema`;
    `key` is where `conf` sits in the config (error messages name `key.field`)."""
    plain = to_plain(conf or {})
    _check_mappings(schema, plain, key)
    try:
        node = OmegaConf.merge(_writable(OmegaConf.structured(schema)), plain)
        _same_kinds(plain, OmegaConf.to_container(node), key)  # before __post_init__ converts
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


def _same_kinds(raw: Any, out: Any, key: str) -> None:
    """No silent conversion: OmegaConf reads '5' as 5 and 'no' as False, while code that reads
    the config itself would see the string. Only an integer where a number goes is taken."""
    if raw is None:
        return
    if isinstance(raw, Mapping):
        for name, value in raw.items():
            _same_kinds(value, out[name], _join(key, str(name)))
    elif isinstance(raw, list | tuple):
        for index, (value, child) in enumerate(zip(raw, out, strict=False)):
            _same_kinds(value, child, f"{key}[{index}]")
    elif type(raw) is not type(out) and not (type(raw) is int and type(out) is float):
        raise ConfigError(
            f"{key} must be {_describe(type(out))}, got {raw!r} ({type(raw).__name__})"
        )


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
