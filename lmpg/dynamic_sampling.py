"""DAPO's dynamic sampling: a batch made only of groups whose returns differ.

Under a group baseline (group_mean, leave_one_out, optimal, optimal_token) a group whose G returns
are all equal has A_i = R_i - b_i = 0 for every sample: it adds nothing to the policy gradient and
only dilutes the loss's token and sequence counts. DAPO (Yu et al. 2025, arXiv 2503.14476, section
3.2: the constraint 0 < |{o_i | is_equivalent(a, o_i)}| < G of eq. 11) over-samples and keeps the
groups with spread. lmpg's form, one `DynamicSampling` call per iteration after the trainer's
usual sampling and scoring:

1. round 0 is the iteration's usual batch: N = batch_size / group_size prompts, sampled and scored;
2. while fewer than N of the groups sampled so far have spread and extra rounds are left
   (`dynamic_sampling_max_extra_rounds`), a round takes the next M prompts of the prompt order
   (`dynamic_sampling_round_prompts`, default N) and samples and scores them with the trainer's own
   steps (any sampler: lmpg's, an inference engine, episodes). Its prompts sit at positions S + p of
   the iteration, S the prompts sampled before it, so each sample's random stream
   row_seed(seed, iteration, S + p, j) is its own;
3. the batch is the first N groups with spread in sampling order (round, then position): the choice
   one process makes. When the rounds run out first, it is completed with the first groups without
   spread (A = 0 there, so the update trains on the spread groups found, their loss diluted as
   without dynamic sampling), with a warning and `dynamic_sampling/short_groups` > 0;
4. each process takes its share of the N chosen groups, laid out as any batch is
   (`lmpg.distributed.prompt_positions`), gathering the groups another process sampled.

Every process takes the same decisions from the same gathered flags, so all end an iteration with
N / processes groups (no collective waits on a process that stopped early), and the batch, its
samples and its metrics are one process's. The prompt order advances by each round's prompts, still
a function of the seed and checkpointed as before, so a killed run resumes bit for bit.

Spread is `lmpg.advantages.zero_spread_groups` negated: at least two scored samples whose returns
R_i (the task reward, discounted by gamma, before any KL penalty) differ, the groups that
zero_spread_group_frac does not count.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmpg import distributed
from lmpg.advantages import returns, sequence_returns, zero_spread_groups
from lmpg.batch import TrajectoryBatch
from lmpg.rewards.scorer import RewardScores, metric_means, pool_metric_values

logger = logging.getLogger("lmpg")

PROMPT_SIDE = ("prompt_ids", "prompt_mask")
"""The (B, P) fields, left padded; every other (B, ...) tensor of two or more dims is (B, T), right padded."""


# ---------------------------------------------------------------- the choice (pure)
def group_spread(batch: TrajectoryBatch, *, group_size: int, gamma: float) -> torch.Tensor:
    """(S,) bool for a scored batch of S groups (G contiguous rows each): whether the group's scored
    samples have returns R_i that differ, max_i R_i > min_i R_i (so at least two are scored)."""
    ret = returns(batch.token_rewards, batch.action_mask, gamma=gamma, turn_ids=batch.turn_ids)  # (B, T)
    return ~zero_spread_groups(sequence_returns(ret), group_size, batch.scored)


def choose_groups(spread: torch.Tensor, n: int) -> tuple[list[int], int]:
    """(the n groups a batch trains on, how many of them lack spread), from the (S,) spread flags of
    S >= n groups in sampling order: the first n with spread, completed by the first without when
    fewer than n have it; the chosen indices in sampling order."""
    with_spread = torch.nonzero(spread).flatten().tolist()[:n]
    short = n - len(with_spread)
    without = torch.nonzero(~spread).flatten().tolist()[:short]
    return sorted(with_spread + without), short


# ---------------------------------------------------------------- groups of rows, moved whole
@dataclass
class SampledGroups:
    """Groups sampled and scored, each with its prompt, its G rows and their rewards."""

    prompts: object
    """The trainer's `Prompts` (one per group); `positions` says which sampled group each is."""
    batch: TrajectoryBatch
    """G contiguous rows per group."""
    scores: RewardScores
    """The reward functions' values per row, and this process's error counts and log_metric values."""


