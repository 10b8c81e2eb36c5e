"""Checking what a reward function returned: one value per completion, each a number, None or a
per-token list.

Values are read as TRL reads them: bools and numpy or 0-d torch numbers become floats, None and NaN
mean "no signal from this function for this sample" (TRL turns None into NaN and skips NaN). A value
that is none of these (a string, inf, a per-token list of the wrong length) is an error.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

from lmpg.rewards.specs import one_line


class CallResult(NamedTuple):
    """One call of one function on samples [start, stop), as it came back from wherever it ran."""

    start: int
    stop: int
    began: float
    ended: float
    raised: bool
    output: Any
    """What the function returned, or (exception type name, message) if it raised or timed out."""
    extras: dict
    """Columns it gave `log_extra`: name -> one value per sample of [start, stop)."""
    metrics: dict
    """Values it gave `log_metric`: name -> list of floats."""


class CheckedCall(NamedTuple):
    values: list
    """The values for samples [start, stop), bad ones set to None."""
    n_errors: int
    """How many samples were set to None."""
    problem: str | None
    """The first problem, worded as a RewardError message; None if all was well."""


def as_real(value: Any) -> tuple[float | None, str | None]:
    """(float, None) for a finite real number or bool (int, float, numpy or 0-d torch scalar),
    (None, None) for NaN, else (None, why)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if not isinstance(value, numbers.Real):  # bool is a numbers.Real
        return None, f"a {type(value).__name__} is not a number"
    number = float(value)
    if math.isnan(number):
        return None, None
    if not math.isfinite(number):
        return None, "the reward is not finite"
    return number, None


def as_sequence(output: Any) -> list | None:
    if isinstance(output, (str, bytes, dict)):
        return None
    if hasattr(output, "tolist") and getattr(output, "ndim", 0) >= 1:  # numpy array / torch tensor
        return output.tolist()
    if isinstance(output, Sequence):
        return list(output)
    return None


def check_sample(value: Any, n_tokens: int) -> tuple[float | list[float] | None, str | None]:
    """(the value as lmpg keeps it, None) or (None, why it is not a reward)."""
    if value is None:
        return None, None
    sequence = None if getattr(value, "ndim", None) == 0 else as_sequence(value)
    if sequence is None:
        return as_real(value)
    if len(sequence) != n_tokens:
        return (
            None,
            f"a per-token list needs one value per completion token: got {len(sequence)}, expected {n_tokens}",
        )
    rewards = []
    for position, element in enumerate(sequence):
        number, why = as_real(element)
        if why is not None or number is None:
            return None, f"per-token value at position {position}: {why or 'NaN'}"
        rewards.append(number)
    return rewards, None


def check_call(name: str, call: CallResult, completion_ids: Sequence) -> CheckedCall:
    """Check what one call returned: a sequence of one entry per sample, each valid (module docstring)."""
    n = call.stop - call.start
    span = f"samples {call.start}..{call.stop - 1}"
    fix = "fix the function or set reward_on_error: none to score such samples None"
    output = call.output
    values = None if call.raised or inspect.isawaitable(output) else as_sequence(output)
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
            f"reward function '{name}' returned {one_line(repr(output), 80)} ({type(output).__name__}) for"
            f" {span}; return a list with one float, None or per-token list per completion"
        )
    elif len(values) != n:
        problem = (
            f"reward function '{name}' returned {len(values)} values for {n} completions ({span}): got"
            f" {len(values)}, expected {n}; return one value per completion"
        )
    else:
        problem = None
    if problem is not None:
        return CheckedCall([None] * n, n, problem)
    checked, n_bad = [], 0
    for offset, value in enumerate(values):
        index = call.start + offset
        reward, why = check_sample(value, len(completion_ids[index]))
        if why is not None:
            n_bad += 1
            problem = problem or (
                f"reward function '{name}' returned {one_line(repr(value), 80)} for sample {index}: {why}; {fix}"
            )
        checked.append(reward)
    return CheckedCall(checked, n_bad, problem)
