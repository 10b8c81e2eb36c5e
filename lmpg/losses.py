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

Objectives (`pg_objective`), the per-token loss l = -f, with r the ratio and A the advantage:
- ppo_clip (PPO, arXiv 1707.06347 eq. 7, with DAPO's separate epsilons, arXiv 2503.14476 eq. 10):
      f = min(r A, clip(r, 1 - clip_eps_low, 1 + clip_eps_high) A)
  `clip_eps_low=None` and `clip_eps_high=None` turn clipping off: f = r A, the plain importance-sampled
  gradient. `clip_delta` d caps the unclipped term too (INTELLECT-2's two-sided clipping, arXiv
  2505.07291): f = min(min(r, d) A, clip(r, ...) A), so a negative-advantage token whose ratio passed
  d stops pushing its probability down.
- cispo (MiniMax-M1, arXiv 2506.13585 section 3.1; the cap as ScaleRL's eps_max, arXiv 2510.13786):
      f = sg(min(r, w_max)) A log pi_theta          sg: stop-gradient
  clips the importance weight, not the update: every token keeps a gradient w A grad log pi.
- sapo (Soft Adaptive Policy Optimization, arXiv 2511.20347): a smooth gate instead of the hard clip,
      f = (4 / tau) sigmoid(tau (r - 1)) A,         tau = tau_pos where A > 0, tau_neg elsewhere
  whose gradient 4 s (1 - s) r A grad log pi (s the sigmoid) is the plain one at r = 1 and fades as r
  leaves 1, faster for the larger tau.
- vespo (VESPO, arXiv 2602.10693): a smooth weight of the trajectory ratio w_i = prod_t r_{i,t},
      f = sg(phi(w_i)) A log pi_theta,   phi(w) = e^lambda w^k e^(-lambda w)   (phi(1) = 1)
  with (k, lambda) = (k_pos, lambda_pos) where A >= 0, (k_neg, lambda_neg) elsewhere; w is clamped
  to [1e-8, e^20] in log space, as the paper's code does. Token ratio level only.
At ratio 1 (theta = theta_old) every objective's gradient is A grad log pi, the policy gradient.

Aggregation (`loss_agg`) of token losses l_{i,t} over the counted tokens m_{i,t} (`loss_mask`):
- token_mean:    L = sum_{i,t} l_{i,t} / sum_{i,t} m_{i,t}          (DAPO: every token weighs the same)
- sequence_mean: L = (1/N) sum_i (sum_t l_{i,t} / sum_t m_{i,t})    (GRPO: every sequence weighs the same)
- sequence_sum:  L = (1/N) sum_i sum_t l_{i,t}                      (the textbook estimator, unbiased)
- constant:      L = sum_{i,t} l_{i,t} / (N * loss_constant)         (Dr. GRPO, arXiv 2503.20783)
The sequence ratio levels produce one loss per sequence (cispo: one weight per sequence, times each
token's log pi). What a sequence's loss weighs is `sequence_loss_weight`:
- one:    the per-sequence losses are averaged over sequences (GSPO), whatever `loss_agg` says (it then
          aggregates only the KL term added in lmpg.update.surrogate_loss);
- length: the sequence's loss counts at each of its tokens and `loss_agg` aggregates those, so
          token_mean weighs a sequence by its length (TRL's sequence level with loss_type dapo, bnpo,
          cispo or dr_grpo), and sequence_sum with ratio_level=sequence_mean is LUSPO (Length-Unbiased
          Sequence Policy Optimization, arXiv 2602.05261):
              L = (1/N) sum_i |y_i| l_i,   l_i = -min(r_i A_i, clip(r_i) A_i),  r_i = exp(mean_t log r_{i,t})
          whose gradient at ratio 1 is (1/N) sum_i sum_t A_i grad log pi_t: GSPO's mean over tokens
          times the length is the sum, the textbook estimator.

`policy_token_mask` (B, T), when given, keeps the policy term only on its True tokens (the off-policy
sequence mask `off_policy_sequence_mask`, the high-entropy tokens of lmpg.entropy); the dropped tokens
still count in the normaliser, as TRL's masks do.

To split a batch over micro-batches or processes and still get the whole batch's gradient, pass the
whole batch's `num_tokens` and `num_sequences`: each part then returns its share of the sum, and the
shares add up to the loss of the whole batch.

Shapes: B sequences, T completion tokens. All per-token inputs are (B, T).
"""

from __future__ import annotations

import math
from typing import get_args

import torch

from lmpg.choices import LossAgg, PgObjective, RatioLevel, SequenceLossWeight
from lmpg.masked import masked_mean, masked_min_max, masked_sum

RATIO_LEVELS = get_args(RatioLevel)
LOSS_AGGS = get_args(LossAgg)
PG_OBJECTIVES = get_args(PgObjective)
SEQUENCE_LOSS_WEIGHTS = get_args(SequenceLossWeight)


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
                      clip_eps_high: float | None, clip_delta: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, clipped): min(r A, clip(r, 1-eps_low, 1+eps_high) A), or r A with no clipping; with
    clip_delta d the unclipped term is min(r, d) A (two-sided clipping, module docstring).

    `clipped` is True where the objective has no gradient: the clipped term is the smaller one, or the
    ratio is past d.
    """
    capped = ratio if clip_delta is None else torch.clamp(ratio, max=clip_delta)
    unclipped = capped * adv
    past_delta = torch.zeros_like(ratio, dtype=torch.bool) if clip_delta is None else ratio > clip_delta
    if clip_eps_low is None and clip_eps_high is None:
        return unclipped, past_delta
    lo = 1.0 - (clip_eps_low if clip_eps_low is not None else float("inf"))
    hi = 1.0 + (clip_eps_high if clip_eps_high is not None else float("inf"))
    clipped = torch.clamp(ratio, lo, hi) * adv
    return torch.minimum(unclipped, clipped), (clipped < unclipped) | past_delta


def cispo_objective(ratio: torch.Tensor, adv: torch.Tensor, logp: torch.Tensor, *,
                    weight_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, capped): sg(min(r, w_max)) A log pi_theta (CISPO, module docstring); `capped` is True
    where the weight hit w_max. ratio and adv broadcast against logp."""
    weight = torch.clamp(ratio.detach(), max=weight_max)
    return weight * adv * logp, ratio.detach() > weight_max


def sapo_objective(ratio: torch.Tensor, adv: torch.Tensor, *, temperature_pos: float,
                   temperature_neg: float) -> torch.Tensor:
    """(4 / tau) sigmoid(tau (r - 1)) A, tau = temperature_pos where A > 0, temperature_neg elsewhere
    (SAPO, module docstring)."""
    pos, neg = (torch.tensor(t, dtype=ratio.dtype, device=ratio.device) for t in (temperature_pos, temperature_neg))
    tau = torch.where(adv > 0, pos, neg)
    return torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv


@torch.no_grad()
def vespo_weight(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, loss_mask: torch.Tensor, *,
                 k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float) -> torch.Tensor:
    """phi(w_i) = exp(lambda + k log w_i - lambda w_i), (B, T), no grad (VESPO, module docstring).

    log w_i = sum_t clamp(log r_{i,t}, -20, 20) over `loss_mask`, clamped to [log 1e-8, 20];
    (k, lambda) by the sign of each token's A (>= 0: the _pos pair); lambda is floored at 1e-4.
    A weight that overflows counts 0.
    """
    log_ratio = torch.where(loss_mask, (logp - logp_old).clamp(-20.0, 20.0), torch.zeros_like(logp))
    log_w = log_ratio.sum(1, keepdim=True).clamp(math.log(1e-8), 20.0)  # (B, 1)
    nonneg = adv >= 0
    k_pos, lambda_pos, k_neg, lambda_neg = (torch.tensor(v, dtype=logp.dtype, device=logp.device)
                                            for v in (k_pos, lambda_pos, k_neg, lambda_neg))
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_sequence_mask(logp: torch.Tensor, logp_sampler: torch.Tensor, adv: torch.Tensor,
                             loss_mask: torch.Tensor, *, threshold: float) -> tuple[torch.Tensor, dict]:
    """(keep (B, T) bool, stats): the off-policy sequence mask of DeepSeek-V3.2 (arXiv 2512.02556 eq. 9),

        keep_i = A_i >= 0  or  (1/|y_i|) sum_t (log q(a_t|s_t) - log pi_theta(a_t|s_t)) <= threshold

    q the policy that sampled the batch (`logp_sampler`: pi_old, or an inference engine's log-probs).
    A sequence that lowers its own probability (A < 0) after pi_theta moved far from what sampled it
    is dropped from the policy term. A NaN log-prob (a token the engine could not score) adds 0.
    adv (B, T): a token's own advantage decides for it. stats: off_policy_masked_frac (sequences with a
    counted token that lost at least one, of those).
    """
    kl = torch.where(loss_mask, (logp_sampler - logp.detach()).nan_to_num(nan=0.0), torch.zeros_like(logp))
    mean_kl = masked_mean(kl, loss_mask, dim=1).unsqueeze(1)  # (B, 1)
    keep = (adv >= 0) | (mean_kl <= threshold)  # (B, T)
    seq_mask = loss_mask.any(1)
    dropped = (~keep & loss_mask).any(1)
    return keep, {"off_policy_masked_frac": float(masked_mean(dropped.float(), seq_mask))}


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
                         loss_mask: torch.Tensor, *, pg_objective: PgObjective = "ppo_clip",
                         ratio_level: RatioLevel = "token", clip_eps_low: float | None = None,
                         clip_eps_high: float | None = None, clip_delta: float | None = None,
                         cispo_weight_max: float = 5.0, sapo_temperature_pos: float = 1.0,
                         sapo_temperature_neg: float = 1.05, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                         vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
                         sequence_loss_weight: SequenceLossWeight = "one",
                         policy_token_mask: torch.Tensor | None = None, loss_agg: LossAgg = "token_mean",
                         loss_constant: float | None = None, num_tokens: float | None = None,
                         num_sequences: float | None = None):
    """Surrogate policy-gradient loss and its statistics (equations in the module docstring).

    logp:     (B, T) log pi_theta(a_t | s_t) of the taken tokens, with grad.
    logp_old: (B, T) the same under the sampling policy, no grad.
    adv:      (B, T) advantages A_t (for sequence ratio levels the sequence's advantage is read at
              its first counted token, where all tokens share it unless reward-to-go is on).
    loss_mask: (B, T) bool, True where a token counts in the loss (`TrajectoryBatch.loss_mask`: the
              actions of scored rows).
    policy_token_mask: (B, T) bool or None, False on counted tokens whose policy term is dropped (they
              stay in the normaliser).

    Returns (loss, stats) with stats: ratio_min/mean/max (min and max 1.0 where nothing counts, the
    ratio of an unchanged policy), clip_frac (fraction of counted tokens, or sequences, whose
    objective was clipped: ppo_clip's clipped term or d active, cispo's weight capped; 0 for sapo and
    vespo), pg_loss; vespo adds vespo_weight_mean.
    """
    if pg_objective not in PG_OBJECTIVES:
        raise ValueError(f"unknown pg_objective {pg_objective!r}; choose one of {PG_OBJECTIVES}")
    if sequence_loss_weight not in SEQUENCE_LOSS_WEIGHTS:
        raise ValueError(f"unknown sequence_loss_weight {sequence_loss_weight!r}; choose one of {SEQUENCE_LOSS_WEIGHTS}")
    loss_mask = loss_mask.bool()
    logp_old = logp_old.detach()
    ratio = importance_ratio(logp, logp_old, loss_mask, ratio_level)
    # cispo and vespo multiply by log pi itself: what sits off the mask must not reach the backward
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    adv, logp_counted = torch.where(loss_mask, adv, zero), torch.where(loss_mask, logp, zero)
    extra = {}
    if ratio_level == "token":
        counted = loss_mask
        r_adv = adv
    else:
        if pg_objective == "vespo":
            raise ValueError("pg_objective='vespo' weighs the trajectory ratio itself; use ratio_level='token'")
        counted = loss_mask.any(1)  # (B,) sequences with a counted token
        r_adv = _first_counted(adv, loss_mask)  # (B,)
    clipped = torch.zeros_like(ratio, dtype=torch.bool)
    if pg_objective == "ppo_clip":
        objective, clipped = clipped_objective(ratio, r_adv, clip_eps_low, clip_eps_high, clip_delta)
    elif pg_objective == "sapo":
        objective = sapo_objective(ratio, r_adv, temperature_pos=sapo_temperature_pos,
                                   temperature_neg=sapo_temperature_neg)
    elif pg_objective == "cispo":  # per token: the sequence's weight times each token's log pi
        r_tok, a_tok = (ratio, adv) if ratio_level == "token" else (ratio.unsqueeze(1), r_adv.unsqueeze(1))
        objective, clipped = cispo_objective(r_tok, a_tok, logp_counted, weight_max=cispo_weight_max)
        clipped = clipped if ratio_level == "token" else clipped.squeeze(1)
    else:  # vespo
        phi = vespo_weight(logp, logp_old, adv, loss_mask, k_pos=vespo_k_pos, lambda_pos=vespo_lambda_pos,
                           k_neg=vespo_k_neg, lambda_neg=vespo_lambda_neg)
        objective = phi * adv * logp_counted
        extra["vespo_weight_mean"] = float(masked_mean(phi, loss_mask))
    keep = None if policy_token_mask is None else policy_token_mask.bool() & loss_mask
    if objective.dim() == 1 and sequence_loss_weight == "one":
        # one loss per sequence, each weighing the same; the share of its tokens kept (1.0 exactly
        # when no token is dropped) scales it, as the per-sequence token mean of TRL's grpo does
        kept = 1.0 if keep is None else masked_mean(keep.to(objective.dtype), loss_mask, dim=1)
        n_seq = float(loss_mask.shape[0] if num_sequences is None else num_sequences)
        loss = -masked_sum(objective * kept, counted) / n_seq
    else:
        token_loss = -(objective.unsqueeze(1) if objective.dim() == 1 else objective)  # (B, T) or (B, 1)
        token_loss = token_loss.expand_as(logp)
        if keep is not None:
            token_loss = torch.where(keep, token_loss, torch.zeros((), dtype=token_loss.dtype))
        agg = loss_agg if ratio_level == "token" or sequence_loss_weight == "length" else "sequence_mean"
        loss = aggregate(token_loss, loss_mask, agg, loss_constant, num_tokens, num_sequences)
    r_min, r_max = masked_min_max(ratio, counted, empty=1.0)
    stats = {"pg_loss": float(loss.detach()), "ratio_min": r_min, "ratio_mean": float(masked_mean(ratio.detach(), counted)),
             "ratio_max": r_max, "clip_frac": float(masked_mean(clipped.float(), counted)), **extra}
    return loss, stats


def cispo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, loss_mask: torch.Tensor, *,
               weight_max: float = 5.0, **aggregation):
    """CISPO (MiniMax-M1, arXiv 2506.13585 section 3.1), (loss, stats):

        L = agg_{i,t} [ - sg(min(r_{i,t}, w_max)) A_{i,t} log pi_theta(a_t | s_t) ]

    The importance weight is clipped and detached instead of the update: no token loses its gradient,
    a token far off-policy only weighs at most w_max (ScaleRL, arXiv 2510.13786, recommends 5). TRL's
    loss_type='cispo' with token_mean (its epsilon_high is w_max). `aggregation`: policy_gradient_loss's
    ratio_level, sequence_loss_weight, loss_agg, ... keywords."""
    return policy_gradient_loss(logp, logp_old, adv, loss_mask, pg_objective="cispo", cispo_weight_max=weight_max,
                                **aggregation)


def sapo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, loss_mask: torch.Tensor, *,
              temperature_pos: float = 1.0, temperature_neg: float = 1.05, **aggregation):
    """SAPO (Soft Adaptive Policy Optimization, arXiv 2511.20347), (loss, stats):

        L = agg_{i,t} [ - (4 / tau) sigmoid(tau (r_{i,t} - 1)) A_{i,t} ],   tau = tau_pos (A > 0) | tau_neg

    A soft trust region: the gradient 4 s (1 - s) r A grad log pi equals the policy gradient at r = 1
    and decays smoothly as r leaves 1 (no hard cut-off), faster for negative advantages (tau_neg >
    tau_pos). TRL's loss_type='sapo' aggregates with sequence_mean. `aggregation`: policy_gradient_loss's
    ratio_level, loss_agg, ... keywords."""
    return policy_gradient_loss(logp, logp_old, adv, loss_mask, pg_objective="sapo",
                                sapo_temperature_pos=temperature_pos, sapo_temperature_neg=temperature_neg,
                                **aggregation)


def vespo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, loss_mask: torch.Tensor, *,
               k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0,
               **aggregation):
    """VESPO (Variational Sequence-Level Soft Policy Optimization, arXiv 2602.10693), (loss, stats):

        L = agg_{i,t} [ - sg(phi(w_i)) A_{i,t} log pi_theta(a_t | s_t) ],   w_i = prod_t r_{i,t}
        phi(w) = e^lambda w^k e^(-lambda w)     (a Gamma kernel scaled so that phi(1) = 1)

    A smooth, asymmetric weight of the trajectory ratio replaces clipping: w^k damps w << 1, e^(-lambda w)
    damps w >> 1; (k, lambda) = (k_pos, lambda_pos) for A >= 0, (k_neg, lambda_neg) otherwise (`vespo_weight`
    has the clamps). TRL's loss_type='vespo' aggregates with token_mean. `aggregation`:
    policy_gradient_loss's loss_agg, ... keywords (ratio_level token only)."""
    return policy_gradient_loss(logp, logp_old, adv, loss_mask, pg_objective="vespo", vespo_k_pos=k_pos,
                                vespo_lambda_pos=lambda_pos, vespo_k_neg=k_neg, vespo_lambda_neg=lambda_neg,
                                **aggregation)


def luspo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, loss_mask: torch.Tensor, *,
               clip_eps_low: float | None = 0.2, clip_eps_high: float | None = 0.2, **aggregation):
    """LUSPO (Length-Unbiased Sequence Policy Optimization, arXiv 2602.05261), (loss, stats):

        L = (1/N) sum_i |y_i| [ - min(r_i A_i, clip(r_i, 1 - eps_low, 1 + eps_high) A_i) ],
        r_i = exp( (1/|y_i|) sum_t log r_{i,t} )

    GSPO's sequence ratio with each sequence's loss weighed by its length: the gradient at ratio 1 is
    (1/N) sum_i A_i sum_t grad log pi_t, the textbook estimator, where GSPO's (1/N) sum_i A_i mean_t
    grad log pi_t favours short sequences. ratio_level=sequence_mean, sequence_loss_weight=length,
    loss_agg=sequence_sum; TRL's loss_type='luspo' with importance_sampling_level='sequence' (at its
    token level, sequence_sum over token ratios). `aggregation`: policy_gradient_loss's num_sequences,
    policy_token_mask, ... keywords."""
    return policy_gradient_loss(logp, logp_old, adv, loss_mask, ratio_level="sequence_mean",
                                sequence_loss_weight="length", loss_agg="sequence_sum", clip_eps_low=clip_eps_low,
                                clip_eps_high=clip_eps_high, **aggregation)


def _first_counted(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x at the first True of each row of mask, (B,); 0 for rows with none."""
    B, T = x.shape
    if T == 0:
        return x.new_zeros(B)
    idx = mask.int().argmax(1)  # first True (0 if none)
    first = x.gather(1, idx.unsqueeze(1)).squeeze(1)
    return torch.where(mask.any(1), first, torch.zeros_like(first))
