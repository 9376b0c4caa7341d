"""Scaled dot-product attention over a key mask that may be empty for some rows.

A row with no valid key makes SDPA with a boolean mask return NaN. Language contexts are empty for rows with
no instruction (or all of a batch in Stage 1), and GR00T-style VL tokens can be empty too, so every masked
attention in the library and the reference models goes through this one helper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA of ``q`` (B, H, T, E) over ``k``/``v`` (B, H, S, E) with a (B, S) key mask, True on valid keys.

    Rows with no valid key return exact zeros instead of NaN (computed with every key visible, then zeroed),
    without a host synchronisation.

    Example::

        >>> q, kv = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 5, 4)
        >>> out = masked_attention(q, kv, kv, torch.tensor([[True] * 5, [False] * 5]))
        >>> bool(out[1].eq(0).all()), bool(out.isfinite().all())
        (True, True)
    """
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    key_mask = key_mask.to(device=q.device, dtype=torch.bool)
    empty = ~key_mask.any(-1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=(key_mask | empty[:, None])[:, None, None, :])
    return out.masked_fill(empty[:, None, None, None], 0.0)
