"""Exact proof, by enumeration, that lmpg's surrogate loss over multi-turn episodes estimates grad J.

The MDP (lmpg.episodes): a tabular softmax policy over tokens {0, 1} and a stochastic two-turn
environment. An episode of prompt p is

    a1 ~ pi_theta(. | p)              the policy's first turn (one token)
    o  ~ P(. | p, a1)                 the environment's answer (one token, fixed random table)
    a2 ~ pi_theta(. | p, a1, o)       the policy's second turn

with a reward r1(p, a1) after turn 1 and r2(p, a1, o, a2) after turn 2, each on the last token of
its turn. The completion is [a1, o, a2], `action_mask` = [1, 0, 1], `turn_ids` = [0, 0, 1].
Like a language model, the policy has a logit row at every position, the environment's too
(theta[p, a1] predicts o), so "putting the environment's tokens in the loss" is a real option; its
term grad log pi_theta(o | p, a1) has no place in grad log p_theta(tau), whose dynamics factor
P(o | p, a1) does not depend on theta.

J(theta) = mean_p sum_tau pi(a1|p) P(o|p,a1) pi(a2|p,a1,o) (r1 + gamma r2), differentiated by
autograd on the finite sum; the estimate's expectation over all C^N joint batches (C = 8 episodes
per prompt) is a finite sum too. Nothing is sampled.
"""

from __future__ import annotations

import itertools

import torch
from torch.autograd.functional import jacobian

from lmpg.advantages import returns, subtract_baseline
from lmpg.losses import policy_gradient_loss

DT = torch.float64
EXACT = dict(rtol=0.0, atol=1e-10)
P, V = 2, 2  # prompts, tokens


class TwoTurnMDP:
    """Every episode [a1, o, a2] of each prompt, the policy's logit rows and the dynamics table."""

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.episodes = list(itertools.product(range(V), repeat=3))  # (a1, o, a2), C = 8
        # logit rows: prefix () -> a1, (a1,) -> o (the LM's row at the environment's token), (a1, o) -> a2
        prefixes = [()] + [(a,) for a in range(V)] + list(itertools.product(range(V), repeat=2))
        row = {s: i for i, s in enumerate(prefixes)}
        C = self.C = len(self.episodes)
        self.tokens = torch.tensor(self.episodes)  # (C, 3)
        self.prefix = torch.tensor([[row[e[:t]] for t in range(3)] for e in self.episodes])  # (C, 3)
        self.theta = torch.randn(P, len(prefixes), V, generator=g, dtype=DT)
        dyn = torch.rand(P, V, V, generator=g, dtype=DT) + 0.2  # P(o | p, a1)
        self.dynamics = dyn / dyn.sum(-1, keepdim=True)
        r1 = torch.rand(P, V, generator=g, dtype=DT)  # r1(p, a1)
        r2 = 2 * torch.rand(P, V, V, V, generator=g, dtype=DT) - 1  # r2(p, a1, o, a2)
        self.token_rewards = torch.zeros(P, C, 3, dtype=DT)
        for c, (a1, o, a2) in enumerate(self.episodes):
            self.token_rewards[:, c, 0] = r1[:, a1]  # last (only) token of turn 1
            self.token_rewards[:, c, 2] = r2[:, a1, o, a2]  # last token of turn 2
        self.log_dynamics = torch.stack([self.dynamics[:, a1, o].log() for a1, o, _ in self.episodes], 1)  # (P, C)
        self.action_mask = torch.tensor([True, False, True]).expand(C, 3)
        self.completion_mask = torch.ones(C, 3, dtype=torch.bool)
        self.turn_ids = torch.tensor([0, 0, 1]).expand(C, 3)

    def token_logp(self, theta: torch.Tensor) -> torch.Tensor:
        """log pi_theta(x_t | prefix) at every position, the environment's included, (P, C, 3)."""
        logits = theta[:, self.prefix]  # (P, C, 3, V)
        logp = logits - logits.exp().sum(-1, keepdim=True).log()
        return logp.gather(-1, self.tokens.expand(P, -1, -1).unsqueeze(-1)).squeeze(-1)

    def episode_logp(self, theta: torch.Tensor) -> torch.Tensor:
        """log p_theta(tau | p) = log pi(a1) + log P(o) + log pi(a2), (P, C)."""
        lp = self.token_logp(theta)
        return lp[..., 0] + self.log_dynamics + lp[..., 2]

    def grad_J(self, prompts, gamma: float = 1.0) -> torch.Tensor:
        theta = self.theta.clone().requires_grad_(True)
        ret = self.token_rewards[..., 0] + gamma * self.token_rewards[..., 2]  # (P, C)
        J = (self.episode_logp(theta).exp() * ret).sum(1)[sorted(set(prompts))].mean()
        return torch.autograd.grad(J, theta)[0].flatten()


MDP = TwoTurnMDP(seed=5)


