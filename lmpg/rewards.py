"""Reward functions: loading them, running them, and placing their outputs as per-token rewards.

A reward function has TRL's signature

    fn(prompts, completions, **kwargs) -> list[float | None | list[float]]      # one entry per completion

kwargs carry every other dataset column aligned to the completions (e.g. `answer=[...]`), plus
`completion_ids` (list of lists of token ids) and `step` (the training step); a function should
accept `**kwargs`. Per completion i it returns

- a float: a sequence-level reward r_i;
- a list of len(completion_ids[i]) floats: per-token rewards r_{i,t} (for reward-to-go);
- None: no signal from this function for this sample (left out, not counted as 0).

With weights w_k, `RewardScores.to_token_rewards` builds the (B, T) per-token reward

    r_{i,t} = sum_k w_k · ( r_{k,i} · 1[t = last counted token of i]   if function k gave a scalar
                          | r_{k,i,t}                               if it gave a per-token list )

summing over the functions that gave a value for sample i. `RewardScorer` runs the functions
(serially, in threads, in processes, async ones concurrently in an event loop) and checks what
they return; `load_reward_fn` resolves a spec string from a config.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import multiprocessing
import numbers
import os
import pickle
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from lmpg.errors import RewardError

RewardFn = Callable[..., Sequence]
ON_ERROR = ("raise", "none")
EXECUTORS = ("serial", "thread", "process")
RESERVED_KWARGS = ("prompts", "completions", "completion_ids", "step")


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_repr(value: Any, limit: int = 80) -> str:
    return _one_line(repr(value), limit)


# ---------------------------------------------------------------------------------------------------
# Naming and loading


def reward_fn_name(fn: Callable) -> str:
    """The name a reward is logged under: `__name__` (functions, and partials or objects given one),
    else a functools.partial's function name, else the class name of a callable object."""
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(fn, functools.partial):
        return reward_fn_name(fn.func)
    return type(fn).__name__


def _builtin_rewards() -> dict[str, Callable]:
    from reward_fns import BUILTIN_REWARDS  # imported on demand: it pulls in sympy via math_verify

    return BUILTIN_REWARDS


def _public_callables(module: Any) -> list[str]:
    return sorted(
        name
        for name, value in vars(module).items()
        if callable(value) and not name.startswith("_") and not inspect.isclass(value)
    )


def _import_module(target: str, spec: str) -> Any:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as error:
        if error.name and (target == error.name or target.startswith(error.name + ".")):
            raise RewardError(
                f"reward function '{spec}': module '{target}' not found; install it, or give a file"
                " path instead (e.g. 'path/to/rewards.py:my_reward')"
            ) from None
        raise RewardError(
            f"reward function '{spec}': importing '{target}' failed: {_one_line(error)}"
        ) from None
    except Exception as error:
        raise RewardError(
            f"reward function '{spec}': importing '{target}' raised {type(error).__name__}: {_one_line(error)}"
        ) from None


def _import_file(path: str, spec: str) -> Any:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise RewardError(f"reward function '{spec}': file not found: {path}")
    stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
    module_name = f"lmpg_reward_file_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    if module_name in sys.modules:  # loaded before: the same functions, not a second copy
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # registered first, as a normal import does (dataclasses need it)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise RewardError(
            f"reward function '{spec}': running {path} raised {type(error).__name__}: {_one_line(error)}"
        ) from None
    return module


def load_reward_fn(spec: str) -> Callable:
    """The reward function a spec names.

    spec: 'package.module:function', 'path/to/file.py:function' (a path relative to the working
    directory, or absolute), or the bare name of a built-in (`reward_fns.BUILTIN_REWARDS`, e.g.
    'math_answer'). The attribute may be dotted ('module:obj.method'). Raises RewardError saying why
    a spec does not resolve: module or file not found, import failure, no such attribute (listing
    the callables the module has), or an attribute that is a class or not callable.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"reward function spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if ":" not in spec:
        builtins = _builtin_rewards()
        if spec in builtins:
            return builtins[spec]
        raise RewardError(
            f"reward function '{spec}' is not a built-in ({', '.join(sorted(builtins))}); give"
            " 'package.module:function' or 'path/to/file.py:function'"
        )
    target, _, attribute = spec.rpartition(":")
    if not target or not attribute:
        raise RewardError(f"reward function '{spec}' must be 'module:function' or 'file.py:function'")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    module = _import_file(target, spec) if is_file else _import_module(target, spec)
    value = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            available = _public_callables(module)
            listing = ", ".join(available[:20]) + (", ..." if len(available) > 20 else "") or "none"
            raise RewardError(
                f"reward function '{spec}': '{target}' has no attribute '{attribute}'; its callables: {listing}"
            )
        value = getattr(value, part)
    if inspect.isclass(value):
        raise RewardError(
            f"reward function '{spec}' is a class; create an instance at module level and name that instead"
        )
    if not callable(value):
        raise RewardError(f"reward function '{spec}' is a {type(value).__name__}, not a callable")
    return value


# ---------------------------------------------------------------------------------------------------
# Checking what a function returned


def _as_real(value: Any) -> tuple[float | None, str | None]:
    """(float, None) for a finite real number (int, float, numpy or 0-d torch scalar), else (None, why)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return None, "a bool is not a reward (return 1.0 / 0.0)"
    if not isinstance(value, numbers.Real):
        return None, f"a {type(value).__name__} is not a number"
    number = float(value)
    if not math.isfinite(number):
        return None, "the reward is not finite"
    return number, None


