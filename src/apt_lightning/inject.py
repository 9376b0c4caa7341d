"""Inject gated fusion blocks by module name, with peft's ``target_modules`` semantics.

All targets are resolved and checked before anything is mutated, so a failed injection leaves the model
untouched. Injecting twice is a no-op, and :func:`unload_fusion` restores the original modules and keys.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator

from torch import nn

from apt_lightning.config import FusionConfig
from apt_lightning.errors import NoMatchingTargetError
from apt_lightning.fusion import GatedCrossAttentionBlock, GatedFusionLayer


def target_matches(targets: str | list[str], name: str) -> bool:
    """peft semantics: a ``str`` is a regex matched against the full name; a list matches exactly or by suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _closest_names(names: list[str], targets: str | list[str]) -> list[str]:
    asked = [targets] if isinstance(targets, str) else list(targets)
    near: set[str] = set()
    for t in asked:
        near.update(difflib.get_close_matches(t, names, n=3, cutoff=0.4))
    return sorted(near) or names[:8]


def resolve_targets(
    model: nn.Module,
    targets: str | list[str],
    exclude: str | list[str] | None = None,
    forbidden_prefix: str | None = None,
) -> list[str]:
    """Names of the modules of ``model`` matched by ``targets`` and not by ``exclude``.

    Raises:
        NoMatchingTargetError: nothing matched (the message lists the closest existing names), every match
            was excluded, or a match lies inside ``forbidden_prefix`` (the VLM: fusion belongs to the expert).
    """
    names = [n for n, m in model.named_modules() if n and not isinstance(m, GatedFusionLayer)]
    names = [n.replace(".base_layer", "") for n in names if ".apt_fusion" not in n]
    hits = [n for n in names if target_matches(targets, n)]
    if not hits:
        raise NoMatchingTargetError(
            f"`target_modules`={targets!r} matched no module of {type(model).__name__}. "
            f"Closest existing names: {_closest_names(names, targets)}. "
            "Use a regex string matching the full name, or a list of names / dotted suffixes."
        )
    kept = [n for n in hits if exclude is None or not target_matches(exclude, n)]
    if not kept:
        raise NoMatchingTargetError(
            f"All modules matched by `target_modules`={targets!r} were excluded by `exclude_modules`={exclude!r}."
        )
    if forbidden_prefix:
        inside = [n for n in kept if n == forbidden_prefix or n.startswith(forbidden_prefix + ".")]
        if inside:
            raise NoMatchingTargetError(
                f"`target_modules`={targets!r} matched modules inside the VLM `{forbidden_prefix}`: {inside[:4]}. "
                "Gated fusion goes into the action expert; narrow the pattern to expert modules."
            )
    return kept


def _infer_width(module: nn.Module, name: str) -> int | None:
    for attr in ("hidden_size", "embed_dim", "dim", "out_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    config = getattr(module, "config", None)
    return getattr(config, "hidden_size", None)


def inject_fusion(model: nn.Module, config: FusionConfig, forbidden_prefix: str | None = None) -> list[str]:
    """Wrap every target of ``config`` in a :class:`GatedFusionLayer` (inactive until Stage 2).

    Returns the site names. Modules that are already wrapped are left as they are, so calling this again
    (e.g. from ``setup`` on resume) is a no-op.

    Raises:
        NoMatchingTargetError: see :func:`resolve_targets`.
        ValueError: a target's width cannot be inferred and ``config.hidden_dim`` is unset, or
            ``config.context_dim`` is unset.
    """
    sites = resolve_targets(model, config.target_modules, config.exclude_modules, forbidden_prefix)
    if config.context_dim is None:
        raise ValueError("`FusionConfig.context_dim` is unset: give the width of the language features.")
    plan: list[tuple[nn.Module, str, nn.Module, int]] = []
    for site in sites:
        parent_name, _, child = site.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child) if not child.isdigit() else parent[int(child)]
        if isinstance(module, GatedFusionLayer):
            continue
        width = config.hidden_dim or _infer_width(module, site)
        if width is None:
            raise ValueError(
                f"Cannot infer the output width of `{site}` ({type(module).__name__}): set `FusionConfig.hidden_dim`."
            )
        plan.append((parent, child, module, width))
    for parent, child, module, width in plan:
        block = GatedCrossAttentionBlock(
            width, config.context_dim, config.num_heads, config.head_dim, config.ff_mult, config.dropout
        )
        param = next(module.parameters(), None)
        if param is not None:
            block.to(device=param.device, dtype=param.dtype)
        wrapper = GatedFusionLayer(module, block)
        if child.isdigit():
            parent[int(child)] = wrapper
        else:
            setattr(parent, child, wrapper)
    return sites


def fusion_sites(model: nn.Module) -> Iterator[tuple[str, GatedFusionLayer]]:
    """``(site_name, wrapper)`` for every injected fusion site, named as the original module was."""
    for name, module in model.named_modules():
        if isinstance(module, GatedFusionLayer):
            yield name.replace(".base_layer", ""), module


def unload_fusion(model: nn.Module) -> None:
    """Replace every :class:`GatedFusionLayer` by its ``base_layer``: original modules, original keys."""
    for name, wrapper in list(model.named_modules()):
        if not isinstance(wrapper, GatedFusionLayer):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if child.isdigit():
            parent[int(child)] = wrapper.base_layer
        else:
            setattr(parent, child, wrapper.base_layer)
