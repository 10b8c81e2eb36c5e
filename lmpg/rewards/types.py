"""What a reward function is, and the name it is logged under.

A reward function is called as TRL's GRPOTrainer calls it (lmpg.rewards.calling):

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns, trainer_state=...,
       log_extra=..., log_metric=...) -> one value per completion

each value a float (bools and numpy numbers count), None (no signal from this function), or a list
of one float per completion token (lmpg's per-token rewards).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import TypeVar

RewardFn = Callable[..., Sequence]
"""The one type of a reward function (module docstring)."""

F = TypeVar("F", bound=Callable)


def reward_fn_name(fn: Callable) -> str:
    """The name a reward is logged under: `__name__` (functions, and partials or objects given one),
    else a functools.partial's function name, else the class name of a callable object."""
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(fn, functools.partial):
        return reward_fn_name(fn.func)
    return type(fn).__name__


def named_reward(fn: F, name: str, doc: str) -> F:
    """`fn` (a partial a `make_*` factory built) given the name it is logged under and a docstring
    (the first line is what `lmpg rewards` lists)."""
    fn.__name__ = name
    fn.__doc__ = doc
    return fn


def is_async_reward_fn(fn: Callable) -> bool:
    """Whether `fn` is an `async def` function (or partial of one) or an object with an async __call__."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(type(fn), "__call__", None))
