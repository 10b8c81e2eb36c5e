"""Surrogate loss (lmpg.losses), KL estimators (lmpg.kl) and log-probabilities (lmpg.logprobs):
hand-worked numbers, masking, micro-batch splitting.

Shapes: B sequences, T completion tokens, V vocabulary.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmpg.kl import kl_estimate
from lmpg.logprobs import selective_log_softmax, token_entropy
from lmpg.losses import (
    LOSS_AGGS,
    PG_OBJECTIVES,
    RATIO_LEVELS,
    aggregate,
    cispo_loss,
    clipped_objective,
    importance_ratio,
    luspo_loss,
    policy_gradient_loss,
    sapo_loss,
    vespo_loss,
    vespo_weight,
)

DT = torch.float64
CLIP = dict(clip_eps_low=0.2, clip_eps_high=0.28)
NO_CLIP = dict(clip_eps_low=None, clip_eps_high=None)


def batch(seed, B=6, T=5, spread=0.3):
    """Random logp (leaf), logp_old = logp + noise, adv and a mask with prompt-like leading False,
    right padding and one empty row."""
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=DT) * 3).requires_grad_(True)
    logp_old = logp.detach() + spread * torch.randn(B, T, generator=g, dtype=DT)
    adv = torch.randn(B, T, generator=g, dtype=DT)
    start = torch.randint(0, 2, (B,), generator=g)  # 0 or 1 leading masked (prompt) positions
    end = torch.randint(1, T + 1, (B,), generator=g)
    t = torch.arange(T)
    mask = (t >= start.unsqueeze(1)) & (t < end.unsqueeze(1))
    mask[-1] = False  # an empty row
    return logp, logp_old, adv, mask


def loss_and_grad(logp, *args, **kw):
    loss, stats = policy_gradient_loss(logp, *args, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, stats


# ---------------------------------------------------------------------------------------------
# first step: ratio 1
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_first_step_ratio_is_one_and_clipping_is_inactive(ratio_level, loss_agg):
    logp, _, adv, mask = batch(0)
    old = logp.detach()
    ratio = importance_ratio(logp, old, mask, ratio_level)
    assert (ratio.detach() == 1).all()
    kw = dict(ratio_level=ratio_level, loss_agg=loss_agg, loss_constant=8.0)
    loss_c, grad_c, stats = loss_and_grad(logp, old, adv, mask, **CLIP, **kw)
    loss_u, grad_u, _ = loss_and_grad(logp, old, adv, mask, **NO_CLIP, **kw)
    assert loss_c == loss_u and torch.equal(grad_c, grad_u)
    assert stats["ratio_min"] == stats["ratio_max"] == stats["ratio_mean"] == 1.0
    assert stats["clip_frac"] == 0.0


def test_first_step_gradient_is_reinforce():
    """At ratio 1, sequence_sum: d(-L)/d logp_{i,t} = A_{i,t} / B on counted tokens, 0 elsewhere
    (token level); the sequence level credits every counted token with the first token's A_i."""
    logp, _, adv, mask = batch(1)
    B = logp.shape[0]
    _, grad, _ = loss_and_grad(logp, logp.detach(), adv, mask, loss_agg="sequence_sum")
    torch.testing.assert_close(-grad, torch.where(mask, adv, 0.0) / B, rtol=0, atol=1e-15)
    _, grad, _ = loss_and_grad(logp, logp.detach(), adv, mask, ratio_level="sequence")
    first = torch.stack([adv[i, mask[i]][0] if mask[i].any() else adv.new_zeros(()) for i in range(B)])
    torch.testing.assert_close(-grad, torch.where(mask, first.unsqueeze(1), 0.0) / B, rtol=0, atol=1e-15)


@pytest.mark.parametrize("pg_objective", PG_OBJECTIVES)
def test_every_objective_at_ratio_one_is_the_policy_gradient(pg_objective):
    """theta == theta_old, sequence_sum: d(-L)/d logp_{i,t} = A_{i,t} / B on counted tokens for every
    objective (cispo's weight min(1, w_max) = 1, sapo's gate slope 4 s (1 - s) = 1 at r = 1, vespo's
    phi(1) = 1)."""
    logp, _, adv, mask = batch(1)
    B = logp.shape[0]
    _, grad, stats = loss_and_grad(logp, logp.detach(), adv, mask, pg_objective=pg_objective, loss_agg="sequence_sum",
                                   cispo_weight_max=1.5, **CLIP)
    torch.testing.assert_close(-grad, torch.where(mask, adv, 0.0) / B, rtol=0, atol=1e-15)
    assert stats["clip_frac"] == 0.0


