"""Validation of the language context a model hands to its fusion sites (``apt.fusion_context``).

Pure functions, no module state: :func:`per_site_contexts` turns what a model passes (one tensor for every
site, or one per site) into one checked ``(features, bool mask)`` pair per site, and :func:`check_contexts`
runs the same checks where the context is otherwise ignored (Stage 1), so that a wrong context in a one-fit plan
fails at the first forward of step 0, not at the switch after all of Stage 1 trained.

Checked, each with the site named and the fix: a stacked ``(N, B, S, D)`` tensor where a list was meant, the
number of per-site tensors, rank and width (``FusionConfig.context_dim`` per site), a non-floating feature dtype
(int64 or bool ids/masks passed by mistake would otherwise be cast to float silently), a batch size that differs
between sites, a device other than the site's, and the mask: ``(B, S)`` matching its features, ``bool`` (True
on language tokens) or an integer 0/1 mask in Hugging Face style; a floating mask is refused because an additive
mask (0 keep / -inf drop) would be read inverted. No check reads tensor values on an accelerator (no host sync);
integer masks on the CPU are checked to hold only 0 and 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from apt_lightning.errors import FusionContextError

if TYPE_CHECKING:
    from apt_lightning.fusion import GatedFusionLayer

Features = torch.Tensor | Sequence[torch.Tensor] | None


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} on {value.device}"
    return type(value).__name__


def _as_list(value: torch.Tensor | Sequence[torch.Tensor], count: int, what: str, names: list[str]) -> list:
    if isinstance(value, torch.Tensor):
        stacked = 4 if what == "feature tensors" else 3
        if value.ndim == stacked and count > 1 and value.shape[0] == count:
            shape = "(N, B, S, D)" if what == "feature tensors" else "(N, B, S)"
            raise FusionContextError(
                f"`apt.fusion_context` got one stacked {shape} tensor {tuple(value.shape)} as {what}: a single tensor "
                f"is shared by every site. Pass a list with one tensor per site (`list(x)` or `x.unbind(0)`), in "
                f"this order: {names}."
            )
        return [value] * count
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise FusionContextError(
            f"`apt.fusion_context` {what}: expected a tensor or a list/tuple of tensors (one per site), got "
            f"{type(value).__name__}."
        )
    items = list(value)
    if len(items) != count:
        raise FusionContextError(
            f"`apt.fusion_context` got {len(items)} {what} for {count} fusion sites: pass one tensor for all "
            f"sites or one per site, in this order: {names}."
        )
    return items


def _site_device(site: GatedFusionLayer) -> torch.device | None:
    param = next(site.apt_fusion.parameters(), None)
    return param.device if param is not None else None


def _check_mask(name: str, key_mask: object, context: torch.Tensor) -> torch.Tensor:
    if not isinstance(key_mask, torch.Tensor) or key_mask.shape != context.shape[:2]:
        raise FusionContextError(
            f"Fusion site `{name}`: mask {_describe(key_mask)} does not match its features {tuple(context.shape)}; "
            f"expected (B, S) = {tuple(context.shape[:2])}."
        )
    if key_mask.is_floating_point() or key_mask.is_complex():
        raise FusionContextError(
            f"Fusion site `{name}`: the mask is {key_mask.dtype}; pass a bool mask, True on the language tokens the "
            "site may read (a float mask may be additive, 0 keep / -inf drop, which would be read inverted). Use "
            "`mask.bool()` for a 0/1 mask or `mask == 0` for an additive one."
        )
    if key_mask.device != context.device:
        raise FusionContextError(
            f"Fusion site `{name}`: the mask is on {key_mask.device} but its features on {context.device}; move both "
            "to the model's device."
        )
    on_host = key_mask.device.type == "cpu"  # reading values is free there; never sync an accelerator for it
    if key_mask.dtype != torch.bool and on_host and bool(((key_mask != 0) & (key_mask != 1)).any()):
        raise FusionContextError(
            f"Fusion site `{name}`: the integer mask holds values other than 0 and 1 (e.g. token ids or "
            "positions): pass a bool (or 0/1) mask, True on the language tokens."
        )
    return key_mask.bool()


def per_site_contexts(
    features: Features, mask: Features, sites: dict[str, GatedFusionLayer]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One validated ``(features, bool mask)`` pair per site, in site order.

    Args:
        features: one (B, S, D) float tensor for every site, or a sequence with one (B, S_i, D_i) per site.
        mask: (B, S) bool (or 0/1 integer) key mask, True on language tokens, or one per site.
        sites: the model's fusion sites by name, in module order (``APTMixin.apt.sites``).

    Raises:
        FusionContextError: naming the site and the fix; see the module docstring for what is checked.

    Example::

        >>> from apt_lightning.fusion import GatedCrossAttentionBlock, GatedFusionLayer
        >>> site = GatedFusionLayer(torch.nn.Linear(8, 8), GatedCrossAttentionBlock(8, 4, 2))
        >>> mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # a 0/1 integer mask is read as bool
        >>> [(f.shape, m.dtype) for f, m in per_site_contexts(torch.zeros(2, 3, 4), mask, {"s": site})]
        [(torch.Size([2, 3, 4]), torch.bool)]
    """
    if features is None or mask is None:
        raise FusionContextError(
            "Stage 2 needs language features and their mask in `apt.fusion_context(features, mask)`; got "
            f"features={_describe(features)}, mask={_describe(mask)}."
        )
    names = list(sites)
    per_site = _as_list(features, len(names), "feature tensors", names)
    masks = _as_list(mask, len(names), "masks", names)
    contexts = []
    batch: int | None = None
    for index, (name, context, key_mask) in enumerate(zip(names, per_site, masks, strict=True)):
        width = sites[name].apt_fusion.context_dim
        if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[-1] != width:
            raise FusionContextError(
                f"Fusion site `{name}` reads context (B, S, {width}) but got {_describe(context)} (entry {index}): "
                "pass that site the VLM states it was built for, or set `FusionConfig.context_dim` (one width per "
                f"site, in site order {names}) to the widths you pass."
            )
        if not context.is_floating_point():
            raise FusionContextError(
                f"Fusion site `{name}` got {context.dtype} features {tuple(context.shape)}: the context must be the "
                "VLM's hidden states (a float dtype). Integer or bool tensors here are token ids or masks passed by "
                "mistake; they would be cast to float silently."
            )
        device = _site_device(sites[name])
        if device is not None and context.device != device:
            raise FusionContextError(
                f"Fusion site `{name}` lives on {device} but its context is on {context.device}: move the features "
                f"to the model's device (`features.to({str(device)!r})`)."
            )
        if batch is None:
            batch = context.shape[0]
        elif context.shape[0] != batch:
            raise FusionContextError(
                f"Fusion site `{name}` got a context of batch size {context.shape[0]}, but site `{names[0]}` got "
                f"{batch}: every site's context must hold the same samples, in the same order."
            )
        contexts.append((context, _check_mask(name, key_mask, context)))
    return contexts


def check_contexts(features: Features, mask: Features, sites: dict[str, GatedFusionLayer]) -> None:
    """Run :func:`per_site_contexts`' checks where the context is not used (Stage 1 of a plan with a Stage 2).

    A model that skips computing its language features outside Stage 2 (``features=None``) is checked at the
    switch instead; anything it does pass is checked now.

    Raises:
        FusionContextError: as :func:`per_site_contexts`.
    """
    if features is None or not sites:
        return
    per_site_contexts(features, mask, sites)
