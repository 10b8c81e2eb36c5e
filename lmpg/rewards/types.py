"""What a reward function is, and the name it is logged under.

A reward function is called as TRL's GRPOTrainer calls it (lmpg.rewards.calling):

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns, trainer_state=...,
       log_extra=..., log_metric=...) -> one value per completion

each value a float (bools and numpy numbers count), None (no signal from this function), or a list
of one float per completion token (lmpg's per-token rewards).

A completion (and a prompt) is a string, or, as TRL's conversational datasets give it, a list of
messages `[{"role": "assistant", "content": "..."}]` whose text is the last message's content
(`completion_text`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from lmpg.errors import RewardError

RewardFn = Callable[..., Sequence]
"""The one type of a reward function (module docstring)."""

F = TypeVar("F", bound=Callable)


def completion_text(completion: Any) -> str:
    """The text of a completion (or prompt): the string itself, or the `content` of the last message
    of a list of messages ("" for an empty list)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        content = completion[-1].get("content", "")
        return content if isinstance(content, str) else str(content)
    if isinstance(completion, Sequence) and not completion:
        return ""
    raise RewardError(
        f"completion of type {type(completion).__name__} is neither a string nor a list of messages;"
        " pass completions as str or [{'role': 'assistant', 'content': str}]"
    )


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
