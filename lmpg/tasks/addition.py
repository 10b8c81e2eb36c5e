"""Addition of n-digit numbers: a verifiable task, a systematically wrong demonstrator, a reward.

Format. The prompt is the sum as written, the completion is the answer's digits least significant
first, then EOS:

    prompt "123+459="   completion "285"   (123 + 459 = 582, reversed)

Writing the answer reversed lets a left-to-right model emit each digit after the digits it depends
on (the carries come from the less significant columns); small transformers learn addition far
faster this way (Lee et al. 2023, "Teaching Arithmetic to Small Transformers", section 4).

Demonstrator. `demonstrator_answer` adds column by column like a pupil who always forgets the carry
out of the units column: 18 + 5 gives 13 instead of 23. The mistake is a rule, not noise, so an
imitator learns it too; the right answer is only ever found by trying and checking, which is what a
policy-gradient step on `exact_answer_reward` does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

FORGOTTEN_CARRY_COLUMN = 0
"""The demonstrator drops the carry out of this column (0 = units), so the next column is wrong
whenever this column's digits sum to 10 or more."""


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
    if n_train + n_heldout > n_unordered // 2:
        raise ValueError(
            f"{n_train + n_heldout} problems asked of {n_digits}-digit operands, which allow about "
            f"{n_unordered}: lower n_train/n_heldout or raise n_digits"
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
    """The columns an RL dataset needs: `prompt` and the correct `answer` for the reward."""
    return {"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]}


def demonstrator_answer(a: int, b: int, forgotten_carry_column: int = FORGOTTEN_CARRY_COLUMN) -> str:
    """The demonstrator's completion for `a + b`: column addition that drops one carry.

    Column i (0 = units) writes digit `(a_i + b_i + c_i) mod 10` and carries
    `c_{i+1} = (a_i + b_i + c_i) >= 10`, except that the carry out of `forgotten_carry_column` is
    never made. Returned reversed, like `AdditionProblem.answer`: 18 + 5 -> "31" (13, not 23).
    """
    digits: list[int] = []
    carry, column = 0, 0
    while a > 0 or b > 0 or carry:
        total = a % 10 + b % 10 + carry
        digits.append(total % 10)
        carry = int(total >= 10 and column != forgotten_carry_column)
        a, b, column = a // 10, b // 10, column + 1
    return "".join(str(d) for d in digits) or "0"


def demonstrator_is_correct(problem: AdditionProblem) -> bool:
    """Whether the demonstrator's answer to `problem` is the correct one."""
    return demonstrator_answer(problem.a, problem.b) == problem.answer


def completion_text(completion: str | list[dict[str, str]]) -> str:
    """The text of a completion given either as a string or as chat messages (last message's content)."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


def exact_answer_reward(
    prompts: list, completions: list, answer: list[str], **kwargs
) -> list[float]:
    """1.0 where the completion, stripped of surrounding whitespace, is exactly the answer, else 0.0.

    `answer` is the dataset column of correct reversed answers, one per completion. Completions may
    be strings or chat messages. Extra `kwargs` (other dataset columns) are ignored.
    """
    return [
        float(completion_text(completion).strip() == target.strip())
        for completion, target in zip(completions, answer, strict=True)
    ]


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: list[str],
    greedy: bool = True,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    batch_size: int = 256,
    seed: int = 0,
) -> list[str]:
    """One completion per prompt, greedy or sampled at `temperature` (no top-k/top-p truncation).

    Sampling is seeded by `seed` in a forked RNG, so the global torch RNG is left as it was and the
    same call gives the same completions.
    """
    was_training = model.training
    model.eval()
    completions: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                prompts[start : start + batch_size],
                padding=True,
                padding_side="left",
                add_special_tokens=False,
                return_tensors="pt",
            )
            sampling = {} if greedy else {"temperature": temperature, "top_k": 0, "top_p": 1.0}
            output_ids = model.generate(
                **batch,
                do_sample=not greedy,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            new_ids = output_ids[:, batch["input_ids"].shape[1] :]  # B, T
            completions += tokenizer.batch_decode(new_ids, skip_special_tokens=True)
    model.train(was_training)
    return completions


def accuracy(
    model,
    tokenizer,
    problems: list[AdditionProblem],
    greedy: bool = True,
    temperature: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Fraction of `problems` the model answers exactly, with one greedy or sampled completion each.

    Sampled accuracy (greedy=False, temperature 1) is the expected reward of the policy RL trains;
    greedy accuracy is what the policy's mode gets right.
    """
    n_digits = max(len(str(max(p.a, p.b))) for p in problems)
    completions = generate_completions(
        model,
        tokenizer,
        [p.prompt for p in problems],
        greedy=greedy,
        temperature=temperature,
        max_new_tokens=n_digits + 2,  # the sum has at most n_digits + 1 digits, then EOS
        batch_size=batch_size,
        seed=seed,
    )
    rewards = exact_answer_reward(None, completions, [p.answer for p in problems])
    return sum(rewards) / len(rewards)


def demonstrator_accuracy(problems: list[AdditionProblem]) -> float:
    """Fraction of `problems` the demonstrator answers correctly (it is deterministic)."""
    return sum(demonstrator_is_correct(p) for p in problems) / len(problems)