def _pad(t: torch.Tensor, width: int, name: str, pad_id: int) -> torch.Tensor:
    """(B, W, ...) -> (B, width, ...), padded as the samplers pad: prompts on the left, the rest on the
    right; token ids with pad_id, turn_ids with each row's last turn, everything else with 0 / False."""
    extra = width - t.shape[1]
    if extra <= 0:
        return t
    if name == "turn_ids" and t.shape[1]:
        pad = t[:, -1:].expand(-1, extra, *t.shape[2:])
    else:
        pad = t.new_full((t.shape[0], extra, *t.shape[2:]), pad_id if name.endswith("_ids") and name != "turn_ids" else 0)
    return torch.cat([pad, t] if name in PROMPT_SIDE else [t, pad], 1)


def concat_batches(batches: list[TrajectoryBatch], pad_id: int) -> TrajectoryBatch:
    """The rows of several batches, one after another, padded to the widest; counts (ints) add up."""
    values = {}
    for f in dataclasses.fields(TrajectoryBatch):
        items = [getattr(b, f.name) for b in batches]
        if all(v is None for v in items):
            values[f.name] = None
        elif isinstance(items[0], torch.Tensor):
            if items[0].dim() >= 2:
                width = max(v.shape[1] for v in items)
                items = [_pad(v, width, f.name, pad_id) for v in items]
            values[f.name] = torch.cat(items)
        elif isinstance(items[0], list):
            values[f.name] = [x for v in items for x in v]
        elif isinstance(items[0], int):
            values[f.name] = sum(items)
        else:
            raise TypeError(f"TrajectoryBatch.{f.name} holds a {type(items[0]).__name__}; teach "
                            "lmpg.dynamic_sampling.concat_batches how to join it")
    return TrajectoryBatch(**values)


