"""Shared helpers of the built-in rewards (reward_fns/text.py) and the BUILTIN_REWARDS table."""

from __future__ import annotations

import pytest

from lmpg.errors import RewardError
from reward_fns import BUILTIN_REWARDS
from reward_fns.text import completion_text, reference_column


def test_completion_text_of_strings_and_conversations():
    assert completion_text("plain") == "plain"
    conversation = [{"role": "assistant", "content": "first"}, {"role": "assistant", "content": "last"}]
    assert completion_text(conversation) == "last"
    assert completion_text([]) == ""
    with pytest.raises(
        RewardError, match="completion of type int is neither a string nor a list of messages"
    ):
        completion_text(3)


def test_completion_text_is_lmpgs_one_helper():
    from lmpg.rewards.types import completion_text as lmpg_completion_text

    assert completion_text is lmpg_completion_text  # re-exported, not a twin


def test_reference_column_takes_the_first_present_and_checks_alignment():
    assert reference_column({"solution": ["s"], "answer": None}, ("answer", "solution"), 1) == ["s"]
    assert reference_column({}, ("answer",), 1) is None
    with pytest.raises(RewardError, match="column 'answer' has 2 values for 3 completions"):
        reference_column({"answer": ["a", "b"]}, ("answer",), 3)
    with pytest.raises(RewardError, match="column 'answer' must be a list"):
        reference_column({"answer": "abc"}, ("answer",), 3)


def test_builtin_names_are_the_functions_names():
    assert sorted(BUILTIN_REWARDS) == [
        "code_tests",
        "contains_answer",
        "exact_match",
        "format_tags",
        "format_tags_partial",
        "math_answer",
        "multiple_choice",
    ]
    assert all(fn.__name__ == name for name, fn in BUILTIN_REWARDS.items())
