"""Reward functions are called as TRL 1.16 calls them; lmpg's older positional form still works."""

import numpy as np
import pytest

from lmpg.errors import RewardError
from lmpg.rewards import RewardScorer
from lmpg.rewards.calling import call_plan
from lmpg.rewards.scorer import metric_means, pool_metric_values


def score(fn, columns=None, **kwargs):
    with RewardScorer([fn], **kwargs) as scorer:
        return scorer.score(["p1", "p2"], ["a", "bb"], [[1], [2, 2]], step=3, columns=columns).values[0]


def test_keywords_reach_a_trl_function_that_names_one_positional_parameter():
    def digit_reward(completions, **kwargs):  # "takes 1 positional argument but 2 were given" before
        assert set(kwargs) >= {"prompts", "completion_ids", "trainer_state", "log_extra", "log_metric", "step"}
        assert kwargs["trainer_state"].global_step == 3
        return [len(c) for c in completions]

    assert score(digit_reward) == [1.0, 2.0]


def test_a_column_named_like_a_parameter_is_passed_once():
    def accuracy(completions, solution, **kwargs):  # "got multiple values for argument 'solution'" before
        return [float(c == s) for c, s in zip(completions, solution)]

    assert score(accuracy, columns={"solution": ["a", "x"]}) == [1.0, 0.0]


def test_the_old_positional_form_and_functions_without_kwargs():
    def old(p, c, **kw):
        return [float(len(x)) for x in c]

    def strict(completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    assert call_plan(old, "old").positional and not call_plan(strict, "strict").positional
    assert score(old) == [1.0, 2.0]
    assert score(strict, columns={"answer": ["a", "b"]}) == [1.0, 0.0]
    with pytest.raises(RewardError, match="'strict' needs argument 'answer', which is no column of the data"):
        score(strict)


def test_values_trl_accepts_bools_numpy_none_nan():
    assert score(lambda completions, **kw: [True, np.bool_(False)]) == [1.0, 0.0]
    assert score(lambda completions, **kw: [np.float64(0.5), None]) == [0.5, None]
    assert score(lambda completions, **kw: np.array([float("nan"), 2.0])) == [None, 2.0]


def test_log_extra_and_log_metric_are_gathered_across_slices():
    def logs(completions, log_extra, log_metric, **kwargs):
        log_extra("length", [len(c) for c in completions])
        log_metric("calls", 1.0)
        return [0.0] * len(completions)

    with RewardScorer([logs], executor="thread", max_workers=2) as scorer:
        scores = scorer.score(["p1", "p2"], ["a", "bb"], [[1], [2, 2]])
    assert scores.extras == {"length": [1, 2]} and scores.metrics == {"calls": 1.0}


def test_log_metric_mean_is_over_every_value_however_the_batch_is_split():
    def per_sample(completions, log_metric, **kwargs):
        for c in completions:
            log_metric("length", len(c))
        return [0.0] * len(completions)

    completions = ["a", "bb", "ccc", "dddd", "eeeee"]
    with RewardScorer([per_sample]) as serial, RewardScorer([per_sample], executor="thread", max_workers=3) as sliced:
        one, three = (s.score(["p"] * 5, completions, [[1]] * 5) for s in (serial, sliced))
    assert one.metrics == three.metrics == {"length": 3.0}
    assert one.metric_values == three.metric_values == {"length": [1.0, 2.0, 3.0, 4.0, 5.0]}
    # processes pool their values (lmpg.trainer); fsum makes the mean independent of their order
    halves = [{"x": [1e16, 1.0]}, {"x": [-1e16, 1.0], "y": [2.0]}]
    assert pool_metric_values(halves) == {"x": [1e16, 1.0, -1e16, 1.0], "y": [2.0]}
    assert metric_means(pool_metric_values(halves)) == {"x": 0.5, "y": 2.0}  # a plain left-to-right sum gives 0.25
