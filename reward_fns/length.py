"""Length rewards: closeness to a target length, and DAPO's soft overlong punishment.

Lengths are counted in tokens (`len(completion_ids[i])`, the ids the trainer sampled) or in
characters of the completion text. Factories return a `functools.partial` of a module-level function
(named via `__name__`), so the rewards pickle for `RewardScorer(executor="process")`.
"""

from __future__ import annotations

import functools
from typing import Any

from lmpg.errors import RewardError
from lmpg.rewards.types import RewardFn, named_reward
from reward_fns.text import completion_text

UNITS = ("tokens", "chars")


def completion_lengths(completions: list, unit: str, kwargs: dict) -> list[int]:
    """|y_i|: tokens from the `completion_ids` kwarg, or characters of the completion text."""
    if unit == "chars":
        return [len(completion_text(c)) for c in completions]
    completion_ids = kwargs.get("completion_ids")
    if completion_ids is None:
        raise RewardError(
            "a token-length reward needs the completion_ids kwarg; score through RewardScorer"
            " or use unit='chars'"
        )
    return [len(ids) for ids in completion_ids]


def _check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise RewardError(f"length unit must be one of {UNITS}, got {unit!r}")


def length_closeness(length: int, target_length: int) -> float:
    """r = max(0, 1 - |L - L*| / L*): 1 at the target, falling linearly to 0 at L = 0 and L = 2 L*."""
    return max(0.0, 1.0 - abs(length - target_length) / target_length)


def _length_reward(
    target_length: int, unit: str, prompts: list, completions: list, /, **kwargs: Any
) -> list[float | None]:
    return [length_closeness(n, target_length) for n in completion_lengths(completions, unit, kwargs)]


def make_length_reward(target_length: int, unit: str = "tokens") -> RewardFn:
    """A reward for completions of about `target_length`: r = max(0, 1 - |L - L*| / L*).

    target_length: L*, > 0.  unit: "tokens" (from `completion_ids`) or "chars".
    """
    if not isinstance(target_length, int) or target_length <= 0:
        raise RewardError(f"target_length must be a positive int, got {target_length!r}")
    _check_unit(unit)
    reward = functools.partial(_length_reward, target_length, unit)
    return named_reward(
        reward,
        "length_reward",
        f"max(0, 1 - |L - {target_length}| / {target_length}), L the completion's length in {unit}.",
    )


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13), L_max = max_length,
    L_cache = buffer:

        R(y) = 0                                  if |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
             = -1                                 if L_max < |y|
    """
    if length <= max_length - buffer:
        return 0.0
    if length <= max_length:
        return ((max_length - buffer) - length) / buffer
    return -1.0


def _overlong_reward(
    max_length: int, buffer: int, unit: str, prompts: list, completions: list, /, **kwargs: Any
) -> list[float | None]:
    lengths = completion_lengths(completions, unit, kwargs)
    return [overlong_penalty(n, max_length, buffer) for n in lengths]


def make_overlong_penalty(max_length: int, buffer: int, unit: str = "tokens") -> RewardFn:
    """DAPO's soft overlong punishment as a reward (see `overlong_penalty`), added to the task reward.

    max_length: L_max, the length beyond which the penalty is -1 (usually the generation limit).
    buffer: L_cache, the width of the linear ramp from 0 to -1 before L_max; 0 < buffer <= max_length.
    unit: "tokens" (from `completion_ids`) or "chars".
    """
    if not isinstance(max_length, int) or not isinstance(buffer, int) or not 0 < buffer <= max_length:
        raise RewardError(
            f"overlong penalty needs ints with 0 < buffer <= max_length, got max_length={max_length!r},"
            f" buffer={buffer!r}"
        )
    _check_unit(unit)
    reward = functools.partial(_overlong_reward, max_length, buffer, unit)
    return named_reward(
        reward,
        "overlong_penalty",
        f"DAPO's soft overlong penalty: 0 up to {max_length - buffer} {unit}, linear down to -1 at"
        f" {max_length}, -1 beyond.",
    )