def test_luspo_at_ratio_one_is_the_textbook_estimator_and_gspo_is_not():
    """LUSPO weighs GSPO's sequence loss by the sequence's length: its first-step gradient is
    A_i / B on every counted token; GSPO's is A_i / (B |y_i|)."""
    logp, _, adv, mask = batch(1)
    B = logp.shape[0]
    adv = adv[:, :1].expand_as(adv)  # one advantage per sequence
    loss, stats = luspo_loss(logp, logp.detach(), adv, mask)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(-grad, torch.where(mask, adv, 0.0) / B, rtol=0, atol=1e-15)
    _, grad, _ = loss_and_grad(logp, logp.detach(), adv, mask, ratio_level="sequence_mean")
    lengths = mask.sum(1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(-grad, torch.where(mask, adv / lengths, 0.0) / B, rtol=0, atol=1e-15)


def test_cispo_sapo_vespo_by_hand():
    """One token, sequence_sum, L = -f: CISPO's weight capped and detached; SAPO's gate and its slope;
    VESPO's Gamma kernel with the sign's (k, lambda)."""
    one = torch.ones(1, 1, dtype=torch.bool)
    for r, A in ((2.0, 1.5), (0.5, -1.0)):
        lp = math.log(0.3)
        logp = torch.tensor([[lp]], dtype=DT, requires_grad=True)
        old = torch.tensor([[lp - math.log(r)]], dtype=DT)
        adv = torch.tensor([[A]], dtype=DT)
        # cispo: -min(r, 1.5) A log pi; gradient -min(r, 1.5) A
        loss, stats = cispo_loss(logp, old, adv, one, weight_max=1.5, loss_agg="sequence_sum")
        (grad,) = torch.autograd.grad(loss, logp)
        w = min(r, 1.5)
        assert float(loss) == pytest.approx(-w * A * lp, abs=1e-12)
        assert float(grad) == pytest.approx(-w * A, abs=1e-12)
        assert stats["clip_frac"] == float(r > 1.5)
        # sapo: -(4/tau) s A, s = sigmoid(tau (r - 1)); d/d logp = -4 s (1 - s) r A
        tau = 1.0 if A > 0 else 1.05
        s = 1 / (1 + math.exp(-tau * (r - 1)))
        loss, _ = sapo_loss(logp, old, adv, one, loss_agg="sequence_sum")
        (grad,) = torch.autograd.grad(loss, logp)
        assert float(loss) == pytest.approx(-4 / tau * s * A, abs=1e-12)
        assert float(grad) == pytest.approx(-4 * s * (1 - s) * r * A, abs=1e-12)
        # vespo: -phi(r) A log pi, phi(w) = e^lam w^k e^(-lam w), (k, lam) = (2, 3) for A >= 0, (3, 2) else
        k, lam = (2.0, 3.0) if A >= 0 else (3.0, 2.0)
        phi = math.exp(lam) * r ** k * math.exp(-lam * r)
        assert float(vespo_weight(logp, old, adv, one, k_pos=2.0, lambda_pos=3.0, k_neg=3.0,
                                  lambda_neg=2.0)) == pytest.approx(phi, rel=1e-12)
        loss, stats = vespo_loss(logp, old, adv, one, loss_agg="sequence_sum")
        (grad,) = torch.autograd.grad(loss, logp)
        assert float(loss) == pytest.approx(-phi * A * lp, rel=1e-12)
        assert float(grad) == pytest.approx(-phi * A, rel=1e-12)
        assert stats["vespo_weight_mean"] == pytest.approx(phi, rel=1e-12)


def test_vespo_weight_is_of_the_trajectory_ratio_and_clamped():
    """w_i = prod_t r_{i,t} over the counted tokens; log w clamped to [log 1e-8, 20]."""
    logp = torch.tensor([[0.3, -0.1, 5.0], [-30.0, 0.0, 0.0]], dtype=DT)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    adv = torch.ones(2, 3, dtype=DT)
    phi = vespo_weight(logp, torch.zeros_like(logp), adv, mask, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0)
    w = math.exp(0.2)
    assert float(phi[0, 0]) == pytest.approx(math.exp(3 + 2 * 0.2 - 3 * w), rel=1e-12)
    lo = math.log(1e-8)  # -30 clamped to -20 per token, then to log 1e-8 for the sequence
    assert float(phi[1, 0]) == pytest.approx(math.exp(3 + 2 * lo - 3 * 1e-8), rel=1e-9)
    with pytest.raises(ValueError, match="ratio_level='token'"):
        vespo_loss(logp, logp, adv, mask, ratio_level="sequence")


def test_sequence_loss_weight_length_counts_the_sequence_loss_at_each_token():
    """ratio 1, r_i A_i = A_i per sequence: `one` gives (A_1 + A_2) / 2 whatever loss_agg; `length`
    gives loss_agg over the tokens: token_mean (2 A_1 + 3 A_2) / 5, sequence_sum (2 A_1 + 3 A_2) / 2."""
    logp = torch.zeros(2, 3, dtype=DT)
    kw = dict(ratio_level="sequence_mean")
    assert float(policy_gradient_loss(logp, logp, ADV, MASK, loss_agg="token_mean", **kw)[0]) == -(1 + 4) / 2
    length = dict(sequence_loss_weight="length", **kw)
    assert float(policy_gradient_loss(logp, logp, ADV, MASK, loss_agg="token_mean", **length)[0]) == -(2 + 12) / 5
    assert float(policy_gradient_loss(logp, logp, ADV, MASK, loss_agg="sequence_sum", **length)[0]) == -(2 + 12) / 2
    assert float(policy_gradient_loss(logp, logp, ADV, MASK, loss_agg="sequence_mean", **length)[0]) == -(1 + 4) / 2


# ---------------------------------------------------------------------------------------------
# ratios and clipping by hand
# ---------------------------------------------------------------------------------------------

def test_importance_ratio_by_hand():
    log_ratio = torch.tensor([[math.log(2), math.log(3), 100.0], [math.log(0.5), 0.0, math.log(4)]], dtype=DT)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    logp_old = torch.zeros(2, 3, dtype=DT)
    token = importance_ratio(log_ratio, logp_old, mask, "token")
    torch.testing.assert_close(token, torch.tensor([[2.0, 3.0, 1.0], [0.5, 1.0, 4.0]], dtype=DT))
    torch.testing.assert_close(importance_ratio(log_ratio, logp_old, mask, "sequence"),
                               torch.tensor([6.0, 2.0], dtype=DT))
    torch.testing.assert_close(importance_ratio(log_ratio, logp_old, mask, "sequence_mean"),
                               torch.tensor([6 ** 0.5, 2 ** (1 / 3)], dtype=DT))
    with pytest.raises(ValueError, match="unknown ratio_level"):
        importance_ratio(log_ratio, logp_old, mask, "trajectory")


# (ratio, advantage, eps_low, eps_high) -> (objective, d objective / d log ratio, clipped)
# PPO: min(r A, clip(r, 1 - eps_low, 1 + eps_high) A); the clipped branch has no gradient.
CLIP_CASES = [
    (1.5, 2.0, 0.2, 0.2, 2.4, 0.0, True),     # A > 0, r above 1 + eps: capped at 1.2 * 2
    (0.5, 2.0, 0.2, 0.2, 1.0, 1.0, False),    # A > 0, r below 1 - eps: min picks r A, gradient r A
    (0.5, -2.0, 0.2, 0.2, -1.6, 0.0, True),   # A < 0, r below 1 - eps: floored at 0.8 * -2
    (1.5, -2.0, 0.2, 0.2, -3.0, -3.0, False),  # A < 0, r above 1 + eps: min picks r A
    (1.25, 2.0, 0.1, 0.3, 2.5, 2.5, False),   # inside (0.9, 1.3)
    (1.35, 2.0, 0.1, 0.3, 2.6, 0.0, True),    # above 1.3 (eps_high, DAPO's clip-higher)
    (0.85, -2.0, 0.1, 0.3, -1.8, 0.0, True),  # below 0.9 (eps_low)
    (0.85, 2.0, 0.1, 0.3, 1.7, 1.7, False),
    (0.1, -2.0, None, 0.2, -0.2, -0.2, False),  # no floor
    (1.5, 2.0, None, 0.2, 2.4, 0.0, True),
    (5.0, -2.0, 0.2, None, -10.0, -10.0, False),  # no ceiling
]


@pytest.mark.parametrize("r,A,lo,hi,objective,slope,clipped", CLIP_CASES)
def test_clipping_by_hand(r, A, lo, hi, objective, slope, clipped):
    log_r = torch.tensor([[math.log(r)]], dtype=DT, requires_grad=True)
    obj, flag = clipped_objective(log_r.exp(), torch.tensor([[A]], dtype=DT), lo, hi)
    assert float(obj.detach()) == pytest.approx(objective, abs=1e-12)
    assert bool(flag) is clipped
    (d,) = torch.autograd.grad(obj.sum(), log_r)
    assert float(d) == pytest.approx(slope, abs=1e-12)
    # the same through the loss: one token, sequence_sum, L = -objective
    loss, grad, stats = loss_and_grad(log_r, torch.zeros(1, 1, dtype=DT), torch.tensor([[A]], dtype=DT),
                                      torch.ones(1, 1, dtype=torch.bool), clip_eps_low=lo, clip_eps_high=hi,
                                      loss_agg="sequence_sum")
    assert float(loss) == pytest.approx(-objective, abs=1e-12)
    assert float(grad) == pytest.approx(-slope, abs=1e-12)
    assert stats["clip_frac"] == float(clipped)


# ---------------------------------------------------------------------------------------------
# aggregation by hand
# ---------------------------------------------------------------------------------------------

ADV = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=DT)
MASK = torch.tensor([[True, True, False], [True, True, True]])


