"""Format rewards: does the completion follow a required structure (tags, a regular expression)?

    format_tags:  r = 1 if the completion is exactly  <think>...</think> <answer>...</answer>
                  (DOTALL, whitespace allowed around and between) with each tag used once, else 0
    partial:      r = sum over the 2k tags of 1/(2k) · 1[tag occurs exactly once]   (0.25 each for k=2)

Factories return a `functools.partial` of a module-level function (named via `__name__`), so the
rewards pickle for `RewardScorer(executor="process")`; configuration is bound positionally, so no
dataset column can override it.

The partial-credit variant is the shaping used by several R1-style recipes (e.g. TRL's and
open-r1's tag-count rewards): it gives a gradient towards the format before the model emits it whole.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

from lmpg.errors import RewardError
from lmpg.rewards.types import RewardFn, named_reward
from reward_fns.text import completion_text


def _tag_pattern(tags: Sequence[str]) -> re.Pattern:
    """`\\s*<t1>.*?</t1>\\s*<t2>.*?</t2>\\s*...` matched against the whole completion."""
    body = r"\s*".join(rf"<{re.escape(tag)}>.*?</{re.escape(tag)}>" for tag in tags)
    return re.compile(rf"\s*{body}\s*", re.DOTALL)


def tag_format_score(text: str, tags: Sequence[str] = ("think", "answer"), partial: bool = False) -> float:
    """1.0 if `text` is exactly the tags in order, each once; else the partial credit (or 0.0)."""
    markers = [marker for tag in tags for marker in (f"<{tag}>", f"</{tag}>")]
    each_once = all(text.count(marker) == 1 for marker in markers)
    if each_once and _tag_pattern(tags).fullmatch(text):
        return 1.0
    if not partial:
        return 0.0
    return sum(text.count(marker) == 1 for marker in markers) / len(markers)


def _format_reward(
    tags: tuple[str, ...], partial: bool, prompts: list, completions: list, /, **kwargs: Any
) -> list[float | None]:
    return [tag_format_score(completion_text(c), tags, partial) for c in completions]


def make_format_reward(tags: Sequence[str] = ("think", "answer"), partial: bool = False) -> RewardFn:
    """A reward for completions laid out as `<tag1>...</tag1> <tag2>...</tag2> ...` (see `tag_format_score`).

    tags: the tag names, in the order they must appear.  partial: give 1/(2k) for each of the 2k
    opening/closing tags that occurs exactly once when the whole layout does not match.
    """
    tags = tuple(tags)
    if not tags or not all(isinstance(tag, str) and re.fullmatch(r"[\w-]+", tag) for tag in tags):
        raise RewardError(f"tags must be non-empty names like ('think', 'answer'), got {tags!r}")
    reward = functools.partial(_format_reward, tags, partial)
    layout = " ".join(f"<{tag}>...</{tag}>" for tag in tags)
    credit = f"else 1/{2 * len(tags)} per tag present once" if partial else "else 0.0"
    doc = f"1.0 if the completion is exactly {layout}, each tag once; {credit}."
    return named_reward(reward, "format_tags" + ("_partial" if partial else ""), doc)


def _regex_reward(
    compiled: re.Pattern, partial: float, prompts: list, completions: list, /, **kwargs: Any
) -> list[float | None]:
    rewards: list[float | None] = []
    for completion in completions:
        text = completion_text(completion)
        if compiled.fullmatch(text):
            rewards.append(1.0)
        else:
            rewards.append(float(partial) if compiled.search(text) else 0.0)
    return rewards


def make_regex_reward(
    pattern: str, partial: float = 0.0, flags: int = re.DOTALL, name: str = "regex_reward"
) -> RewardFn:
    """1.0 if the whole completion matches `pattern`, `partial` if the pattern occurs somewhere in it, else 0.

    pattern: a Python regular expression.  partial: reward for a match that does not cover the whole
    completion (`re.search` but not `re.fullmatch`).  flags: `re` flags, DOTALL by default so `.`
    spans lines.  name: the reward's name in logs.
    """
    try:
        compiled = re.compile(pattern, flags)
    except re.error as error:
        raise RewardError(f"regex reward pattern {pattern!r} does not compile: {error}") from None
    reward = functools.partial(_regex_reward, compiled, float(partial))
    return named_reward(
        reward,
        name,
        f"1.0 if the whole completion matches {pattern!r}, {float(partial)} if it occurs in it, else 0.0.",
    )


format_tags = make_format_reward()
format_tags_partial = make_format_reward(partial=True)