def _as_sequence(output: Any) -> list | None:
    if isinstance(output, (str, bytes)) or isinstance(output, dict):
        return None
    if hasattr(output, "tolist") and getattr(output, "ndim", 0) >= 1:  # numpy array / torch tensor
        return output.tolist()
    if isinstance(output, Sequence):
        return list(output)
    return None


def _check_sample(value: Any, n_tokens: int) -> tuple[float | list[float] | None, str | None]:
    if value is None:
        return None, None
    sequence = None if getattr(value, "ndim", None) == 0 else _as_sequence(value)
    if sequence is None:
        return _as_real(value)
    if len(sequence) != n_tokens:
        return (
            None,
            f"a per-token list needs one value per completion token: got {len(sequence)}, expected {n_tokens}",
        )
    rewards = []
    for position, element in enumerate(sequence):
        number, why = _as_real(element)
        if why is not None:
            return None, f"per-token value at position {position}: {why}"
        rewards.append(number)
    return rewards, None


class _CallResult(NamedTuple):
    """One call of one function on samples [start, stop), as it came back from wherever it ran."""

    start: int
    stop: int
    began: float
    ended: float
    raised: bool
    output: Any  # what the function returned, or (exception type name, message) if it raised


class _CheckedCall(NamedTuple):
    values: list
    """The values for samples [start, stop), bad ones set to None."""
    n_errors: int
    """How many samples were set to None."""
    problem: str | None
    """The first problem, worded as a RewardError message; None if all was well."""


def _check_call(name: str, call: _CallResult, completion_ids: Sequence) -> _CheckedCall:
    """Check what one call returned: a sequence of one entry per sample, each valid (module docstring)."""
    n = call.stop - call.start
    span = f"samples {call.start}..{call.stop - 1}"
    fix = "fix the function or set on_error='none' to score such samples None"
    output = call.output
    values = None if call.raised or inspect.isawaitable(output) else _as_sequence(output)
    if call.raised:
        kind, message = output
        problem = f"reward function '{name}' raised {kind}: {message} (on {span}); {fix}"
    elif inspect.isawaitable(output):
        if inspect.iscoroutine(output):
            output.close()  # never awaited; closing avoids a RuntimeWarning
        problem = (
            f"reward function '{name}' returned an awaitable; declare it `async def` (or give its class an"
            " async __call__) so RewardScorer awaits it"
        )
    elif values is None:
        problem = (
            f"reward function '{name}' returned {_short_repr(output)} ({type(output).__name__}) for {span};"
            " return a list with one float, None or per-token list per completion"
        )
    elif len(values) != n:
        problem = (
            f"reward function '{name}' returned {len(values)} values for {n} completions ({span}): got"
            f" {len(values)}, expected {n}; return one value per completion"
        )
    else:
        problem = None
    if problem is not None:
        return _CheckedCall([None] * n, n, problem)
    checked, n_bad = [], 0
    for offset, value in enumerate(values):
        index = call.start + offset
        reward, why = _check_sample(value, len(completion_ids[index]))
        if why is not None:
            n_bad += 1
            problem = (
                problem
                or f"reward function '{name}' returned {_short_repr(value)} for sample {index}: {why}; {fix}"
            )
        checked.append(reward)
    return _CheckedCall(checked, n_bad, problem)


# ---------------------------------------------------------------------------------------------------
# Scores


