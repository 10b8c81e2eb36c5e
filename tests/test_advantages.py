"""Returns, baselines and advantages (lmpg.advantages): hand-worked numbers and a plain reference loop.

Shapes: B sequences (groups of G consecutive samples per prompt), T completion tokens.
"""

from __future__ import annotations

import threading

import pytest
import torch

from lmpg import PGConfig
from lmpg.advantages import (
    advantage_stats,
    advantage_std,
    baseline,
    discounted_reward_to_go,
    normalise,
    optimal_baseline,
    optimal_token_baseline,
    returns,
    sequence_returns,
    subtract_baseline,
    zero_spread_groups,
)
from lmpg.errors import ConfigError

DT = torch.float64
BASELINES = ("none", "batch_mean", "group_mean", "leave_one_out")


def right_padded_mask(lengths, T):
    """(B, T) bool, True on the first lengths[i] tokens of row i."""
    return torch.arange(T).unsqueeze(0) < torch.as_tensor(lengths).unsqueeze(1)


def random_batch(B, T, seed, padding_value=float("nan")):
    """Random per-token rewards and right-padded completions of random length 0..T.

    Padding holds `padding_value` (NaN by default): a masked position carries no reward, so it must
    never reach a return or an advantage."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = right_padded_mask(lengths, T)
    r = torch.randn(B, T, generator=g, dtype=DT)
    return torch.where(mask, r, torch.full_like(r, padding_value)), mask


def advantages(r, mask, group_size, kind, *, adv_norm="none", reward_to_go=False, gamma=1.0, sample_mask=None,
               eps=1e-6, grad_sq_norm=None, gather=None, process_index=0):
    """(adv, stats) from per-token rewards r (B, T): the three steps as PGTrainer.compute_advantages
    calls them (returns, subtract_baseline, normalise when adv_norm is not none)."""
    ret = returns(r, mask, reward_to_go=reward_to_go, gamma=gamma)
    adv, stats = subtract_baseline(ret, mask, group_size=group_size, kind=kind, sample_mask=sample_mask,
                                   grad_sq_norm=grad_sq_norm, gather=gather, process_index=process_index)
    if adv_norm != "none":
        adv = normalise(adv, group_size=group_size, scope=adv_norm, sample_mask=sample_mask, eps=eps, gather=gather,
                        process_index=process_index)
        m = torch.ones(len(r), dtype=torch.bool) if sample_mask is None else sample_mask
        stats.update(advantage_stats(adv, mask & m.unsqueeze(1), m))
    return adv, stats


def last_token_rewards(R, lengths, T):
    """A scalar reward per sequence placed on its last counted token, (B, T)."""
    r = torch.zeros(len(R), T, dtype=DT)
    r[torch.arange(len(R)), torch.as_tensor(lengths) - 1] = torch.as_tensor(R, dtype=DT)
    return r


# ---------------------------------------------------------------------------------------------
# returns
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reward_to_go_matches_reference_loop(gamma):
    r, mask = random_batch(B=9, T=7, seed=0)
    ref = torch.zeros_like(r)
    for i in range(r.shape[0]):
        n = int(mask[i].sum())
        for t in range(n):
            ref[i, t] = sum(gamma ** (u - t) * float(r[i, u]) for u in range(t, n))
    torch.testing.assert_close(discounted_reward_to_go(r, mask, gamma), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(returns(r, mask, reward_to_go=True, gamma=gamma), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_return_is_broadcast_to_every_token(gamma):
    """reward_to_go=False: every counted token of trajectory i gets R_i = sum_t gamma^t r_t."""
    r, mask = random_batch(B=9, T=7, seed=1)
    ret = returns(r, mask, reward_to_go=False, gamma=gamma)
    for i in range(r.shape[0]):
        n = int(mask[i].sum())
        R = sum(gamma ** t * float(r[i, t]) for t in range(n))
        torch.testing.assert_close(ret[i, :n], torch.full((n,), R, dtype=DT), rtol=0, atol=1e-12)
        assert (ret[i, n:] == 0).all()
        assert float(sequence_returns(ret)[i]) == pytest.approx(R, abs=1e-12)


def test_returns_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=DT)
    mask = torch.tensor([[True, True, True, False]])
    # gamma 0.5: rtg_2 = 3, rtg_1 = 2 + 0.5 * 3 = 3.5, rtg_0 = 1 + 0.5 * 3.5 = 2.75
    assert returns(r, mask, reward_to_go=True, gamma=0.5).tolist() == [[2.75, 3.5, 3.0, 0.0]]
    assert returns(r, mask, reward_to_go=False, gamma=0.5).tolist() == [[2.75, 2.75, 2.75, 0.0]]
    # gamma 1 with the reward at the last token only: both credits are the same
    last = torch.tensor([[0.0, 0.0, 3.0, 0.0]], dtype=DT)
    assert returns(last, mask, reward_to_go=True).tolist() == returns(last, mask).tolist() == [[3.0, 3.0, 3.0, 0.0]]


# ---------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------

RET = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=DT)  # two groups of G=4


def test_baselines_by_hand_group_of_four():
    assert baseline(RET, 4, "none").tolist() == [0.0] * 8
    assert baseline(RET, 4, "batch_mean").tolist() == [10 / 8] * 8
    assert baseline(RET, 4, "group_mean").tolist() == [0.5] * 4 + [2.0] * 4
    # leave-one-out: a 1 sees the others (0 + 0 + 1) / 3, a 0 sees (1 + 0 + 1) / 3
    torch.testing.assert_close(baseline(RET, 4, "leave_one_out"),
                               torch.tensor([1 / 3, 2 / 3, 2 / 3, 1 / 3, 2, 2, 2, 2], dtype=DT))


def test_baselines_by_hand_group_of_two():
    assert baseline(RET, 2, "group_mean").tolist() == [0.5, 0.5, 0.5, 0.5, 2, 2, 2, 2]
    assert baseline(RET, 2, "leave_one_out").tolist() == [0, 1, 1, 0, 2, 2, 2, 2]


def test_group_mean_advantage_is_scaled_leave_one_out():
    """R_i - mean_g = (G-1)/G (R_i - mean_{g, j != i}): per batch, not only in expectation."""
    g = torch.Generator().manual_seed(2)
    ret = torch.randn(12, generator=g, dtype=DT)
    for G in (2, 3, 4):
        torch.testing.assert_close(ret - baseline(ret, G, "group_mean"),
                                   (G - 1) / G * (ret - baseline(ret, G, "leave_one_out")))


def test_baseline_rejects_bad_groups():
    with pytest.raises(ValueError, match="whole number of groups"):
        baseline(RET, 3, "group_mean")
    with pytest.raises(ValueError, match="group_size >= 2"):
        baseline(RET, 1, "leave_one_out")
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline(RET, 4, "median")


def test_advantages_by_hand():
    """Sequence rewards at the last token of completions of lengths 1-3: A = R - b on counted tokens."""
    lengths = [3, 1, 2, 3, 2, 2, 1, 3]
    T = 4
    mask = right_padded_mask(lengths, T)
    r = last_token_rewards(RET, lengths, T)
    expected_b = {"none": [0.0] * 8, "batch_mean": [1.25] * 8, "group_mean": [0.5] * 4 + [2.0] * 4,
                  "leave_one_out": [1 / 3, 2 / 3, 2 / 3, 1 / 3] + [2.0] * 4}
    for kind, b in expected_b.items():
        adv, stats = advantages(r, mask, 4, kind)
        want = torch.where(mask, (RET - torch.tensor(b, dtype=DT)).unsqueeze(1).expand(8, T), 0.0)
        torch.testing.assert_close(adv, want, rtol=0, atol=1e-15)
        assert stats["ret_mean"] == 1.25
    # adv_norm group (GRPO): group 1 has A = [.5, -.5, -.5, .5], population std 0.5; group 2 A = 0
    adv, stats = advantages(r, mask, 4, "group_mean", adv_norm="group", eps=1e-6)
    scale = 0.5 / (0.5 + 1e-6)
    torch.testing.assert_close(adv[:, 0], torch.tensor([scale, -scale, -scale, scale, 0, 0, 0, 0], dtype=DT))
    assert stats["zero_spread_group_frac"] == 0.5
    # adv_norm batch: A = [.5, -.5, -.5, .5, 0, 0, 0, 0], mean 0, std sqrt(1/8)
    adv, _ = advantages(r, mask, 4, "group_mean", adv_norm="batch", eps=0.0)
    torch.testing.assert_close(adv[:4, 0], torch.tensor([1.0, -1, -1, 1], dtype=DT) * 0.5 / 0.125 ** 0.5)


def test_advantage_std_is_population_std():
    adv = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 2.0], dtype=DT)
    assert advantage_std(adv, 2, "group").tolist() == [1, 1, 0, 0, 0, 0]
    # batch: mean 4/3, squares (1/9 + 25/9 + 16/9 * 2 + 4/9 * 2) / 6 = 66/54
    torch.testing.assert_close(advantage_std(adv, 2, "batch"), torch.full((6,), (66 / 54) ** 0.5, dtype=DT))
    assert advantage_std(adv, 2, "none").tolist() == [1.0] * 6


# ---------------------------------------------------------------------------------------------
# unscored samples (sample_mask)
# ---------------------------------------------------------------------------------------------

def test_sample_mask_excludes_unscored_samples_from_baselines():
    # group 1: [1, 0, (9, unscored), 1]; group 2: [2, 4, 6, 8]
    ret = torch.tensor([1.0, 0.0, 9.0, 1.0, 2.0, 4.0, 6.0, 8.0], dtype=DT)
    m = torch.tensor([True, True, False, True, True, True, True, True])
    torch.testing.assert_close(baseline(ret, 4, "group_mean", sample_mask=m),
                               torch.tensor([2 / 3] * 4 + [5.0] * 4, dtype=DT))
    # leave-one-out over the other scored samples: 1 -> (0 + 1)/2, 0 -> (1 + 1)/2, unscored -> 2/3
    torch.testing.assert_close(baseline(ret, 4, "leave_one_out", sample_mask=m)[:4],
                               torch.tensor([0.5, 1.0, 2 / 3, 0.5], dtype=DT))
    torch.testing.assert_close(baseline(ret, 4, "batch_mean", sample_mask=m), torch.full((8,), 22 / 7, dtype=DT))
    # std of [1/3, -2/3, 1/3] (the unscored sample left out): sqrt(2/9)
    std = advantage_std(ret - baseline(ret, 4, "group_mean", sample_mask=m), 4, "group", sample_mask=m)
    torch.testing.assert_close(std[:4], torch.full((4,), (2 / 9) ** 0.5, dtype=DT))


def test_unscored_sample_gets_zero_advantage_even_with_nan_reward():
    lengths = [2, 2, 3, 1]
    mask = right_padded_mask(lengths, 3)
    r = last_token_rewards([1.0, 0.0, 0.0, 1.0], lengths, 3)
    r[2] = float("nan")  # a reward function that failed
    m = torch.tensor([True, True, False, True])
    for kind in BASELINES:
        for norm in ("none", "group", "batch"):
            adv, stats = advantages(r, mask, 4, kind, adv_norm=norm, sample_mask=m)
            assert torch.isfinite(adv).all() and all(v == v for v in stats.values()), (kind, norm)
            assert (adv[2] == 0).all()
            # the same as a group of the 3 scored samples alone
            scored = advantages(r[[0, 1, 3]], mask[[0, 1, 3]], 3, kind, adv_norm=norm)[0]
            torch.testing.assert_close(adv[[0, 1, 3]], scored, rtol=0, atol=1e-12)
    adv, _ = advantages(r, mask, 4, "leave_one_out", sample_mask=m)
    assert adv[:, 0].tolist() == [0.5, -1.0, 0.0, 0.5]


def test_zero_spread_groups_flags():
    ret = torch.tensor([1.0, 1.0, 7.0, 1.0, 1.0, 0.0, 1.0, 1.0, 5.0, 3.0, 3.0, 3.0], dtype=DT)
    m = torch.tensor([True, True, False, True, True, True, True, True, True, False, False, False])
    # group 1: scored all 1 -> flagged; group 2: spread; group 3: one scored sample -> no comparison
    assert zero_spread_groups(ret, 4, m).tolist() == [True, False, True]
    assert zero_spread_groups(ret, 4).tolist() == [False, False, False]
    assert zero_spread_groups(torch.tensor([2.0, 2.0, 0.0, 1.0], dtype=DT), 2).tolist() == [True, False]


# ---------------------------------------------------------------------------------------------
# zero spread, padding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,adv_norm", [
    ("group_mean", "group"), ("leave_one_out", "group"), ("none", "group"), ("batch_mean", "group"),
    ("group_mean", "batch"), ("leave_one_out", "batch"), ("none", "batch"), ("batch_mean", "batch"),
])
def test_zero_spread_gives_zero_advantage_not_nan(kind, adv_norm):
    """A group (adv_norm group) or a batch (adv_norm batch) whose returns are all equal has std 0 and
    no learning signal (`zero_spread_groups`): its advantages must be 0, finite, not A / eps."""
    lengths = [2, 3, 1, 2, 3, 3, 2, 1]
    mask = right_padded_mask(lengths, 3)
    # adv_norm group: group 1 [1, 0, 0, 1] has spread, group 2 [2, 2, 2, 2] has none;
    # adv_norm batch: the whole batch is [3] * 8
    R = RET if adv_norm == "group" else torch.full((8,), 3.0, dtype=DT)
    zero = slice(4, 8) if adv_norm == "group" else slice(0, 8)
    r = last_token_rewards(R, lengths, 3)
    assert zero_spread_groups(R, 4).tolist() == ([False, True] if adv_norm == "group" else [True, True])
    adv, _ = advantages(r, mask, 4, kind, adv_norm=adv_norm)
    assert torch.isfinite(adv).all()
    assert (adv[zero] == 0).all(), adv[zero, 0].tolist()  # (none, group): 2 / 1e-6 = 2e6


@pytest.mark.parametrize("kind", BASELINES)
@pytest.mark.parametrize("adv_norm", ["none", "group", "batch"])
@pytest.mark.parametrize("reward_to_go,gamma", [(False, 1.0), (True, 1.0), (True, 0.9), (False, 0.9)])
def test_advantages_are_zero_on_padding(kind, adv_norm, reward_to_go, gamma):
    r, mask = random_batch(B=8, T=5, seed=3)  # NaN rewards on the padding
    adv, stats = advantages(r, mask, 4, kind, adv_norm=adv_norm, reward_to_go=reward_to_go, gamma=gamma)
    assert torch.isfinite(adv).all()
    assert (adv[~mask] == 0).all()
    assert all(v == v for v in stats.values())


def test_reward_to_go_subtracts_one_baseline_per_sequence():
    """With reward-to-go A_t = ret_t - b_i, b_i from the sequences' whole returns R_i = ret_0."""
    r = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], dtype=DT)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # ret = [[3, 2, 0], [2, 2, 1]], R = [3, 2], group mean 2.5
    adv, _ = advantages(r, mask, 2, "group_mean", reward_to_go=True)
    assert adv.tolist() == [[0.5, -0.5, 0.0], [-0.5, -0.5, -1.5]]


