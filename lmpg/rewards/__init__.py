"""Rewards: specs (`specs`), calling a function as TRL does (`calling`), checking what it returns
(`checks`), where calls run (`executors`), weighting and placing scores as per-token rewards
(`scorer`, `placement`).

    from lmpg.rewards import RewardScorer
    with RewardScorer([correct, "format_tags"], weights=[1.0, 0.2]) as scorer:
        scores = scorer.score(prompts, completions, completion_ids, step=0, columns={"answer": answers})
        token_rewards, has_reward = scores.to_token_rewards(completion_mask)
"""

from lmpg.rewards.calling import RewardState
from lmpg.rewards.scorer import RewardScorer, RewardScores
from lmpg.rewards.specs import load_reward_fn
from lmpg.rewards.types import RewardFn, completion_text, is_async_reward_fn, named_reward, reward_fn_name

__all__ = ["RewardFn", "RewardScorer", "RewardScores", "RewardState", "completion_text", "is_async_reward_fn",
           "load_reward_fn", "named_reward", "reward_fn_name"]
