"""Addition of n-digit numbers: a verifiable task, a systematically wrong demonstrator, a reward.

Format. The prompt is the sum as written, the completion is the answer's digits least significant
first, then EOS:

    prompt "123+459="   completion "285"   (123 + 459 = 582, reversed)

Writing the answer reversed lets a left-to-right model emit each digit after the digits it depends
on (the carries come from the less significant columns); small transformers learn addition far
faster this way (Lee et al. 2023, "Teaching Arithmetic to Small Transformers", arXiv 2307.03381).
The operands stay as written: reversing them too made the recipe's model learn slower, not faster
(imitation loss 0.017 against 0.0007 after the same 1500 steps).

Demonstrator. A careless pupil who adds column by column and forgets the carry out of the units
column 80% of the time (18 + 5 -> 13 instead of 23). The error is systematic: it is always the same
carry, and forgotten more often than not, so the demonstrator's most likely answer is wrong on every
problem whose units digits sum to 10 or more (about 45% of them). An imitator learns that mode, so
greedy decoding of the warm start is wrong wherever the demonstrator's mode is, yet the right answer
keeps probability ~0.2 under the warm-started policy: a policy-gradient step on the exact-match reward
(reward_fns' `exact_match` against the `answer` column) finds it by sampling and makes it the mode,
which imitation of this demonstrator never can.

Why not an always-wrong demonstrator: a deterministic bug (always forget that carry, or carry only
past 10) is a rule a small transformer learns exactly; after imitation the correct answer to the
problems it affects had probability < 0.001 under sampling at temperature 1 (measured with the
recipe's model), so RL had nothing to reinforce. And why not unbiased noise: if the demonstrator were
right more often than not, imitation alone would already make the right answer the mode.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmpg.errors import ConfigError

FORGET_PROBABILITY = 0.8
"""How often the demonstrator forgets the carry out of the units column (> 0.5: its mode is wrong)."""


@dataclass(frozen=True)
class AdditionProblem:
    """The question `a + b`; its prompt and its correct (reversed) answer are derived from it."""

    a: int
    b: int

    @property
    def prompt(self) -> str:
        """The text the model is given, e.g. "123+459="."""
        return format_prompt(self.a, self.b)

    @property
    def answer(self) -> str:
        """The correct completion, the sum's digits least significant first, e.g. "285"."""
        return reversed_digits(self.a + self.b)


def format_prompt(a: int, b: int) -> str:
    """The prompt for `a + b`: "a+b=" with both operands written most significant digit first."""
    return f"{a}+{b}="


def reversed_digits(n: int) -> str:
    """The decimal digits of `n >= 0`, least significant first: 582 -> "285", 10 -> "01"."""
    if n < 0:
        raise ValueError(f"reversed_digits expects n >= 0, got {n}")
    return str(n)[::-1]


def make_problems(
    n_train: int, n_heldout: int, n_digits: int, seed: int
) -> tuple[list[AdditionProblem], list[AdditionProblem]]:
    """Two disjoint lists of problems whose operands both have exactly `n_digits` digits.

    Problems are drawn uniformly without repetition. A held-out problem never appears in the
    training list in either order (if `a+b` is held out, neither `a+b` nor `b+a` is trained on), so
    held-out accuracy measures addition, not recall of a commuted fact.
    """
    low, high = 10 ** (n_digits - 1), 10**n_digits - 1
    n_unordered = (high - low + 1) * (high - low + 2) // 2
    if n_train + n_heldout > n_unordered:
        raise ConfigError(
            f"{n_train + n_heldout} problems asked of {n_digits}-digit operands, which allow only "
            f"{n_unordered} (counting a+b and b+a once): lower n_train/n_heldout or raise n_digits"
        )
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    problems: list[AdditionProblem] = []
    while len(problems) < n_train + n_heldout:
        a, b = rng.randint(low, high), rng.randint(low, high)
        key = (min(a, b), max(a, b))
        if key not in seen:
            seen.add(key)
            problems.append(AdditionProblem(a, b))
    return problems[:n_train], problems[n_train:]


def problem_columns(problems: list[AdditionProblem]) -> dict[str, list[str]]:
    """The columns an RL or evaluation dataset needs: `prompt`, and the correct `answer` that the
    `exact_match` reward compares the completion with."""
    return {"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]}


def column_sum(a: int, b: int, forgotten_carry_column: int | None = None) -> str:
    """`a + b` by column addition, reversed like `AdditionProblem.answer`, optionally dropping a carry.

    Column i (0 = units) writes digit `(a_i + b_i + c_i) mod 10` and carries
    `c_{i+1} = [a_i + b_i + c_i >= 10]`, except that the carry out of `forgotten_carry_column` is
    never made: column_sum(18, 5) = "32" (23), column_sum(18, 5, forgotten_carry_column=0) = "31" (13).
    """
    if a < 0 or b < 0:
        raise ValueError(f"column_sum expects non-negative operands, got {a} and {b}")
    digits: list[int] = []
    carry, column = 0, 0
    while a > 0 or b > 0 or carry:
        total = a % 10 + b % 10 + carry
        digits.append(total % 10)
        carry = int(total >= 10 and column != forgotten_carry_column)
        a, b, column = a // 10, b // 10, column + 1
    return "".join(str(d) for d in digits) or "0"


def demonstrator_answer(a: int, b: int, forgets_carry: bool) -> str:
    """The demonstrator's completion for `a + b`, when it forgets the units carry and when it does not."""
    return column_sum(a, b, forgotten_carry_column=0 if forgets_carry else None)


def has_units_carry(problem: AdditionProblem) -> bool:
    """Whether the units digits sum to 10 or more: the problems the demonstrator's mode gets wrong."""
    return problem.a % 10 + problem.b % 10 >= 10


def sample_demonstrations(
    problems: list[AdditionProblem], forget_probability: float = FORGET_PROBABILITY, seed: int = 0
) -> list[str]:
    """One demonstrator completion per problem; each forgets the units carry with `forget_probability`.

    The coin flips come from `random.Random(seed)`, one per problem in order, so the same call gives
    the same demonstrations.
    """
    rng = random.Random(seed)
    return [demonstrator_answer(p.a, p.b, forgets_carry=rng.random() < forget_probability) for p in problems]


def demonstrator_accuracy(
    problems: list[AdditionProblem], greedy: bool = True, forget_probability: float = FORGET_PROBABILITY
) -> float:
    """The demonstrator's accuracy on `problems`, exactly (no sampling).

    Greedy: its most likely answer, which forgets the carry when `forget_probability > 0.5`, so it is
    right only on problems without a units carry. Sampled: the expected accuracy of one draw,
    `P(no units carry) + (1 - forget_probability) * P(units carry)`, since forgetting a units carry
    always changes the tens digit.
    """
    n_carry = sum(has_units_carry(p) for p in problems)
    n_plain = len(problems) - n_carry
    if greedy:
        right_with_carry = n_carry * float(forget_probability < 0.5)
    else:
        right_with_carry = n_carry * (1.0 - forget_probability)
    return (n_plain + right_with_carry) / len(problems)