def select_rows(batch: TrajectoryBatch, rows: list[int]) -> TrajectoryBatch:
    """The given rows of a batch, in that order; counts (ints) are kept as they are."""
    index = torch.tensor(rows, dtype=torch.long)
    values = {}
    for f in dataclasses.fields(TrajectoryBatch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            v = v[index.to(v.device)]
        elif isinstance(v, list):
            v = [v[i] for i in rows]
        values[f.name] = v
    return TrajectoryBatch(**values)


def trim_padding(batch: TrajectoryBatch) -> TrajectoryBatch:
    """The batch without the prompt columns no row uses (left) and the columns after every row's
    last token (right): the widths a sampler gives these rows."""
    used_prompt = torch.nonzero(batch.prompt_mask.any(0)).flatten()
    used_after = torch.nonzero(batch.completion_mask.any(0)).flatten()
    start = int(used_prompt[0]) if len(used_prompt) else batch.prompt_mask.shape[1]
    stop = int(used_after[-1]) + 1 if len(used_after) else 0
    values = {}
    for f in dataclasses.fields(TrajectoryBatch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            v = v[:, start:] if f.name in PROMPT_SIDE else v[:, :stop]
        values[f.name] = v
    return TrajectoryBatch(**values)


def gather_batch(accelerator, batch: TrajectoryBatch, pad_id: int) -> TrajectoryBatch:
    """The rows of every process in rank order (each process with as many rows); counts stay this
    process's. An episode's environment instance stays behind: it may not pickle, and scoring, its
    only reader, is done."""
    values = {}
    for f in dataclasses.fields(TrajectoryBatch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            if v.dim() >= 2:
                width = int(distributed.gather(accelerator, torch.tensor([v.shape[1]], device=v.device)).max())
                v = _pad(v, width, f.name, pad_id)
            v = distributed.gather(accelerator, v)
        elif isinstance(v, list):
            v = distributed.gather_objects(accelerator, [_without_environment(x) for x in v])
        values[f.name] = v
    return TrajectoryBatch(**values)


def _without_environment(item):
    if dataclasses.is_dataclass(item) and any(f.name == "environment" for f in dataclasses.fields(item)):
        return dataclasses.replace(item, environment=None)
    return item


def concat_groups(parts: list[SampledGroups], pad_id: int) -> SampledGroups:
    """The groups of several rounds one after another; error counts, seconds and log_metric values
    add up."""
    first = parts[0].prompts
    prompts = dataclasses.replace(
        first, positions=[p for part in parts for p in part.prompts.positions],
        rows={k: [x for part in parts for x in part.prompts.rows[k]] for k in first.rows},
        prompts=[x for part in parts for x in part.prompts.prompts],
        texts=[x for part in parts for x in part.prompts.texts])
    scores = [part.scores for part in parts]
    extras = dict.fromkeys(k for s in scores for k in s.extras)
    metric_values = pool_metric_values([s.metric_values for s in scores])
    joined = dataclasses.replace(
        scores[0], values=[[x for s in scores for x in s.values[k]] for k in range(len(scores[0].names))],
        error_counts={k: sum(s.error_counts.get(k, 0) for s in scores) for k in scores[0].error_counts},
        seconds={k: sum(s.seconds.get(k, 0.0) for s in scores) for k in scores[0].seconds},
        extras={k: [x for s, part in zip(scores, parts) for x in s.extras.get(k, [None] * part.batch.batch_size)]
                for k in extras},
        metrics=metric_means(metric_values), metric_values=metric_values)
    return SampledGroups(prompts, concat_batches([part.batch for part in parts], pad_id), joined)


def take_groups(groups: SampledGroups, index: list[int], group_size: int) -> SampledGroups:
    """The given groups, in that order (their rows and rewards with them); per-process totals kept."""
    rows = [g * group_size + j for g in index for j in range(group_size)]
    p = groups.prompts
    prompts = dataclasses.replace(p, positions=[p.positions[g] for g in index],
                                  rows={k: [v[g] for g in index] for k, v in p.rows.items()},
                                  prompts=[p.prompts[g] for g in index], texts=[p.texts[g] for g in index])
    s = groups.scores
    scores = dataclasses.replace(s, values=[[v[i] for i in rows] for v in s.values],
                                 extras={k: [v[i] for i in rows] for k, v in s.extras.items()})
    return SampledGroups(prompts, select_rows(groups.batch, rows), scores)


def gather_groups(accelerator, groups: SampledGroups, pad_id: int) -> SampledGroups:
    """The groups of every process in rank order (each process with as many); per-process totals
    (error counts, log_metric values, prompts cut) stay this process's, for the metrics to add up."""
    p, s = groups.prompts, groups.scores
    per_prompt = distributed.gather_objects(accelerator, [
        (pos, {k: v[g] for k, v in p.rows.items()}, p.prompts[g], p.texts[g]) for g, pos in enumerate(p.positions)])
    prompts = dataclasses.replace(p, positions=[x[0] for x in per_prompt],
                                  rows={k: [x[1][k] for x in per_prompt] for k in p.rows},
                                  prompts=[x[2] for x in per_prompt], texts=[x[3] for x in per_prompt])
    per_row = distributed.gather_objects(accelerator, [
        ([v[i] for v in s.values], {k: v[i] for k, v in s.extras.items()}) for i in range(groups.batch.batch_size)])
    extras = dict.fromkeys(k for _, row_extras in per_row for k in row_extras)
    scores = dataclasses.replace(s, values=[[x[0][k] for x in per_row] for k in range(len(s.names))],
                                 extras={k: [x[1].get(k) for x in per_row] for k in extras})
    return SampledGroups(prompts, gather_batch(accelerator, groups.batch, pad_id), scores)


# ---------------------------------------------------------------- the trainer's step
@dataclass
class FilledBatch:
    """What dynamic sampling hands back to the trainer: this process's share of the chosen groups."""

    groups: SampledGroups
    """Positions: each prompt's place in the iteration's batch of N (as `next_prompts` lays them out)."""
    stats: dict
    """dynamic_sampling/* metrics, the same on every process."""
    time_sample: float
    """Seconds the extra rounds spent sampling (their scoring and the choice are the rest)."""


class DynamicSampling:
    """DAPO's dynamic sampling (module docstring) for a trainer with N = prompts_per_iteration prompts
    per batch laid out in minibatches of prompts_per_minibatch prompts over the processes, and
    round_prompts prompts per extra round."""

    def __init__(self, accelerator, *, prompts_per_iteration: int, prompts_per_minibatch: int, round_prompts: int,
                 group_size: int, gamma: float, max_extra_rounds: int, pad_id: int):
        self.accelerator = accelerator
        self.prompts_per_iteration, self.prompts_per_minibatch = prompts_per_iteration, prompts_per_minibatch
        self.round_prompts = round_prompts
        self.group_size, self.gamma, self.max_extra_rounds, self.pad_id = group_size, gamma, max_extra_rounds, pad_id
        self.bound_hits = 0  # iterations whose batch was completed with groups without spread (for the warnings)

    def __call__(self, first: SampledGroups, *, next_prompts: Callable, sample: Callable, score: Callable,
                 iteration: int) -> FilledBatch:
        """`first` is round 0 (sampled and scored); next_prompts(count, first_position) /
        sample(prompts) / score(batch, prompts) are the trainer's steps for the extra rounds."""
        N, acc = self.prompts_per_iteration, self.accelerator
        rounds, spread, time_sample = [first], [self.spread_in_order(first)], 0.0
        while int(torch.cat(spread).sum()) < N and len(rounds) <= self.max_extra_rounds:
            start = time.perf_counter()
            prompts = next_prompts(self.round_prompts, first_position=sum(len(s) for s in spread))
            batch = sample(prompts)
            time_sample += time.perf_counter() - start
            rounds.append(SampledGroups(prompts, batch, score(batch, prompts)))
            spread.append(self.spread_in_order(rounds[-1]))
        spread = torch.cat(spread)  # (N + extra rounds * M,) in sampling order
        chosen, short = choose_groups(spread, N)
        stats = self.round_stats(rounds, spread, short)
        self.bound_hits += short > 0
        if short and acc.is_main_process and self.bound_hits % 10 == 1:  # the first time, then every 10th
            logger.warning("dynamic sampling at iteration %d: %d of %d groups have reward spread after %d extra "
                           "rounds; the batch is completed with %d without (no policy gradient from them; %d "
                           "iterations so short in this process's run); raise dynamic_sampling_max_extra_rounds or "
                           "use prompts the policy sometimes solves", iteration + 1, N - short, N, len(rounds) - 1,
                           short, self.bound_hits)
        return FilledBatch(self.my_share(concat_groups(rounds, self.pad_id), chosen), stats, time_sample)

    def spread_in_order(self, groups: SampledGroups) -> torch.Tensor:
        """(N,) or (M,) bool: the spread of every process's groups of one round, in position order."""
        flags = group_spread(groups.batch, group_size=self.group_size, gamma=self.gamma).cpu()
        return distributed.in_global_order(self.accelerator, flags, torch.tensor(groups.prompts.positions))

    def my_share(self, pool: SampledGroups, chosen: list[int]) -> SampledGroups:
        """This process's groups of the batch: chosen[t] at each of its positions t, gathered from the
        process that sampled it; positions then the batch's (0 .. N-1)."""
        acc, G = self.accelerator, self.group_size
        positions = distributed.prompt_positions(self.prompts_per_iteration, self.prompts_per_minibatch,
                                                 acc.num_processes, acc.process_index)
        if acc.num_processes > 1:  # every process sends its chosen groups, as many each (a repeat fills in)
            wanted = set(chosen)
            held = [g for g, sampled in enumerate(pool.prompts.positions) if sampled in wanted]
            most = int(distributed.gather(acc, torch.tensor([len(held)])).max())
            held += [held[0] if held else 0] * (most - len(held))
            pool = gather_groups(acc, take_groups(pool, held, G), self.pad_id)
        where = {}
        for g, sampled in enumerate(pool.prompts.positions):
            where.setdefault(sampled, g)
        mine = take_groups(pool, [where[chosen[t]] for t in positions], G)
        batch = trim_padding(mine.batch)
        batch.group = torch.arange(batch.batch_size, device=batch.group.device) // G
        return SampledGroups(dataclasses.replace(mine.prompts, positions=positions), batch, mine.scores)

    def round_stats(self, rounds: list[SampledGroups], spread: torch.Tensor, short: int) -> dict:
        """The dynamic_sampling/* metrics over every process's rounds (docs/diagnostics.md)."""
        acc = self.accelerator
        tokens = sum(int(distributed.gather(acc, torch.tensor([r.batch.num_tokens])).sum()) for r in rounds)
        rewards = []
        for r in rounds:
            reward = distributed.gather(acc, r.batch.token_rewards.sum(1).double().cpu())
            rewards += reward[distributed.gather(acc, r.batch.scored.cpu())].tolist()
        sampled = len(spread)
        return {"dynamic_sampling/extra_rounds": len(rounds) - 1,
                "dynamic_sampling/sampled_prompts": sampled,
                "dynamic_sampling/spread_frac": int(spread.sum()) / sampled,
                "dynamic_sampling/dropped_groups": sampled - self.prompts_per_iteration,
                "dynamic_sampling/short_groups": short,
                "dynamic_sampling/bound_hit": int(short > 0),
                "dynamic_sampling/sampled_tokens": tokens,
                # fsum: exactly rounded, so the same however the rows were split over processes
                "dynamic_sampling/sampled_reward_mean": math.fsum(rewards) / len(rewards) if rewards else float("nan")}
