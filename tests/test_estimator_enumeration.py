"""Exact proofs, by enumeration, that lmpg's surrogate loss estimates the policy gradient.

A tabular autoregressive policy (2 prompts, 2 or 3 tokens of which one is EOS, completions of 1 to
L <= 3 tokens) is small enough to list every trajectory tau and its probability pi(tau). Then:

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
        # log-softmax written out (exact enough in float64 at these logit scales): torch.log_softmax's
        # CPU kernel costs ~10 ms a call on tiny tensors when the shared cores are busy
        logp = (logits - logits.exp().sum(-1, keepdim=True).log()).gather(-1, taken).squeeze(-1)
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
              reward_to_go=False, gamma=1.0, adv_weight=None, **loss_kw):
    """Per-outcome gradient estimates g (K, D) = grad_theta(-loss) and outcome probabilities (K,).

    Samples come from pi(theta_old); the loss is evaluated at theta (default theta_old: ratio 1).
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
        adv, _ = compute_advantages(rewards[p, b], mask, G, baseline)
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
