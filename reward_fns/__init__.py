"""Built-in reward functions, each `fn(prompts, completions, **kwargs) -> list[float | None]`.

    from reward_fns import math_answer, format_tags
    scorer = RewardScorer([math_answer, format_tags], weights=[1.0, 0.2])

`BUILTIN_REWARDS` maps the names a config may use (`reward_fns: [math_answer, format_tags]`, resolved
by `lmpg.rewards.load_reward_fn`) to ready-made functions. Factories (`make_*`) build configured
variants. `RewardModelReward` is imported on first use, so importing this package does not load
transformers.
"""

from reward_fns.code_tests import code_tests, extract_code, make_code_tests_reward, split_test_cases
from reward_fns.format import format_tags, format_tags_partial, make_format_reward, make_regex_reward
from reward_fns.length import make_length_reward, make_overlong_penalty
from reward_fns.match import (
    contains_answer,
    exact_match,
    extract_choice,
    make_contains_answer,
    make_exact_match,
    make_multiple_choice,
    multiple_choice,
)
from reward_fns.math_answer import extract_final_answer, is_equivalent, math_answer
from reward_fns.sandbox import SandboxLimits, SandboxResult, run_python_tests

BUILTIN_REWARDS = {
    "math_answer": math_answer,
    "format_tags": format_tags,
    "format_tags_partial": format_tags_partial,
    "exact_match": exact_match,
    "contains_answer": contains_answer,
    "multiple_choice": multiple_choice,
    "code_tests": code_tests,
}


def __getattr__(name: str):
    if name == "RewardModelReward":
        from reward_fns.reward_model import RewardModelReward

        return RewardModelReward
    raise AttributeError(f"module 'reward_fns' has no attribute {name!r}")


__all__ = [
    "BUILTIN_REWARDS",
    "RewardModelReward",
    "SandboxLimits",
    "SandboxResult",
    "code_tests",
    "contains_answer",
    "exact_match",
    "extract_choice",
    "extract_code",
    "extract_final_answer",
    "format_tags",
    "format_tags_partial",
    "is_equivalent",
    "make_code_tests_reward",
    "make_contains_answer",
    "make_exact_match",
    "make_format_reward",
    "make_length_reward",
    "make_multiple_choice",
    "make_overlong_penalty",
    "make_regex_reward",
    "math_answer",
    "multiple_choice",
    "run_python_tests",
    "split_test_cases",
]