def run_on_two_processes(fn):
    """[fn(gather, 0), fn(gather, 1)] run side by side on two threads whose `gather` concatenates a
    tensor over the two in rank order, as `lmpg.distributed.gather` does over processes."""
    barrier = threading.Barrier(2, timeout=30)
    shares, results, errors = [None, None], [None, None], []

    def gather(rank):
        def concatenate(x):
            shares[rank] = x
            barrier.wait()
            out = torch.cat(shares)
            barrier.wait()  # both have read the shares before either writes its next one
            return out
        return concatenate

    def run(rank):
        try:
            results[rank] = fn(gather(rank), rank)
        except Exception as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_gather_across_processes_equals_one_process():
    """Two processes each holding half the batch get the halves of the one-process advantages and
    the one-process figures: batch-level baselines and stds see the whole batch."""
    r, mask = random_batch(B=8, T=4, seed=4)
    m = torch.tensor([True, True, False, True, True, True, True, True])
    g = torch.Generator().manual_seed(6)
    w = torch.where(mask, torch.rand(8, 4, generator=g, dtype=DT), 0.0)
    cases = [(kind, norm) for kind in BASELINES + ("optimal",) for norm in ("none", "group", "batch")]
    for kind, norm in cases + [("optimal_token", "none")]:
        whole, whole_stats = advantages(r, mask, 2, kind, adv_norm=norm, sample_mask=m, grad_sq_norm=w)

        def on_process(gather, rank):
            part = slice(4 * rank, 4 * rank + 4)
            return advantages(r[part], mask[part], 2, kind, adv_norm=norm, sample_mask=m[part],
                              grad_sq_norm=w[part], gather=gather, process_index=rank)

        (adv0, stats0), (adv1, stats1) = run_on_two_processes(on_process)
        torch.testing.assert_close(torch.cat([adv0, adv1]), whole, rtol=0, atol=1e-12)
        for key in ("ret_mean", "baseline_mean", "zero_spread_group_frac", "grad_sq_norm_mean", "grad_sq_norm_cv"):
            assert stats0[key] == stats1[key] == pytest.approx(whole_stats[key], abs=1e-12), (kind, norm, key)


