"""Shard an APT module with FSDP2 (``torch.distributed.fsdp.fully_shard``) so it trains across the switch.

Lightning calls ``training_step``, never the root module's ``forward``, and a model's step calls submodules
(often not even through their ``forward``: pi0's ``embed_prefix`` reaches into the VLM's vision tower). FSDP2
gathers a unit's parameters in that unit's forward hook, so a parameter whose unit's forward never runs stays
a shard and the step fails with "mixed torch.Tensor and DTensor". :func:`fully_shard_apt` therefore makes a
unit of every module named by ``units`` (e.g. the transformer layers, peft-style target names), of every fusion
block, and of each remaining module that owns parameters directly, so every parameter is gathered by the
forward of the module that uses it. FSDP2 shards parameter by parameter, so a frozen VLM beside a trainable
expert and fusion blocks (the mixed ``requires_grad`` that FSDP1's flat parameters refuse) needs nothing else.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import nn

from apt_lightning.errors import ContractError
from apt_lightning.fusion import GatedCrossAttentionBlock

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def fully_shard_apt(module: nn.Module, units: str | list[str] | None = None, **fully_shard_kwargs: Any) -> list[str]:
    """Apply FSDP2's ``fully_shard`` to ``module``'s units, bottom-up; return the units' names.

    Args:
        module: a prepared APT module (its fusion blocks already injected: call this from ``configure_model``,
            which Lightning runs after the callbacks' ``setup``).
        units: regex (``str``, full match) or list of names/suffixes of the modules to shard as one unit each,
            e.g. ``r".*layers\\.\\d+"``; fusion blocks and every other module owning parameters become units too.
        fully_shard_kwargs: passed to ``fully_shard`` (``mesh``, ``mp_policy``, ``reshard_after_forward`` ...).

    Raises:
        ContractError: the module is not prepared (no scheduler, or ``configure_model`` ran before the
            scheduler's ``setup`` built the fusion blocks), or part of it is already sharded.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    controller = getattr(module, "apt", None)
    if controller is None or not controller.is_prepared:
        raise ContractError(
            f"{type(module).__name__} is not prepared: shard it in `configure_model`, which Lightning calls after "
            "APTStageScheduler's `setup` has built the fusion blocks (and add the scheduler to the callbacks)."
        )
    if any(isinstance(m, FSDPModule) for m in module.modules()):
        raise ContractError(
            f"{type(module).__name__} is already (partly) sharded: call `apt_fully_shard` once, and do not also "
            "call `fully_shard` on its submodules."
        )
    named = dict(module.named_modules())
    # containers without a forward (ModuleList, ModuleDict) cannot be units: their children become units instead
    chosen = [name for name, m in named.items() if name and _matches(name, units) and _has_forward(m)]
    chosen += [name for name, m in named.items() if isinstance(m, GatedCrossAttentionBlock) and name not in chosen]
    covered = {id(p) for name in chosen for p in named[name].parameters()}
    for name, m in named.items():  # each remaining direct owner is its own unit (its forward uses its params)
        if name and any(id(p) not in covered for p in m.parameters(recurse=False)):
            chosen.append(name)
            covered.update(id(p) for p in m.parameters(recurse=False))
    if any(id(p) not in covered for p in module.parameters(recurse=False)):
        chosen.append("")
    # bottom-up: a unit is sharded before any unit that contains it
    for name in sorted(chosen, key=lambda n: n.count(".") if n else -1, reverse=True):
        fully_shard(named[name], **fully_shard_kwargs)
    return chosen


def is_sharded(tensor: torch.Tensor) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a DTensor (FSDP2, tensor parallel), of which this rank holds a shard."""
    return hasattr(tensor, "to_local") and hasattr(tensor, "placements")


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def _has_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


def _matches(name: str, units: str | list[str] | None) -> bool:
    if units is None:
        return False
    if isinstance(units, str):
        return re.fullmatch(units, name) is not None
    return any(name == unit or name.endswith("." + unit) for unit in units)


def unsharded_parameters(module: nn.Module) -> list[str]:
    """Names of parameters that are plain tensors in a module that also holds sharded ones (never all-reduced
    under FSDP2, so the ranks would drift apart)."""
    from torch.distributed.tensor import DTensor

    names = [(n, isinstance(p, DTensor)) for n, p in module.named_parameters()]
    if not any(sharded for _, sharded in names):
        return [n for n, _ in names]
    return [n for n, sharded in names if not sharded]


def prime_optimizer_state(optimizer: torch.optim.Optimizer) -> int:
    """Give every trainable parameter without optimizer state the state a first step would create, unchanged
    weights included; return how many were primed.

    Distributed checkpoints (FSDP2) load optimizer state by key for *every* trainable parameter, but a parameter
    that has taken no gradient yet (fusion blocks in Stage 1, an expert's unused embedding) has no state to save,
    so resuming such a checkpoint fails with "Missing key in checkpoint state_dict". Priming steps only those
    parameters, with zero gradients and a zero learning rate, then resets their step counters: the state equals
    what the optimizer creates lazily (Adam: zero moments, step 0), so training continues bit for bit.
    """
    missing = [
        p for group in optimizer.param_groups for p in group["params"] if p.requires_grad and not optimizer.state.get(p)
    ]
    if not missing:
        return 0
    chosen = {id(p) for p in missing}
    saved = [(group["params"], group.get("lr")) for group in optimizer.param_groups]
    grads = {id(p): p.grad for p in missing}
    try:
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) in chosen]
            if "lr" in group:
                group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0
        for p in missing:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    finally:
        for group, (params, lr) in zip(optimizer.param_groups, saved, strict=True):
            group["params"] = params
            if lr is not None:
                group["lr"] = lr
        for p in missing:
            p.grad = grads[id(p)]
    for p in missing:
        state = optimizer.state.get(p, {})
        if isinstance(state.get("step"), torch.Tensor):
            state["step"].zero_()
        elif "step" in state:
            state["step"] = 0
    return len(missing)
