"""lmpg.mismatch: the sampler-trainer correction weights by hand, and by enumeration against grad J.

The enumeration: a tabular policy over 2-token trajectories from a 3-token vocabulary (9
trajectories), pi(a | s) = softmax(theta[s]), and a sampler q that is the same policy at another
temperature, as an inference engine's kernels or truncation make q differ from pi_old. The expected
gradient of each weighted estimator under q, sum_tau q(tau) sum_t w_t grad log pi(a_t|s_t) R(tau),
is compared with grad J = grad sum_tau pi(tau) R(tau) and with the bias its docstring states.
"""

import itertools
import math

import pytest
import torch

from lmpg.mismatch import correction_weights, mismatch_stats

V = 3
TRAJECTORIES = list(itertools.product(range(V), repeat=2))  # (a_1, a_2)


def _tokens(values):
    return torch.tensor([values], dtype=torch.float32)


# ---------------------------------------------------------------- by hand, literal tensors
LOGP_OLD = torch.log(torch.tensor([[0.5, 0.2, 0.4], [0.1, 0.3, 0.9]]))
LOGP_Q = torch.log(torch.tensor([[0.1, 0.4, 0.4], [0.4, 0.3, 0.9]]))
MASK = torch.tensor([[True, True, False], [True, True, True]])
# rho = pi_old / q: row 0: 5, 0.5, (off the actions); row 1: 0.25, 1, 1


def test_token_truncate_by_hand():
    w, stats = correction_weights(LOGP_OLD, LOGP_Q, MASK, mode="token_truncate", c_max=3.0)
    assert torch.allclose(w, torch.tensor([[3.0, 0.5, 1.0], [0.25, 1.0, 1.0]]))
    assert stats["correction_truncated_frac"] == pytest.approx(1 / 5)  # 1 of 5 action tokens clamped
    w, _ = correction_weights(LOGP_OLD, LOGP_Q, MASK, mode="token_truncate", c_max=3.0, c_min=0.5)
    assert torch.allclose(w, torch.tensor([[3.0, 0.5, 1.0], [0.5, 1.0, 1.0]]))


def test_token_mask_by_hand():
    w, stats = correction_weights(LOGP_OLD, LOGP_Q, MASK, mode="token_mask", c_max=3.0, c_min=1 / 3)
    assert torch.allclose(w, torch.tensor([[0.0, 0.5, 1.0], [0.0, 1.0, 1.0]]))
    assert stats["correction_masked_frac"] == pytest.approx(2 / 5)


def test_sequence_modes_by_hand():
    # sequence ratios: row 0: 5 * 0.5 = 2.5, row 1: 0.25 * 1 * 1 = 0.25
    w, stats = correction_weights(LOGP_OLD, LOGP_Q, MASK, mode="sequence_truncate", c_max=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 2.0, 1.0], [0.25, 0.25, 0.25]]))
    assert stats["correction_truncated_frac"] == pytest.approx(1 / 2)
    w, stats = correction_weights(LOGP_OLD, LOGP_Q, MASK, mode="sequence_mask", c_max=3.0, c_min=1 / 3)
    assert torch.allclose(w, torch.tensor([[2.5, 2.5, 1.0], [0.0, 0.0, 0.0]]))
    assert stats["correction_masked_frac"] == pytest.approx(1 / 2)


def test_none_mode_and_nan_sampler_logp():
    w, stats = correction_weights(LOGP_OLD, LOGP_Q, MASK, mode="none", c_max=3.0)
    assert torch.equal(w, torch.ones_like(w)) and stats == {}
    q = LOGP_Q.clone()
    q[0, 0] = float("nan")  # a token the sampler could not score: no correction (TRL's rule)
    w, _ = correction_weights(LOGP_OLD, q, MASK, mode="token_truncate", c_max=3.0)
    assert w[0, 0] == 1.0 and w[0, 1] == pytest.approx(0.5)


def test_mismatch_stats_by_hand():
    stats = mismatch_stats(LOGP_OLD, LOGP_Q, MASK)
    rho = torch.tensor([5.0, 0.5, 0.25, 1.0, 1.0])
    k3 = rho - 1 - torch.log(rho)
    assert stats["mismatch_kl"] == pytest.approx(float(k3.mean()), rel=1e-6)
    assert stats["mismatch_ratio_min"] == pytest.approx(0.25)
    assert stats["mismatch_ratio_max"] == pytest.approx(5.0)
    assert stats["mismatch_ratio_mean"] == pytest.approx(float(rho.mean()), rel=1e-6)
    assert stats["mismatch_logp_abs_max"] == pytest.approx(math.log(5.0), rel=1e-6)
    same = mismatch_stats(LOGP_OLD, LOGP_OLD, MASK)
    assert same["mismatch_kl"] == 0.0 and same["mismatch_ratio_min"] == same["mismatch_ratio_max"] == 1.0


# ---------------------------------------------------------------- enumeration
def _policy_tables(theta, sampler_temperature_first, sampler_temperature_second):
    """log pi and log q of every trajectory's two tokens, (9, 2) each; states: 0 = start, 1 + a_1."""
    logp_pi = torch.log_softmax(theta, -1)
    first_q = torch.log_softmax(theta[:1].detach() / sampler_temperature_first, -1)
    rest_q = torch.log_softmax(theta[1:].detach() / sampler_temperature_second, -1)
    logp_q = torch.cat([first_q, rest_q])
    pi = torch.stack([torch.stack([logp_pi[0, a1], logp_pi[1 + a1, a2]]) for a1, a2 in TRAJECTORIES])
    q = torch.stack([torch.stack([logp_q[0, a1], logp_q[1 + a1, a2]]) for a1, a2 in TRAJECTORIES])
    return pi, q


