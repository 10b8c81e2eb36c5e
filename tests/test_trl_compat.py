"""PGConfig.from_trl on real TRL GRPOConfig objects, and a TRL GRPO script ported by its imports."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lmpg import PGConfig
from lmpg.errors import ConfigError

trl = pytest.importorskip("trl")


def grpo_config(tmp_path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.GRPOConfig(output_dir=str(tmp_path / "out"), bf16=False, report_to="none", **kwargs)


def test_the_migration_guides_side_by_side_run_converts_to_its_pgconfig(tmp_path):
    args = grpo_config(tmp_path, num_generations=8, per_device_train_batch_size=8, gradient_accumulation_steps=4,
                       num_iterations=1, max_completion_length=256, learning_rate=1e-6, beta=0.0, epsilon=0.2,
                       epsilon_high=0.28, loss_type="dapo", scale_rewards="group", temperature=1.0, max_steps=500,
                       lr_scheduler_type="constant", gradient_checkpointing=False)
    config = PGConfig.from_trl(args)
    expected = PGConfig(output_dir=str(tmp_path / "out"), group_size=8, batch_size=32, minibatch_size=32,
                        micro_batch_size=8, epochs_per_batch=1, max_new_tokens=256, learning_rate=1e-6,
                        kl_coef=0.0, clip_eps_low=0.2, clip_eps_high=0.28, loss_agg="token_mean",
                        baseline="group_mean", adv_norm="group", temperature=1.0, iterations=500, seed=42,
                        log_every=10, save_every=500, adam_eps=1e-8, weight_decay=0.0)
    assert config == expected


def test_fields_map_one_by_one(tmp_path):
    args = grpo_config(tmp_path, num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                       steps_per_generation=4, num_iterations=2, max_steps=40, loss_type="dr_grpo",
                       scale_rewards="none", importance_sampling_level="token", beta=0.04, top_p=0.9, top_k=20,
                       reward_weights=[1.0, 0.5], lr_scheduler_type="cosine", warmup_steps=0.1, seed=3,
                       max_completion_length=32, adam_epsilon=1e-6, save_total_limit=5, logging_steps=1)
    config = PGConfig.from_trl(args, rewards=["a", "b"])
    # a generation batch of 4 x 4 = 16 completions, optimizer steps on 4 x 2 = 8: 2 minibatches x 2 epochs
    assert (config.batch_size, config.minibatch_size, config.micro_batch_size) == (16, 8, 4)
    assert (config.epochs_per_batch, config.iterations, config.warmup_steps) == (2, 10, 4)
    assert (config.loss_agg, config.loss_constant, config.adv_norm, config.ratio_level) == \
        ("constant", 32, "none", "token")
    assert (config.kl_coef, config.kl_in, config.kl_estimator) == (0.04, "loss", "k3")
    assert (config.top_p, config.top_k, config.lr_scheduler, config.seed) == (0.9, 20, "cosine", 3)
    assert (config.reward_weights, config.adam_eps, config.keep_last, config.log_every) == ([1.0, 0.5], 1e-6, 5, 1)
    assert config.gradient_checkpointing  # TRL's default is on
    # GSPO: lmpg averages one loss per sequence over sequences, which is TRL's sequence level with grpo only
    gspo = PGConfig.from_trl(grpo_config(tmp_path, max_steps=10, loss_type="grpo", importance_sampling_level="sequence"))
    assert (gspo.ratio_level, gspo.loss_agg) == ("sequence_mean", "sequence_mean")
    with pytest.raises(ConfigError, match="importance_sampling_level='sequence' with loss_type='dr_grpo'"):
        PGConfig.from_trl(grpo_config(tmp_path, max_steps=10, loss_type="dr_grpo", importance_sampling_level="sequence"))


def test_options_lmpg_lacks_are_one_line_naming_each(tmp_path):
    args = grpo_config(tmp_path, max_steps=10, loss_type="vespo", multi_objective_aggregation="normalize_then_sum",
                       entropy_coef=0.1, mask_truncated_completions=True)
    with pytest.raises(ConfigError) as error:
        PGConfig.from_trl(args)
    message = str(error.value)
    assert "\n" not in message
    for fragment in ("loss_type='vespo'", "multi_objective_aggregation='normalize_then_sum'", "entropy_coef=0.1",
                     "mask_truncated_completions=True"):
        assert fragment in message
    with pytest.raises(ConfigError, match="max_steps unset"):
        PGConfig.from_trl(grpo_config(tmp_path))


def migration_script() -> str:
    text = (Path(__file__).resolve().parents[1] / "docs" / "trl_migration.md").read_text()
    return next(b.split("```", 1)[0] for b in text.split("```python\n")[1:] if b.startswith("# train_grpo.py"))


def test_the_ported_trl_script_in_the_migration_guide_runs(tmp_path):
    from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm

    tokenizer = make_char_tokenizer("0123456789+=<>/thinkboxed{}\\ ")
    make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    script = migration_script().replace('"Qwen/Qwen2.5-0.5B-Instruct"', repr(str(tmp_path / "model")))
    script = script.replace("max_steps=500", "max_steps=2").replace("max_completion_length=256",
                                                                        "max_completion_length=6")
    (tmp_path / "train_grpo.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "CI": "1"}
    result = subprocess.run([sys.executable, "train_grpo.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = [json.loads(line) for line in (tmp_path / "grpo_out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2]