@pytest.mark.parametrize("loss_agg,expected", [
    ("token_mean", -(1 + 2 + 4 + 5 + 6) / 5),           # every counted token weighs the same
    ("sequence_mean", -((1 + 2) / 2 + (4 + 5 + 6) / 3) / 2),  # every sequence weighs the same
    ("sequence_sum", -(3 + 15) / 2),                    # sum over tokens, mean over sequences
    ("constant", -(3 + 15) / (2 * 4)),                  # / (N * loss_constant), loss_constant 4
])
def test_loss_agg_by_hand(loss_agg, expected):
    logp = torch.zeros(2, 3, dtype=DT)  # ratio 1: token loss = -A
    loss, _ = policy_gradient_loss(logp, logp, ADV, MASK, loss_agg=loss_agg, loss_constant=4.0)
    assert float(loss) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("ratio_level", ["sequence", "sequence_mean"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_sequence_ratio_levels_average_over_sequences(ratio_level, loss_agg):
    """One loss per sequence, -r_i A_i (A_i at the first counted token), averaged over sequences:
    loss_agg does not apply (documented in lmpg.losses)."""
    logp = torch.zeros(2, 3, dtype=DT)
    loss, _ = policy_gradient_loss(logp, logp, ADV, MASK, ratio_level=ratio_level, loss_agg=loss_agg,
                                   loss_constant=4.0)
    assert float(loss) == -(1 + 4) / 2


def test_aggregate_with_whole_batch_totals():
    x = ADV
    assert float(aggregate(x, MASK, "token_mean", num_tokens=10)) == 18 / 10
    assert float(aggregate(x, MASK, "sequence_sum", num_sequences=6)) == 18 / 6
    assert float(aggregate(x, MASK, "sequence_mean", num_sequences=4)) == (1.5 + 5) / 4
    assert float(aggregate(x, MASK, "constant", loss_constant=3.0, num_sequences=3)) == 18 / 9
    assert float(aggregate(x, torch.zeros_like(MASK), "token_mean")) == 0.0  # nothing counted: 0, not NaN
    with pytest.raises(ValueError, match="loss_constant"):
        aggregate(x, MASK, "constant")
    with pytest.raises(ValueError, match="unknown loss_agg"):
        aggregate(x, MASK, "median")


# ---------------------------------------------------------------------------------------------
# masked positions never contribute
# ---------------------------------------------------------------------------------------------

OBJECTIVE_CASES = [dict(), dict(pg_objective="cispo", cispo_weight_max=1.2), dict(pg_objective="sapo"),
                   dict(pg_objective="vespo"), dict(clip_delta=1.4), dict(sequence_loss_weight="length")]
# (ratio_level, objective keywords) where the objective applies: vespo at token level only, the length
# weighting at sequence levels only (PGConfig refuses the others)
LEVEL_OBJECTIVES = [(level, kw) for level in RATIO_LEVELS for kw in OBJECTIVE_CASES
                    if not (kw.get("pg_objective") == "vespo" and level != "token")
                    and not ("sequence_loss_weight" in kw and level == "token")]


@pytest.mark.parametrize("ratio_level,objective", LEVEL_OBJECTIVES)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_masked_positions_never_contribute(ratio_level, loss_agg, objective):
    """Prompt and padding positions may hold anything, NaN and inf included (masked_sum selects with
    torch.where, so nothing leaks into the loss or through the backward pass), for every objective."""
    logp, logp_old, adv, mask = batch(2)
    kw = dict(ratio_level=ratio_level, loss_agg=loss_agg, loss_constant=8.0, **CLIP, **objective)
    clean = [torch.where(mask, x.detach(), 0.0) for x in (logp, logp_old, adv)]
    leaf = clean[0].clone().requires_grad_(True)
    loss0, grad0, _ = loss_and_grad(leaf, clean[1], clean[2], mask, **kw)
    junk = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e6], dtype=DT)
    fill = junk[torch.arange(mask.numel()) % 4].view_as(mask)
    dirty = [torch.where(mask, x, fill) for x in clean]
    leaf = dirty[0].clone().requires_grad_(True)
    loss1, grad1, stats = loss_and_grad(leaf, dirty[1], dirty[2], mask, **kw)
    assert torch.equal(loss0, loss1) and torch.isfinite(loss1)
    assert torch.equal(grad0, grad1)
    assert (grad1[~mask] == 0).all()
    assert all(math.isfinite(v) for v in stats.values())


