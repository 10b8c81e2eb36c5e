"""The values of PGConfig's choice fields, each a `Literal`, in a leaf module.

`lmpg.config` and the module that implements a choice both import its Literal from here, so the
config never imports the maths or the reward engine to learn what a field may hold. A choice
field's allowed values are its Literal's arguments (`lmpg.config.choices`): adding a value here,
and its implementation in the module named beside it, is the only edit a new choice needs.
"""

from __future__ import annotations

from typing import Literal, get_args

# lmpg.advantages
Baseline = Literal["none", "batch_mean", "group_mean", "leave_one_out", "optimal", "optimal_token"]
AdvNorm = Literal["none", "group", "batch"]
RewardAggregation = Literal["sum", "normalize_then_sum"]  # of the reward functions (GDPO: normalize_then_sum)
WEIGHTED_BASELINES = ("optimal", "optimal_token")  # need each token's grad_sq_norm from the sampler
# compare a sample with its own group's: a group whose returns tie gets A = 0 (lmpg.dynamic_sampling)
GROUP_BASELINES = ("group_mean", "leave_one_out", *WEIGHTED_BASELINES)

# lmpg.losses
RatioLevel = Literal["token", "sequence", "sequence_mean"]
LossAgg = Literal["token_mean", "sequence_mean", "sequence_sum", "constant"]
# the per-token objective f(r, A) whose gradient the loss follows (lmpg.losses' docstring)
PgObjective = Literal["ppo_clip", "cispo", "sapo", "vespo"]
# under a sequence ratio level, what a sequence's loss weighs: one (GSPO) or its length (TRL's other loss types)
SequenceLossWeight = Literal["one", "length"]
# every level but token gives one loss per sequence (averaged over sequences), so loss_agg reaches
# only the KL term there
SEQUENCE_RATIO_LEVELS = tuple(level for level in get_args(RatioLevel) if level != "token")

# lmpg.kl
KlEstimator = Literal["k1", "k2", "k3"]
KlIn = Literal["loss", "reward"]  # where the penalty goes (lmpg.kl's docstring)

# lmpg.rewards
RewardExecutor = Literal["serial", "thread", "process"]  # lmpg.rewards.executors
OnError = Literal["raise", "none"]  # a reward function that raises: stop the run, or score the sample None

# lmpg.mismatch
SamplerCorrection = Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]

# lmpg.tools
ToolFormat = Literal["hermes", "simple"]
