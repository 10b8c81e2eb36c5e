"""RewardScorer: runs the reward functions on a batch, checks what they return, and owns their
weights; RewardScores: what one batch got, placed as per-token rewards with those weights."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import pickle
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

import torch

from lmpg.choices import OnError
from lmpg.errors import RewardError
from lmpg.rewards.calling import RESERVED, RewardState, call_plan, check_arguments
from lmpg.rewards.checks import CallResult, check_call
from lmpg.rewards.executors import (
    EXECUTORS,
    ProcessRunner,
    RewardTask,
    in_daemon_thread,
    run_async,
    run_in_threads,
    run_serial,
)
from lmpg.rewards.placement import token_rewards
from lmpg.rewards.specs import load_reward_fn, one_line
from lmpg.rewards.types import is_async_reward_fn, reward_fn_name

ON_ERROR = get_args(OnError)


@dataclass
class RewardScores:
    """What each reward function gave each completion, from one `RewardScorer.score` call."""

    names: list[str]
    """One per function, unique, in the scorer's order."""
    values: list[list]
    """values[k][i]: function k's reward for completion i: a float, None (no signal), or a list of one
    float per completion token."""
    weights: list[float]
    """One per function: the scorer's weights, which `to_token_rewards` applies."""
    error_counts: dict[str, int] = field(default_factory=dict)
    """Per function, the samples whose value became None under on_error='none' (timeouts included)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Per function, wall-clock seconds from its first call starting to its last call ending."""
    extras: dict[str, list] = field(default_factory=dict)
    """Columns the functions gave `log_extra`, one value per completion (for samples.jsonl)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Per name given to `log_metric`, the mean of its values over the batch (for metrics.jsonl)."""
    metric_values: dict[str, list[float]] = field(default_factory=dict)
    """Per name given to `log_metric`, every value given, so that processes can pool them (`metric_means`)."""

    def means(self) -> dict[str, float]:
        """Per function, the mean reward over samples that have one (a per-token list counts as its
        sum); functions that gave no sample a value are left out."""
        means = {}
        for name, values in zip(self.names, self.values):
            given = [sum(v) if isinstance(v, list) else v for v in values if v is not None]
            if given:
                means[name] = sum(given) / len(given)
        return means

    def group_normalised(self, group_size: int, eps: float) -> RewardScores:
        """These scores with each function's values normalised within each group of `group_size`
        samples (`lmpg.advantages.group_normalised_rewards`, GDPO); None stays None. Per-token values
        (lists) are refused: the normalisation is of one reward per sample."""
        from lmpg.advantages import group_normalised_rewards

        for name, values in zip(self.names, self.values):
            if any(isinstance(v, list) for v in values):
                raise RewardError(f"reward '{name}' gives per-token rewards, but reward_aggregation=normalize_then_sum "
                                  "normalises one reward per sample; return one float per completion or set "
                                  "reward_aggregation=sum")
        rewards = torch.tensor([[math.nan if v is None else float(v) for v in values] for values in self.values],
                               dtype=torch.float64).T.reshape(-1, len(self.names))  # (B, K)
        z, _ = group_normalised_rewards(rewards, group_size, eps=eps)
        values = [[None if math.isnan(v) else v for v in column] for column in z.T.tolist()]
        return dataclasses.replace(self, values=values)

    def to_token_rewards(self, completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token_rewards (B, T), has_reward (B,)): the weighted per-token rewards of
        `lmpg.rewards.placement.token_rewards` on completion_mask (B, T) bool."""
        return token_rewards(self.names, self.values, self.weights, completion_mask)


def pool_metric_values(logs: Sequence[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per name, the values given to `log_metric` in all of `logs` (one per call, or one per process), in order."""
    pooled: dict[str, list[float]] = {}
    for log in logs:
        for name, values in log.items():
            pooled.setdefault(name, []).extend(values)
    return pooled


def metric_means(values: dict[str, list[float]]) -> dict[str, float]:
    """Per name, the mean of its values: sum / count, the sum by `math.fsum` so that the order the
    values come in (how the batch was split over calls or processes) does not round it differently."""
    return {name: math.fsum(v) / len(v) for name, v in values.items() if v}


def _unique_names(names: list[str]) -> list[str]:
    """Names made unique: every name used more than once gets _1, _2, ... in order."""
    counts, seen, unique = Counter(names), Counter(), []
    taken = {n for n in names if counts[n] == 1}
    for name in names:
        if counts[name] == 1:
            unique.append(name)
            continue
        while True:
            seen[name] += 1
            candidate = f"{name}_{seen[name]}"
            if candidate not in taken:
                break
        taken.add(candidate)
        unique.append(candidate)
    return unique