# ---------------------------------------------------------------------------------------------
# micro-batches
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio_level,objective", LEVEL_OBJECTIVES)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_micro_batches_sum_to_whole_batch(ratio_level, loss_agg, objective):
    """With the whole batch's num_tokens / num_sequences each micro-batch returns its share: losses
    and gradients add up to the whole batch's (ratios off 1, clipping active on some tokens), for
    every objective."""
    logp, logp_old, adv, mask = batch(3)
    kw = dict(ratio_level=ratio_level, loss_agg=loss_agg, loss_constant=8.0, **CLIP, **objective)
    whole, grad_whole, stats = loss_and_grad(logp, logp_old, adv, mask, **kw)
    if kw.get("pg_objective", "ppo_clip") == "ppo_clip":
        assert 0 < stats["clip_frac"] < 1  # the case exercises clipping
    totals = dict(num_tokens=float(mask.sum()), num_sequences=float(mask.shape[0]))
    parts_loss, parts_grad = 0.0, torch.zeros_like(grad_whole)
    for part in (slice(0, 2), slice(2, 3), slice(3, 6)):  # the last holds the empty row
        loss, _ = policy_gradient_loss(logp[part], logp_old[part], adv[part], mask[part], **kw, **totals)
        (grad,) = torch.autograd.grad(loss, logp)
        parts_loss = parts_loss + loss.detach()
        parts_grad = parts_grad + grad
    torch.testing.assert_close(parts_loss, whole, rtol=0, atol=1e-14)
    torch.testing.assert_close(parts_grad, grad_whole, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------

def test_kl_estimators_by_hand():
    # pi_theta(a) = 1/2, pi_ref(a) = 1/4: x = log pi_ref - log pi_theta = -log 2
    logp, logp_ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    ln2 = math.log(2)
    assert float(kl_estimate(logp, logp_ref, "k1")) == pytest.approx(ln2)
    assert float(kl_estimate(logp, logp_ref, "k2")) == pytest.approx(0.5 * ln2 ** 2)
    assert float(kl_estimate(logp, logp_ref, "k3")) == pytest.approx(0.5 - 1 + ln2)
    same = torch.tensor([-1.3])
    assert [float(kl_estimate(same, same, k)) for k in ("k1", "k2", "k3")] == [0.0, 0.0, 0.0]
    # a token the reference finds e^30 times likelier: exp is clamped at x = 20, no overflow
    big = kl_estimate(torch.tensor([-40.0], dtype=DT), torch.tensor([-10.0], dtype=DT), "k3")
    assert float(big) == pytest.approx(math.exp(20) - 1 - 30)
    with pytest.raises(ValueError, match="unknown kl_estimator"):
        kl_estimate(same, same, "k4")


def test_kl_estimators_in_expectation_and_k3_nonnegative():
    """Exact expectation over a ~ pi_theta (enumerating a categorical of V = 6): k1 and k3 are
    unbiased for KL(pi_theta || pi_ref); k2 is not; k3 >= 0 on every token."""
    g = torch.Generator().manual_seed(4)
    logp = torch.log_softmax(torch.randn(6, generator=g, dtype=DT), 0)
    logp_ref = torch.log_softmax(torch.randn(6, generator=g, dtype=DT), 0)
    kl = float((logp.exp() * (logp - logp_ref)).sum())
    expect = {k: float((logp.exp() * kl_estimate(logp, logp_ref, k)).sum()) for k in ("k1", "k2", "k3")}
    assert expect["k1"] == pytest.approx(kl, abs=1e-12)
    assert expect["k3"] == pytest.approx(kl, abs=1e-12)
    assert abs(expect["k2"] - kl) > 1e-2
    x = 5 * torch.randn(1000, generator=g, dtype=DT)
    assert (kl_estimate(torch.zeros_like(x), x, "k3") >= 0).all()


# ---------------------------------------------------------------------------------------------
# log-probabilities and entropy
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_is_log_softmax_gather(temperature):
    g = torch.Generator().manual_seed(5)
    B, T, V = 5, 4, 11
    logits = 3 * torch.randn(B, T, V, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    ref = torch.log_softmax(logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    out = selective_log_softmax(logits, tokens, temperature, chunk_rows=2)  # 3 chunks, the last short
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # bf16/fp64 logits come back as fp32 log-probabilities
    assert selective_log_softmax(logits.double(), tokens, temperature).dtype == torch.float32


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_entropy_is_the_definition(temperature):
    g = torch.Generator().manual_seed(6)
    logits = 3 * torch.randn(3, 4, 7, generator=g, requires_grad=True)
    p = torch.softmax(logits.detach() / temperature, -1)
    ref = -(p * p.log()).sum(-1)
    ent = token_entropy(logits, temperature, chunk_rows=2)
    torch.testing.assert_close(ent, ref, rtol=0, atol=1e-5)
    assert not ent.requires_grad
    # uniform logits: log V; one-hot-like logits: ~0
    assert float(token_entropy(torch.zeros(1, 1, 7))[0, 0]) == pytest.approx(math.log(7), abs=1e-6)
    assert float(token_entropy(torch.tensor([[[100.0, 0.0, 0.0]]]))[0, 0]) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# ratio_min / ratio_max through the one masked min/max (lmpg.masked.masked_min_max)
# ---------------------------------------------------------------------------------------------

def test_masked_min_max_reads_only_counted_entries():
    from lmpg.masked import masked_min_max

    x = torch.tensor([[0.5, float("nan"), 3.0], [float("inf"), 2.0, -1e9]], requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    assert masked_min_max(x, mask) == (0.5, 3.0)  # NaN, inf and -1e9 sit on masked-out entries
    nothing = torch.zeros_like(mask)
    lo, hi = masked_min_max(x, nothing)
    assert math.isnan(lo) and math.isnan(hi)
    assert masked_min_max(x, nothing, empty=1.0) == (1.0, 1.0)


@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
def test_ratio_min_max_are_of_the_counted_ratios_and_one_where_nothing_counts(ratio_level):
    """Hand-worked: token ratios exp(0.2) and exp(-0.4) on the counted tokens; the masked-out token
    (ratio exp(3)) never reaches ratio_max. Sequence ratios of the two rows: exp(0.2 - 0.4) and
    exp(0.5); row means exp(-0.1) and exp(0.5)."""
    logp_old = torch.zeros(2, 3, dtype=DT)
    logp = torch.tensor([[0.2, -0.4, 3.0], [0.5, 0.0, 0.0]], dtype=DT, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    adv = torch.ones(2, 3, dtype=DT)
    _, stats = policy_gradient_loss(logp, logp_old, adv, mask, ratio_level=ratio_level)
    want = {"token": (math.exp(-0.4), math.exp(0.5)), "sequence": (math.exp(-0.2), math.exp(0.5)),
            "sequence_mean": (math.exp(-0.1), math.exp(0.5))}[ratio_level]
    assert (stats["ratio_min"], stats["ratio_max"]) == pytest.approx(want, rel=1e-12)
    _, stats = policy_gradient_loss(logp, logp_old, adv, torch.zeros_like(mask), ratio_level=ratio_level)
    assert stats["ratio_min"] == stats["ratio_max"] == 1.0
