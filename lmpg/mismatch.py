"""The sampler-trainer mismatch: weights that correct it, figures that measure it.

An inference engine samples a_t ~ q(. | s_t) while the trainer's pi_old is its own forward of the
same weights. q != pi_old: other kernels, bf16, batch shapes, and top-k / top-p / min_p truncation
and the repetition penalty (q is the distribution actually sampled from, `lmpg.vllm_sampler`; lmpg's
own sampler with those settings reports the same q, `lmpg.sampler.sampling_logits`, exact but for
float rounding). The batch is then off-policy, and
the policy gradient at theta_old,

    grad J = E_{tau ~ pi_old}[ sum_t grad log pi(a_t | s_t) A(tau) ],

is estimated from samples of q with an importance weight (CS224R lecture 3, importance sampling):

    rho_t = pi_old(a_t | s_t) / q(a_t | s_t),        rho(tau) = prod_t rho_t.

Modes (`sampler_correction`, TRL's `vllm_importance_sampling_mode`, verl's rollout correction):
- sequence_truncate: w(tau) = min(rho(tau), C) on every token of tau. With C = inf,
  E_q[w g] = E_pi_old[g] exactly (g = sum_t grad log pi(a_t|s_t) A) where q > 0 wherever pi_old > 0
  (truncation breaks that: what q never samples, no weight recovers). Truncating at C trades that for
  bounded variance, with bias  E_q[w g] - grad J = -E_q[(rho(tau) - C)_+ g(tau)]  (zero when no
  trajectory's ratio exceeds C). A lower bound C_min adds +E_q[(C_min - rho(tau))_+ g(tau)].
- sequence_mask: w(tau) = rho(tau) when C_min <= rho(tau) <= C, else 0: bias
  -E_q[rho(tau) 1{rho outside [C_min, C]} g(tau)], the masked trajectories' share of grad J.
- token_truncate: w_t = min(rho_t, C) (truncated importance sampling, TIS; Yao et al. 2025, "Your
  efficient RL framework secretly brings you off-policy RL training"). Even with C = inf it reweights
  only the action a_t, not the states q's earlier tokens led to nor the later tokens the return
  depends on:
      E_q[sum_t rho_t grad log pi(a_t|s_t) A(tau)] = sum_t E_{a_<t ~ q, a_t ~ pi_old, a_>t ~ q}[grad log pi(a_t|s_t) A(tau)],
  exact for one-token trajectories or when q == pi_old, and otherwise the same first-order
  approximation as the token-level PPO ratio (`lmpg.losses`); lower variance than the sequence weight.
- token_mask: w_t = rho_t when C_min <= rho_t <= C, else 0 (the token drops out of the gradient).
The weight is a constant (no gradient) multiplying each token's policy-gradient term, as TRL
multiplies its per-token loss; the KL term is not weighted. Since w >= 0,
w * min(r A, clip(r) A) = min(r (w A), clip(r) (w A)), so the trainer applies w to the advantages.

Shapes: B sequences, T tokens after the prompt; per-token inputs (B, T).
"""

from __future__ import annotations

import math
import torch

from lmpg.choices import SamplerCorrection
from lmpg.masked import masked_mean, masked_min_max


def sampler_log_ratio(logp_old: torch.Tensor, logp_sampler: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) log rho_t = log pi_old(a_t|s_t) - log q(a_t|s_t) on the actions, 0 elsewhere. A token
    whose q the sampler could not give (NaN) gets 0 (no correction), as TRL does."""
    diff = torch.where(action_mask, logp_old.float() - logp_sampler.float(), torch.zeros_like(logp_old, dtype=torch.float32))
    return torch.nan_to_num(diff, nan=0.0)


def correction_weights(logp_old: torch.Tensor, logp_sampler: torch.Tensor, action_mask: torch.Tensor, *,
                       mode: SamplerCorrection, c_max: float | None, c_min: float | None = None
                       ) -> tuple[torch.Tensor, dict]:
    """(w (B, T), stats): the importance weight of each token's policy-gradient term (equations in the
    module docstring). c_max / c_min: the bounds C, C_min (None: unbounded on that side). Rows or
    tokens off the actions get weight 1 (they carry no policy-gradient term anyway).

    stats: correction_masked_frac (share of action tokens whose weight the mask set to 0; for the
    sequence modes, share of sequences), correction_truncated_frac (share whose ratio was clamped)."""
    if mode == "none":
        return torch.ones_like(logp_old, dtype=torch.float32), {}
    lo = -math.inf if c_min is None else c_min
    hi = math.inf if c_max is None else c_max
    log_rho = sampler_log_ratio(logp_old, logp_sampler, action_mask)
    if mode.startswith("sequence"):
        rho = torch.exp(log_rho.sum(1, keepdim=True)).expand_as(log_rho)  # (B, T), one value per row
        counted = action_mask.any(1, keepdim=True).expand_as(log_rho) & (torch.arange(log_rho.shape[1], device=log_rho.device) == 0)
    elif mode.startswith("token"):
        rho = torch.exp(log_rho)
        counted = action_mask
    else:
        raise ValueError(f"unknown sampler correction {mode!r}")
    outside = (rho < lo) | (rho > hi)
    if mode.endswith("truncate"):
        w = rho.clamp(min=lo, max=hi)
        stats = {"correction_truncated_frac": float(masked_mean(outside.float(), counted)),
                 "correction_masked_frac": 0.0}
    else:
        w = torch.where(outside, torch.zeros_like(rho), rho)
        stats = {"correction_masked_frac": float(masked_mean(outside.float(), counted)),
                 "correction_truncated_frac": 0.0}
    w = torch.where(action_mask, w, torch.ones_like(w))
    return w.detach(), stats


def mismatch_stats(logp_old: torch.Tensor, logp_sampler: torch.Tensor, action_mask: torch.Tensor) -> dict:
    """How far the sampler's q is from the trainer's pi_old on the sampled actions:
    mismatch_kl = mean_t [rho_t - 1 - log rho_t] (the k3 estimator of KL(q || pi_old) from samples of
    q, Schulman 2020), mismatch_ratio_min / _mean / _max of rho_t = pi_old / q over the action tokens,
    and mismatch_logp_abs_max = max_t |log pi_old - log q|."""
    log_rho = sampler_log_ratio(logp_old, logp_sampler, action_mask)
    rho = torch.exp(log_rho)
    k3 = rho - 1 - log_rho
    r_min, r_max = masked_min_max(rho, action_mask, empty=1.0)
    return {"mismatch_kl": float(masked_mean(k3, action_mask)), "mismatch_ratio_min": r_min,
            "mismatch_ratio_mean": float(masked_mean(rho, action_mask)), "mismatch_ratio_max": r_max,
            "mismatch_logp_abs_max": float(log_rho.abs().max()) if log_rho.numel() else 0.0}
