"""Length rewards (reward_fns/length.py): hand-worked values."""

from __future__ import annotations

import pytest

from lmpg.errors import RewardError
from reward_fns.length import make_length_reward, make_overlong_penalty, overlong_penalty


def test_overlong_penalty_dapo_eq13():
    # L_max = 20, L_cache = 4: 0 up to 16, then (16 - |y|) / 4 down to -1 at 20, -1 beyond.
    lengths = [0, 16, 17, 18, 20, 21, 100]
    assert [overlong_penalty(n, max_length=20, buffer=4) for n in lengths] == [
        0.0,
        0.0,
        -0.25,
        -0.5,
        -1.0,
        -1.0,
        -1.0,
    ]


def test_overlong_penalty_reward_counts_tokens_from_completion_ids():
    reward = make_overlong_penalty(max_length=20, buffer=4)
    completion_ids = [[1] * 10, [1] * 18, [1] * 25]
    assert reward(None, ["a", "b", "c"], completion_ids=completion_ids) == [0.0, -0.5, -1.0]
    assert reward.__name__ == "overlong_penalty"


def test_length_reward_tokens_and_chars():
    by_tokens = make_length_reward(target_length=10)
    assert by_tokens(None, ["", "", "", ""], completion_ids=[[0] * 10, [0] * 5, [0] * 15, [0] * 30]) == [
        1.0,
        0.5,
        0.5,
        0.0,
    ]
    by_chars = make_length_reward(target_length=4, unit="chars")
    assert by_chars(None, ["abcd", "ab", "", [{"role": "assistant", "content": "abcdef"}]]) == [
        1.0,
        0.5,
        0.0,
        0.5,
    ]


def test_bad_configuration_and_missing_completion_ids():
    with pytest.raises(RewardError, match="0 < buffer <= max_length"):
        make_overlong_penalty(max_length=10, buffer=11)
    with pytest.raises(RewardError, match="0 < buffer <= max_length"):
        make_overlong_penalty(max_length=10, buffer=0)
    with pytest.raises(RewardError, match="target_length must be a positive int"):
        make_length_reward(target_length=0)
    with pytest.raises(RewardError, match="length unit must be one of"):
        make_length_reward(target_length=5, unit="words")
    with pytest.raises(RewardError, match="needs the completion_ids kwarg"):
        make_length_reward(target_length=5)(None, ["abc"])
