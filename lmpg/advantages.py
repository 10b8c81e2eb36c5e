"""Returns, baselines and advantages: the weights A_t of the policy gradient.

The policy gradient (CS224R lecture 3) is

    grad J(theta) = E_tau [ sum_t grad log pi_theta(a_t | s_t) * A_t ]

where a prompt is the initial state, each generated token a_t is an action and a completion is the
trajectory. This module computes A_t from the rewards in three steps, each a call the trainer
makes (`PGTrainer.compute_advantages`):

1. `returns`: the return credited to each token, either the whole return of the trajectory
   (REINFORCE) or the reward-to-go (causality: an action only gets credit for rewards after it).
2. `subtract_baseline`: A = ret - b, b a value from `baseline`. A baseline that does not depend on
   the sample's own action leaves the gradient unbiased (E[grad log pi * b] = b * grad sum pi = 0)
   and cuts its variance. `group_mean` includes the sample's own return, which scales the expected
   gradient by exactly (G-1)/G; `leave_one_out` (RLOO) excludes it and is exactly unbiased. `optimal`
   and `optimal_token` are the lecture's variance-minimising baseline (see `optimal_baseline`).
3. `normalise`: division by the group or batch standard deviation (GRPO), when the config asks.

With several reward functions and `reward_aggregation: normalize_then_sum` (GDPO) a step comes
before the three: `group_normalised_rewards` normalises each function's rewards within each group
before their weighted sum becomes the reward the returns add up (`PGTrainer.score`).

Shapes: B sequences (B = number of prompts * G, the G samples of a prompt contiguous), G samples per
prompt, T completion tokens. `action_mask` (B, T) is True on the policy's own tokens, the actions
that receive rewards and returns (`TrajectoryBatch.action_mask`); `sample_mask` (B,) is True on the
samples that have a reward (`TrajectoryBatch.scored`).
"""

from __future__ import annotations

from typing import get_args

import torch

from lmpg.choices import WEIGHTED_BASELINES, AdvNorm, Baseline
from lmpg.masked import masked_mean

BASELINES = get_args(Baseline)
ADV_NORMS = get_args(AdvNorm)


def discounted_reward_to_go(token_rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float = 1.0, *,
                            turn_ids: torch.Tensor | None = None) -> torch.Tensor:
    """ret_t = sum_{t' >= t} gamma^(t'-t) r_t'  over the actions, 0 off them.

    token_rewards: (B, T) reward received after each action; action_mask: (B, T) True on the actions.
    Computed right to left: ret_t = r_t + gamma * ret_{t+1}. Masked positions carry no reward and
    do not break the chain (padding only ever follows the completion; in a multi-turn episode the
    environment's tokens sit between the actions, masked out of the loss).

    turn_ids: (B, T) int, the turn of a multi-turn episode each token belongs to (environment tokens
    carry the turn they follow). Given, the discount is per turn, not per token:
    ret_t = sum_{t' >= t} gamma^(turn(t') - turn(t)) r_t', i.e. ret_t = r_t + gamma^(turn(t+1) -
    turn(t)) ret_{t+1}: every token of a turn gets the rewards of its own turn undiscounted and
    those of turn k later times gamma^k (`lmpg.episodes`).
    """
    B, T = token_rewards.shape  # sequences, completion tokens
    r = torch.where(action_mask, token_rewards, torch.zeros_like(token_rewards))
    ret = torch.zeros_like(r)
    running = torch.zeros(B, dtype=r.dtype, device=r.device)
    for t in range(T - 1, -1, -1):
        if turn_ids is None or t == T - 1:
            discount = gamma
        else:
            discount = gamma ** (turn_ids[:, t + 1] - turn_ids[:, t]).to(r.dtype)
        running = r[:, t] + discount * running
        ret[:, t] = running
    return torch.where(action_mask, ret, torch.zeros_like(ret))


