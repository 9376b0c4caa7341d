"""Find APT's structure in a model by module type, and name it by one rule.

Every other module asks here instead of re-deriving structure from substrings of parameter names (peft's own
``base_layer`` and ``lora_`` names would match those too). The one naming rule: APT's wrapper
(:class:`~apt_lightning.GatedFusionLayer`) sits at the path of the module it wraps, so a *site* is named as the
user's module was, and a key under ``<site>.base_layer.`` is that module's key ``<site>.``.
"""

from __future__ import annotations

from collections.abc import Iterator

from peft.tuners.lora import LoraLayer
from torch import nn

from apt_lightning.fusion import GatedCrossAttentionBlock, GatedFusionLayer, LanguageGate

BASE_ATTR = "base_layer"
"""Attribute of :class:`GatedFusionLayer` holding the wrapped module (peft's convention)."""
FUSION_ATTR = "apt_fusion"
"""Attribute of :class:`GatedFusionLayer` holding its :class:`GatedCrossAttentionBlock`."""


def fusion_sites(model: nn.Module) -> Iterator[tuple[str, GatedFusionLayer]]:
    """``(site_name, wrapper)`` for every injected fusion site, in module order, named as the original module.

    Example::

        >>> from apt_lightning import FusionConfig
        >>> from apt_lightning.inject import inject_fusion
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> _ = inject_fusion(model, FusionConfig(target_modules=["1"], hidden_dim=4, context_dim=3, num_heads=1))
        >>> [name for name, _ in fusion_sites(model)]
        ['1']
    """
    for name, module in model.named_modules():
        if isinstance(module, GatedFusionLayer):
            yield name, module


def fusion_blocks(model: nn.Module) -> Iterator[GatedCrossAttentionBlock]:
    """Every gated cross-attention block of ``model``."""
    for module in model.modules():
        if isinstance(module, GatedCrossAttentionBlock):
            yield module


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The tanh gates of every fusion block and every :class:`LanguageGate` (the ``gates`` param group)."""
    gates = [gate for block in fusion_blocks(model) for gate in block.gate_parameters()]
    return gates + [gate.apt_gate for _, gate in language_gates(model)]


def language_gates(model: nn.Module) -> Iterator[tuple[str, LanguageGate]]:
    """``(name, gate)`` for every :class:`LanguageGate` (language paths inside the expert's own layers)."""
    for name, module in model.named_modules():
        if isinstance(module, LanguageGate):
            yield name, module


def fusion_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every fusion block parameter that is not a gate (the ``fusion`` param group)."""
    gates = {id(p) for p in gate_parameters(model)}
    return [p for block in fusion_blocks(model) for p in block.parameters() if id(p) not in gates]


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter weights peft injected into ``module`` (``lora_A``, ``lora_B``, DoRA magnitudes ...)."""
    params: list[nn.Parameter] = []
    for layer in module.modules():
        if isinstance(layer, LoraLayer):
            for attr in layer.adapter_layer_names:
                adapters = getattr(layer, attr, None)
                if isinstance(adapters, nn.Module):
                    params.extend(adapters.parameters())
    return params


def has_fusion(model: nn.Module) -> bool:
    return next(fusion_sites(model), None) is not None


def original_named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` as the user's model had them before APT: a wrapped module appears under its own
    (the wrapper's) path, and APT's blocks do not appear. Injection matches targets against these names, so
    injecting again finds the same modules."""
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        if isinstance(module, GatedFusionLayer):
            module = module.base_layer
        if id(module) in seen:
            return
        seen.add(id(module))
        yield prefix, module
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}.{name}" if prefix else name)

    yield from walk(model, "")


def original_key(key: str, wrapper_paths: set[str]) -> str:
    """State-dict ``key`` with each APT wrapper's ``.base_layer`` segment removed (peft's own are kept).

    Example::

        >>> original_key("expert.0.base_layer.weight", {"expert.0"})
        'expert.0.weight'
        >>> original_key("vlm.q.base_layer.weight", {"expert.0"})  # a peft LoRA wrapper: unchanged
        'vlm.q.base_layer.weight'
    """
    parts = key.split(".")
    kept: list[str] = []
    path = ""
    for part in parts:
        if part == BASE_ATTR and path in wrapper_paths:
            path = f"{path}.{part}"
            continue
        path = f"{path}.{part}" if path else part
        kept.append(part)
    return ".".join(kept)


def original_state_dict_keys(model: nn.Module) -> dict[str, str]:
    """``{original key: actual key}`` for every entry of ``model.state_dict()``."""
    wrappers = {name for name, _ in fusion_sites(model)}
    return {original_key(key, wrappers): key for key in model.state_dict()}


def is_fusion_key(key: str) -> bool:
    """Whether a state-dict key (actual or original) belongs to a fusion block: a ``.apt_fusion.`` segment."""
    return f".{FUSION_ATTR}." in f".{key}"