# ---------------------------------------------------------------------------------------------
# the optimal baselines (weights w_j ~ ||grad log p(tau_j)||^2; the maths by enumeration in
# tests/test_estimator_enumeration.py)
# ---------------------------------------------------------------------------------------------

def test_optimal_baseline_by_hand():
    R = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DT)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0], dtype=DT)
    # leave-one-out: sample 0 sees (0*2 + 2*3 + 1*4) / 3, sample 1 sees (1 + 6 + 4) / 4, ...
    torch.testing.assert_close(optimal_baseline(R, w, 4), torch.tensor([10 / 3, 11 / 4, 5 / 2, 7 / 3], dtype=DT))
    torch.testing.assert_close(baseline(R, 4, "optimal", weight=w), optimal_baseline(R, w, 4))
    # including sample i: one weighted mean for the group, 11 / 4
    torch.testing.assert_close(optimal_baseline(R, w, 4, leave_one_out=False), torch.full((4,), 11 / 4, dtype=DT))
    # equal weights: the leave-one-out mean (RLOO) and the group mean
    ones = torch.ones(4, dtype=DT)
    torch.testing.assert_close(optimal_baseline(R, ones, 4), baseline(R, 4, "leave_one_out"))
    torch.testing.assert_close(optimal_baseline(R, ones, 4, leave_one_out=False), baseline(R, 4, "group_mean"))
    # G = 2: the one other sample's return, whatever the weights (a zero weight falls back to the plain mean)
    assert optimal_baseline(R, torch.tensor([0.0, 0.0, 5.0, 1.0], dtype=DT), 2).tolist() == [2, 1, 4, 3]


