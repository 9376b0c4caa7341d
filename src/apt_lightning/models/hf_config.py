"""Refuse misspelt keys in the transformers configs a reference policy is built from.

A transformers config takes any keyword: ``GemmaConfig(hidden_sizee=64)`` stores ``hidden_sizee`` as an attribute
nobody reads and builds the default width, so a typo in a YAML model config trains another model without a word.
:func:`check_config_keys` compares every key the user wrote (recursively into sub-configs such as pi0's
``dit_config`` or PaliGemma's ``text_config``) with the keys the config class declares, and raises
:class:`~apt_lightning.ConfigError` naming the unknown key, the closest valid names and the fix.

A key is valid when the class declares it (a dataclass field, an ``attribute_map`` alias), its default instance
writes it (``to_dict()``: ``model_type``, ``transformers_version`` ...), the parent config writes it into this
sub-config (pi0 sets ``dit_config.is_causal``), or transformers' base config consumes it for backward compatibility
(``torch_dtype``, ``num_labels``, ``attn_implementation``, RoPE's legacy keys, generation defaults). Keys starting
with ``_`` are transformers' own bookkeeping, never a user's typo, and pass.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from functools import cache
from typing import Any

from transformers import PretrainedConfig

from apt_lightning.errors import ConfigError

_BACKWARD_COMPATIBLE = frozenset(
    {
        "torch_dtype",
        "num_labels",
        "name_or_path",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "per_layer_config",
        "rope_scaling",
        "rope_theta",
        "partial_rotary_factor",
    }
)
"""Keys ``PretrainedConfig.__post_init__`` consumes itself (not fields of any one config class)."""


@cache
def _generation_keys() -> frozenset[str]:
    try:
        from transformers import GenerationConfig

        return frozenset(GenerationConfig._get_default_generation_params())
    except (ImportError, AttributeError):  # pragma: no cover -- another transformers layout
        return frozenset()


@cache
def _default_dict(cls: type) -> dict[str, Any]:  # `type`: hashable for the cache
    """``cls().to_dict()``, or ``{}`` for a class that needs arguments."""
    try:
        return cls().to_dict()
    except Exception:  # a config without defaults: its fields still count
        return {}


@cache
def declared_keys(cls: type) -> frozenset[str]:  # a PretrainedConfig subclass
    """Every key ``cls`` reads: fields, ``attribute_map`` aliases, what its default instance writes, and what the base
    config consumes for backward compatibility."""
    keys = set(_default_dict(cls)) | set(getattr(cls, "attribute_map", {}) or {}) | _BACKWARD_COMPATIBLE
    if dataclasses.is_dataclass(cls):
        keys |= {field.name for field in dataclasses.fields(cls)}
    keys |= {"model_type", "transformers_version", "architectures"}
    return frozenset(keys | _generation_keys())


def unknown_config_keys(given: Mapping[str, Any], built: PretrainedConfig, name: str) -> list[tuple[str, list[str]]]:
    """``(dotted key, closest valid names)`` for every key of ``given`` that ``built``'s config class (and, for a
    sub-config, its parent) does not declare, recursively into sub-configs."""
    return _walk(given, built, name, frozenset())


def _walk(
    given: Mapping[str, Any], built: PretrainedConfig, name: str, from_parent: frozenset[str]
) -> list[tuple[str, list[str]]]:
    cls: type = type(built)
    valid = declared_keys(cls) | from_parent
    found: list[tuple[str, list[str]]] = []
    for key, value in given.items():
        if not isinstance(key, str) or key.startswith("_"):
            continue
        if key not in valid:
            found.append((f"{name}.{key}", difflib.get_close_matches(key, sorted(valid), n=3, cutoff=0.6)))
            continue
        child = getattr(built, key, None)
        if isinstance(value, Mapping) and isinstance(child, PretrainedConfig):
            parent_sets = _default_dict(cls).get(key)
            extra = frozenset(parent_sets) if isinstance(parent_sets, Mapping) else frozenset()
            found.extend(_walk(value, child, f"{name}.{key}", extra))
    return found


def check_config_keys(given: Mapping[str, Any] | PretrainedConfig, built: PretrainedConfig, name: str) -> None:
    """Raise :class:`~apt_lightning.ConfigError` if ``given`` (the dict or config the user passed as ``name``) holds a
    key ``built`` (the config transformers made of it) does not declare.

    Example::

        >>> from transformers import GemmaConfig
        >>> given = {"hidden_sizee": 64}
        >>> check_config_keys(given, GemmaConfig(**given), "dit_config")
        Traceback (most recent call last):
        ...
        apt_lightning.errors.ConfigError: `dit_config.hidden_sizee` is not a key of GemmaConfig ...
    """
    as_dict = given.to_dict() if isinstance(given, PretrainedConfig) else given
    unknown = unknown_config_keys(as_dict, built, name)
    if unknown:
        parts = [
            f"`{key}` is not a key of {_owner(built, key, name)}" + (f" (closest: {near})" if near else "")
            for key, near in unknown
        ]
        raise ConfigError(
            "; ".join(parts) + ". transformers would store it and ignore it, so the model would silently be built "
            "with the default instead. Fix the spelling (or remove the key)."
        )


def _owner(built: PretrainedConfig, dotted: str, name: str) -> str:
    """Class name of the (sub-)config that holds ``dotted``."""
    config: Any = built
    for part in dotted[len(name) + 1 :].split(".")[:-1]:
        config = getattr(config, part, config)
    return type(config).__name__
