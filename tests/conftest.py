"""Shared fixtures: a tiny causal LM and a character tokenizer built in-process (nothing downloaded)."""

import os

# OpenMP threads sleep instead of spinning at barriers: on shared cores a spinning thread holds the
# core its partner needs, which makes small-tensor steps several times slower (benchmarks/README.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

ALPHABET = "0123456789+=ab "


@pytest.fixture
def tokenizer():
    from lmpg.tiny import make_char_tokenizer

    return make_char_tokenizer(ALPHABET)


@pytest.fixture
def tiny_model(tokenizer):
    from lmpg.tiny import make_tiny_causal_lm

    return make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)


@pytest.fixture
def prompts_dataset():
    import datasets

    return datasets.Dataset.from_list([{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(12)])


def count_a(prompts, completions, **kwargs):
    """Reward: fraction of 'a' characters among 8 (a signal a tiny model learns in a few iterations)."""
    return [c.count("a") / 8 for c in completions]


def small_config(tmp_path, **overrides):
    """A PGConfig for a few quick iterations on the tiny model, writing under tmp_path/run."""
    from lmpg import PGConfig

    base = dict(output_dir=str(tmp_path / "run"), iterations=2, batch_size=8, group_size=4, max_new_tokens=6,
                learning_rate=3e-3, sample_log_every=0, progress_bar=False)
    base.update(overrides)
    return PGConfig(**base)
