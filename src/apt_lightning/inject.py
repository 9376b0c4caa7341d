"""Inject gated fusion blocks by module name, with peft's ``target_modules`` semantics.

All targets are resolved and checked before anything is mutated, so a failed injection leaves the model
untouched. Injecting twice is a no-op, and :func:`unload_fusion` restores the original modules and keys.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from apt_lightning.config import FusionConfig, check_pattern
from apt_lightning.errors import ContractError, NoMatchingTargetError
from apt_lightning.fusion import GatedCrossAttentionBlock, GatedFusionLayer
from apt_lightning.structure import fusion_sites, original_named_modules


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
        ConfigError: ``targets`` or ``exclude`` is a str that is not a valid regular expression.
        NoMatchingTargetError: nothing matched (the message lists the closest existing names), every match
            was excluded, or a match lies inside ``forbidden_prefix`` (the VLM: fusion belongs to the expert).
    """
    check_pattern("target_modules", targets)  # an invalid regex is named here, not raised as re.error
    check_pattern("exclude_modules", exclude)
    names = [n for n, _ in original_named_modules(model) if n]
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


def _infer_width(module: nn.Module) -> int | None:
    for attr in ("hidden_size", "embed_dim", "dim", "out_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    config = getattr(module, "config", None)
    return getattr(config, "hidden_size", None)


def _module_at(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, child, parent.get_submodule(child)


def fusion_geometry_problems(model: nn.Module, sites: list[str], config: FusionConfig) -> list[str]:
    """Everything that keeps blocks from being built for ``sites``, as messages naming the site and the fix.

    Checks the widths :func:`inject_fusion` needs without mutating ``model``; an empty list means injection
    will succeed.
    """
    problems: list[str] = []
    if config.context_dim is None:
        problems.append(
            "`FusionConfig.context_dim` is unset and cannot be inferred: give the width of the language features."
        )
    elif isinstance(config.context_dim, list) and len(config.context_dim) != len(sites):
        problems.append(
            f"`FusionConfig.context_dim` lists {len(config.context_dim)} widths but there are {len(sites)} fusion "
            f"sites {sites[:6]}: give one width per site, in this order, or one int for all."
        )
    if config.hidden_dim is None:
        unknown = [
            s
            for s in sites
            if not isinstance(_module_at(model, s)[2], GatedFusionLayer)
            and _infer_width(_module_at(model, s)[2]) is None
        ]
        if unknown:
            kinds = sorted({type(_module_at(model, s)[2]).__name__ for s in unknown})
            problems.append(
                f"Cannot infer the output width of fusion site(s) {unknown[:6]} ({', '.join(kinds)} has no "
                "`hidden_size`, `embed_dim`, `dim`, `out_features` or `config.hidden_size`): set "
                "`FusionConfig.hidden_dim`."
            )
    return problems


def inject_fusion(model: nn.Module, config: FusionConfig, forbidden_prefix: str | None = None) -> list[str]:
    """Wrap every target of ``config`` in a :class:`GatedFusionLayer` (inactive until Stage 2).

    Returns the site names, in module order (the order of per-site contexts). Modules that are already
    wrapped are left as they are, so calling this again (e.g. from ``setup`` on resume) is a no-op. All
    targets and widths are checked before anything is wrapped.

    Raises:
        NoMatchingTargetError: see :func:`resolve_targets`.
        ContractError: see :func:`fusion_geometry_problems` (a width is unknown, or ``context_dim`` does not list
            one width per site).
    """
    sites = resolve_targets(model, config.target_modules, config.exclude_modules, forbidden_prefix)
    problems = fusion_geometry_problems(model, sites, config)
    if problems:
        raise ContractError(" ".join(problems))
    widths = config.context_dim if isinstance(config.context_dim, list) else [config.context_dim] * len(sites)
    for site, context_dim in zip(sites, widths, strict=True):
        parent, child, module = _module_at(model, site)
        if isinstance(module, GatedFusionLayer):
            continue
        dim = config.hidden_dim or _infer_width(module)
        assert dim is not None and context_dim is not None  # fusion_geometry_problems refused unknown widths
        block = GatedCrossAttentionBlock(
            dim,
            context_dim,
            config.num_heads,
            config.head_dim,
            config.ff_mult,
            config.dropout,
            config.gate,
            config.gate_shape,
        )
        param = next(module.parameters(), None)
        if param is not None:
            block.to(device=param.device, dtype=param.dtype)
        setattr(parent, child, GatedFusionLayer(module, block))  # a container's index is its child's name
    return sites


def unload_fusion(model: nn.Module) -> None:
    """Replace every :class:`GatedFusionLayer` by its ``base_layer``: original modules, original keys."""
    for name, wrapper in list(fusion_sites(model)):
        parent, child, _ = _module_at(model, name)
        setattr(parent, child, wrapper.base_layer)
