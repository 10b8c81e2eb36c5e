"""Exact, contains and multiple-choice rewards (reward_fns/match.py), on literal completions."""

from __future__ import annotations

import pytest

from lmpg.errors import RewardError
from reward_fns.match import (
    contains_answer,
    exact_match,
    extract_choice,
    make_contains_answer,
    make_exact_match,
    make_multiple_choice,
    multiple_choice,
)


def test_exact_match_strips_and_casefolds():
    completions = ["  Paris\n", "paris", "Paris.", "Lyon", "x"]
    answers = ["Paris", "PARIS", "Paris", ["Lyon", "Lyons"], None]
    assert exact_match(None, completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, None]
    case_sensitive = make_exact_match(case_sensitive=True)
    assert case_sensitive(None, ["paris", "Paris"], answer=["Paris", "Paris"]) == [0.0, 1.0]
    assert exact_match(None, ["42"], answer=[42]) == [1.0]
    assert exact_match(None, ["42"]) == [None]


def test_contains_answer_whole_word_by_default():
    completions = ["The capital is PARIS.", "it is 14", "it is 4.", "Parisian food"]
    answers = ["Paris", "4", "4", "Paris"]
    assert contains_answer(None, completions, answer=answers) == [1.0, 0.0, 1.0, 0.0]
    substring = make_contains_answer(whole_word=False)
    assert substring(None, completions, answer=answers) == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "text, letter",
    [
        ("Answer: (B)", "B"),
        ("the answer is C", "C"),
        ("Therefore the answer is c.", "C"),
        ("so \\boxed{D}", "D"),
        ("\\boxed{\\text{(E)}}", "E"),
        ("<answer>b</answer>", "B"),
        ("A is wrong and B is wrong; answer is option D", "D"),
        ("A and B fail, C works.", "C"),  # last standalone capital
        ("the answer is a bit unclear", None),
        ("no choice here", None),
    ],
)
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_multiple_choice_reward_and_reference_forms():
    completions = ["Answer: (B)", "the answer is C", "\\boxed{A}", "hmm", "Answer: B"]
    answers = ["B", "(c)", 0, "A", None]
    assert multiple_choice(None, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, None]
    ten_options = make_multiple_choice(letters="ABCDEFGHIJ")
    assert ten_options(None, ["The answer is (J)"], answer=["J"]) == [1.0]


def test_multiple_choice_rejects_unusable_reference():
    with pytest.raises(RewardError, match="multiple-choice answer 'Paris' is not one of the letters ABCDE"):
        multiple_choice(None, ["A"], answer=["Paris"])
    with pytest.raises(RewardError, match="letters must be upper-case"):
        make_multiple_choice(letters="abc")