def expected_estimate(mdp, prompts, G, *, baseline="none", reward_to_go=False, gamma=1.0,
                      loss_mask="action"):
    """E[g] over every joint batch, g = grad_theta(-loss) with lmpg's advantages and loss
    (loss_agg sequence_sum: the textbook estimator), on the tokens of `loss_mask`."""
    prompts = torch.tensor(prompts)
    N = len(prompts)
    batches = torch.tensor(list(itertools.product(range(mdp.C), repeat=N)))  # (K, N)
    K = len(batches)
    pid = prompts.expand(K, N)
    prob = mdp.episode_logp(mdp.theta)[pid, batches].sum(1).exp()  # (K,)
    action = mdp.action_mask[batches].reshape(K * N, 3)
    mask = action if loss_mask == "action" else mdp.completion_mask[batches].reshape(K * N, 3)
    rewards = mdp.token_rewards[pid, batches].reshape(K * N, 3)
    turns = mdp.turn_ids[batches].reshape(K * N, 3)
    # (with loss_mask="completion" the environment's token gets a return of its own, as it would in
    # a trainer that took every token after the prompt for an action)
    ret = returns(rewards, mask, reward_to_go=reward_to_go, gamma=gamma, turn_ids=turns)
    adv, _ = subtract_baseline(ret, mask, group_size=G, kind=baseline)
    logp = mdp.token_logp(mdp.theta)[pid, batches].reshape(K * N, 3).clone().requires_grad_(True)
    loss, _ = policy_gradient_loss(logp, logp.detach(), adv, mask, loss_agg="sequence_sum",
                                   clip_eps_low=None, clip_eps_high=None, num_sequences=N)
    (w,) = torch.autograd.grad(-loss, logp)  # (K*N, 3)
    jac = jacobian(mdp.token_logp, mdp.theta).reshape(P, mdp.C, 3, -1)
    g = torch.einsum("knt,kntd->kd", w.view(K, N, 3), jac[pid, batches])  # (K, D)
    return prob @ g, float(prob.sum())


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_enumeration_is_a_distribution():
    _, total = expected_estimate(MDP, [0, 1], 1)
    assert abs(total - 1.0) < 1e-12


def test_surrogate_over_action_tokens_is_exactly_grad_J():
    """Action tokens only: E[g] = grad J, with the whole return (also discounted per turn, gamma =
    0.5), with reward-to-go across turns, and under a leave-one-out baseline over a group of G = 2
    episodes that start from the same prompt; group_mean keeps its known (G-1)/G. (Reward-to-go with
    gamma < 1 drops the gamma^k in front of turn k's term, as in the single-turn case,
    tests/test_estimator_enumeration.py.)"""
    cases = [
        (dict(), [0, 1], 1, 1.0),
        (dict(gamma=0.5), [0, 1], 1, 1.0),
        (dict(reward_to_go=True), [0, 1], 1, 1.0),
        (dict(reward_to_go=True, baseline="leave_one_out"), [1, 1], 2, 1.0),
        (dict(gamma=0.5, baseline="leave_one_out"), [1, 1], 2, 1.0),
        (dict(baseline="leave_one_out"), [0, 0, 1, 1], 2, 1.0),
        (dict(baseline="group_mean"), [0, 0, 1, 1], 2, 0.5),
    ]
    for kw, prompts, G, factor in cases:
        grad_J = MDP.grad_J(prompts, kw.get("gamma", 1.0))
        assert grad_J.norm() > 0.05
        mean, _ = expected_estimate(MDP, prompts, G, **kw)
        torch.testing.assert_close(mean, factor * grad_J, **EXACT)


def test_environment_tokens_in_the_loss_break_it():
    """The environment's token in the loss adds E[grad log pi_theta(o | p, a1) A], which is not
    zero: o is drawn from P, not from pi_theta. Here E[g] misses grad J by 0.62 of its norm with
    the whole return (0.72 with reward-to-go across turns), an error no batch size removes."""
    prompts = [0, 1]
    grad_J = MDP.grad_J(prompts)
    errs = {}
    for rtg in (False, True):
        right, _ = expected_estimate(MDP, prompts, 1, reward_to_go=rtg)
        torch.testing.assert_close(right, grad_J, **EXACT)
        wrong, _ = expected_estimate(MDP, prompts, 1, reward_to_go=rtg, loss_mask="completion")
        errs[rtg] = rel_err(wrong, grad_J)
    assert min(errs.values()) > 0.5, errs  # 0.622, 0.716


def test_per_token_discount_is_not_per_turn():
    """gamma per token would discount turn 2's reward by gamma^2 here (the environment's token sits
    between the turns); the per-turn discount is what J_gamma = E[r1 + gamma r2] asks for."""
    prompts, gamma = [0, 1], 0.5
    grad_J = MDP.grad_J(prompts, gamma)
    per_turn, _ = expected_estimate(MDP, prompts, 1, gamma=gamma)
    torch.testing.assert_close(per_turn, grad_J, **EXACT)
    ret_tok = returns(MDP.token_rewards[0], MDP.action_mask, gamma=gamma)
    ret_turn = returns(MDP.token_rewards[0], MDP.action_mask, gamma=gamma, turn_ids=MDP.turn_ids)
    adv_tok, _ = subtract_baseline(ret_tok, MDP.action_mask, group_size=1, kind="none")
    adv_turn, _ = subtract_baseline(ret_turn, MDP.action_mask, group_size=1, kind="none")
    expected = MDP.token_rewards[0, :, 0] + gamma * MDP.token_rewards[0, :, 2]
    torch.testing.assert_close(adv_turn[:, 0], expected, **EXACT)
    assert not torch.allclose(adv_tok[:, 0], expected)
