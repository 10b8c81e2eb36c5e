"""Calling a reward function as TRL 1.16's GRPOTrainer does (`_calculate_rewards`).

Every argument is a keyword:

    fn(prompts=prompts, completions=completions, completion_ids=completion_ids,
       **columns,                 # every other dataset column, one value per completion
       trainer_state=state,       # .global_step: iterations done; .max_steps: config.iterations
       log_extra=log_extra,       # log_extra(column, values): a column of samples.jsonl
       log_metric=log_metric,     # log_metric(name, value): a metric of metrics.jsonl (batch mean)
       environments=...,          # only where the caller has environments
       step=global_step)          # lmpg's own name for trainer_state.global_step

A function written for lmpg's older positional form, whose first two parameters are named anything
but these keywords (`def f(p, c, **kw)`), gets prompts and completions positionally. A function
without `**kwargs` gets only the keywords it names (TRL would raise on the others), and one that
needs a column the data lacks gets a one-line RewardError saying which.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmpg.errors import RewardError

INPUTS = ("prompts", "completions", "completion_ids")
CONTEXT = ("trainer_state", "log_extra", "log_metric", "environments", "step")
RESERVED = INPUTS + CONTEXT
"""Keywords no dataset column may take."""


@dataclass(frozen=True)
class RewardState:
    """The part of TRL's `TrainerState` a reward function reads (for schedules over training)."""

    global_step: int
    """Iterations done before this batch was sampled."""
    max_steps: int | None = None
    """The run's iterations (config.iterations)."""


class RewardLog:
    """What one call gave `log_extra` and `log_metric` (built where the call runs, so that it also
    works in a worker process, and returned with the call's result)."""

    def __init__(self) -> None:
        self.extras: dict[str, list] = {}
        self.metrics: dict[str, list[float]] = {}

    def log_extra(self, column: str, values: list) -> None:
        self.extras.setdefault(str(column), []).extend(values)

    def log_metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(str(name), []).append(float(value))


@dataclass(frozen=True)
class CallPlan:
    """How to call one function, read off its signature once."""

    name: str
    positional: bool
    """lmpg's old form: prompts and completions go first, positionally."""
    accepts: frozenset | None
    """The keywords it takes, or None when it takes **kwargs."""
    required: tuple[str, ...]
    """Keywords it cannot do without."""


def call_plan(fn: Callable, name: str) -> CallPlan:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: assume TRL's form
        return CallPlan(name, False, None, ())
    kinds = inspect.Parameter
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    old_form = len(positional) >= 2 and (
        positional[0].kind == kinds.POSITIONAL_ONLY
        or (positional[0].name not in INPUTS and positional[1].name not in INPUTS)
    )
    rest = positional[2:] if old_form else positional
    named = [p for p in rest if p.kind != kinds.POSITIONAL_ONLY] + [p for p in params if p.kind == kinds.KEYWORD_ONLY]
    takes_kwargs = any(p.kind == kinds.VAR_KEYWORD for p in params)
    required = tuple(p.name for p in named if p.default is inspect.Parameter.empty)
    accepts = None if takes_kwargs else frozenset(p.name for p in named)
    return CallPlan(name, old_form, accepts, required)


def check_arguments(plan: CallPlan, available: set[str]) -> None:
    """RewardError if the function needs a keyword the batch does not have (usually a data column)."""
    given = available | ({"prompts", "completions"} if plan.positional else set())
    missing = [name for name in plan.required if name not in given]
    if missing == ["environments"]:  # not a column: the episodes' environment instances
        raise RewardError(
            f"reward function '{plan.name}' needs argument 'environments', the environment instances of a "
            "multi-turn run; set environment: SPEC in the config, or pass --environment SPEC to lmpg eval / "
            "lmpg sample")
    if missing:
        columns = sorted(available - set(RESERVED))
        raise RewardError(
            f"reward function '{plan.name}' needs argument '{missing[0]}', which is no column of the data"
            f" (columns: {', '.join(columns) or 'none'}); add the column, or with `lmpg sample` pass"
            f" --column {missing[0]}=VALUE"
        )


def call_reward_fn(fn: Callable, plan: CallPlan, kwargs: dict, log: RewardLog) -> Any:
    """fn called with the batch's keywords (module docstring); log receives log_extra / log_metric."""
    kwargs = {**kwargs, "log_extra": log.log_extra, "log_metric": log.log_metric}
    args = ()
    if plan.positional:
        args = (kwargs.pop("prompts"), kwargs.pop("completions"))
    if plan.accepts is not None:
        kwargs = {k: v for k, v in kwargs.items() if k in plan.accepts}
    return fn(*args, **kwargs)
