"""String-match rewards against the `answer` column: exact match, containment, multiple-choice letter.

Each gives 1.0 on a match and 0.0 otherwise, and None for a sample whose `answer` is None. An answer
may also be a list of acceptable answers (a match with any of them counts). Factories return a
`functools.partial` of a module-level function (named via `__name__`), so the rewards pickle for
`RewardScorer(executor="process")`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from lmpg.errors import RewardError
from lmpg.rewards.types import RewardFn, named_reward
from reward_fns.text import completion_text, reference_column


def _acceptable_answers(answer: Any) -> list[str]:
    return [str(a) for a in answer] if isinstance(answer, (list, tuple)) else [str(answer)]


def _normalise(text: str, case_sensitive: bool) -> str:
    text = text.strip()
    return text if case_sensitive else text.casefold()


def is_exact_match(completion: str, answer: Any, case_sensitive: bool = False) -> bool:
    """Whether the stripped completion equals the stripped answer (case-folded unless case_sensitive)."""
    text = _normalise(completion, case_sensitive)
    return any(text == _normalise(a, case_sensitive) for a in _acceptable_answers(answer))


def contains(completion: str, answer: Any, case_sensitive: bool = False, whole_word: bool = True) -> bool:
    """Whether the answer occurs in the completion; with whole_word, not inside a longer word or number
    (so answer `4` is not found in `14`)."""
    flags = 0 if case_sensitive else re.IGNORECASE
    for candidate in _acceptable_answers(answer):
        candidate = candidate.strip()
        if not candidate:
            continue
        pattern = re.escape(candidate)
        if whole_word:
            pattern = rf"(?<!\w){pattern}(?!\w)"
        if re.search(pattern, completion, flags):
            return True
    return False


def _match_reward(
    predicate: Callable[[str, Any], bool], prompts: list, completions: list, /, **kwargs: Any
) -> list[float | None]:
    answers = reference_column(kwargs, ("answer",), len(completions))
    if answers is None:
        return [None] * len(completions)
    return [
        None if answer is None else float(predicate(completion_text(completion), answer))
        for completion, answer in zip(completions, answers)
    ]


def make_exact_match(case_sensitive: bool = False) -> RewardFn:
    """1.0 if the whole completion, stripped, equals `answer` (case-folded unless case_sensitive)."""
    reward = functools.partial(
        _match_reward, functools.partial(is_exact_match, case_sensitive=case_sensitive)
    )
    case = "" if case_sensitive else " ignoring case"
    return named_reward(reward, "exact_match", f"1.0 if the stripped completion equals the `answer` column{case}, else 0.0.")


def make_contains_answer(case_sensitive: bool = False, whole_word: bool = True) -> RewardFn:
    """1.0 if `answer` occurs in the completion (see `contains` for case_sensitive and whole_word)."""
    predicate = functools.partial(contains, case_sensitive=case_sensitive, whole_word=whole_word)
    reward = functools.partial(_match_reward, predicate)
    how = ("as a whole word" if whole_word else "as a substring") + (
        "" if case_sensitive else ", ignoring case"
    )
    return named_reward(reward, "contains_answer", f"1.0 if the `answer` column occurs in the completion {how}, else 0.0.")


# Multiple choice. Forms, most explicit first; within a form the last occurrence wins, because models
# restate options ("A is wrong, B is wrong, ... so the answer is C").
@functools.lru_cache(maxsize=8)
def _choice_patterns(letters: str) -> list[re.Pattern]:
    upper = f"[{letters}]"
    either = f"[{letters}{letters.lower()}]"
    anchor = r"(?i:answer\s*(?:is|:)?\s*:?\s*(?:option|choice)?)\s*"
    return [
        # \boxed{D}, \boxed{(D)}, \boxed{\text{D}}
        re.compile(rf"\\boxed\{{\s*(?:\\text\{{)?\s*\(?\s*({either})\s*\)?\s*\}}?\s*\}}"),
        # <answer>B</answer>, <answer>(B)</answer>
        re.compile(rf"<answer>\s*\(?\s*({either})\s*\)?\s*</answer>"),
        # "Answer: (b)", "the answer is C", "answer is option B", "the answer is c.": a capital, or any
        # case in brackets or before punctuation/the end (so "the answer is a bit" is no choice)
        re.compile(rf"{anchor}(?:[\(\[]\s*({either})\s*[\)\]]|({upper})\b|({either})(?=\s*(?:[.,;!]|$)))"),
        # a standalone capital letter: "(C)", "C.", "so C"
        re.compile(rf"(?<![\w\\])({upper})(?!\w)"),
    ]


def extract_choice(text: str, letters: str = "ABCDE") -> str | None:
    """The option letter a completion chooses (upper case), or None.

    Tried in order: `\\boxed{D}`; `<answer>B</answer>`; "answer is C" / "Answer: (B)" (the letter
    must be a capital unless bracketed or before punctuation, so "the answer is a bit" is no
    choice); the last standalone capital.
    """
    for pattern in _choice_patterns(letters):
        matches = list(pattern.finditer(text))
        if matches:
            last = matches[-1]
            return last.group(last.lastindex).upper()
    return None


def reference_choice(answer: Any, letters: str = "ABCDE") -> str:
    """The reference letter: "B", "(B)", " b " -> "B"; an int is a 0-based option index (0 -> "A")."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(letters):
            return letters[answer]
    else:
        letter = str(answer).strip().strip("()[].").strip().upper()
        if len(letter) == 1 and letter in letters:
            return letter
    raise RewardError(
        f"multiple-choice answer {answer!r} is not one of the letters {letters} or a 0-based index;"
        " fix the answer column"
    )


def _multiple_choice_reward(
    letters: str, prompts: list, completions: list, /, **kwargs: Any
) -> list[float | None]:
    answers = reference_column(kwargs, ("answer",), len(completions))
    if answers is None:
        return [None] * len(completions)
    rewards: list[float | None] = []
    for completion, answer in zip(completions, answers):
        if answer is None:
            rewards.append(None)
            continue
        chosen = extract_choice(completion_text(completion), letters)
        rewards.append(float(chosen == reference_choice(answer, letters)))
    return rewards


def make_multiple_choice(letters: str = "ABCDE") -> RewardFn:
    """1.0 if the letter the completion chooses (see `extract_choice`) is the `answer` letter.

    letters: the option letters, upper case, e.g. "ABCDEFGHIJ" for MMLU-Pro.
    """
    if not letters or not letters.isalpha() or not letters.isupper():
        raise RewardError(f"letters must be upper-case option letters like 'ABCDE', got {letters!r}")
    reward = functools.partial(_multiple_choice_reward, letters)
    return named_reward(
        reward,
        "multiple_choice",
        f"1.0 if the option letter ({letters}) the completion chooses is the `answer` column's, else 0.0.",
    )


exact_match = make_exact_match()
contains_answer = make_contains_answer()
multiple_choice = make_multiple_choice()
