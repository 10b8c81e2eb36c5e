"""Math answer correctness (reward_fns/math_answer.py), on literal completions."""

from __future__ import annotations

import threading

import pytest

from lmpg.errors import RewardError
from reward_fns.math_answer import (
    extract_boxed,
    extract_final_answer,
    is_equivalent,
    math_answer,
    reference_answer,
)

GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{\\sqrt{2}}} is it", "\\frac{1}{\\sqrt{2}}"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("cut off \\boxed{\\frac{1}{2", None),
        ("no box", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("We get \\boxed{42}.\n#### 41", "42"),  # boxed first
        ("48 + 24 = 72\n#### 72", "72"),
        ("<think>6*7</think><answer>42</answer>", "42"),
        ("It costs $1,250.50 in total, so 3 boxes.", "3"),
        ("half of it: 3/4", "3/4"),
        ("no numbers here", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    "predicted, reference, equal",
    [
        ("1,000", "1000", True),
        ("42.0", "42", True),
        ("$18", "18", True),
        ("18 dollars", "18", True),
        ("0.5", "\\frac{1}{2}", True),
        ("\\dfrac{3}{4}", "0.75", True),
        ("x^2+1", "1+x^2", True),
        ("\\sqrt{2}", "2^{1/2}", True),
        ("41", "42", False),
        ("\\frac{1}{3}", "0.5", False),
        ("x^2-1", "x^2+1", False),
    ],
)
def test_is_equivalent(predicted, reference, equal):
    assert is_equivalent(predicted, reference) is equal


def test_reference_may_be_a_gsm8k_or_math_solution():
    assert reference_answer(GSM8K_SOLUTION) == "72"
    assert reference_answer("So the area is $\\boxed{6\\pi}$.") == "6\\pi"
    assert reference_answer(42) == "42"
    assert reference_answer(None) is None


def test_math_answer_rewards():
    completions = [
        "48/2 = 24 in May, 72 in total.\n#### 72",
        "The answer is \\boxed{72}",
        "<answer>71</answer>",
        "I am not sure.",
        "So 72.",
        "anything",
    ]
    answers = [GSM8K_SOLUTION, "72", "72", "72", "72.0", None]
    assert math_answer(None, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0, None]


def test_reference_columns_solution_and_ground_truth_and_conversational_completions():
    completion = [{"role": "assistant", "content": "\\boxed{\\frac{2}{4}}"}]
    assert math_answer(None, [completion], solution=["The answer is $\\boxed{0.5}$"]) == [1.0]
    assert math_answer(None, ["#### 5"], ground_truth=["5"]) == [1.0]
    assert math_answer(None, ["#### 5"]) == [None]  # no reference column at all


def test_misaligned_reference_column_is_an_error():
    with pytest.raises(RewardError, match="column 'answer' has 1 values for 2 completions"):
        math_answer(None, ["1", "2"], answer=["1"])


def test_works_outside_the_main_thread():
    results = []
    worker = threading.Thread(
        target=lambda: results.append(math_answer(None, ["\\boxed{x^2+1}"], answer=["1+x^2"]))
    )
    worker.start()
    worker.join()
    assert results == [[1.0]]
