"""The policy's entropy in the loss: which tokens train, the entropy bonus and its adaptive coefficient.

H_t = - sum_v pi(v | s_t) log pi(v | s_t), from the update's own forward (`lmpg.forward.row_logprobs`).

1. High-entropy tokens (Wang et al., "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive
   Effective RL for LLM Reasoning", arXiv 2506.01939): the policy term keeps only the tokens whose
   entropy is at or above the (1 - rho) quantile of the counted tokens' entropies, rho =
   `top_entropy_quantile` (the paper: 0.2); the others stay in the loss's normaliser. As TRL 1.16 does,
   the quantile is taken over each micro-batch's counted tokens on every process, so which tokens train
   depends on micro_batch_size. The estimator is biased: it drops the low-entropy tokens' terms of the
   policy gradient (tests/test_estimator_enumeration.py states by how much on a tabular policy).

2. Entropy bonus: L <- L - c * H_bar, H_bar the mean entropy over the tokens the policy term acts on
   (with 1., the kept ones): a gradient towards flatter distributions (exploration). H_bar is the mean
   over the minibatch's counted tokens on every process; under 1., whose kept tokens are known only per
   micro-batch, each micro-batch's mean divided by the number of micro-batches (TRL 1.16's form).

3. Adaptive coefficient (Skywork-OR1, arXiv 2505.22312; TRL 1.16's rule): after every optimizer step,
   with H_bar the step's mean entropy over the tokens the bonus acts on (all micro-batches, all processes),

       c <- min(c + delta, c_max)  if H_bar <= target,    c <- max(c - delta, c_min)  otherwise,

   and the bonus applies c only while the last measured H_bar <= target (none before the first
   measurement): it switches on when entropy collapses and backs off once it recovers.
"""

from __future__ import annotations

import math

import torch

from lmpg.masked import masked_mean, masked_sum


def high_entropy_threshold(entropies: torch.Tensor, top_quantile: float) -> tuple[float, int]:
    """(threshold, kept): the (1 - top_quantile) quantile of `entropies` (1-D, the counted tokens' of a
    micro-batch on every process; linear interpolation, torch.quantile's) and how many are at or above
    it. (inf, 0) when there are none: no token trains. Computed in fp32 (as TRL does) or fp64, the
    entropies' own precision, so a quantile that lands on an entropy keeps that token."""
    values = entropies.detach()
    values = values if values.dtype in (torch.float32, torch.float64) else values.float()
    if values.numel() == 0:
        return math.inf, 0
    threshold = float(torch.quantile(values, 1.0 - top_quantile))
    return threshold, int((values >= threshold).sum())


def high_entropy_mask(entropy: torch.Tensor, loss_mask: torch.Tensor, *,
                      threshold: float) -> tuple[torch.Tensor, dict]:
    """(keep (B, T) bool, stats): counted tokens with H_t >= threshold (`high_entropy_threshold`).
    stats: high_entropy_frac, the share of counted tokens kept."""
    keep = (entropy.detach() >= threshold) & loss_mask
    return keep, {"high_entropy_frac": float(masked_mean(keep.float(), loss_mask))}


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, *, num_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """(H_bar, stats): sum_{i,t} H_{i,t} m_{i,t} / num_tokens over the tokens of `mask`, with the
    entropy's gradient; num_tokens defaults to this call's own count (a micro-batch's share of the
    minibatch's mean when given the minibatch's). stats: entropy_sum and entropy_count of this call
    (what the adaptive coefficient adds up over a step)."""
    count = float(mask.sum())
    value = masked_sum(entropy, mask) / max(count if num_tokens is None else num_tokens, 1.0)
    return value, {"entropy_sum": float(masked_sum(entropy.detach(), mask)), "entropy_count": count}


def adaptive_entropy_coef(coef: float, entropy_mean: float, *, target: float, delta: float, coef_min: float,
                          coef_max: float) -> float:
    """The coefficient after an optimizer step whose mean entropy was `entropy_mean` (module docstring, 3.)."""
    if entropy_mean <= target:
        return min(coef + delta, coef_max)
    return max(coef - delta, coef_min)


def applied_entropy_coef(coef: float, last_entropy: float, *, target: float) -> float:
    """The coefficient the adaptive bonus applies: coef while the last measured entropy is at or below
    target, 0 otherwise (and before any measurement, last_entropy = inf)."""
    return coef if last_entropy <= target else 0.0
