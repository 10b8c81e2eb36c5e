"""Exact proofs, by enumeration, that lmpg's surrogate loss estimates the policy gradient.

A tabular autoregressive policy (a few prompts, 3 tokens of which one is EOS, completions of 1 to
L tokens) is small enough to list every trajectory tau and its probability pi(tau). Then:

- the true gradient grad J, J(theta) = mean_p sum_tau pi(tau | p) R(p, tau), comes from autograd on
  that finite sum;
- a batch is G i.i.d. completions per prompt; its outcomes are finitely many too, so the expectation
  E[g] and the total variance E||g - E g||^2 of the estimate g = grad_theta(-loss), with the loss
  from lmpg's `compute_advantages` and `policy_gradient_loss`, are finite sums over all joint
  outcomes weighted by their probability (product over samples).

Nothing is sampled: every assertion holds to float64 round-off. The why is CS224R lecture 3:
a baseline that does not depend on the sample's own action leaves the gradient unbiased (E[grad log
pi * b] = b grad sum pi = 0); causality lets an action keep only the rewards after it; importance
sampling with pi_theta / pi_old reuses samples of pi_old.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.autograd.functional import jacobian

from lmpg.advantages import baseline as lmpg_baseline
from lmpg.advantages import compute_advantages, returns
from lmpg.losses import policy_gradient_loss

DT = torch.float64
EXACT = dict(rtol=0.0, atol=1e-10)  # float64 sums of a few thousand terms


def completions(V: int, L: int) -> list[tuple[int, ...]]:
    """Every completion over tokens 0..V-1 (V-1 = EOS) that stops at EOS or after L tokens."""
    eos, out = V - 1, []

    def extend(prefix):
        for a in range(V):
            seq = prefix + (a,)
            if a == eos or len(seq) == L:
                out.append(seq)
            else:
                extend(seq)

    extend(())
    return out


class TabularPolicy:
    """pi(a | p, a_<t) = softmax(theta[p, prefix(a_<t)]), one logit row per (prompt, prefix).

    theta: (P, S, V), P prompts, S prefixes that do not end the completion, V tokens.
    The C completions are padded to (C, L) tensors `tokens`, `mask` (True on counted tokens) and
    `prefix` (row of theta that scored each token).
    """

    def __init__(self, P: int, V: int, L: int, seed: int):
        self.P, self.V, self.L = P, V, L
        self.completions = completions(V, L)
        prefixes = sorted({c[:t] for c in self.completions for t in range(len(c))}, key=lambda s: (len(s), s))
        row = {s: i for i, s in enumerate(prefixes)}
        C = self.C = len(self.completions)
        self.tokens = torch.zeros(C, L, dtype=torch.long)
        self.mask = torch.zeros(C, L, dtype=torch.bool)
        self.prefix = torch.zeros(C, L, dtype=torch.long)
        for c, comp in enumerate(self.completions):
            for t, a in enumerate(comp):
                self.tokens[c, t], self.mask[c, t], self.prefix[c, t] = a, True, row[comp[:t]]
        self.lengths = self.mask.sum(1)  # (C,)
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.randn(P, len(prefixes), V, generator=g, dtype=DT)

    def token_logp(self, theta: torch.Tensor) -> torch.Tensor:
        """log pi(a_t | p, a_<t), (P, C, L), 0 on padding."""
        logits = theta[:, self.prefix]  # (P, C, L, V)
        taken = self.tokens.expand(self.P, -1, -1).unsqueeze(-1)
        logp = torch.log_softmax(logits, -1).gather(-1, taken).squeeze(-1)
        return torch.where(self.mask, logp, torch.zeros((), dtype=DT))

    def seq_logp(self, theta: torch.Tensor) -> torch.Tensor:
        """log pi(tau | p), (P, C)."""
        return self.token_logp(theta).sum(-1)


# V=2 ({0, EOS}), up to 3 tokens: 4 completions of lengths 1, 2, 3, 3.
TINY = TabularPolicy(P=2, V=2, L=3, seed=2)
# V=3, up to 2 tokens: 7 completions; up to 3 tokens: 15 completions (lengths 1-3).
SHORT = TabularPolicy(P=2, V=3, L=2, seed=0)
LONG = TabularPolicy(P=2, V=3, L=3, seed=1)


def sequence_rewards(policy: TabularPolicy, seed: int, offset: float = 0.0) -> torch.Tensor:
    """A fixed R(p, tau) (uniform in [offset, offset + 1)) given at the last token, (P, C, L)."""
    g = torch.Generator().manual_seed(seed)
    R = torch.rand(policy.P, policy.C, generator=g, dtype=DT) + offset
    r = torch.zeros(policy.P, policy.C, policy.L, dtype=DT)
    r[:, torch.arange(policy.C), policy.lengths - 1] = R
    return r


def per_token_rewards(policy: TabularPolicy, seed: int) -> torch.Tensor:
    """A fixed r_t(p, tau) in [-1, 1) at every counted token, (P, C, L)."""
    g = torch.Generator().manual_seed(seed)
    r = 2 * torch.rand(policy.P, policy.C, policy.L, generator=g, dtype=DT) - 1
    return torch.where(policy.mask, r, torch.zeros((), dtype=DT))


def objective(policy, theta, token_rewards, prompts, gamma=1.0):
    """J(theta) = mean_{p in prompts} sum_tau pi(tau | p) sum_t gamma^t r_t(p, tau).

    A batch of G samples for each of its prompts estimates J over those prompts, equally weighted.
    """
    disc = gamma ** torch.arange(policy.L, dtype=DT)
    ret = (token_rewards * disc).sum(-1)  # (P, C)
    p = sorted(set(prompts))
    return (policy.seq_logp(theta).exp() * ret).sum(1)[p].mean()


def true_gradient(policy, token_rewards, prompts, theta=None, gamma=1.0) -> torch.Tensor:
    """grad J by autograd on the enumerated sum, flattened (D,)."""
    theta = (policy.theta if theta is None else theta).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(policy, theta, token_rewards, prompts, gamma), theta)
    return grad.flatten()


def joint_batches(C: int, N: int) -> torch.Tensor:
    """All C^N joint outcomes of a batch of N samples: (K, N) completion indices."""
    return torch.tensor(list(itertools.product(range(C), repeat=N)), dtype=torch.long)


def estimator(policy, prompts, G, token_rewards, *, baseline="none", theta=None, theta_old=None,
              reward_to_go=False, gamma=1.0, adv_weight=None, **loss_kw):
    """Per-outcome gradient estimates g (K, D) = grad_theta(-loss) and outcome probabilities (K,).

    Samples come from pi(theta_old); the loss is evaluated at theta (default theta_old: ratio 1).
    Fast path: the loss is linear in its per-batch pieces, so the K batches are stacked into one
    call with `num_sequences=N` (its loss is sum_k loss_k and d loss / d logp_k = d loss_k / d logp_k),
    then chained with the Jacobian d logp / d theta. `test_fast_path_equals_plain_loop` checks it
    against one autograd pass per batch.
    """
    theta_old = policy.theta if theta_old is None else theta_old
    theta = theta_old if theta is None else theta
    prompts = torch.tensor(prompts)
    N, L = len(prompts), policy.L
    batches = joint_batches(policy.C, N)  # (K, N)
    K = batches.shape[0]
    pid = prompts.expand(K, N)
    prob = policy.seq_logp(theta_old)[pid, batches].sum(1).exp()  # (K,)
    mask = policy.mask[batches]  # (K, N, L)
    rewards = token_rewards[pid, batches]  # (K, N, L)
    adv_kw = dict(reward_to_go=reward_to_go, gamma=gamma)
    if baseline == "batch_mean":
        # The mean of one batch is the group mean of a "group" spanning that batch (checked for every
        # batch with lmpg's `baseline`), so all K batches still go through one stacked call.
        R = returns(rewards.view(K * N, L), mask.view(K * N, L), reward_to_go, gamma)[:, 0].view(K, N)
        b = torch.stack([lmpg_baseline(R[k], G, "batch_mean") for k in range(K)])
        torch.testing.assert_close(b, R.mean(1, keepdim=True).expand(K, N), rtol=0, atol=1e-12)
        G, baseline = N, "group_mean"
    # group baselines only see their own group, never a neighbouring batch
    adv = compute_advantages(rewards.view(K * N, L), mask.view(K * N, L), G, baseline,
                             **adv_kw)[0].view(K, N, L)
    if adv_weight is not None:
        adv = adv * adv_weight
    with torch.no_grad():
        logp_old = policy.token_logp(theta_old)[pid, batches]
        logp = policy.token_logp(theta)[pid, batches].clone()  # equal values when theta is theta_old
    logp.requires_grad_(True)
    if loss_kw.get("loss_agg") == "token_mean":  # normaliser = that batch's own token count
        loss = sum(policy_gradient_loss(logp[k], logp_old[k], adv[k], mask[k], **loss_kw)[0]
                   for k in range(K))
    else:
        loss = policy_gradient_loss(logp.view(K * N, L), logp_old.view(K * N, L), adv.view(K * N, L),
                                    mask.view(K * N, L), num_sequences=N, **loss_kw)[0]
    (w,) = torch.autograd.grad(-loss, logp)  # (K, N, L)
    jac = jacobian(policy.token_logp, theta).reshape(policy.P, policy.C, L, -1)
    g = torch.einsum("knt,kntd->kd", w, jac[pid, batches])  # (K, D)
    return g, prob


def moments(g, prob):
    """E[g] (D,) and the total variance E||g - E g||^2 (trace of the covariance)."""
    mean = prob @ g
    return mean, prob @ ((g - mean) ** 2).sum(1)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


