"""The surrogate loss whose gradient is the policy gradient.

One forward and one backward pass through

    L(theta) = - agg_{i,t} [ r_{i,t}(theta) * A_{i,t} ]

give grad L = - E[ sum_t r_t grad log pi_theta(a_t|s_t) A_t ] because grad r = r * grad log pi.
The ratio r = pi_theta / pi_old compares the policy being updated with the policy that sampled the
batch (importance sampling, CS224R lecture 3), so one batch can serve several epochs of minibatch
updates; at the first step theta == theta_old, r == 1 exactly and the gradient is the on-policy
REINFORCE gradient.

Ratio levels (`ratio_level`):
- token:         r_{i,t} = exp(logp_{i,t} - logp_old_{i,t}). An approximation: it takes the ratio
                 of state distributions p_theta(s_t) / p_old(s_t) as 1, fine when theta is near
                 theta_old (PPO/GRPO).
- sequence:      r_i = prod_t pi_theta(a_t|s_t) / pi_old(a_t|s_t) = exp(sum_t (logp - logp_old)),
                 the trajectory ratio of the derivation: E_old[r_i grad log pi_theta(tau_i) A_i] is
                 exactly grad J at theta. Per-sequence loss -r_i A_i (A_i: the sequence's advantage).
- sequence_mean: r_i = exp(mean_t (logp - logp_old)), the length-normalised form (GSPO,
                 arXiv 2507.18071 eq. 7); its gradient is r_i * mean_t grad logp_t * A_i.

Clipping (PPO, arXiv 1707.06347 eq. 7, with DAPO's separate epsilons, arXiv 2503.14476 eq. 10):
    l = - min(r A, clip(r, 1 - clip_eps_low, 1 + clip_eps_high) A)
`clip_eps_low=None` and `clip_eps_high=None` turn clipping off: l = -r A, the plain importance-sampled
gradient.

Aggregation (`loss_agg`) of token losses l_{i,t} over the counted tokens m_{i,t} (`loss_mask`):
- token_mean:    L = sum_{i,t} l_{i,t} / sum_{i,t} m_{i,t}          (DAPO: every token weighs the same)
- sequence_mean: L = (1/N) sum_i (sum_t l_{i,t} / sum_t m_{i,t})    (GRPO: every sequence weighs the same)
- sequence_sum:  L = (1/N) sum_i sum_t l_{i,t}                      (the textbook estimator, unbiased)
- constant:      L = sum_{i,t} l_{i,t} / (N * loss_constant)         (Dr. GRPO, arXiv 2503.20783)
The sequence ratio levels produce one loss per sequence; they are averaged over sequences, whatever
`loss_agg` says (it then aggregates only the KL term added in lmpg.update.surrogate_loss).

To split a batch over micro-batches or processes and still get the whole batch's gradient, pass the
whole batch's `num_tokens` and `num_sequences`: each part then returns its share of the sum, and the
shares add up to the loss of the whole batch.

Shapes: B sequences, T completion tokens. All per-token inputs are (B, T).
"""

from __future__ import annotations

from typing import get_args

import torch

from lmpg.choices import LossAgg, RatioLevel
from lmpg.masked import masked_mean, masked_min_max, masked_sum

RATIO_LEVELS = get_args(RatioLevel)
LOSS_AGGS = get_args(LossAgg)


def importance_ratio(logp: torch.Tensor, logp_old: torch.Tensor, loss_mask: torch.Tensor,
                     ratio_level: RatioLevel = "token") -> torch.Tensor:
    """pi_theta / pi_old at the chosen level: (B, T) for token, (B,) for the sequence levels (over the
    tokens of `loss_mask`)."""
    log_ratio = torch.where(loss_mask, logp - logp_old, torch.zeros_like(logp))
    if ratio_level == "token":
        return torch.exp(log_ratio)
    if ratio_level == "sequence":
        return torch.exp(log_ratio.sum(1))
    if ratio_level == "sequence_mean":
        return torch.exp(masked_mean(log_ratio, loss_mask, dim=1))
    raise ValueError(f"unknown ratio_level {ratio_level!r}; choose one of {RATIO_LEVELS}")


