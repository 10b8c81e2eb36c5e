"""Per-token estimators of KL(pi_theta || pi_ref) from tokens sampled by the policy.

With x = log pi_ref(a_t|s_t) - log pi_theta(a_t|s_t) at a sampled token a_t ~ pi_theta
(J. Schulman, "Approximating KL divergence", 2020, http://joschu.net/blog/kl-approx.html):

- k1 = -x = log pi_theta - log pi_ref        unbiased, high variance, can be negative
- k2 = x^2 / 2                                biased, low variance
- k3 = exp(x) - 1 - x                         unbiased, low variance, always >= 0 (GRPO's choice)

Where the penalty goes is the trainer's choice (`kl_in`): added to the loss (GRPO; k3 there gives a
gradient that pulls towards pi_ref), or subtracted from the per-token rewards (PPO-RLHF; k1 there is
the usual choice and the penalty is then credited through the returns).

In the loss, k3's value estimates KL(pi_theta || pi_ref) but its gradient does not: at a token drawn
from pi_old = pi_theta,

    E[grad k3] = sum_a pi_theta(a) (1 - pi_ref(a) / pi_theta(a)) grad log pi_theta(a)
               = - sum_a pi_ref(a) grad log pi_theta(a) = grad KL(pi_ref || pi_theta),

the forward KL's gradient. Weighting each token's k3 by the ratio r = pi_theta / pi_old, with its
gradient (`kl_ratio_weighted`; DeepSeek-V3.2, arXiv 2512.02556; TRL's use_bias_correction_kl), gives
E_{a ~ pi_old}[grad (r k3)] = grad sum_a pi_theta(a) k3(a) = grad KL(pi_theta || pi_ref) at every state
and every theta. Over a completion it is the gradient of sum_t KL_t at each visited state s_t with the
state distribution held fixed, as the token ratio is; weighted by the sequence ratio (ratio_level
sequence) it is the gradient of the completions' KL(pi_theta(tau) || pi_ref(tau)) itself
(tests/test_estimator_enumeration.py: each exactly, and how far apart they are).
"""

from __future__ import annotations

from typing import get_args

import torch

from lmpg.choices import KlEstimator

KL_ESTIMATORS = get_args(KlEstimator)


def kl_estimate(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: KlEstimator = "k3") -> torch.Tensor:
    """Per-token KL estimate, same shape as logp (B, T); see the module docstring for each formula."""
    x = logp_ref - logp
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x * x
    if estimator == "k3":
        # clamp x before exp so a token the reference finds far likelier cannot overflow to inf
        return torch.exp(x.clamp(max=20.0)) - 1.0 - x
    raise ValueError(f"unknown kl_estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def kl_penalised_rewards(token_rewards: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor,
                         action_mask: torch.Tensor, kl_coef: float,
                         estimator: KlEstimator = "k1") -> torch.Tensor:
    """The per-token rewards with the KL penalty in them (kl_in=reward), (B, T):

        r'_t = r_t - kl_coef * KL_t(pi_old || pi_ref)   on action tokens, r'_t = r_t elsewhere

    KL_t is `kl_estimate` at the sampling policy's log-probs (the penalty is a reward, fixed during
    the update), credited to earlier actions through the returns like any other reward.
    """
    kl_tok = kl_estimate(logp_old, logp_ref, estimator)
    return token_rewards - kl_coef * torch.where(action_mask, kl_tok, 0.0)
