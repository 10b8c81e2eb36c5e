"""Placing the reward functions' values as per-token rewards.

With weights w_k, the (B, T) per-token reward is

    r_{i,t} = sum_k w_k · ( r_{k,i} · 1[t = last counted token of i]   if function k gave a scalar
                          | r_{k,i,t}                               if it gave a per-token list )

summing over the functions that gave sample i a value (None: no term).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmpg.errors import RewardError


def token_rewards(
    names: Sequence[str], values: Sequence[Sequence], weights: Sequence[float], completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_{i,t} (module docstring) and has_reward.

    values[k][i]: function k's value for sample i (float, None, or list of per-token floats).
    completion_mask: (B, T) bool, True where a completion token exists. A scalar goes on the last True
    position of its row; a row with no True position (an empty completion) gets it at position 0. A
    per-token list is laid along the row's True positions in order and must have as many values.
    Returns token_rewards (B, T) float32 on the mask's device, and has_reward (B,) bool: True where at
    least one function gave a value.
    """
    if len(weights) != len(names) or len(values) != len(names):
        raise RewardError(f"got {len(weights)} reward weights and {len(values)} value lists for {len(names)} "
                          f"reward functions {list(names)}")
    B, T = completion_mask.shape  # batch, completion tokens
    mask = completion_mask.detach().to("cpu", torch.bool)
    counted = [mask[i].nonzero().squeeze(-1) for i in range(B)]  # per row, its counted positions in order
    rewards = torch.zeros(B, T, dtype=torch.float64)
    has_reward = torch.zeros(B, dtype=torch.bool)
    for name, weight, fn_values in zip(names, weights, values):
        if len(fn_values) != B:
            raise RewardError(f"reward '{name}' has {len(fn_values)} values but completion_mask has {B} rows")
        for i, value in enumerate(fn_values):
            if value is None:
                continue
            has_reward[i] = True
            positions = counted[i]
            if isinstance(value, list):
                if len(value) != len(positions):
                    raise RewardError(
                        f"reward '{name}' gave sample {i} {len(value)} per-token values but completion_mask"
                        f" counts {len(positions)} tokens; completion_ids and completion_mask disagree"
                    )
                rewards[i, positions] += weight * torch.tensor(value, dtype=torch.float64)
            else:
                last = int(positions[-1]) if len(positions) else 0
                rewards[i, last] += weight * value
    return rewards.float().to(completion_mask.device), has_reward.to(completion_mask.device)