def test_optimal_baseline_leaves_out_unscored_samples():
    R = torch.tensor([1.0, 2.0, 99.0, 4.0], dtype=DT)
    w = torch.tensor([1.0, 3.0, 50.0, 1.0], dtype=DT)
    m = torch.tensor([True, True, False, True])
    # sample 0: (3*2 + 1*4) / 4; sample 1: (1 + 4) / 2; sample 3: (1 + 6) / 4
    b = optimal_baseline(R, w, 4, sample_mask=m)
    torch.testing.assert_close(b[[0, 1, 3]], torch.tensor([10 / 4, 5 / 2, 7 / 4], dtype=DT))
    # alone in its group among the scored samples: no comparison, b = 0
    assert optimal_baseline(R[:2], w[:2], 2, sample_mask=torch.tensor([True, False])).tolist()[0] == 0.0


def test_optimal_token_baseline_by_hand():
    """Per position t, the weighted mean of the other samples' returns at t among those that reach t."""
    ret = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0], [3.0, 0.0, 0.0], [5.0, 5.0, 5.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    w = torch.tensor([[1.0, 2.0, 9.0], [1.0, 1.0, 1.0], [2.0, 9.0, 9.0], [1.0, 1.0, 3.0]], dtype=DT)
    b = optimal_token_baseline(ret, w, 4, action_mask=mask)
    want = torch.tensor([[(2 + 6 + 5) / 4, (2 + 5) / 2, 0],
                         [(1 + 6 + 5) / 4, (2 + 5) / 3, 5.0],
                         [(1 + 2 + 5) / 3, 0, 0],
                         [(1 + 2 + 6) / 4, (2 + 2) / 3, 2.0]], dtype=DT)
    torch.testing.assert_close(torch.where(mask, b, 0.0), torch.where(mask, want, 0.0))
    # the longest sample's tail: no other sample reaches position 2 in a group of (0, 1)
    assert optimal_token_baseline(ret[:2], w[:2], 2, action_mask=mask[:2])[1, 2] == 0.0


@pytest.mark.parametrize("kind,adv_norm,reward_to_go", [
    ("optimal", "none", False), ("optimal", "group", True), ("optimal_token", "none", True),
    ("optimal_token", "none", False)])
def test_optimal_advantages_ignore_padding_and_unscored_samples(kind, adv_norm, reward_to_go):
    """NaN rewards and weights on padding and on an unscored sample never reach an advantage; the
    scored samples get what a group of them alone would get."""
    r, mask = random_batch(B=8, T=5, seed=4)
    g = torch.Generator().manual_seed(5)
    w = torch.where(mask, torch.rand(8, 5, generator=g, dtype=DT) * 3, float("nan"))
    r[2], w[2] = float("nan"), float("nan")
    m = torch.ones(8, dtype=torch.bool)
    m[2] = False
    adv, stats = advantages(r, mask, 4, kind, adv_norm=adv_norm, reward_to_go=reward_to_go, sample_mask=m,
                            grad_sq_norm=w)
    assert torch.isfinite(adv).all() and (adv[~mask] == 0).all() and (adv[2] == 0).all()
    assert all(v == v for v in stats.values())
    keep = [0, 1, 3]
    alone = advantages(r[keep], mask[keep], 3, kind, adv_norm=adv_norm, reward_to_go=reward_to_go,
                       grad_sq_norm=w[keep])[0]
    torch.testing.assert_close(adv[keep], alone, rtol=0, atol=1e-12)


def test_optimal_weights_are_summed_over_the_tokens():
    lengths = [3, 1, 2, 2]
    mask = right_padded_mask(lengths, 3)
    r = last_token_rewards([1.0, 2.0, 3.0, 4.0], lengths, 3)
    w_tok = torch.where(mask, torch.tensor([[0.5, 0.25, 0.25], [0.0, 7, 7], [1, 1, 7], [0.5, 0.5, 7]], dtype=DT), 0.0)
    adv, stats = advantages(r, mask, 4, "optimal", grad_sq_norm=w_tok)  # w = [1, 0, 2, 1]
    b = torch.tensor([10 / 3, 11 / 4, 5 / 2, 7 / 3], dtype=DT)
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.0, 2, 3, 4], dtype=DT) - b)
    assert stats["grad_sq_norm_mean"] == 1.0