@dataclass
class RewardScores:
    """What each reward function gave each completion, from one `RewardScorer.score` call."""

    names: list[str]
    """One per function, unique, in the scorer's order."""
    values: list[list]
    """values[k][i]: function k's reward for completion i: a float, None (no signal), or a list of one
    float per completion token."""
    error_counts: dict[str, int] = field(default_factory=dict)
    """Per function, the samples whose value became None under on_error='none'."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Per function, wall-clock seconds from its first call starting to its last call ending."""

    def means(self) -> dict[str, float]:
        """Per function, the mean reward over samples that have one (a per-token list counts as its
        sum); functions that gave no sample a value are left out."""
        means = {}
        for name, values in zip(self.names, self.values):
            given = [sum(v) if isinstance(v, list) else v for v in values if v is not None]
            if given:
                means[name] = sum(given) / len(given)
        return means

    def _check_weights(self, weights: Sequence[float]) -> list[float]:
        if len(weights) != len(self.names):
            raise RewardError(
                f"got {len(weights)} reward weights for {len(self.names)} reward functions {self.names}"
            )
        return [float(w) for w in weights]

    def to_token_rewards(
        self, weights: Sequence[float], completion_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token rewards r_{i,t} = sum_k w_k r_{k,i,t} (module docstring) and has_reward.

        completion_mask: (B, T) bool, True where a completion token counts. A scalar reward goes on
        the last True position of its row; a row with no True position (an empty completion) gets it
        at position 0. A per-token list is laid along the row's True positions in order and must have
        as many values as the row has True positions.
        Returns token_rewards (B, T) float32 on the mask's device, and has_reward (B,) bool: True
        where at least one function gave a value.
        """
        weights = self._check_weights(weights)
        B, T = completion_mask.shape  # batch, completion tokens
        mask = completion_mask.detach().to("cpu", torch.bool)
        counted = [mask[i].nonzero().squeeze(-1) for i in range(B)]  # per row, its counted positions in order
        token_rewards = torch.zeros(B, T, dtype=torch.float64)
        has_reward = torch.zeros(B, dtype=torch.bool)
        for name, weight, values in zip(self.names, weights, self.values):
            if len(values) != B:
                raise RewardError(
                    f"reward '{name}' has {len(values)} values but completion_mask has {B} rows"
                )
            for i, value in enumerate(values):
                if value is None:
                    continue
                has_reward[i] = True
                positions = counted[i]
                if isinstance(value, list):
                    if len(value) != len(positions):
                        raise RewardError(
                            f"reward '{name}' gave sample {i} {len(value)} per-token values but completion_mask"
                            f" counts {len(positions)} tokens; completion_ids and completion_mask disagree"
                        )
                    token_rewards[i, positions] += weight * torch.tensor(value, dtype=torch.float64)
                else:
                    last = int(positions[-1]) if len(positions) else 0
                    token_rewards[i, last] += weight * value
        return token_rewards.float().to(completion_mask.device), has_reward.to(completion_mask.device)


# ---------------------------------------------------------------------------------------------------
# Running the functions


@functools.lru_cache(maxsize=64)
def _load_in_worker(spec: str) -> Callable:
    return load_reward_fn(spec)


def _call_reward_fn(
    fn: Callable | str, prompts: list, completions: list, kwargs: dict, start: int
) -> _CallResult:
    """Call a reward function on one slice of the batch, timing it and catching what it raises. A
    string is a spec, loaded in the worker process (so functions from files work under processes)."""
    began = time.perf_counter()
    try:
        fn = _load_in_worker(fn) if isinstance(fn, str) else fn
        output, raised = fn(prompts, completions, **kwargs), False
    except Exception as error:
        output, raised = (type(error).__name__, _one_line(error)), True
    return _CallResult(start, start + len(completions), began, time.perf_counter(), raised, output)


async def _call_async_reward_fn(fn: Callable, prompts: list, completions: list, kwargs: dict) -> _CallResult:
    began = time.perf_counter()
    try:
        output, raised = await fn(prompts, completions, **kwargs), False
    except Exception as error:
        output, raised = (type(error).__name__, _one_line(error)), True
    return _CallResult(0, len(completions), began, time.perf_counter(), raised, output)


def _run_coroutines(make_coroutines: Callable[[], list]) -> list:
    """Await coroutines concurrently in one event loop: `asyncio.run` here, or in a fresh thread if this
    thread already runs a loop (asyncio.run cannot nest)."""

    async def gather() -> list:
        return await asyncio.gather(*make_coroutines())

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(asyncio.run, gather()).result()


def is_async_reward_fn(fn: Callable) -> bool:
    """Whether `fn` is an `async def` function (or partial of one) or an object with an async __call__."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(type(fn), "__call__", None))


def _chunk_bounds(batch_size: int, n_chunks: int) -> list[tuple[int, int]]:
    """[start, stop) of n_chunks contiguous, nearly equal slices (fewer if the batch is smaller)."""
    n_chunks = max(1, min(n_chunks, batch_size))
    edges = [round(c * batch_size / n_chunks) for c in range(n_chunks + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


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


class RewardScorer:
    """Runs reward functions on a batch of completions and checks what they return.

    reward_fns: callables or spec strings (see `load_reward_fn`).  weights: one per function
    (default 1.0 each), used by the trainer with `RewardScores.to_token_rewards`.  on_error: "raise"
    (a function that raises or returns something unusable raises RewardError naming it, the sample
    and the value) or "none" (those samples get None and are counted in `error_counts`).
    executor: how sync functions run: "serial" (one after another in this thread), "thread" or
    "process" (a pool of max_workers, kept across calls; each function's batch is split into
    max_workers contiguous slices scored concurrently, and functions run concurrently with each
    other). Under "process" the functions must pickle, or be given as spec strings (loaded in the
    workers). async functions are always awaited concurrently in one event loop. A function with
    attribute `split_batch = False` (e.g. a reward model that batches itself) runs whole in this
    thread. Use as a context manager, or call close(), to shut the pool down. The process pool
    starts its workers with forkserver (fork is unsafe once torch runs threads), so a script using it
    needs the usual `if __name__ == "__main__":` guard.
    """

    def __init__(
        self,
        reward_fns: Sequence[Callable | str],
        weights: Sequence[float] | None = None,
        on_error: str = "raise",
        executor: str = "serial",
        max_workers: int | None = None,
    ):
        reward_fns = [reward_fns] if isinstance(reward_fns, str) or callable(reward_fns) else list(reward_fns)
        if not reward_fns:
            raise RewardError(
                "no reward functions given; pass at least one callable or spec like 'math_answer'"
            )
        if on_error not in ON_ERROR:
            raise RewardError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if executor not in EXECUTORS:
            raise RewardError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
            raise RewardError(f"max_workers must be a positive int or None, got {max_workers!r}")
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
        self.on_error = on_error
        self.executor = executor
        default_workers = os.cpu_count() or 1
        self.max_workers = max_workers or (
            default_workers if executor == "process" else min(32, default_workers + 4)
        )
        self.is_async = [is_async_reward_fn(fn) for fn in self.reward_fns]
        # What a pool worker calls: the spec string when the function came from one, else the function.
        self._pool_targets = [
            spec if isinstance(spec, str) else fn for spec, fn in zip(reward_fns, self.reward_fns)
        ]
        self._pooled = [
            executor != "serial" and not is_async and getattr(fn, "split_batch", True)
            for fn, is_async in zip(self.reward_fns, self.is_async)
        ]
        if executor == "process":
            self._check_picklable()
        self._pool: concurrent.futures.Executor | None = None

    def _check_picklable(self) -> None:
        for name, target, pooled in zip(self.names, self._pool_targets, self._pooled):
            if not pooled or isinstance(target, str):
                continue
            try:
                pickle.dumps(target)
            except Exception as error:
                raise RewardError(
                    f"reward function '{name}' cannot be pickled for executor='process' ({type(error).__name__}:"
                    f" {_one_line(error, 80)}); use executor='thread', or define it at module top level"
                ) from None

    def _get_pool(self) -> concurrent.futures.Executor:
        if self._pool is None:
            if self.executor == "process":
                context = multiprocessing.get_context("forkserver")  # fork is unsafe with torch's threads
                self._pool = concurrent.futures.ProcessPoolExecutor(self.max_workers, mp_context=context)
            else:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.max_workers, thread_name_prefix="reward"
                )
        return self._pool

    def close(self) -> None:
        """Shut down the worker pool (a later score() starts a new one)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _reward_kwargs(
        self,
        prompts: Sequence,
        completions: Sequence,
        completion_ids: Sequence,
        step: int,
        columns: dict | None,
    ) -> dict[str, Any]:
        batch_size = len(completions)
        for what, sequence in (("prompts", prompts), ("completion_ids", completion_ids)):
            if len(sequence) != batch_size:
                raise RewardError(
                    f"got {len(sequence)} {what} for {batch_size} completions; align them one per completion"
                )
        kwargs = {}
        for name, column in (columns or {}).items():
            if name in RESERVED_KWARGS:
                raise RewardError(
                    f"dataset column '{name}' clashes with a reward function argument; rename the column"
                )
            if (
                isinstance(column, (str, bytes))
                or not isinstance(column, Sequence)
                or len(column) != batch_size
            ):
                raise RewardError(
                    f"column '{name}' must be a list with one value per completion ({batch_size}), got"
                    f" {type(column).__name__}{f' of length {len(column)}' if hasattr(column, '__len__') else ''}"
                )
            kwargs[name] = list(column)
        kwargs["completion_ids"] = [list(ids) for ids in completion_ids]
        kwargs["step"] = step
        return kwargs

    def score(
        self,
        prompts: Sequence,
        completions: Sequence,
        completion_ids: Sequence[Sequence[int]],
        step: int = 0,
        columns: dict[str, Sequence] | None = None,
    ) -> RewardScores:
        """Every function's reward for every completion.

        prompts, completions, completion_ids: one per completion (a prompt repeated for each of its G
        samples).  step: the training step.  columns: the other dataset columns, aligned to the
        completions; passed to the functions as kwargs with completion_ids and step.
        """
        prompts, completions = list(prompts), list(completions)
        kwargs = self._reward_kwargs(prompts, completions, completion_ids, step, columns)
        batch_size = len(completions)
        calls = self._run_all(prompts, completions, kwargs) if batch_size else [[] for _ in self.reward_fns]
        return self._collect(calls, kwargs["completion_ids"], batch_size)

    def _run_all(self, prompts: list, completions: list, kwargs: dict) -> list[list[_CallResult]]:
        """Per function, its calls (one, or one per slice under a pool) as they came back."""
        calls: list[list[_CallResult]] = [[] for _ in self.reward_fns]
        # 1. Sync functions on the pool, each split into slices, submitted first so they run meanwhile.
        pending = []
        bounds = _chunk_bounds(len(completions), self.max_workers)
        for k in (k for k, pooled in enumerate(self._pooled) if pooled):
            for start, stop in bounds:
                sliced = {
                    name: value if name == "step" else value[start:stop] for name, value in kwargs.items()
                }
                future = self._get_pool().submit(
                    _call_reward_fn,
                    self._pool_targets[k],
                    prompts[start:stop],
                    completions[start:stop],
                    sliced,
                    start,
                )
                pending.append((k, start, stop, future))
        # 2. async functions, concurrently in one event loop.
        async_indices = [k for k, is_async in enumerate(self.is_async) if is_async]
        if async_indices:
            results = _run_coroutines(
                lambda: [
                    _call_async_reward_fn(self.reward_fns[k], prompts, completions, kwargs)
                    for k in async_indices
                ]
            )
            for k, result in zip(async_indices, results):
                calls[k].append(result)
        # 3. The remaining sync functions, whole, in this thread.
        for k, fn in enumerate(self.reward_fns):
            if not self.is_async[k] and not self._pooled[k]:
                calls[k].append(_call_reward_fn(fn, prompts, completions, kwargs, 0))
        # 4. Pool results, in submission (= sample) order.
        for k, start, stop, future in pending:
            try:
                calls[k].append(future.result())
            except Exception as error:  # the worker died, or the output did not pickle
                if isinstance(error, concurrent.futures.BrokenExecutor):
                    self.close()
                now = time.perf_counter()
                calls[k].append(
                    _CallResult(start, stop, now, now, True, (type(error).__name__, _one_line(error)))
                )
        return calls

    def _collect(self, calls: list[list[_CallResult]], completion_ids: list, batch_size: int) -> RewardScores:
        values, error_counts, seconds = [], {}, {}
        for name, fn_calls in zip(self.names, calls):
            row: list = []
            error_counts[name] = 0
            for call in sorted(fn_calls, key=lambda c: c.start):
                checked = _check_call(name, call, completion_ids)
                if checked.problem is not None and self.on_error == "raise":
                    raise RewardError(checked.problem)
                row.extend(checked.values)
                error_counts[name] += checked.n_errors
            values.append(row if fn_calls else [None] * batch_size)
            seconds[name] = max((c.ended for c in fn_calls), default=0.0) - min(
                (c.began for c in fn_calls), default=0.0
            )
        return RewardScores(names=list(self.names), values=values, error_counts=error_counts, seconds=seconds)