def _setup(first_temperature=2.0, second_temperature=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(1 + V, V, generator=g).mul(1.5).requires_grad_(True)
    reward = torch.randn(len(TRAJECTORIES), generator=g)
    return theta, reward, _policy_tables(theta, first_temperature, second_temperature)


def _grad(scalar, theta):
    return torch.autograd.grad(scalar, theta, retain_graph=True)[0]


def _grad_J(theta, logp_pi, reward):
    return _grad((logp_pi.sum(1).exp() * reward).sum(), theta)


def _expected_estimate(theta, logp_pi, logp_q, reward, weights):
    """sum_tau q(tau) sum_t w_t(tau) grad log pi(a_t | s_t) R(tau): the estimator's expectation under q."""
    q_tau = logp_q.sum(1).exp().detach()
    surrogate = (q_tau.unsqueeze(1) * weights * logp_pi * reward.unsqueeze(1)).sum()
    return _grad(surrogate, theta)


def _per_trajectory_score(theta, logp_pi, reward):
    """(9, |theta|) g(tau) = sum_t grad log pi(a_t|s_t) R(tau)."""
    return torch.stack([_grad(logp_pi[i].sum() * reward[i], theta).flatten() for i in range(len(TRAJECTORIES))])


MASK_ALL = torch.ones(len(TRAJECTORIES), 2, dtype=torch.bool)


def test_sequence_weight_gives_grad_J_exactly():
    theta, reward, (logp_pi, logp_q) = _setup()
    w, _ = correction_weights(logp_pi.detach(), logp_q, MASK_ALL, mode="sequence_truncate", c_max=None)
    got = _expected_estimate(theta, logp_pi, logp_q, reward, w)
    want = _grad_J(theta, logp_pi, reward)
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    # without a correction the estimate is biased: the samples are q's, not pi_old's
    plain = _expected_estimate(theta, logp_pi, logp_q, reward, torch.ones_like(w))
    assert (plain - want).norm() > 0.05 * want.norm()


@pytest.mark.parametrize("c_max", [1.1, 1.5])
def test_sequence_truncate_bias_is_the_stated_one(c_max):
    theta, reward, (logp_pi, logp_q) = _setup()
    w, _ = correction_weights(logp_pi.detach(), logp_q, MASK_ALL, mode="sequence_truncate", c_max=c_max)
    rho = (logp_pi.detach().sum(1) - logp_q.sum(1)).exp()
    assert (rho > c_max).any()  # the case truncates something
    got = _expected_estimate(theta, logp_pi, logp_q, reward, w)
    q_tau = logp_q.sum(1).exp()
    g = _per_trajectory_score(theta, logp_pi, reward)
    bias = -(q_tau * (rho - c_max).clamp(min=0)) @ g  # -E_q[(rho - C)_+ g]
    want = _grad_J(theta, logp_pi, reward).flatten() + bias
    assert torch.allclose(got.flatten(), want, atol=1e-6)


def test_sequence_mask_bias_is_the_masked_share():
    theta, reward, (logp_pi, logp_q) = _setup()
    c_max, c_min = 2.0, 0.5
    w, _ = correction_weights(logp_pi.detach(), logp_q, MASK_ALL, mode="sequence_mask", c_max=c_max, c_min=c_min)
    rho = (logp_pi.detach().sum(1) - logp_q.sum(1)).exp()
    outside = (rho < c_min) | (rho > c_max)
    assert outside.any() and not outside.all()
    got = _expected_estimate(theta, logp_pi, logp_q, reward, w)
    g = _per_trajectory_score(theta, logp_pi, reward)
    bias = -(logp_q.sum(1).exp() * rho * outside.float()) @ g  # -E_q[rho 1{outside} g]
    want = _grad_J(theta, logp_pi, reward).flatten() + bias
    assert torch.allclose(got.flatten(), want, atol=1e-6)


def test_token_weight_expectation_is_the_stated_mixture():
    # E_q[sum_t rho_t grad log pi(a_t|s_t) R] = sum_t E_{a_<t ~ q, a_t ~ pi, a_>t ~ q}[grad log pi(a_t|s_t) R]
    theta, reward, (logp_pi, logp_q) = _setup()
    w, _ = correction_weights(logp_pi.detach(), logp_q, MASK_ALL, mode="token_truncate", c_max=None)
    got = _expected_estimate(theta, logp_pi, logp_q, reward, w)
    p, q = logp_pi.detach().exp(), logp_q.exp()
    mixture_first = p[:, 0] * q[:, 1]   # a_1 ~ pi, a_2 ~ q
    mixture_second = q[:, 0] * p[:, 1]  # a_1 ~ q, a_2 ~ pi
    want = _grad((mixture_first * logp_pi[:, 0] * reward).sum() + (mixture_second * logp_pi[:, 1] * reward).sum(), theta)
    assert torch.allclose(got, want, atol=1e-6)
    # which is not grad J when q differs from pi (the bias the sequence weight does not have)
    grad_J = _grad_J(theta, logp_pi, reward)
    assert (got - grad_J).norm() > 1e-3 * grad_J.norm()
    # with q == pi the token weights are 1 and the estimate is grad J
    w_same, _ = correction_weights(logp_pi.detach(), logp_pi.detach(), MASK_ALL, mode="token_truncate", c_max=None)
    assert torch.allclose(_expected_estimate(theta, logp_pi, logp_pi.detach(), reward, w_same), grad_J, atol=1e-6)
