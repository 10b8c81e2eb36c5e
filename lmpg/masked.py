"""Masked reductions: the one place where `completion_mask` is applied.

`completion_mask` is a boolean tensor, True where a token counts (a generated completion token up to
and including its EOS), False for prompt tokens and padding. Every reduction over tokens in lmpg goes
through these helpers so that the mask has one meaning everywhere.
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
