"""Masked reductions: every reduction over tokens or samples in lmpg goes through these helpers.

`mask` is a boolean tensor of x's shape (or one that broadcasts to it), True where an element counts
and False where it does not. The caller passes the mask that says what counts for its quantity, named
for what it holds (`lmpg.batch`): `loss_mask` for the loss, `action_mask` for returns and entropy,
`sample_mask` for per-sample figures. Masked-out entries never reach a result, even NaN or inf.
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum_i x_i * m_i over `dim` (all elements when None). Masked-out entries may hold NaN/inf."""
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum_i x_i m_i / max(sum_i m_i, 1): zero, not NaN, where nothing is counted."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_min_max(x: torch.Tensor, mask: torch.Tensor, empty: float = float("nan")) -> tuple[float, float]:
    """(min_i x_i, max_i x_i) over the counted entries (m_i True), as floats; (empty, empty) when none
    is counted."""
    if not bool(mask.any()):
        return empty, empty
    values = x.detach()[mask]
    return float(values.min()), float(values.max())
