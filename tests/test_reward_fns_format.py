"""Format rewards (reward_fns/format.py), on literal completions."""

from __future__ import annotations

import pickle

import pytest

from lmpg.errors import RewardError
from reward_fns.format import format_tags, format_tags_partial, make_format_reward, make_regex_reward

COMPLETIONS = [
    "<think>6 times 7</think>\n<answer>42</answer>",  # the layout
    "  <think>\nmulti\nline\n</think><answer>42</answer>\n",  # whitespace around and inside is fine
    "<answer>42</answer><think>late</think>",  # wrong order: all four tags once
    "<think>a</think><think>b</think><answer>42</answer>",  # <think> twice
    "<think>no answer</think>",  # two of four tags
    "Sure! <think>x</think><answer>42</answer>",  # text outside the tags
    "42",
]


def test_format_tags_full_match_only():
    assert format_tags(None, COMPLETIONS) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_format_tags_partial_credit_quarter_per_tag_present_once():
    assert format_tags_partial(None, COMPLETIONS) == [1.0, 1.0, 1.0, 0.5, 0.5, 1.0, 0.0]


def test_custom_tags():
    reward = make_format_reward(tags=("reasoning", "code"), partial=True)
    assert reward(None, ["<reasoning>r</reasoning><code>c</code>", "<code>c</code>"]) == [1.0, 0.5]
    with pytest.raises(RewardError, match="tags must be non-empty names"):
        make_format_reward(tags=("a b",))


def test_regex_reward_full_partial_and_none():
    reward = make_regex_reward(r"Answer: \d+", partial=0.25, name="answer_line")
    assert reward.__name__ == "answer_line"
    assert reward(None, ["Answer: 12", "So. Answer: 12", "Answer: twelve"]) == [1.0, 0.25, 0.0]
    with pytest.raises(RewardError, match="does not compile"):
        make_regex_reward("(")


def test_dataset_columns_cannot_override_configuration_and_rewards_pickle():
    assert format_tags(None, ["42"], tags=["x"], partial=[True]) == [0.0]
    restored = pickle.loads(pickle.dumps(format_tags_partial))
    assert restored.__name__ == "format_tags_partial"
    assert restored(None, ["<think>a</think>"]) == [0.5]
