"""The reward plug-in API: loading, scoring, checking outputs, and per-token placement (lmpg/rewards.py)."""

from __future__ import annotations

import asyncio
import functools
import threading
import time

import numpy as np
import pytest
import torch

from lmpg.errors import RewardError
from lmpg.rewards import RewardScorer, RewardScores, load_reward_fn, reward_fn_name
from reward_fns import BUILTIN_REWARDS, exact_match, math_answer


def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def length_in_chars(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def half_per_token(prompts, completions, completion_ids, **kwargs):
    return [[0.5] * len(ids) for ids in completion_ids]


def every_other_none(prompts, completions, **kwargs):
    return [None if i % 2 else 2.0 for i in range(len(completions))]


def echo_kwargs(prompts, completions, answer, completion_ids, step, **kwargs):
    return [float(a == c) + step + len(ids) / 10 for a, c, ids in zip(answer, completions, completion_ids)]


def returns(value):
    """A reward function that returns `value`, named `bad`."""

    def bad(prompts, completions, **kwargs):
        return value

    return bad


def score(scorer, completions, completion_ids=None, **columns):
    completion_ids = completion_ids if completion_ids is not None else [[7] * len(c) for c in completions]
    return scorer.score(["p"] * len(completions), completions, completion_ids, step=0, columns=columns)


# ---------------------------------------------------------------------------------------------------
# Scoring and combining


def test_values_kwargs_and_names():
    scorer = RewardScorer([constant, echo_kwargs, constant])
    scores = scorer.score(["p", "p"], ["42", "x"], [[1, 2], [3]], step=3, columns={"answer": ["42", "41"]})
    assert scores.names == ["constant_1", "echo_kwargs", "constant_2"]
    assert scores.values == [[1.0, 1.0], [4.2, 3.1], [1.0, 1.0]]
    assert scores.error_counts == {"constant_1": 0, "echo_kwargs": 0, "constant_2": 0}
    assert set(scores.seconds) == set(scores.names)


def test_weighted_token_rewards_scalar_on_last_counted_token_and_per_token_along_mask():
    scorer = RewardScorer([length_in_chars, half_per_token, every_other_none], weights=[1.0, 2.0, -0.5])
    # Row 0: 2 counted tokens at 1, 2 (left padding); row 1: 1 token at 0; row 2: empty completion.
    completion_mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    scores = score(scorer, ["ab", "c", ""], [[5, 6], [7], []])
    token_rewards, has_reward = scores.to_token_rewards(completion_mask)
    # row 0: per-token 2*0.5 at 1, 2; scalar 2 + (-0.5*2) = 1 on the last counted token (2).
    # row 1: 1 + 2*0.5 at 0 (every_other_none gave None). row 2: 0 + (-0.5*2) at position 0 (no tokens).
    assert token_rewards.tolist() == [[0.0, 1.0, 2.0, 0.0], [2.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]
    assert token_rewards.dtype == torch.float32
    assert has_reward.tolist() == [True, True, True]


def test_none_is_left_out_not_zero():
    scorer = RewardScorer([every_other_none])
    scores = score(scorer, ["a", "b", "c"])
    assert scores.values == [[2.0, None, 2.0]]
    assert scores.means() == {"every_other_none": 2.0}  # not 4/3
    token_rewards, has_reward = scores.to_token_rewards(torch.ones(3, 2, dtype=torch.bool))
    assert has_reward.tolist() == [True, False, True]
    assert token_rewards.tolist() == [[0.0, 2.0], [0.0, 0.0], [0.0, 2.0]]


def test_means_count_per_token_lists_as_their_sum_and_leave_out_functions_without_values():
    scores = RewardScores(names=["a", "b"], values=[[[0.5, 0.25], 1.0], [None, None]], weights=[1.0, 1.0])
    assert scores.means() == {"a": 0.875}


def test_to_token_rewards_rejects_mask_that_disagrees_with_per_token_list():
    scores = RewardScores(names=["t"], values=[[[1.0, 2.0]]], weights=[1.0])
    with pytest.raises(RewardError, match="2 per-token values but completion_mask counts 3 tokens"):
        scores.to_token_rewards(torch.ones(1, 3, dtype=torch.bool))
    scores.weights = [1.0, 2.0]
    with pytest.raises(RewardError, match="got 2 reward weights and 1 value lists for 1 reward functions"):
        scores.to_token_rewards(torch.ones(1, 2, dtype=torch.bool))


def test_accepts_numpy_torch_and_int_values():
    def mixed(prompts, completions, **kwargs):
        return [np.float32(0.5), torch.tensor(1.5), 2, np.array([1.0, 2.0])]

    scores = score(RewardScorer([mixed]), ["a", "b", "c", "de"])
    assert scores.values == [[0.5, 1.5, 2.0, [1.0, 2.0]]]
    assert scores.values[0][2].__class__ is float
    tensor_output = score(RewardScorer([returns(torch.tensor([1.0, 0.0]))]), ["a", "b"])
    assert tensor_output.values == [[1.0, 0.0]]


# ---------------------------------------------------------------------------------------------------
# Errors: raise (default) and on_error="none"


@pytest.mark.parametrize(
    "output, message",
    [
        (
            [1.0],
            "reward function 'bad' returned 1 values for 2 completions (samples 0..1): got 1, expected 2",
        ),
        (3.0, "reward function 'bad' returned 3.0 (float) for samples 0..1"),
        ("1.0", "reward function 'bad' returned '1.0' (str)"),
        ([1.0, "x"], "reward function 'bad' returned 'x' for sample 1: a str is not a number"),
        ([1.0, float("inf")], "returned inf for sample 1: the reward is not finite"),
        (
            [1.0, [1.0, 2.0, 3.0]],
            "returned [1.0, 2.0, 3.0] for sample 1: a per-token list needs one value per"
            " completion token: got 3, expected 2",
        ),
        ([1.0, [1.0, float("nan")]], "for sample 1: per-token value at position 1: NaN"),
    ],
)
def test_bad_outputs_raise_naming_function_sample_and_value(output, message):
    scorer = RewardScorer([returns(output)])
    with pytest.raises(RewardError) as error:
        score(scorer, ["a", "bc"])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_function_that_raises_is_reported_with_exception_type_and_message():
    def broken(prompts, completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(
        RewardError, match=r"reward function 'broken' raised KeyError: 'answer' \(on samples 0\.\.2\)"
    ):
        score(RewardScorer([broken]), ["a", "b", "c"])


def test_on_error_none_turns_bad_samples_into_none_and_counts_them():
    def broken(prompts, completions, **kwargs):
        raise ValueError("boom")

    scorer = RewardScorer(
        [returns([1.0, float("nan"), "x"]), broken, returns([1.0]), constant], on_error="none"
    )
    scores = score(scorer, ["a", "b", "c"])
    assert scores.values == [[1.0, None, None], [None] * 3, [None] * 3, [1.0] * 3]
    assert scores.error_counts == {"bad_1": 1, "broken": 3, "bad_2": 3, "constant": 0}  # NaN is no signal, as in TRL


def test_sync_function_returning_a_coroutine_is_told_to_be_async():
    async def reward(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    def wrapper(prompts, completions, **kwargs):
        return reward(prompts, completions, **kwargs)

    with pytest.raises(RewardError, match="returned an awaitable; declare it `async def`"):
        score(RewardScorer([wrapper]), ["a"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": [1.0]}, "got 1 reward weights for 2 reward functions"),
        ({"weights": [1.0, float("nan")]}, "weight of reward 'length_in_chars' must be a finite number"),
        ({"on_error": "skip"}, "on_error must be one of ('raise', 'none')"),
        ({"executor": "gpu"}, "executor must be one of ('serial', 'thread', 'process')"),
        ({"max_workers": 0}, "max_workers must be a positive int"),
    ],
)
def test_bad_scorer_arguments(kwargs, message):
    with pytest.raises(RewardError) as error:
        RewardScorer([constant, length_in_chars], **kwargs)
    assert message in str(error.value)


def test_misaligned_inputs_and_reserved_columns():
    scorer = RewardScorer([constant])
    with pytest.raises(RewardError, match="got 1 completion_ids for 2 completions"):
        scorer.score(["p", "p"], ["a", "b"], [[1]])
    with pytest.raises(RewardError, match="column 'answer' must be a list with one value per completion"):
        scorer.score(["p", "p"], ["a", "b"], [[1], [2]], columns={"answer": ["x"]})
    with pytest.raises(RewardError, match="dataset column 'step' clashes"):
        scorer.score(["p"], ["a"], [[1]], columns={"step": [1]})


# ---------------------------------------------------------------------------------------------------
# Concurrency


def max_concurrency(spans: list[tuple[float, float]]) -> int:
    """The most (start, end) intervals that were open at one instant."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])  # ends first at a tie
    open_now = most = 0
    for _, step in events:
        open_now += step
        most = max(most, open_now)
    return most


def test_max_concurrency_by_hand():
    assert max_concurrency([(0, 1), (1, 2), (2, 3)]) == 1  # one after another
    assert max_concurrency([(0, 2), (1, 3), (1.5, 4), (3.5, 5)]) == 3


def test_async_functions_run_concurrently():
    """Each call records when it ran; their intervals overlap (whatever the machine's speed)."""
    spans = []

    async def sleepy(prompts, completions, **kwargs):
        start = time.monotonic()
        await asyncio.sleep(0.1)
        spans.append((start, time.monotonic()))
        return [1.0] * len(completions)

    scorer = RewardScorer([sleepy] * 8)
    scores = score(scorer, ["a", "b"])
    assert scores.values == [[1.0, 1.0]] * 8
    assert len(spans) == 8 and max_concurrency(spans) >= 2


def test_async_callable_object_and_running_event_loop():
    class Judge:
        async def __call__(self, prompts, completions, **kwargs):
            await asyncio.sleep(0.01)
            return [float(len(c)) for c in completions]

    scorer = RewardScorer([Judge(), constant])
    assert scorer.is_async == [True, False]
    assert scorer.names == ["Judge", "constant"]

    async def inside_a_loop():
        return score(scorer, ["ab"])

    assert asyncio.run(inside_a_loop()).values == [[2.0], [1.0]]


def test_thread_executor_splits_a_slow_function_and_keeps_order():
    calls = []

    def slow(prompts, completions, **kwargs):
        start = time.monotonic()
        time.sleep(0.1)
        calls.append((threading.get_ident(), len(completions), (start, time.monotonic())))
        return [float(c) for c in completions]

    with RewardScorer([slow, constant], executor="thread", max_workers=4) as scorer:
        scores = score(scorer, [str(i) for i in range(8)])
    assert scores.values[0] == [float(i) for i in range(8)]
    assert sorted(n for _, n, _ in calls) == [2, 2, 2, 2]
    assert len({ident for ident, _, _ in calls}) == 4
    assert max_concurrency([span for _, _, span in calls]) >= 2  # the slices ran at once, not one by one


def test_process_pool_is_kept_across_calls_and_closed():
    scorer = RewardScorer([constant], executor="process", max_workers=2)
    score(scorer, ["a", "b"])
    pool = scorer._processes._pool
    score(scorer, ["a", "b"])
    assert scorer._processes._pool is pool
    scorer.close()
    assert scorer._processes._pool is None


def test_split_batch_false_runs_whole_in_this_thread():
    seen = []

    class BatchesItself:
        split_batch = False

        def __call__(self, prompts, completions, **kwargs):
            seen.append((threading.current_thread() is threading.main_thread(), len(completions)))
            return [0.0] * len(completions)

    with RewardScorer([BatchesItself()], executor="thread", max_workers=4) as scorer:
        score(scorer, ["a"] * 8)
    assert seen == [(True, 8)]


def test_math_answer_works_in_threads():
    # math_verify's signal-based timeout raises outside the main thread unless switched off.
    completions = ["\\boxed{\\frac{1}{2}}", "so \\boxed{x^2+1}", "#### 1,000", "7"]
    with RewardScorer([math_answer], executor="thread", max_workers=2) as scorer:
        scores = score(scorer, completions, answer=["0.5", "1+x^2", "1000", "8"])
    assert scores.values == [[1.0, 1.0, 1.0, 0.0]]


def test_process_executor_with_builtin_and_file_spec(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def shout(prompts, completions, **kwargs):\n    return [float(c.isupper()) for c in completions]\n"
    )
    with RewardScorer([exact_match, f"{path}:shout"], executor="process", max_workers=2) as scorer:
        scores = score(scorer, ["A", "b", "C"], answer=["a", "x", "c"])
    assert scores.values == [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]


def test_process_executor_rejects_unpicklable_function():
    with pytest.raises(
        RewardError, match="'<lambda>' cannot be pickled for executor='process'.*use executor='thread'"
    ):
        RewardScorer([lambda prompts, completions, **kwargs: [0.0] * len(completions)], executor="process")


# ---------------------------------------------------------------------------------------------------
# Loading and naming


def test_load_from_module_path_file_path_and_builtin_name(tmp_path):
    assert load_reward_fn("reward_fns.math_answer:math_answer") is math_answer
    assert load_reward_fn("math_answer") is BUILTIN_REWARDS["math_answer"]
    assert load_reward_fn("format_tags")(None, ["<think>a</think><answer>b</answer>"]) == [1.0]
    path = tmp_path / "custom.py"
    path.write_text(
        "class Scale:\n    def f(self, prompts, completions, **kw):\n        return [2.0] * len(completions)\n"
        "scale = Scale()\n"
    )
    method = load_reward_fn(f"{path}:scale.f")
    assert method(None, ["a"]) == [2.0]
    assert load_reward_fn(f"{path}:scale.f").__self__ is method.__self__  # the file is loaded once


def test_load_failures_say_why(tmp_path):
    with pytest.raises(RewardError, match="module 'no_such_module_xyz' not found"):
        load_reward_fn("no_such_module_xyz:fn")
    with pytest.raises(RewardError, match="file not found: .*missing.py"):
        load_reward_fn(str(tmp_path / "missing.py") + ":fn")
    with pytest.raises(
        RewardError, match=r"'reward_fns.match' has no attribute 'exact'; its callables: .*exact_match"
    ):
        load_reward_fn("reward_fns.match:exact")
    with pytest.raises(RewardError, match="'mathanswer' is not a built-in .*math_answer"):
        load_reward_fn("mathanswer")
    with pytest.raises(RewardError, match="is a class; create an instance"):
        load_reward_fn("reward_fns.reward_model:RewardModelReward")
    with pytest.raises(RewardError, match="is a tuple, not a callable"):
        load_reward_fn("reward_fns.math_answer:REFERENCE_COLUMNS")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_installed_abc\n")
    with pytest.raises(
        RewardError,
        match="running .*broken.py raised ModuleNotFoundError: No module named 'not_installed_abc'",
    ):
        load_reward_fn(f"{broken}:fn")
    with pytest.raises(RewardError, match="module 'reward_fns.nope' not found"):
        RewardScorer(["reward_fns.nope:fn"])


def test_reward_fn_name():
    class Judge:
        def __call__(self, prompts, completions, **kwargs):
            return []

    assert reward_fn_name(constant) == "constant"
    assert reward_fn_name(Judge()) == "Judge"
    assert reward_fn_name(functools.partial(length_in_chars)) == "length_in_chars"
    assert reward_fn_name(BUILTIN_REWARDS["format_tags_partial"]) == "format_tags_partial"