def _chunk_bounds(batch_size: int, n_chunks: int) -> list[tuple[int, int]]:
    """[start, stop) of n_chunks contiguous, nearly equal slices (fewer if the batch is smaller)."""
    n_chunks = max(1, min(n_chunks, batch_size))
    edges = [round(c * batch_size / n_chunks) for c in range(n_chunks + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


class RewardScorer:
    """Runs reward functions on a batch of completions and checks what they return.

    reward_fns: callables or spec strings (`lmpg.rewards.specs`).  weights: one per function
    (default 1.0 each), applied by `RewardScores.to_token_rewards`.  on_error: "raise" (a function
    that raises, times out or returns something unusable raises RewardError naming it, the sample and
    the value) or "none" (those samples get None and are counted in `error_counts`).
    executor: how sync functions run (`lmpg.rewards.executors`): "serial", "thread" or "process" (a
    pool of max_workers, kept across calls; each function's batch is split into max_workers contiguous
    slices scored concurrently). Under "process" the functions must pickle, or be given as spec
    strings (loaded in the workers), and a script needs the `if __name__ == "__main__":` guard.
    async functions are always awaited concurrently in one event loop. A function with attribute
    `split_batch = False` (e.g. a reward model that batches itself) runs whole, not in the pool.
    timeout: seconds per call, None for no limit.  memory_mb: cap on each process worker's data
    memory.  max_steps: what `trainer_state.max_steps` reports.  Use as a context manager, or call
    close(), to shut the pool down.
    """

    def __init__(
        self,
        reward_fns: Sequence[Callable | str] | Callable | str,
        weights: Sequence[float] | None = None,
        on_error: str = "raise",
        executor: str = "serial",
        max_workers: int | None = None,
        timeout: float | None = None,
        memory_mb: int | None = None,
        max_steps: int | None = None,
    ):
        reward_fns = [reward_fns] if isinstance(reward_fns, str) or callable(reward_fns) else list(reward_fns)
        if not reward_fns:
            raise RewardError("no reward functions given; pass at least one callable or spec like 'math_answer'")
        if on_error not in ON_ERROR:
            raise RewardError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if executor not in EXECUTORS:
            raise RewardError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
            raise RewardError(f"max_workers must be a positive int or None, got {max_workers!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                    or not timeout > 0):
            raise RewardError(f"reward timeout must be a number of seconds > 0 or None, got {timeout!r}")
        self.reward_fns = [load_reward_fn(fn) if isinstance(fn, str) else fn for fn in reward_fns]
        for fn, given in zip(self.reward_fns, reward_fns):
            if not callable(fn):
                raise RewardError(
                    f"reward function {given!r} is a {type(given).__name__}, not a callable or a spec string"
                )
        self.names = _unique_names([reward_fn_name(fn) for fn in self.reward_fns])
        if weights is None:
            weights = [1.0] * len(self.reward_fns)
        if len(weights) != len(self.reward_fns):
            raise RewardError(
                f"got {len(weights)} reward weights for {len(self.reward_fns)} reward functions {self.names};"
                " give one weight per function"
            )
        for name, weight in zip(self.names, weights):
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise RewardError(f"weight of reward '{name}' must be a finite number, got {weight!r}")
        self.weights = [float(w) for w in weights]
        self.on_error, self.executor, self.timeout, self.max_steps = on_error, executor, timeout, max_steps
        cpus = os.cpu_count() or 1
        self.max_workers = max_workers or (cpus if executor == "process" else min(32, cpus + 4))
        self.plans = [call_plan(fn, name) for fn, name in zip(self.reward_fns, self.names)]
        self.is_async = [is_async_reward_fn(fn) for fn in self.reward_fns]
        # What a pool worker calls: the spec string when the function came from one, else the function.
        self._pool_targets = [spec if isinstance(spec, str) else fn for spec, fn in zip(reward_fns, self.reward_fns)]
        self._pooled = [
            executor != "serial" and not is_async and getattr(fn, "split_batch", True)
            for fn, is_async in zip(self.reward_fns, self.is_async)
        ]
        self._processes = ProcessRunner(self.max_workers, memory_mb) if executor == "process" else None
        if executor == "process":
            self._check_picklable()

    def _check_picklable(self) -> None:
        for name, target, pooled in zip(self.names, self._pool_targets, self._pooled):
            if not pooled or isinstance(target, str):
                continue
            try:
                pickle.dumps(target)
            except Exception as error:
                raise RewardError(
                    f"reward function '{name}' cannot be pickled for executor='process' ({type(error).__name__}:"
                    f" {one_line(error, 80)}); use executor='thread', or define it at module top level"
                ) from None

    def close(self) -> None:
        """Shut down the worker pool (a later score() starts a new one)."""
        if self._processes is not None:
            self._processes.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _reward_kwargs(self, prompts: list, completions: list, completion_ids: Sequence, step: int,
                       columns: dict | None, environments: Sequence | None) -> dict[str, Any]:
        batch_size = len(completions)
        for what, sequence in (("prompts", prompts), ("completion_ids", completion_ids)):
            if len(sequence) != batch_size:
                raise RewardError(f"got {len(sequence)} {what} for {batch_size} completions; align them one per completion")
        kwargs: dict[str, Any] = {"prompts": prompts, "completions": completions,
                                  "completion_ids": [list(ids) for ids in completion_ids]}
        for name, column in (columns or {}).items():
            if name in RESERVED:
                raise RewardError(f"dataset column '{name}' clashes with a reward function argument; rename the column")
            if isinstance(column, (str, bytes)) or not isinstance(column, Sequence) or len(column) != batch_size:
                length = f" of length {len(column)}" if hasattr(column, "__len__") else ""
                raise RewardError(f"column '{name}' must be a list with one value per completion ({batch_size}), got"
                                  f" {type(column).__name__}{length}")
            kwargs[name] = list(column)
        if environments is not None:  # TRL passes environments only where there are some
            kwargs["environments"] = list(environments)
        kwargs["trainer_state"] = RewardState(global_step=step, max_steps=self.max_steps)
        kwargs["step"] = step
        return kwargs

    def score(
        self,
        prompts: Sequence,
        completions: Sequence,
        completion_ids: Sequence[Sequence[int]],
        step: int = 0,
        columns: dict[str, Sequence] | None = None,
        environments: Sequence | None = None,
    ) -> RewardScores:
        """Every function's reward for every completion.

        prompts, completions, completion_ids: one per completion (a prompt repeated for each of its G
        samples).  step: iterations done (trainer_state.global_step).  columns: the other dataset
        columns, aligned to the completions.  environments: one per completion, once there are some.
        The functions get these as TRL's keywords (`lmpg.rewards.calling`).
        """
        prompts, completions = list(prompts), list(completions)
        kwargs = self._reward_kwargs(prompts, completions, completion_ids, step, columns, environments)
        for plan in self.plans:
            check_arguments(plan, set(kwargs) | {"log_extra", "log_metric"})
        batch_size = len(completions)
        calls = self._run_all(kwargs, batch_size) if batch_size else [[] for _ in self.reward_fns]
        return self._collect(calls, kwargs["completion_ids"], batch_size)

    def _task(self, k: int, kwargs: dict, start: int, stop: int, target: Any) -> RewardTask:
        whole = start == 0 and stop == len(kwargs["completions"])
        sliced = kwargs if whole else {name: value[start:stop] if isinstance(value, list) else value
                                       for name, value in kwargs.items()}
        return RewardTask(target, self.plans[k], start, stop, sliced)

    def _run_all(self, kwargs: dict, batch_size: int) -> list[list[CallResult]]:
        """Per function, its calls (one, or one per slice under a pool) as they came back."""
        K = len(self.reward_fns)
        pooled = [self._task(k, kwargs, start, stop, self._pool_targets[k])
                  for k in range(K) if self._pooled[k] for start, stop in _chunk_bounds(batch_size, self.max_workers)]
        owners = [k for k in range(K) if self._pooled[k] for _ in _chunk_bounds(batch_size, self.max_workers)]
        # 1. the pool's calls start first and run meanwhile
        pool_job = None
        if pooled:
            runner = self._processes.run if self._processes is not None else \
                lambda tasks, timeout: run_in_threads(tasks, self.max_workers, timeout)
            pool_job = in_daemon_thread(runner, pooled, self.timeout)
        # 2. async functions, concurrently in one event loop
        async_ks = [k for k in range(K) if self.is_async[k]]
        async_results = run_async([self._task(k, kwargs, 0, batch_size, self.reward_fns[k]) for k in async_ks],
                                  self.timeout) if async_ks else []
        # 3. the remaining sync functions, whole, one after another
        serial_ks = [k for k in range(K) if not self.is_async[k] and not self._pooled[k]]
        serial_results = run_serial([self._task(k, kwargs, 0, batch_size, self.reward_fns[k]) for k in serial_ks],
                                    self.timeout)
        calls: list[list[CallResult]] = [[] for _ in range(K)]
        for k, result in zip(async_ks + serial_ks, async_results + serial_results):
            calls[k].append(result)
        if pool_job is not None:
            for k, result in zip(owners, pool_job.result()):
                calls[k].append(result)
        return calls

    def _collect(self, calls: list[list[CallResult]], completion_ids: list, batch_size: int) -> RewardScores:
        values, error_counts, seconds, extras, logged = [], {}, {}, {}, []
        for name, fn_calls in zip(self.names, calls):
            row: list = []
            error_counts[name] = 0
            fn_extras: dict[str, list] = {}
            for call in sorted(fn_calls, key=lambda c: c.start):
                checked = check_call(name, call, completion_ids)
                if checked.problem is not None and self.on_error == "raise":
                    raise RewardError(checked.problem)
                row.extend(checked.values)
                error_counts[name] += checked.n_errors
                for column, column_values in call.extras.items():
                    fn_extras.setdefault(column, []).extend(column_values)
                logged.append(call.metrics)
            for column, column_values in fn_extras.items():
                if len(column_values) != batch_size:
                    raise RewardError(f"reward function '{name}' gave log_extra('{column}', ...) {len(column_values)}"
                                      f" values for {batch_size} completions; log one value per completion")
                extras[column] = column_values
            values.append(row if fn_calls else [None] * batch_size)
            seconds[name] = max((c.ended for c in fn_calls), default=0.0) - min((c.began for c in fn_calls), default=0.0)
        metric_values = pool_metric_values(logged)
        return RewardScores(names=list(self.names), values=values, weights=list(self.weights),
                            error_counts=error_counts, seconds=seconds, extras=extras,
                            metrics=metric_means(metric_values), metric_values=metric_values)