def returns(token_rewards: torch.Tensor, action_mask: torch.Tensor, *, reward_to_go: bool = False,
            gamma: float = 1.0, turn_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The return credited to each token, (B, T).

    reward_to_go=False (REINFORCE): every token of trajectory i gets the whole discounted return
        R_i = sum_t gamma^t r_{i,t}, i.e. ret_{i,t} = R_i.
    reward_to_go=True: ret_{i,t} = sum_{t' >= t} gamma^(t'-t) r_{i,t'} (see
        `discounted_reward_to_go`); for a reward given only at the last token with gamma = 1 both
        choices are the same.
    turn_ids: (B, T) discount per turn of a multi-turn episode instead of per token (see
        `discounted_reward_to_go`).
    """
    rtg = discounted_reward_to_go(token_rewards, action_mask, gamma, turn_ids=turn_ids)
    if reward_to_go:
        return rtg
    whole = rtg[:, :1].expand_as(rtg) if rtg.shape[1] else rtg
    return torch.where(action_mask, whole, torch.zeros_like(rtg))


def sequence_returns(token_returns: torch.Tensor) -> torch.Tensor:
    """R_i, the return of the whole trajectory: the return credited to its first token. (B,)."""
    B, T = token_returns.shape
    if T == 0:
        return token_returns.new_zeros(B)
    return token_returns[:, 0]


def mean_within_groups(x: torch.Tensor, n: torch.Tensor, *, weight: torch.Tensor | None = None,
                       leave_one_out: bool) -> torch.Tensor:
    """The (weighted) mean over each sample's group, at every sample: the one home of the group and
    leave-one-out means of `baseline`, `optimal_baseline` and `optimal_token_baseline`.

        leave_one_out=True:   b_i = sum_{j in g(i), j != i} w_j x_j / sum_{j in g(i), j != i} w_j
        leave_one_out=False:  b_i = sum_{j in g(i)} w_j x_j / sum_{j in g(i)} w_j

    x, n, weight: (B/G, G) or (B/G, G, T), the group along dim 1. x holds the values, 0 where not
    counted; n is 1 where counted and 0 elsewhere (x's dtype); weight w >= 0, 0 where not counted
    (None: w_j = n_j, the plain mean). Where the weights sum to 0, b_i is the plain mean of the counted
    values; where none is counted, 0.
    """
    x_sum, count = _group_sum(x, leave_one_out), _group_sum(n, leave_one_out)
    plain = x_sum / count.clamp(min=1)
    if weight is None:
        return plain
    wx, w_sum = _group_sum(weight * x, leave_one_out), _group_sum(weight, leave_one_out)
    weighted = wx / torch.where(w_sum > 0, w_sum, torch.ones_like(w_sum))
    return torch.where(w_sum > 0, weighted, plain)


def _group_sum(t: torch.Tensor, leave_one_out: bool) -> torch.Tensor:
    """sum over each member's group (dim 1), at every member; without the member itself (leave_one_out)."""
    total = t.sum(1, keepdim=True)
    return total - t if leave_one_out else total.expand_as(t)


def baseline(ret: torch.Tensor, group_size: int, kind: Baseline, *,
             sample_mask: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The baseline b_i subtracted from sample i's return, (B,).

    ret: (B,) sequence returns R_i, groups of `group_size` consecutive samples per prompt.
    sample_mask: (B,) True for samples that have a return (a sample no reward function scored is
    left out of every mean); defaults to all True.

    none:          b_i = 0
    batch_mean:    b_i = (1/N) sum_j R_j over the whole batch (includes R_i: bias factor (N-1)/N)
    group_mean:    b_i = (1/G) sum_{j in g(i)} R_j (includes R_i: expected gradient times (G-1)/G)
    leave_one_out: b_i = (1/(G-1)) sum_{j in g(i), j != i} R_j (RLOO; exactly unbiased; needs G >= 2)
    optimal:       b_i = sum_{j in g(i), j != i} w_j R_j / sum_{j in g(i), j != i} w_j, w_j ~ ||grad log p(tau_j)||^2
                   (`optimal_baseline`; `weight` (B,) gives w; exactly unbiased; needs G >= 2)
    optimal_token is per token, not per sample: `optimal_token_baseline`.
    """
    B = ret.shape[0]
    if B % group_size:
        raise ValueError(f"batch of {B} returns is not a whole number of groups of {group_size}")
    m = torch.ones_like(ret, dtype=torch.bool) if sample_mask is None else sample_mask.bool()
    x = torch.where(m, ret, torch.zeros_like(ret))
    mf = m.to(ret.dtype)
    if kind == "none":
        return torch.zeros_like(ret)
    if kind == "batch_mean":
        return (x.sum() / mf.sum().clamp(min=1)).expand(B).clone()
    if kind in ("group_mean", "leave_one_out"):
        if kind == "leave_one_out" and group_size < 2:
            raise ValueError("leave_one_out baseline needs group_size >= 2")
        return mean_within_groups(x.view(-1, group_size), mf.view(-1, group_size),  # (B/G, G)
                                  leave_one_out=kind == "leave_one_out").reshape(B)
    if kind == "optimal":
        if group_size < 2 or weight is None:
            raise ValueError("optimal baseline needs group_size >= 2 and a weight per sample (grad_sq_norm)")
        return optimal_baseline(ret, weight, group_size, sample_mask=m)
    raise ValueError(f"unknown baseline {kind!r}; choose one of {BASELINES}")


def optimal_baseline(ret: torch.Tensor, weight: torch.Tensor, group_size: int, *,
                     sample_mask: torch.Tensor | None = None, leave_one_out: bool = True) -> torch.Tensor:
    """The lecture's variance-minimising baseline, estimated within each group, (B,).

    For the estimator g(tau) (R(tau) - b) with g = grad_theta log p_theta(tau), the total variance
    E||g (R - b)||^2 - ||grad J||^2 is a parabola in a constant b; its derivative -2 E[||g||^2 (R - b)]
    vanishes at (CS224R lecture 3: "very close to average reward but with additional weighting terms")

        b* = E[ ||g(tau)||^2 R(tau) ] / E[ ||g(tau)||^2 ].

    From the G samples of a prompt, with w_j an estimate of ||g(tau_j)||^2:

        leave_one_out=True:   b_i = sum_{j in g(i), j != i} w_j R_j / sum_{j in g(i), j != i} w_j
        leave_one_out=False:  b_i = sum_{j in g(i)} w_j R_j / sum_{j in g(i)} w_j        (verl's form)

    The leave-one-out form is a function of the other samples only, so E[g_i b_i] = E[g_i] E[b_i] = 0:
    the estimator stays exactly unbiased. The including form has no exact bias factor: sample i's
    share of its own baseline, w_i / sum_j w_j, is random and moves with g_i, so E[g] is not a fixed
    multiple of grad J (with equal weights it is group_mean's (G-1)/G). The config offers the
    leave-one-out form (`baseline: optimal`); the other is kept for the enumeration tests.
    Where the others' weights sum to 0 (each of their tokens was certain, or they are unscored) b_i
    falls back to their unweighted mean, and to 0 without another scored sample: both still depend on
    the other samples only.

    weight: (B,) w_j >= 0. lmpg uses the logit-gradient proxy (`lmpg.logprobs.logit_grad_sq_norm`,
    summed over the trajectory's actions; the trainer reads it off the sampler):

        w_j = ||grad_z log p(tau_j)||^2 = sum_t (1 - 2 pi(a_t|s_t) + sum_v pi(v|s_t)^2) / tau^2

    the squared norm of the gradient with respect to each step's logits z_t. It equals ||g||^2 exactly
    when the parameters are the logits themselves, one free logit row per state (a tabular softmax
    policy): the states of one trajectory then own disjoint parameters and the per-step gradients are
    orthogonal. For an LM, g = sum_t J_t^T (e_{a_t} - pi_t) with J_t = dz_t / dtheta, and the proxy
    takes J_t J_t'^T = delta_{tt'} I: it ignores how strongly each step's logits move with theta and
    the cross terms between steps, which share every parameter. It costs no backward pass (verl's
    `optimal_token_baseline` uses the same proxy, arXiv 2602.07078).
    sample_mask: (B,) True for scored samples; the others get weight 0.
    """
    B = ret.shape[0]
    if B % group_size:
        raise ValueError(f"batch of {B} returns is not a whole number of groups of {group_size}")
    m = torch.ones_like(ret, dtype=torch.bool) if sample_mask is None else sample_mask.bool()
    zero = torch.zeros_like(ret)
    w = torch.where(m, weight.to(ret.dtype), zero).view(-1, group_size)  # (B/G, G)
    x = torch.where(m, ret, zero).view(-1, group_size)
    n = m.to(ret.dtype).view(-1, group_size)
    return mean_within_groups(x, n, weight=w, leave_one_out=leave_one_out).reshape(B)


def optimal_token_baseline(ret: torch.Tensor, weight: torch.Tensor, group_size: int, *, action_mask: torch.Tensor,
                           sample_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The per-token variance-minimising baseline, leave-one-out within each group, (B, T).

    With a return per token the estimator is sum_t g_t (ret_t - b_t), g_t = grad log pi(a_t | s_t).
    In a tabular softmax policy the g_t of one trajectory lie on disjoint parameters (each state s_t
    has its own logit row), so ||sum_t g_t (ret_t - b_t)||^2 = sum_t ||g_t||^2 (ret_t - b_t)^2 and each
    position's constant b_t minimises its own parabola (g_t = 0 where tau has no token t):

        b*_t = E[ ||g_t||^2 ret_t ] / E[ ||g_t||^2 ]

        b_{i,t} = sum_{j in g(i), j != i} w_{j,t} ret_{j,t} / sum_{j in g(i), j != i} w_{j,t}

    with w_{j,t} = ||grad_{z_t} log pi(a_t | s_t)||^2 of sample j's token t (the per-token term of
    `optimal_baseline`'s proxy; exact in the tabular case, for an LM the same approximation). A
    position is part of the state, and b_{i,t} depends on the other samples only, so the estimator
    stays exactly unbiased. Where the others' weights at t sum to 0, b_{i,t} is their unweighted mean;
    where no other sample reaches position t, b_{i,t} = 0 (nothing to compare with; verl does the same
    for the tail of the longest completion). verl's `optimal_token_baseline` differs in two ways: it
    weights by the running sum W_t = sum_{t' <= t} w_t' and includes the sample itself.
    With the whole return (ret_t = R for every t) this is the optimal per-position baseline for
    REINFORCE, a larger family than `optimal_baseline`'s one constant.

    ret, weight: (B, T); action_mask: (B, T) True on the actions;
    sample_mask: (B,) True for scored samples.
    """
    B, T = ret.shape  # sequences, completion tokens
    if B % group_size:
        raise ValueError(f"batch of {B} returns is not a whole number of groups of {group_size}")
    m = action_mask.bool()
    if sample_mask is not None:
        m = m & sample_mask.bool().unsqueeze(1)
    zero = torch.zeros_like(ret)
    w = torch.where(m, weight.to(ret.dtype), zero).view(-1, group_size, T)  # (B/G, G, T)
    x = torch.where(m, ret, zero).view(-1, group_size, T)
    n = m.to(ret.dtype).view(-1, group_size, T)
    return mean_within_groups(x, n, weight=w, leave_one_out=True).reshape(B, T)


def group_normalised_rewards(rewards: torch.Tensor, group_size: int, *, eps: float = 1e-6) -> tuple[torch.Tensor, dict]:
    """Step 0 of GDPO (Group reward-Decoupled normalisation, arXiv 2601.05242; TRL's
    multi_objective_aggregation="normalize_then_sum"): each reward function's rewards normalised
    within each group, before the weighted sum r_i = sum_k w_k z_{k,i} makes the return:

        z_{k,i} = (r_{k,i} - mean_{j in g(i)} r_{k,j}) / (std_{j in g(i)} r_{k,j} + eps)   where the std > 0,
        z_{k,i} = 0                                                                   where it is 0,

    the mean and population std (divide by the count, as `normalise`) over the samples j of i's group
    that function k scored. A function with a wide range then no longer drowns one with a narrow
    range in the sum (GDPO's argument: after GRPO's normalisation of the sum, distinct reward
    combinations collapse to the same advantage). TRL 1.16 divides by the std with Bessel's
    correction plus 1e-4 instead, so its z are sqrt((n - 1) / n) times these, n the group's scored
    count (docs/trl_migration.md).

    rewards: (B, K) one column per reward function, NaN where the function gave the sample no value
    (it stays NaN in z: no term in the sum); the G samples of a group contiguous.
    Returns z (B, K) and stats: zero_spread_reward_frac, the share of (group, function) pairs whose
    scored rewards are all equal (z = 0 there)."""
    B, K = rewards.shape  # sequences, reward functions
    if B % group_size:
        raise ValueError(f"batch of {B} rewards is not a whole number of groups of {group_size}")
    r = rewards.view(-1, group_size, K)  # (B/G, G, K)
    scored = ~torch.isnan(r)
    x = torch.where(scored, r, torch.zeros_like(r))
    n = scored.sum(1, keepdim=True).clamp(min=1).to(r.dtype)
    mean = x.sum(1, keepdim=True) / n
    std = (torch.where(scored, (x - mean) ** 2, torch.zeros_like(x)).sum(1, keepdim=True) / n).sqrt()
    z = torch.where(std > 0, (x - mean) / (std + eps), torch.zeros_like(x))
    z = torch.where(scored, z, torch.full_like(z, float("nan"))).view(B, K)
    has_values = scored.any(1)
    flat = (std.squeeze(1) == 0) & has_values
    stats = {"zero_spread_reward_frac": float(flat.sum() / has_values.sum().clamp(min=1))}
    return z, stats


def advantage_std(adv: torch.Tensor, group_size: int, scope: AdvNorm, *,
                  sample_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Standard deviation used to scale the advantages, per sample (B,).

    group: std of the returns-minus-baseline within the sample's group; batch: over the batch.
    The population std (divide by the count), of samples in `sample_mask` only.
    """
    B = adv.shape[0]
    m = torch.ones_like(adv, dtype=torch.bool) if sample_mask is None else sample_mask.bool()
    if scope == "none":
        return torch.ones_like(adv)
    if scope == "batch":
        mean = masked_mean(adv, m)
        return masked_mean((adv - mean) ** 2, m).sqrt().expand(B).clone()
    if scope == "group":
        a, gm = adv.view(-1, group_size), m.view(-1, group_size)
        mean = masked_mean(a, gm, dim=1).unsqueeze(1)
        std = masked_mean((a - mean) ** 2, gm, dim=1).sqrt()
        return std.unsqueeze(1).expand(-1, group_size).reshape(B)
    raise ValueError(f"unknown adv_norm {scope!r}; choose one of {ADV_NORMS}")


def zero_spread_groups(ret: torch.Tensor, group_size: int,
                       sample_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B/G,) True for groups whose scored samples all have the same return (no learning signal)."""
    m = torch.ones_like(ret, dtype=torch.bool) if sample_mask is None else sample_mask.bool()
    r, gm = ret.view(-1, group_size), m.view(-1, group_size)
    big = torch.finfo(ret.dtype).max
    hi = torch.where(gm, r, torch.full_like(r, -big)).amax(1)
    lo = torch.where(gm, r, torch.full_like(r, big)).amin(1)
    return (hi - lo <= 0) | (gm.sum(1) <= 1)


def subtract_baseline(ret: torch.Tensor, action_mask: torch.Tensor, *, group_size: int, kind: Baseline,
                      sample_mask: torch.Tensor | None = None, grad_sq_norm: torch.Tensor | None = None,
                      gather=None, process_index: int = 0) -> tuple[torch.Tensor, dict]:
    """Step 2: the advantages before any normalisation, (B, T), and their stats.

        A_{i,t} = ret_{i,t} - b_i    on the actions of scored samples, 0 elsewhere,

    ret (B, T) from `returns`, b_i from `baseline` (`kind`) on the sequence returns R_i
    (`sequence_returns`). With reward-to-go the same constant b_i is subtracted from every token's
    return: it does not depend on sample i's actions, so the gradient stays unbiased (for
    leave_one_out; group_mean keeps its (G-1)/G factor).

    optimal weights sample j by w_j = sum_t grad_sq_norm_{j,t}; optimal_token subtracts a baseline per
    token, A_{i,t} = ret_{i,t} - b_{i,t} (`optimal_token_baseline`, computed per process: a group never
    spans processes). grad_sq_norm: (B, T) the per-token `lmpg.logprobs.logit_grad_sq_norm` of the
    actions (0 elsewhere), needed by both.

    Across processes, `gather` concatenates a (B,) tensor over processes in rank order (each with the
    same B); the baselines then see the global batch, and this process keeps its slice
    `process_index`. The default (None) is one process.

    stats: ret_mean and baseline_mean over the scored samples of all processes, `advantage_stats` of
    A on this process, zero_spread_group_frac, and with weights grad_sq_norm_mean and grad_sq_norm_cv.
    """
    B = ret.shape[0]
    m = torch.ones(B, dtype=torch.bool, device=ret.device) if sample_mask is None else sample_mask.bool()
    if kind in WEIGHTED_BASELINES and grad_sq_norm is None:
        raise ValueError(f"baseline {kind} needs grad_sq_norm (B, T) from the sampler")
    seq_ret = sequence_returns(ret)  # (B,)
    weight = None if grad_sq_norm is None else \
        torch.where(action_mask, grad_sq_norm.to(ret.dtype), torch.zeros_like(ret)).sum(1)  # (B,)
    all_ret, all_m = (seq_ret, m) if gather is None else (gather(seq_ret), gather(m))
    all_w = weight if gather is None or weight is None else gather(weight)
    if kind == "optimal_token":
        b_tok = optimal_token_baseline(ret, grad_sq_norm, group_size, action_mask=action_mask, sample_mask=m)
        adv = ret - b_tok  # (B, T)
        b_all = sequence_returns(b_tok) if gather is None else gather(sequence_returns(b_tok))
    else:
        b_all = baseline(all_ret, group_size, kind, sample_mask=all_m, weight=all_w)
        b = b_all[process_index * B:(process_index + 1) * B].to(ret.device)  # (B,) this process's rows
        adv = ret - b.unsqueeze(1)  # (B, T)
    keep = action_mask & m.unsqueeze(1)
    adv = torch.where(keep, adv, torch.zeros_like(adv))
    stats = {
        "ret_mean": float(masked_mean(all_ret, all_m)),
        "baseline_mean": float(masked_mean(b_all, all_m)),
        **advantage_stats(adv, keep, m),
        "zero_spread_group_frac": float(zero_spread_groups(all_ret, group_size, all_m).float().mean()),
    }
    if all_w is not None:  # how unequal the weights are: 0 means the optimal baseline is the plain mean
        w_mean = masked_mean(all_w, all_m)
        stats["grad_sq_norm_mean"] = float(w_mean)
        stats["grad_sq_norm_cv"] = float(masked_mean((all_w - w_mean) ** 2, all_m).sqrt() / w_mean.clamp(min=1e-12))
    return adv, stats


def normalise(adv: torch.Tensor, *, group_size: int, scope: AdvNorm, sample_mask: torch.Tensor | None = None,
              eps: float = 1e-6, gather=None, process_index: int = 0) -> torch.Tensor:
    """Step 3 (GRPO; the config's adv_norm): the advantages divided by their spread, (B, T).

        A'_{i,t} = A_{i,t} / (std_i + eps)    where std_i > 0,    A'_{i,t} = 0 where std_i = 0

    std_i is the population standard deviation (`advantage_std`) of the sequence advantages
    A_j = A_{j,0} = R_j - b_j of the scored samples j (`sample_mask`) in sample i's group (scope
    group) or in the whole batch of all processes (scope batch). A zero std means every return in the
    group (or batch) is the same: there is no spread to learn from, and dividing by eps would blow up
    whatever the baseline left (e.g. baseline none), so the advantage is set to 0, as
    `zero_spread_groups` counts it. gather, process_index: as in `subtract_baseline`.
    """
    if scope not in ("group", "batch"):
        raise ValueError(f"normalise takes scope group or batch, not {scope!r} (adv_norm none: no call)")
    B = adv.shape[0]
    m = torch.ones(B, dtype=torch.bool, device=adv.device) if sample_mask is None else sample_mask.bool()
    seq_adv = sequence_returns(adv)  # (B,) A_i, read at the first token like R_i
    all_adv, all_m = (seq_adv, m) if gather is None else (gather(seq_adv), gather(m))
    std_all = advantage_std(all_adv, group_size, scope, sample_mask=all_m)
    std = std_all[process_index * B:(process_index + 1) * B].to(adv.device).unsqueeze(1)  # (B, 1)
    return torch.where(std > 0, adv / (std + eps), torch.zeros_like(adv))


def advantage_stats(adv: torch.Tensor, keep: torch.Tensor, sample_mask: torch.Tensor) -> dict:
    """adv_mean, adv_std, adv_abs_max over the counted tokens `keep` (B, T) and adv_zero_frac, the
    fraction of samples in `sample_mask` (B,) whose advantage (at the first token) is 0."""
    seq_adv = adv[:, 0] if adv.shape[1] else adv.new_zeros(adv.shape[0])
    return {
        "adv_mean": float(masked_mean(adv, keep)),
        "adv_std": float(masked_mean((adv - masked_mean(adv, keep)) ** 2, keep).sqrt()),
        "adv_abs_max": float(adv.abs().max()) if adv.numel() else 0.0,
        "adv_zero_frac": float(masked_mean((seq_adv == 0).to(adv.dtype), sample_mask)),
    }
