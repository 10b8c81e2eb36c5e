"""Exact proofs, by enumeration, that lmpg's surrogate loss estimates the policy gradient.

A tabular autoregressive policy (2 prompts, 2 or 3 tokens of which one is EOS, completions of 1 to
L <= 3 tokens) is small enough to list every trajectory tau and its probability pi(tau). Then:

- the true gradient grad J, J(theta) = mean_p sum_tau pi(tau | p) R(p, tau), comes from autograd on
  that finite sum;
- a batch is G i.i.d. completions per prompt; its outcomes are finitely many too, so the expectation
  E[g] and the total variance E||g - E g||^2 of the estimate g = grad_theta(-loss), with the loss
  from lmpg's `returns`, `subtract_baseline` and `policy_gradient_loss`, are finite sums over all joint
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

from lmpg.advantages import WEIGHTED_BASELINES, optimal_baseline, returns, subtract_baseline
from lmpg.advantages import baseline as lmpg_baseline
from lmpg.logprobs import logit_grad_sq_norm
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
        # log-softmax written out (exact enough in float64 at these logit scales): torch.log_softmax's
        # CPU kernel costs ~10 ms a call on tiny tensors when the shared cores are busy
        logp = (logits - logits.exp().sum(-1, keepdim=True).log()).gather(-1, taken).squeeze(-1)
        return torch.where(self.mask, logp, torch.zeros((), dtype=DT))

    def seq_logp(self, theta: torch.Tensor) -> torch.Tensor:
        """log pi(tau | p), (P, C)."""
        return self.token_logp(theta).sum(-1)

    def grad_sq_norm(self, theta: torch.Tensor) -> torch.Tensor:
        """lmpg's logit-gradient proxy ||grad_z log pi(a_t | s_t)||^2 at each token, (P, C, L), 0 on padding."""
        logits = theta[:, self.prefix]  # (P, C, L, V)
        logp_all = logits - logits.exp().sum(-1, keepdim=True).log()
        w = logit_grad_sq_norm(logp_all, self.tokens.expand(self.P, -1, -1))
        return torch.where(self.mask, w, torch.zeros((), dtype=DT))

    def seq_grads(self, theta: torch.Tensor) -> torch.Tensor:
        """g(tau) = grad_theta log pi(tau | p) of every completion, (P, C, D), by autograd."""
        return jacobian(self.seq_logp, theta).reshape(self.P, self.C, -1)


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
    """A fixed r_t = r(p, a_1..a_t) in [-1, 1) at every counted token, (P, C, L).

    r_t depends on the tokens up to and including a_t only: the causality that reward-to-go relies
    on (a reward indexed by the whole completion could depend on later actions)."""
    g = torch.Generator().manual_seed(seed)
    heads = sorted({c[:t + 1] for c in policy.completions for t in range(len(c))}, key=lambda s: (len(s), s))
    table = 2 * torch.rand(policy.P, len(heads), generator=g, dtype=DT) - 1
    row = {h: i for i, h in enumerate(heads)}
    r = torch.zeros(policy.P, policy.C, policy.L, dtype=DT)
    for c, comp in enumerate(policy.completions):
        for t in range(len(comp)):
            r[:, c, t] = table[:, row[comp[:t + 1]]]
    return r


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
              reward_to_go=False, gamma=1.0, adv_weight=None, excluded=None, **loss_kw):
    """Per-outcome gradient estimates g (K, D) = grad_theta(-loss) and outcome probabilities (K,).

    Samples come from pi(theta_old); the loss is evaluated at theta (default theta_old: ratio 1).
    excluded: (C,) bool, completions left out of the baselines and the loss wherever drawn (the
    trainer's `TrajectoryBatch.sample_mask`, e.g. mask_truncated_completions).
    Fast path: every aggregation but token_mean divides by the number of sequences only, so the K
    batches stacked into one call with `num_sequences=N` give sum_k loss_k, whose gradient with
    respect to batch k's logp is that of loss_k; it is chained with the Jacobian d logp / d theta. `test_fast_path_equals_plain_loop` checks it
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
    grad_sq_norm = policy.grad_sq_norm(theta_old)[pid, batches].view(K * N, L) \
        if baseline in WEIGHTED_BASELINES else None
    sample_mask = None if excluded is None else ~excluded[batches].view(K * N)
    ret = returns(rewards.view(K * N, L), mask.view(K * N, L), reward_to_go=reward_to_go, gamma=gamma)
    if baseline == "batch_mean":
        # The mean of one batch is the group mean of a "group" spanning that batch (checked for every
        # batch with lmpg's `baseline`), so all K batches still go through one stacked call.
        R = ret[:, 0].view(K, N)
        b = torch.stack([lmpg_baseline(R[k], G, "batch_mean") for k in range(K)])
        torch.testing.assert_close(b, R.mean(1, keepdim=True).expand(K, N), rtol=0, atol=1e-12)
        G, baseline = N, "group_mean"
    # group baselines only see their own group, never a neighbouring batch
    adv = subtract_baseline(ret, mask.view(K * N, L), group_size=G, kind=baseline, sample_mask=sample_mask,
                            grad_sq_norm=grad_sq_norm)[0].view(K, N, L)
    if sample_mask is not None:  # the loss counts the kept samples' tokens only
        mask = mask & sample_mask.view(K, N, 1)
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


def perturbed(policy, scale, seed=29):
    """theta_old + scale * (fixed standard normal direction)."""
    g = torch.Generator().manual_seed(seed)
    return policy.theta + scale * torch.randn(policy.theta.shape, generator=g, dtype=DT)


def moments(g, prob):
    """E[g] (D,) and the total variance E||g - E g||^2 (trace of the covariance)."""
    mean = prob @ g
    return mean, prob @ ((g - mean) ** 2).sum(1)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# 0. The machinery
# ---------------------------------------------------------------------------------------------

def test_policy_is_a_distribution():
    assert [TINY.C, SHORT.C, LONG.C] == [4, 7, 15]
    assert sorted(LONG.lengths.tolist()) == [1] + [2] * 2 + [3] * 12
    for policy in (TINY, SHORT, LONG):
        torch.testing.assert_close(policy.seq_logp(policy.theta).exp().sum(1), torch.ones(2, dtype=DT))
        _, prob = estimator(policy, [0, 1], 1, sequence_rewards(policy, 0))
        torch.testing.assert_close(prob.sum(), torch.tensor(1.0, dtype=DT))


LOSS_KWS = [
    dict(loss_agg="sequence_sum"),
    dict(loss_agg="token_mean"),
    dict(loss_agg="constant", loss_constant=2.0),
    dict(loss_agg="sequence_mean", clip_eps_low=0.2, clip_eps_high=0.2),
    dict(loss_agg="sequence_sum", ratio_level="sequence"),
    dict(loss_agg="sequence_sum", ratio_level="sequence_mean"),
]


@pytest.mark.parametrize("baseline", ["none", "batch_mean", "group_mean", "leave_one_out"])
def test_fast_path_equals_plain_loop(baseline):
    """The stacked estimator equals one plain autograd pass through theta per batch (every loss
    aggregation and ratio level, theta != theta_old, clipping on in one case)."""
    policy, prompts, G = TINY, [0, 0, 1, 1], 2
    rewards = sequence_rewards(policy, 3)
    theta_old = policy.theta
    theta = perturbed(policy, 0.3)
    p = torch.tensor(prompts)
    batches = list(itertools.product(range(policy.C), repeat=len(prompts)))[::17]  # 16 of 256
    plain = []  # (K, len(LOSS_KWS), D)
    for batch in batches:
        b = torch.tensor(batch)
        mask = policy.mask[b]
        adv, _ = subtract_baseline(returns(rewards[p, b], mask), mask, group_size=G, kind=baseline)
        row = []
        for loss_kw in LOSS_KWS:
            th = theta.clone().requires_grad_(True)
            logp = policy.token_logp(th)[p, b]  # (N, L)
            loss, _ = policy_gradient_loss(logp, policy.token_logp(theta_old)[p, b], adv, mask, **loss_kw)
            row.append(torch.autograd.grad(-loss, th)[0].flatten())
        plain.append(torch.stack(row))
    plain = torch.stack(plain)
    prob_plain = torch.stack([policy.seq_logp(theta_old)[p, torch.tensor(b)].sum().exp() for b in batches])
    for j, loss_kw in enumerate(LOSS_KWS):
        g, prob = estimator(policy, prompts, G, rewards, baseline=baseline, theta=theta, **loss_kw)
        torch.testing.assert_close(g[::17], plain[:, j], **EXACT)
        torch.testing.assert_close(prob[::17], prob_plain, **EXACT)


# ---------------------------------------------------------------------------------------------
# 1. Unbiasedness of every baseline (on-policy, ratio 1, loss_agg="sequence_sum")
# ---------------------------------------------------------------------------------------------

CASES = {
    "2 prompts x G=2, 4 completions of 1-3 tokens": (TINY, [0, 0, 1, 1], 2),  # 4^4 = 256 batches
    "1 prompt x G=3, 7 completions of 1-2 tokens": (SHORT, [1, 1, 1], 3),  # 7^3 = 343 batches
    "1 prompt x G=2, 15 completions of 1-3 tokens": (LONG, [0, 0], 2),  # 15^2 = 225 batches
}


def expected_factor(baseline, N, G):
    """E[g] = factor * grad J. A mean over n samples that includes the sample's own return R_i adds
    -(1/n) E[grad log pi_i R_i]; the other samples are independent of i and E[grad log pi_i] = 0, so
    their returns add nothing: factor 1 - 1/n, whatever the prompts of the other samples."""
    return {"none": 1.0, "leave_one_out": 1.0, "group_mean": (G - 1) / G,
            "batch_mean": (N - 1) / N}[baseline]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("baseline", ["none", "leave_one_out", "group_mean", "batch_mean"])
def test_baselines_bias_is_exactly_known(case, baseline):
    """none and leave_one_out: E[g] = grad J. group_mean: (G-1)/G grad J. batch_mean: (N-1)/N grad J,
    also when the batch mixes prompts with different reward distributions (first case: 3/4)."""
    policy, prompts, G = CASES[case]
    rewards = sequence_rewards(policy, 7)
    grad_J = true_gradient(policy, rewards, prompts)
    assert grad_J.norm() > 0.05  # a non-trivial target
    mean, _ = moments(*estimator(policy, prompts, G, rewards, baseline=baseline, loss_agg="sequence_sum"))
    torch.testing.assert_close(mean, expected_factor(baseline, len(prompts), G) * grad_J, **EXACT)


def test_reward_to_go_is_unbiased_for_undiscounted_return():
    """Causality (gamma = 1): crediting a_t with sum_{t'>=t} r_t' only keeps E[g] = grad E[sum_t r_t],
    alone and under a leave-one-out baseline; group_mean keeps its (G-1)/G."""
    policy = LONG
    rewards = per_token_rewards(policy, 11)
    for prompts, G, baseline, factor in [([0, 1], 1, "none", 1.0), ([0, 0], 2, "leave_one_out", 1.0),
                                         ([1, 1], 2, "group_mean", 0.5)]:
        grad_J = true_gradient(policy, rewards, prompts)
        for reward_to_go in (False, True):
            g, prob = estimator(policy, prompts, G, rewards, baseline=baseline, reward_to_go=reward_to_go,
                                loss_agg="sequence_sum")
            torch.testing.assert_close(moments(g, prob)[0], factor * grad_J, **EXACT)


def test_reward_to_go_needs_causal_rewards():
    """The causality argument needs r_t to depend on a_1..a_t only. A reward attached to token t but
    decided by the whole completion (e.g. a score split over tokens after the fact) breaks it:
    reward-to-go is then biased, while the whole return stays exact."""
    policy, prompts = LONG, [0, 1]
    g = torch.Generator().manual_seed(11)
    rewards = torch.where(policy.mask, torch.rand(policy.P, policy.C, policy.L, generator=g, dtype=DT), 0.0)
    grad_J = true_gradient(policy, rewards, prompts)
    whole, _ = moments(*estimator(policy, prompts, 1, rewards, reward_to_go=False, loss_agg="sequence_sum"))
    torch.testing.assert_close(whole, grad_J, **EXACT)
    rtg, _ = moments(*estimator(policy, prompts, 1, rewards, reward_to_go=True, loss_agg="sequence_sum"))
    assert rel_err(rtg, grad_J) > 0.1  # 0.199 here


def test_discounting_what_lmpg_returns_estimate():
    """gamma < 1. lmpg's `returns`: whole return R = sum_t gamma^t r_t (reward_to_go=False) and
    ret_t = sum_{t'>=t} gamma^(t'-t) r_t' (reward_to_go=True).

    - whole return: E[g] = grad J_gamma, J_gamma = E[sum_t gamma^t r_t], exactly.
    - reward-to-go: grad J_gamma = E[sum_t gamma^t grad log pi_t ret_t]; lmpg (like most
      implementations) drops the gamma^t in front, so its E[g] is not grad J_gamma (nor the gradient
      of any function: Nota & Thomas 2020, "Is the policy gradient a gradient?"). Putting gamma^t back
      (done here in the test, not by lmpg) recovers grad J_gamma exactly.
    """
    policy, gamma = LONG, 0.9
    rewards = per_token_rewards(policy, 13)
    disc = gamma ** torch.arange(policy.L, dtype=DT)
    gaps = []
    for prompts, G, baseline in [([0, 1], 1, "none"), ([0, 0], 2, "leave_one_out")]:
        grad_J = true_gradient(policy, rewards, prompts, gamma=gamma)
        kw = dict(baseline=baseline, gamma=gamma, loss_agg="sequence_sum")
        whole, _ = moments(*estimator(policy, prompts, G, rewards, reward_to_go=False, **kw))
        torch.testing.assert_close(whole, grad_J, **EXACT)
        rtg, _ = moments(*estimator(policy, prompts, G, rewards, reward_to_go=True, **kw))
        gaps.append(rel_err(rtg, grad_J))
        weighted, _ = moments(*estimator(policy, prompts, G, rewards, reward_to_go=True, adv_weight=disc, **kw))
        torch.testing.assert_close(weighted, grad_J, **EXACT)
    assert min(gaps) > 0.02, gaps  # 0.051 (none), 0.032 (leave_one_out) here


def test_loss_aggregation_and_bias():
    """sequence_sum is the textbook estimator (unbiased); constant is unbiased up to 1/loss_constant;
    token_mean and sequence_mean divide by the random completion lengths, which depend on the
    actions, so their E[g] is not a multiple of grad J when lengths vary."""
    policy, prompts, G = LONG, [0, 0], 2
    rewards = sequence_rewards(policy, 17)
    grad_J = true_gradient(policy, rewards, prompts)

    def mean(**kw):
        return moments(*estimator(policy, prompts, G, rewards, baseline="leave_one_out", **kw))[0]

    torch.testing.assert_close(mean(loss_agg="sequence_sum"), grad_J, **EXACT)
    torch.testing.assert_close(mean(loss_agg="constant", loss_constant=3.0), grad_J / 3.0, **EXACT)
    gaps = {}
    for agg in ("token_mean", "sequence_mean"):
        m = mean(loss_agg=agg)
        c = float(m @ grad_J / (grad_J @ grad_J))  # best scalar multiple of grad J
        gaps[agg] = rel_err(m, c * grad_J)
    assert min(gaps.values()) > 0.05, gaps  # 0.138 (token_mean), 0.398 (sequence_mean) here


# ---------------------------------------------------------------------------------------------
# 2. Variance reduction
# ---------------------------------------------------------------------------------------------

def total_variances(policy, prompts, G, rewards, baselines):
    return {b: float(moments(*estimator(policy, prompts, G, rewards, baseline=b, loss_agg="sequence_sum"))[1])
            for b in baselines}


def test_baselines_reduce_variance_with_reward_offset():
    """R + 10: without a baseline every sample pushes up its own likelihood by ~10 and the estimate
    is mostly noise. Exact total variance, 2 prompts x G=2."""
    policy, prompts, G = TINY, [0, 0, 1, 1], 2
    rewards = sequence_rewards(policy, 19, offset=10.0)
    var = total_variances(policy, prompts, G, rewards, ("none", "batch_mean", "group_mean", "leave_one_out"))
    for b in ("batch_mean", "group_mean", "leave_one_out"):
        assert var[b] < var["none"] / 100, var  # 24.7 vs 0.0117, 0.0081, 0.0323
    # per batch, R_i - group mean = (G-1)/G (R_i - leave-one-out mean): group_mean is RLOO scaled
    assert var["group_mean"] == pytest.approx(((G - 1) / G) ** 2 * var["leave_one_out"], rel=1e-12)


def test_group_baseline_beats_batch_baseline_when_prompts_differ():
    """Prompt 0 pays ~ +10, prompt 1 ~ -10: one batch mean cannot centre both (it hardly helps),
    a group mean can."""
    policy, prompts, G = TINY, [0, 0, 1, 1], 2
    offset = torch.tensor([10.0, -10.0], dtype=DT).view(2, 1, 1)
    rewards = sequence_rewards(policy, 23) + offset * (sequence_rewards(policy, 23) != 0)
    var = total_variances(policy, prompts, G, rewards, ("none", "batch_mean", "leave_one_out"))
    assert 0.9 * var["none"] < var["batch_mean"] < var["none"], var  # 21.45 -> 21.40
    assert var["leave_one_out"] < var["batch_mean"] / 1000, var  # 0.0111


# ---------------------------------------------------------------------------------------------
# 3. Off-policy reuse: samples from pi_old, loss evaluated at theta != theta_old
# ---------------------------------------------------------------------------------------------

def off_policy_mean(policy, prompts, G, rewards, theta, ratio_level, baseline="none"):
    return moments(*estimator(policy, prompts, G, rewards, baseline=baseline, theta=theta,
                              ratio_level=ratio_level, loss_agg="sequence_sum"))[0]


def test_sequence_ratio_is_exact_off_policy():
    """E_old[pi_theta(tau)/pi_old(tau) grad log pi_theta(tau) A] = grad J(theta), with no baseline and
    with a leave-one-out baseline (independent of the sample, E_old[r grad log pi_theta] = 0)."""
    policy = LONG
    rewards = sequence_rewards(policy, 31)
    theta = perturbed(policy, 0.5)
    for prompts, G, baseline in [([0, 1], 1, "none"), ([1, 1], 2, "leave_one_out")]:
        grad_J = true_gradient(policy, rewards, prompts, theta=theta)
        assert rel_err(true_gradient(policy, rewards, prompts), grad_J) > 0.1  # theta is elsewhere
        mean = off_policy_mean(policy, prompts, G, rewards, theta, "sequence", baseline)
        torch.testing.assert_close(mean, grad_J, **EXACT)


def test_token_ratio_is_an_approximation_that_vanishes_at_theta_old():
    """The token ratio pi_theta(a_t|s_t)/pi_old(a_t|s_t) treats p_theta(s_t)/p_old(s_t) as 1: its E[g]
    misses grad J(theta) by O(|theta - theta_old|) (numbers in the report); exact at theta_old."""
    policy, prompts = LONG, [0, 1]
    rewards = sequence_rewards(policy, 31)
    errs = []
    for scale in (0.5, 0.05, 0.005):
        theta = perturbed(policy, scale)
        grad_J = true_gradient(policy, rewards, prompts, theta=theta)
        token = off_policy_mean(policy, prompts, 1, rewards, theta, "token")
        sequence = off_policy_mean(policy, prompts, 1, rewards, theta, "sequence")
        torch.testing.assert_close(sequence, grad_J, **EXACT)
        errs.append(rel_err(token, grad_J))
    # 0.213, 0.0205, 0.00204: first order in the step, ~0.4 * scale
    assert errs[0] > 0.1, errs
    assert 8 < errs[0] / errs[1] < 12 and 8 < errs[1] / errs[2] < 12, errs
    token = off_policy_mean(policy, prompts, 1, rewards, policy.theta, "token")
    torch.testing.assert_close(token, true_gradient(policy, rewards, prompts), **EXACT)


def test_sequence_mean_ratio_is_length_normalised():
    """GSPO's r_i = exp(mean_t log ratio): its gradient is r_i mean_t grad logp_t A_i. On-policy that
    is exactly E[grad log pi(tau) R / |tau|], not grad J (lengths differ); off-policy it is not
    grad J(theta) either."""
    policy, prompts = LONG, [0, 1]
    rewards = sequence_rewards(policy, 31)
    # on-policy reference: grad of mean_p sum_tau pi(tau).detach() R(tau) log pi(tau) / |tau|
    theta = policy.theta.clone().requires_grad_(True)
    pi = policy.seq_logp(policy.theta).exp()
    surrogate = (pi * rewards.sum(-1) * policy.seq_logp(theta) / policy.lengths).sum(1).mean()
    (reference,) = torch.autograd.grad(surrogate, theta)
    on_policy = off_policy_mean(policy, prompts, 1, rewards, policy.theta, "sequence_mean")
    torch.testing.assert_close(on_policy, reference.flatten(), **EXACT)
    gap_on = rel_err(on_policy, true_gradient(policy, rewards, prompts))
    theta = perturbed(policy, 0.5)
    off = off_policy_mean(policy, prompts, 1, rewards, theta, "sequence_mean")
    gap_off = rel_err(off, true_gradient(policy, rewards, prompts, theta=theta))
    assert min(gap_on, gap_off) > 0.1, (gap_on, gap_off)  # 0.78 on-policy, 0.70 at scale 0.5 here


# ---------------------------------------------------------------------------------------------
# 4. The optimal baseline b* = E[||g||^2 R] / E[||g||^2] (CS224R lecture 3), g = grad log p(tau)
# ---------------------------------------------------------------------------------------------

def test_logit_proxy_is_the_exact_squared_gradient_norm_of_a_tabular_policy():
    """Free logits per state: sum_t (1 - 2 pi(a_t|s_t) + sum_v pi(v|s_t)^2) = ||grad_theta log p(tau)||^2
    for every trajectory, and each term is ||grad_theta log pi(a_t|s_t)||^2 (the per-token weight)."""
    for policy in (TINY, SHORT, LONG):
        w_tok = policy.grad_sq_norm(policy.theta)  # (P, C, L)
        exact = (policy.seq_grads(policy.theta) ** 2).sum(-1)  # (P, C)
        torch.testing.assert_close(w_tok.sum(-1), exact, **EXACT)
        tok_grads = jacobian(policy.token_logp, policy.theta).flatten(3)  # (P, C, L, D)
        torch.testing.assert_close(w_tok, (tok_grads ** 2).sum(-1), **EXACT)


def constant_baseline_variance(policy, p, R, b):
    """Total variance E||g(tau) (R(tau) - b) - grad J||^2 of the one-sample estimator, for each b in b (n,)."""
    pi = policy.seq_logp(policy.theta)[p].exp()  # (C,)
    g = policy.seq_grads(policy.theta)[p]  # (C, D)
    est = g.unsqueeze(0) * (R.unsqueeze(0) - b.view(-1, 1)).unsqueeze(-1)  # (n, C, D)
    grad_J = pi @ (g * R.unsqueeze(1))
    return ((est - grad_J) ** 2).sum(-1) @ pi  # (n,)


def optimal_constant(policy, p, R):
    """(b*, E[R]) for prompt p, from the proxy weights."""
    pi = policy.seq_logp(policy.theta)[p].exp()
    w = policy.grad_sq_norm(policy.theta)[p].sum(-1)
    return float((pi * w * R).sum() / (pi * w).sum()), float(pi @ R)


@pytest.mark.parametrize("policy", [TINY, SHORT, LONG], ids=["tiny", "short", "long"])
def test_optimal_constant_baseline_minimises_the_variance(policy):
    """Var(b) = Var(0) - 2 b E[||g||^2 R] + b^2 E[||g||^2] (closed form, checked at every grid point);
    its minimum over a grid of 401 constants sits at b* and no grid point beats b*; b* is not E[R]."""
    for p in range(policy.P):
        R = sequence_rewards(policy, 37)[p].sum(-1)  # (C,)
        b_star, mean_R = optimal_constant(policy, p, R)
        pi = policy.seq_logp(policy.theta)[p].exp()
        w = policy.grad_sq_norm(policy.theta)[p].sum(-1)
        grid = torch.linspace(-1.0, 2.0, 401, dtype=DT)
        var = constant_baseline_variance(policy, p, R, grid)
        var_0 = constant_baseline_variance(policy, p, R, torch.zeros(1, dtype=DT))
        closed = var_0 - 2 * grid * (pi @ (w * R)) + grid ** 2 * (pi @ w)
        torch.testing.assert_close(var, closed, **EXACT)
        at_star, at_mean = constant_baseline_variance(policy, p, R, torch.tensor([b_star, mean_R], dtype=DT))
        assert abs(float(grid[var.argmin()]) - b_star) <= float(grid[1] - grid[0]) / 2
        assert at_star <= var.min() + 1e-14
        assert at_star < at_mean and abs(b_star - mean_R) > 1e-3, (b_star, mean_R)


# One prompt, V=2, completions (EOS), (0, EOS), (0, 0, EOS), (0, 0, 0): pi = 0.030, 0.022, 0.810, 0.138,
# so the weights ||g||^2 = 2.16, 2.47, 0.045, 1.49 differ 55-fold; the reward R = w / max w moves with
# them, which puts b* = 0.651 far from E[R] = 0.146.
SKEWED = TabularPolicy(P=1, V=2, L=3, seed=0)


def group_estimates(policy, G, R, baseline_fn):
    """g (K, D) = (1/G) sum_i g(tau_i) (R_i - b_i) for every outcome of G samples of prompt 0, and
    its probability (K,). baseline_fn((K, G) returns, (K, G) weights) -> (K, G) baselines."""
    batches = joint_batches(policy.C, G)  # (K, G)
    prob = policy.seq_logp(policy.theta)[0][batches].sum(1).exp()
    w = policy.grad_sq_norm(policy.theta)[0].sum(-1)  # (C,)
    Rb = R[batches]
    b = baseline_fn(Rb, w[batches])
    g = torch.einsum("kg,kgd->kd", Rb - b, policy.seq_grads(policy.theta)[0][batches]) / G
    return g, prob


def skewed_case():
    w = SKEWED.grad_sq_norm(SKEWED.theta)[0].sum(-1)
    return w / w.max()


def per_group(kind):
    def fn(Rb, wb):
        K, G = Rb.shape
        if kind == "optimal":
            return optimal_baseline(Rb.reshape(-1), wb.reshape(-1), G).view(K, G)
        if kind == "optimal_including":
            return optimal_baseline(Rb.reshape(-1), wb.reshape(-1), G, leave_one_out=False).view(K, G)
        return lmpg_baseline(Rb.reshape(-1), G, kind).view(K, G)
    return fn


def test_leave_one_out_optimal_baseline_is_exactly_unbiased():
    """E[g] = grad J for baseline=optimal through lmpg's subtract_baseline (every CASE), and for the
    direct G-sample form at G = 2, 4, 8."""
    for policy, prompts, G in CASES.values():
        rewards = sequence_rewards(policy, 7)
        mean, _ = moments(*estimator(policy, prompts, G, rewards, baseline="optimal", loss_agg="sequence_sum"))
        torch.testing.assert_close(mean, true_gradient(policy, rewards, prompts), **EXACT)
    R = skewed_case()
    grad_J = SKEWED.seq_logp(SKEWED.theta)[0].exp() @ (SKEWED.seq_grads(SKEWED.theta)[0] * R.unsqueeze(1))
    for G in (2, 4, 8):
        mean, _ = moments(*group_estimates(SKEWED, G, R, per_group("optimal")))
        torch.testing.assert_close(mean, grad_J, **EXACT)


def test_including_form_has_no_exact_bias_factor():
    """verl's b_i = sum_j w_j R_j / sum_j w_j (sample i included): E[g] is not a multiple of grad J
    (group_mean, its equal-weight case, is exactly (G-1)/G grad J)."""
    R = skewed_case()
    grad_J = SKEWED.seq_logp(SKEWED.theta)[0].exp() @ (SKEWED.seq_grads(SKEWED.theta)[0] * R.unsqueeze(1))
    gaps = []
    for G in (2, 4, 8):
        torch.testing.assert_close(moments(*group_estimates(SKEWED, G, R, per_group("group_mean")))[0],
                                   (G - 1) / G * grad_J, **EXACT)
        mean = moments(*group_estimates(SKEWED, G, R, per_group("optimal_including")))[0]
        c = float(mean @ grad_J / (grad_J @ grad_J))
        gaps.append(rel_err(mean, c * grad_J))
    assert gaps == pytest.approx([0.1209, 0.1095, 0.0896], abs=1e-4), gaps  # 12%, 11%, 9% off any multiple


def test_optimal_baseline_variance_beside_b_star_and_leave_one_out_mean():
    """Exact total variance of the G-sample estimator on SKEWED (weights 55-fold apart), a finding:

        G    b* (oracle)   E[R] (oracle)   optimal (LOO, w)   leave_one_out (RLOO)
        2    0.006584      0.052625        0.071819           0.071819    (one other sample: identical)
        4    0.003292      0.026313        0.028673           0.029511
        8    0.001646      0.013156        0.008708           0.013842

    The oracle b* beats the oracle mean reward 8-fold, as the lecture says it should; estimated from
    the G-1 other samples, the weighted mean gains 3% over RLOO at G = 4 and 37% at G = 8, still 5x
    above the oracle b*: most of its variance is the noise of the estimated baseline itself.
    """
    R = skewed_case()
    b_star, mean_R = optimal_constant(SKEWED, 0, R)
    assert (b_star, mean_R) == pytest.approx((0.6512, 0.1458), abs=1e-4)
    table = {}
    for G in (2, 4, 8):
        table[G] = [float(moments(*group_estimates(SKEWED, G, R, fn))[1]) for fn in (
            lambda Rb, wb: torch.full_like(Rb, b_star), lambda Rb, wb: torch.full_like(Rb, mean_R),
            per_group("optimal"), per_group("leave_one_out"))]
    expected = {2: [0.006584, 0.052625, 0.071819, 0.071819], 4: [0.003292, 0.026313, 0.028673, 0.029511],
                8: [0.001646, 0.013156, 0.008708, 0.013842]}
    for G in table:
        assert table[G] == pytest.approx(expected[G], abs=2e-6), (G, table[G])
    # the direct form is lmpg's returns, subtract_baseline and loss: same variance through the estimator
    for kind in ("optimal", "leave_one_out"):
        _, var = moments(*estimator(SKEWED, [0, 0, 0, 0], 4, sequence_rewards_from(SKEWED, R),
                                    baseline=kind, loss_agg="sequence_sum"))
        assert float(var) == pytest.approx(table[4][2 if kind == "optimal" else 3], rel=1e-9)


def sequence_rewards_from(policy, R):
    """R (C,) placed at each completion's last token, (1, C, L)."""
    r = torch.zeros(1, policy.C, policy.L, dtype=DT)
    r[0, torch.arange(policy.C), policy.lengths - 1] = R
    return r


def token_baseline_variance(policy, p, ret, b):
    """E||sum_t g_t (ret_t - b_t) - E[.]||^2 of the one-sample reward-to-go estimator, b: (n, L)."""
    pi = policy.seq_logp(policy.theta)[p].exp()  # (C,)
    g_tok = jacobian(policy.token_logp, policy.theta).flatten(3)[p]  # (C, L, D)
    adv = torch.where(policy.mask, ret.unsqueeze(0) - b.unsqueeze(1), torch.zeros((), dtype=DT))  # (n, C, L)
    est = torch.einsum("ncl,cld->ncd", adv, g_tok)
    mean = torch.einsum("c,ncd->nd", pi, est)
    return ((est - mean.unsqueeze(1)) ** 2).sum(-1) @ pi  # (n,)


def test_optimal_token_baseline_minimises_the_reward_to_go_variance():
    """Per-token rewards, reward-to-go: b*_t = E[||g_t||^2 ret_t] / E[||g_t||^2] is a stationary point
    (every +-0.01 step along every position raises the variance) and beats the sequence-level b*
    subtracted from every token; the leave-one-out estimate keeps E[g] = grad J exactly."""
    policy, p = LONG, 0
    rewards = per_token_rewards(policy, 11)
    ret = returns(rewards[p], policy.mask, reward_to_go=True)  # (C, L)
    pi = policy.seq_logp(policy.theta)[p].exp()
    w = policy.grad_sq_norm(policy.theta)[p]  # (C, L)
    b_tok = (pi @ (w * ret)) / (pi @ w)  # (L,)
    steps = torch.cat([torch.zeros(1, policy.L, dtype=DT), 0.01 * torch.eye(policy.L, dtype=DT),
                       -0.01 * torch.eye(policy.L, dtype=DT)])
    var = token_baseline_variance(policy, p, ret, b_tok + steps)
    assert bool((var[1:] > var[0]).all()), var
    b_seq = (pi @ (w.sum(1) * ret[:, 0])) / (pi @ w.sum(1))
    seq_var = token_baseline_variance(policy, p, ret, b_seq.expand(1, policy.L))
    assert float(var[0]) < float(seq_var[0]), (var[0], seq_var)
    for prompts, G in (([0, 0], 2), ([1, 1, 1], 3)):
        pol = LONG if G == 2 else SHORT
        r = per_token_rewards(pol, 11)
        mean, _ = moments(*estimator(pol, prompts, G, r, baseline="optimal_token", reward_to_go=True,
                                     loss_agg="sequence_sum"))
        torch.testing.assert_close(mean, true_gradient(pol, r, prompts), **EXACT)


# ---------------------------------------------------------------------------------------------
# 5. TRL 1.16's loss types and options (issue 22), at ratio 1
# ---------------------------------------------------------------------------------------------

OBJECTIVES = {"ppo_clip": dict(clip_eps_low=0.2, clip_eps_high=0.28), "ppo_clip+delta": dict(clip_delta=1.5),
              "cispo": dict(pg_objective="cispo", cispo_weight_max=5.0), "sapo": dict(pg_objective="sapo"),
              "vespo": dict(pg_objective="vespo")}


def ratio_one_case():
    policy, prompts, G = LONG, [0, 0], 2  # 225 batches of 15 completions of 1-3 tokens
    rewards = sequence_rewards(policy, 17)
    return policy, prompts, G, rewards, true_gradient(policy, rewards, prompts)


def gap_to_best_multiple(m, grad_J):
    """(relative distance of m from its best multiple c grad J, c)."""
    c = float(m @ grad_J / (grad_J @ grad_J))
    return rel_err(m, c * grad_J), c


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_is_unbiased_at_ratio_one_and_trls_aggregations_set_the_bias(objective):
    """At theta = theta_old every objective's gradient is A grad log pi (cispo's weight min(1, w_max) = 1,
    sapo's gate slope 4 s (1 - s) = 1, vespo's phi(1) = 1): with sequence_sum and a leave-one-out
    baseline E[g] = grad J exactly. Under the aggregation TRL gives the loss type, E[g] is that of PPO's
    clipped objective with the same aggregation exactly, so the bias is the aggregation's:
    token_mean (dapo, bnpo, cispo, vespo) 0.138 from any multiple of grad J, sequence_mean (grpo, sapo)
    0.398, constant (dr_grpo) grad J / C."""
    policy, prompts, G, rewards, grad_J = ratio_one_case()

    def mean(**kw):
        return moments(*estimator(policy, prompts, G, rewards, baseline="leave_one_out", **kw))[0]

    kw = OBJECTIVES[objective]
    torch.testing.assert_close(mean(loss_agg="sequence_sum", **kw), grad_J, **EXACT)
    for agg, gap in (("token_mean", 0.138), ("sequence_mean", 0.398)):
        m = mean(loss_agg=agg, **kw)
        torch.testing.assert_close(m, mean(loss_agg=agg), **EXACT)
        assert gap_to_best_multiple(m, grad_J)[0] == pytest.approx(gap, abs=5e-4)
    torch.testing.assert_close(mean(loss_agg="constant", loss_constant=3.0, **kw), grad_J / 3.0, **EXACT)


def test_luspo_is_unbiased_at_ratio_one_and_trls_sequence_level_keeps_each_aggregations_bias():
    """LUSPO (GSPO's ratio, each sequence's loss weighed by its length, sequence_sum): E[g] = grad J
    exactly, where GSPO (the same ratio averaged over sequences) is 0.398 off. At ratio 1 TRL's
    sequence level with length weighting equals its token level: dapo's token_mean keeps its 0.138,
    dr_grpo's constant its exact grad J / C."""
    policy, prompts, G, rewards, grad_J = ratio_one_case()

    def mean(**kw):
        return moments(*estimator(policy, prompts, G, rewards, baseline="leave_one_out", ratio_level="sequence_mean",
                                  **kw))[0]

    torch.testing.assert_close(mean(sequence_loss_weight="length", loss_agg="sequence_sum"), grad_J, **EXACT)
    assert gap_to_best_multiple(mean(loss_agg="sequence_mean"), grad_J)[0] == pytest.approx(0.398, abs=5e-4)
    dapo = mean(sequence_loss_weight="length", loss_agg="token_mean")
    assert gap_to_best_multiple(dapo, grad_J)[0] == pytest.approx(0.138, abs=5e-4)
    torch.testing.assert_close(mean(sequence_loss_weight="length", loss_agg="constant", loss_constant=3.0),
                               grad_J / 3.0, **EXACT)


def tabular_entropy(policy, theta):
    """H(pi(. | p, prefix)) at every token, (P, C, L), 0 on padding."""
    logits = theta[:, policy.prefix]  # (P, C, L, V)
    logp = logits - logits.exp().sum(-1, keepdim=True).log()
    return torch.where(policy.mask, -(logp.exp() * logp).sum(-1), torch.zeros((), dtype=DT))


def test_top_entropy_quantile_drops_gradient_terms_and_is_biased():
    """The high-entropy mask (each batch's quantile, as lmpg.entropy takes it per micro-batch) keeps
    the policy term of the top rho of the batch's tokens. rho = 1 keeps every token: E[g] = grad J.
    rho = 0.5: E[g] is 0.455 from any multiple of grad J (cosine 0.910); rho = 0.2: 0.864 (cosine
    0.757), here. The estimator is biased towards the high-entropy tokens' share of the gradient, by design."""
    from lmpg.entropy import high_entropy_threshold

    policy, prompts, G, rewards, grad_J = ratio_one_case()
    N, L = len(prompts), policy.L
    batches = joint_batches(policy.C, N)
    K = batches.shape[0]
    entropy = tabular_entropy(policy, policy.theta)[torch.tensor(prompts).expand(K, N), batches]  # (K, N, L)
    mask = policy.mask[batches]
    figures = {}
    for rho in (1.0, 0.5, 0.2):
        keep = torch.zeros_like(mask)
        for k in range(K):
            threshold, _ = high_entropy_threshold(entropy[k][mask[k]], rho)
            keep[k] = (entropy[k] >= threshold) & mask[k]
        m = moments(*estimator(policy, prompts, G, rewards, baseline="leave_one_out", loss_agg="sequence_sum",
                               policy_token_mask=keep.view(K * N, L)))[0]
        figures[rho] = (gap_to_best_multiple(m, grad_J)[0], float(m @ grad_J / (m.norm() * grad_J.norm())))
    assert figures[1.0][0] < 1e-12
    assert figures[0.5] == pytest.approx((0.455, 0.910), abs=1e-3)
    assert figures[0.2] == pytest.approx((0.864, 0.757), abs=1e-3)


def test_mask_truncated_completions_estimates_the_objective_that_scores_a_cut_completion_zero():
    """Completions cut at L = 3 tokens without EOS (8 of 15 here, probability 0.34) left out of the
    baselines and the loss. With no baseline E[g] = grad J' exactly, J' the objective in which a cut
    completion's reward is 0 (1.12 from grad J); with a leave-one-out baseline over the kept samples
    it is neither (0.65 from any multiple of grad J)."""
    policy, prompts, G, rewards, grad_J = ratio_one_case()
    cut = torch.tensor([len(c) == policy.L and c[-1] != policy.V - 1 for c in policy.completions])
    assert int(cut.sum()) == 8
    zeroed = torch.where(cut.view(1, -1, 1), torch.zeros_like(rewards), rewards)
    grad_J0 = true_gradient(policy, zeroed, prompts)
    plain = moments(*estimator(policy, prompts, G, rewards, excluded=cut, loss_agg="sequence_sum"))[0]
    torch.testing.assert_close(plain, grad_J0, **EXACT)
    assert rel_err(plain, grad_J) == pytest.approx(1.125, abs=1e-3)
    loo = moments(*estimator(policy, prompts, G, rewards, baseline="leave_one_out", excluded=cut,
                             loss_agg="sequence_sum"))[0]
    assert gap_to_best_multiple(loo, grad_J)[0] == pytest.approx(0.650, abs=1e-3)
    assert gap_to_best_multiple(loo, grad_J0)[0] > 0.1


def test_kl_gradients_the_ratio_weighting_makes():
    """The KL term alone (A = 0, kl_coef 1, sequence_sum), one sample of one prompt, theta = theta_old,
    pi_ref elsewhere; exact expectations over the 15 completions (lmpg.kl's docstring):
    - plain k3: E[g] = sum_t E_{s_t}[grad KL(pi_ref || pi_theta)(s_t)], the forward KL's gradient per
      visited state;
    - kl_ratio_weighted at token level (TRL's use_bias_correction_kl): the reverse KL's per state,
      state distribution held fixed; 0.19 from grad KL(pi_theta(tau) || pi_ref(tau)) here (plain: 0.22);
    - weighted by the sequence ratio (ratio_level sequence): grad KL(pi_theta(tau) || pi_ref(tau))
      exactly; by the sequence_mean ratio, 0.17 from it."""
    from lmpg.update import surrogate_loss

    policy, p = LONG, 0
    C, L = policy.C, policy.L
    theta_ref = perturbed(policy, 0.7, seed=5)
    prob = policy.seq_logp(policy.theta)[p].exp()  # (C,)
    jac = jacobian(policy.token_logp, policy.theta).reshape(policy.P, C, L, -1)[p]  # (C, L, D)

    def expected_kl_gradient(**kw):
        logp_old = policy.token_logp(policy.theta)[p]
        logp = logp_old.clone().requires_grad_(True)
        loss, _ = surrogate_loss(logp, logp_old, torch.zeros(C, L, dtype=DT), policy.mask,
                                 logp_ref=policy.token_logp(theta_ref)[p], kl_coef=1.0, loss_agg="sequence_sum",
                                 num_sequences=1.0, **kw)  # one sample per row: sum_k loss_k
        (w,) = torch.autograd.grad(loss, logp)
        return prob @ torch.einsum("ct,ctd->cd", w, jac)

    def per_state(reverse):
        theta = policy.theta.clone().requires_grad_(True)
        z, z_ref = theta[p][policy.prefix], theta_ref[p][policy.prefix]  # (C, L, V)
        logp, logp_ref = z.log_softmax(-1), z_ref.log_softmax(-1)
        kl = (logp.exp() * (logp - logp_ref)).sum(-1) if reverse else (logp_ref.exp() * (logp_ref - logp)).sum(-1)
        (grad,) = torch.autograd.grad(prob @ torch.where(policy.mask, kl, 0.0).sum(1), theta)
        return grad.flatten()

    theta = policy.theta.clone().requires_grad_(True)
    seq_logp, seq_logp_ref = policy.seq_logp(theta)[p], policy.seq_logp(theta_ref)[p]
    (sequence_kl,) = torch.autograd.grad((seq_logp.exp() * (seq_logp - seq_logp_ref)).sum(), theta)
    sequence_kl = sequence_kl.flatten()
    plain, weighted = expected_kl_gradient(), expected_kl_gradient(kl_ratio_weighted=True)
    torch.testing.assert_close(plain, per_state(reverse=False), **EXACT)
    torch.testing.assert_close(weighted, per_state(reverse=True), **EXACT)
    assert (rel_err(weighted, sequence_kl), rel_err(plain, sequence_kl)) == pytest.approx((0.190, 0.221), abs=1e-3)
    torch.testing.assert_close(expected_kl_gradient(kl_ratio_weighted=True, ratio_level="sequence"), sequence_kl,
                               **EXACT)
    gspo = expected_kl_gradient(kl_ratio_weighted=True, ratio_level="sequence_mean")
    assert rel_err(gspo, sequence_kl) == pytest.approx(0.174, abs=1e-3)