def test_optimal_baselines_refuse_what_they_cannot_do():
    r, mask = random_batch(B=4, T=3, seed=0)
    with pytest.raises(ValueError, match="needs grad_sq_norm"):
        subtract_baseline(returns(r, mask), mask, group_size=4, kind="optimal")
    # a per-token baseline has no sequence advantage to take a std of: refused when the config is built
    with pytest.raises(ConfigError, match="optimal_token subtracts a baseline per token; set adv_norm=none"):
        PGConfig(baseline="optimal_token", adv_norm="group")
    with pytest.raises(ValueError, match="group_size >= 2"):
        baseline(RET, 1, "optimal", weight=torch.ones(8, dtype=DT))


def test_group_normalised_rewards_by_hand():
    """GDPO's per-function normalisation: each column within each group, population std, over the
    samples the function scored (NaN stays NaN, no term); a group whose scored values are equal gets 0."""
    from lmpg.advantages import group_normalised_rewards

    nan = float("nan")
    rewards = torch.tensor([[1.0, 2.0], [3.0, nan], [5.0, 4.0],      # group 0: f2 scored 2 of 3
                            [7.0, 1.0], [7.0, 1.0], [7.0, nan]], dtype=torch.float64)  # group 1: no spread
    z, stats = group_normalised_rewards(rewards, 3, eps=0.0)
    col0 = (torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64) - 3.0) / (8 / 3) ** 0.5
    torch.testing.assert_close(z[:3, 0], col0)
    torch.testing.assert_close(z[[0, 2], 1], torch.tensor([-1.0, 1.0], dtype=torch.float64))  # mean 3, std 1
    assert torch.isnan(z[1, 1]) and torch.isnan(z[5, 1])
    assert torch.equal(z[3:5], torch.zeros(2, 2, dtype=torch.float64)) and z[5, 0] == 0
    assert stats["zero_spread_reward_frac"] == 0.5  # group 1's two functions of the four pairs
    z_eps, _ = group_normalised_rewards(rewards, 3, eps=1e-6)
    torch.testing.assert_close(z_eps[:3, 0], col0 * (8 / 3) ** 0.5 / ((8 / 3) ** 0.5 + 1e-6))


def test_group_normalised_scores_refuse_per_token_rewards_in_one_line():
    from lmpg.errors import RewardError
    from lmpg.rewards.scorer import RewardScores

    scores = RewardScores(names=["ok", "tokens"], values=[[1.0, 0.0], [[0.5], [0.1, 0.2]]], weights=[1.0, 1.0])
    with pytest.raises(RewardError, match="reward 'tokens' gives per-token rewards") as err:
        scores.group_normalised(2, 1e-6)
    assert "\n" not in str(err.value)
    plain = RewardScores(names=["a", "b"], values=[[1.0, 3.0], [None, 2.0]], weights=[1.0, 2.0])
    assert plain.group_normalised(2, 0.0).values == [[-1.0, 1.0], [None, 0.0]]
