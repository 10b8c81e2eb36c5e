"""lmpg: policy-gradient fine-tuning of causal language models.

    from lmpg import PGConfig, PGTrainer
    PGTrainer(model, reward_fns, train_dataset, PGConfig(...), tokenizer).train()
"""

from lmpg.config import PGConfig
from lmpg.errors import ConfigError, DataError, LmpgError, RewardError, TrainingError

__all__ = ["PGConfig", "PGTrainer", "LmpgError", "ConfigError", "DataError", "RewardError", "TrainingError"]
__version__ = "0.1.0"


def __getattr__(name):
    # PGTrainer pulls in transformers/accelerate; import it on first use so `import lmpg` stays light
    if name == "PGTrainer":
        from lmpg.trainer import PGTrainer
        return PGTrainer
    raise AttributeError(f"module 'lmpg' has no attribute {name!r}")