def clipped_objective(ratio: torch.Tensor, adv: torch.Tensor, clip_eps_low: float | None,
                      clip_eps_high: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, clipped): min(r A, clip(r, 1-eps_low, 1+eps_high) A), or r A with no clipping.

    `clipped` is True where the clipped term is the smaller one (its gradient is zero there).
    """
    unclipped = ratio * adv
    if clip_eps_low is None and clip_eps_high is None:
        return unclipped, torch.zeros_like(ratio, dtype=torch.bool)
    lo = 1.0 - (clip_eps_low if clip_eps_low is not None else float("inf"))
    hi = 1.0 + (clip_eps_high if clip_eps_high is not None else float("inf"))
    clipped = torch.clamp(ratio, lo, hi) * adv
    return torch.minimum(unclipped, clipped), clipped < unclipped


def aggregate(token_loss: torch.Tensor, loss_mask: torch.Tensor, loss_agg: LossAgg,
              loss_constant: float | None = None, num_tokens: float | None = None,
              num_sequences: float | None = None) -> torch.Tensor:
    """Reduce (B, T) token losses over the tokens of `loss_mask` to a scalar with `loss_agg` (equations
    in the module docstring).

    num_tokens / num_sequences: the totals of the whole batch when this call sees only part of it
    (micro-batch or process); default to this part's own totals.
    """
    B = token_loss.shape[0]
    n_seq = float(B if num_sequences is None else num_sequences)
    if loss_agg == "token_mean":
        n_tok = loss_mask.sum().clamp(min=1) if num_tokens is None else max(num_tokens, 1)
        return masked_sum(token_loss, loss_mask) / n_tok
    if loss_agg == "sequence_mean":
        per_seq = masked_mean(token_loss, loss_mask, dim=1)
        return per_seq.sum() / n_seq
    if loss_agg == "sequence_sum":
        return masked_sum(token_loss, loss_mask) / n_seq
    if loss_agg == "constant":
        if not loss_constant or loss_constant <= 0:
            raise ValueError("loss_agg='constant' needs loss_constant > 0 (e.g. max_new_tokens)")
        return masked_sum(token_loss, loss_mask) / (n_seq * loss_constant)
    raise ValueError(f"unknown loss_agg {loss_agg!r}; choose one of {LOSS_AGGS}")


def policy_gradient_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor,
                         loss_mask: torch.Tensor, *, ratio_level: RatioLevel = "token",
                         clip_eps_low: float | None = None, clip_eps_high: float | None = None,
                         loss_agg: LossAgg = "token_mean", loss_constant: float | None = None,
                         num_tokens: float | None = None, num_sequences: float | None = None):
    """Surrogate policy-gradient loss and its statistics.

    logp:     (B, T) log pi_theta(a_t | s_t) of the taken tokens, with grad.
    logp_old: (B, T) the same under the sampling policy, no grad.
    adv:      (B, T) advantages A_t (for sequence ratio levels the sequence's advantage is read at
              its first counted token, where all tokens share it unless reward-to-go is on).
    loss_mask: (B, T) bool, True where a token counts in the loss (`TrajectoryBatch.loss_mask`: the
              actions of scored rows).

    Returns (loss, stats) with stats: ratio_min/mean/max (min and max 1.0 where nothing counts, the
    ratio of an unchanged policy), clip_frac (fraction of counted tokens, or sequences, whose
    clipped term was active), pg_loss.
    """
    loss_mask = loss_mask.bool()
    logp_old = logp_old.detach()
    ratio = importance_ratio(logp, logp_old, loss_mask, ratio_level)
    if ratio_level == "token":
        objective, clipped = clipped_objective(ratio, adv, clip_eps_low, clip_eps_high)
        loss = aggregate(-objective, loss_mask, loss_agg, loss_constant, num_tokens, num_sequences)
        r_min, r_max = masked_min_max(ratio, loss_mask, empty=1.0)
        r_mean = masked_mean(ratio.detach(), loss_mask)
        clip_frac = masked_mean(clipped.float(), loss_mask)
    else:
        seq_mask = loss_mask.any(1)  # (B,) sequences with a counted token
        seq_adv = _first_counted(adv, loss_mask)  # (B,)
        objective, clipped = clipped_objective(ratio, seq_adv, clip_eps_low, clip_eps_high)
        n_seq = float(loss_mask.shape[0] if num_sequences is None else num_sequences)
        loss = -masked_sum(objective, seq_mask) / n_seq
        r_min, r_max = masked_min_max(ratio, seq_mask, empty=1.0)
        r_mean = masked_mean(ratio.detach(), seq_mask)
        clip_frac = masked_mean(clipped.float(), seq_mask)
    stats = {"pg_loss": float(loss.detach()), "ratio_min": r_min, "ratio_mean": float(r_mean),
             "ratio_max": r_max, "clip_frac": float(clip_frac)}
    return loss, stats


def _first_counted(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x at the first True of each row of mask, (B,); 0 for rows with none."""
    B, T = x.shape
    if T == 0:
        return x.new_zeros(B)
    idx = mask.int().argmax(1)  # first True (0 if none)
    first = x.gather(1, idx.unsqueeze(1)).squeeze(1)
    return torch.where(mask.any(1), first, torch.zeros_like(first))

