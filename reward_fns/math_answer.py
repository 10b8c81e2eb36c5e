"""Math answer correctness: 1.0 when the completion's final answer equals the reference, else 0.0.

    r_i = 1[ extract(completion_i) ≡ reference_i ]

`≡` is numeric equality for plain numbers (`1,000` = `1000`, `42.0` = `42`, compared exactly as
fractions) and otherwise the numeric/symbolic equivalence of the `math_verify` library
(`\\frac{1}{2}` = `0.5`, `x^2+1` = `1+x^2`, `\\sqrt{2}` = `2^{1/2}`).

math_verify guards its sympy calls with `signal.alarm`, which only works in the main thread, so the
timeout is used there and switched off (`parsing_timeout=None`, `timeout_seconds=None`) elsewhere,
e.g. under `RewardScorer(executor="thread")`. Without the alarm a pathological expression could run
long, so answers longer than `MAX_ANSWER_CHARS` skip sympy and are compared as strings.

math_verify is imported on first use: plain numbers (GSM8K) are compared without it.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from typing import Any

from reward_fns.text import completion_text, reference_column

REFERENCE_COLUMNS = ("answer", "solution", "ground_truth")
MAX_ANSWER_CHARS = 300
TIMEOUT_SECONDS = 5

_BOXED_OPENERS = ("\\boxed", "\\fbox")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_GSM8K_MARK = re.compile(r"####\s*([^\n]*)")
# A fraction, a number with thousands separators, or a plain integer/decimal, optionally signed.
_NUMBER = r"[-+]?(?:\d+/\d+|\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_ANY_NUMBER = re.compile(_NUMBER)
# A whole answer that is one number, optionally with a currency sign and trailing unit words
# ("$18", "18 dollars", "42."), the form GSM8K answers take.
_PLAIN_NUMBER = re.compile(
    r"^\s*(?:\\?\$)?\s*(?P<number>[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+)"
    r"\s*(?:[A-Za-z]+(?:\s+[A-Za-z]+)*)?\s*\.?\s*$"
)
# A word of 3+ letters not part of a LaTeX command: the answer is prose, not an expression.
_PROSE_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces included."""
    start = max(text.rfind(opener + "{") for opener in _BOXED_OPENERS)
    if start < 0:
        return None
    open_brace = text.index("{", start)
    depth = 0
    for position in range(open_brace, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : position].strip()
    return None  # unbalanced: the completion was cut off inside the box


def extract_final_answer(text: str) -> str | None:
    """The final answer of a solution text, by the first rule that applies:

    1. the last `\\boxed{...}`;  2. the text after the last GSM8K `####`;
    3. the last `<answer>...</answer>`;  4. the last number in the text.
    None when there is nothing to extract.
    """
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    marks = _GSM8K_MARK.findall(text)
    if marks and marks[-1].strip():
        return marks[-1].strip()
    tags = _ANSWER_TAG.findall(text)
    if tags and tags[-1].strip():
        return tags[-1].strip()
    numbers = _ANY_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def plain_number(answer: str) -> Fraction | None:
    """The exact value of an answer that is a single decimal number (`1,000`, `$18`, `42.0`), else None."""
    match = _PLAIN_NUMBER.match(answer.replace("{,}", ","))
    if match is None:
        return None
    return Fraction(match.group("number").replace(",", ""))


def _parse_math(answer: str, timeout: int | None) -> list:
    """math_verify's parse of an extracted answer: LaTeX between `$`, or prose left to its own anchors."""
    text = answer if _PROSE_WORD.search(answer) else f"${answer}$"
    return _math_verify().parse(text, parsing_timeout=timeout)


def _math_verify():
    from lmpg.errors import require_package

    return require_package("math_verify", "'math-verify[antlr4_13_2]'", "math_answer on answers that are not plain numbers")


def is_equivalent(predicted: str, reference: str) -> bool:
    """Whether two extracted answers denote the same value (see the module docstring for `≡`)."""
    predicted_number, reference_number = plain_number(predicted), plain_number(reference)
    if predicted_number is not None and reference_number is not None:
        return predicted_number == reference_number
    if max(len(predicted), len(reference)) > MAX_ANSWER_CHARS:
        return predicted.strip() == reference.strip()
    # signal.alarm, math_verify's timeout, raises outside the main thread.
    timeout = TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    gold = _parse_math(reference, timeout)
    target = _parse_math(predicted, timeout)
    if not gold or not target:
        return False
    return bool(_math_verify().verify(gold, target, timeout_seconds=timeout))


def reference_answer(reference: Any) -> str | None:
    """The answer inside a reference: a number or string as is, or a GSM8K/MATH solution's final answer."""
    if reference is None:
        return None
    text = str(reference).strip()
    if "####" in text or "\\boxed" in text or "\\fbox" in text:
        return extract_final_answer(text)
    return text or None


def math_answer(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """1.0 if the completion's final answer (see `extract_final_answer`) equals the reference, else 0.0.

    The reference comes from the first of the columns `answer`, `solution`, `ground_truth` that is
    passed; it may be a bare answer (`42`, `\\frac{1}{2}`) or a full GSM8K solution ending in
    `#### 42` or a MATH solution with `\\boxed{}`. Samples whose reference is None get None (no signal).
    A completion with no extractable answer gets 0.0.
    """
    references = reference_column(kwargs, REFERENCE_COLUMNS, len(completions))
    if references is None:
        return [None] * len(completions)
    rewards: list[float | None] = []
    for completion, reference in zip(completions, references):
        expected = reference_answer(reference)
        if expected is None:
            rewards.append(None)
            continue
        predicted = extract_final_answer(completion_text(completion))
        rewards.append(1.0 if predicted is not None and is_equivalent(predicted, expected) else 0.0)
    return rewards
