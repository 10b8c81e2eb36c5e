"""config_from_trl on real TRL GRPOConfig objects, and a TRL GRPO script ported by its imports."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
# trl is a test dependency (pyproject [test], TRL 1.16): missing, this module fails, never skips
import trl
import yaml

from lmpg import PGConfig
from lmpg.errors import ConfigError
from lmpg.trl_compat import config_from_trl


def grpo_config(tmp_path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.GRPOConfig(output_dir=str(tmp_path / "out"), bf16=False, report_to="none", **kwargs)


def test_the_migration_guides_side_by_side_run_converts_to_its_pgconfig(tmp_path):
    args = grpo_config(tmp_path, num_generations=8, per_device_train_batch_size=8, gradient_accumulation_steps=4,
                       num_iterations=1, max_completion_length=256, learning_rate=1e-6, beta=0.0, epsilon=0.2,
                       epsilon_high=0.28, loss_type="dapo", scale_rewards="group", temperature=1.0, max_steps=500,
                       lr_scheduler_type="constant", gradient_checkpointing=False)
    config = config_from_trl(args)
    expected = PGConfig(output_dir=str(tmp_path / "out"), group_size=8, batch_size=32, minibatch_size=32,
                        micro_batch_size=8, epochs_per_batch=1, max_new_tokens=256, learning_rate=1e-6,
                        kl_coef=0.0, clip_eps_low=0.2, clip_eps_high=0.28, loss_agg="token_mean",
                        baseline="group_mean", adv_norm="group", temperature=1.0, iterations=500, seed=42,
                        log_every=10, save_every=500, adam_eps=1e-8, weight_decay=0.0, max_episode_tokens=256,
                        kl_ratio_weighted=True,  # TRL's use_bias_correction_kl (default on), no effect at beta 0
                        model_init_kwargs={"dtype": "float32"})
    assert config == expected


def test_fields_map_one_by_one(tmp_path):
    args = grpo_config(tmp_path, num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                       steps_per_generation=4, num_iterations=2, max_steps=40, loss_type="dr_grpo",
                       scale_rewards="none", importance_sampling_level="token", beta=0.04, top_p=0.9, top_k=20,
                       reward_weights=[1.0, 0.5], lr_scheduler_type="cosine", warmup_steps=0.1, seed=3,
                       max_completion_length=32, adam_epsilon=1e-6, save_total_limit=5, logging_steps=1)
    config = config_from_trl(args, rewards=["a", "b"])
    # a generation batch of 4 x 4 = 16 completions, optimizer steps on 4 x 2 = 8: 2 minibatches x 2 epochs
    assert (config.batch_size, config.minibatch_size, config.micro_batch_size) == (16, 8, 4)
    assert (config.epochs_per_batch, config.iterations, config.warmup_steps) == (2, 10, 4)
    assert (config.loss_agg, config.loss_constant, config.adv_norm, config.ratio_level) == \
        ("constant", 32, "none", "token")
    assert (config.kl_coef, config.kl_in, config.kl_estimator, config.kl_ratio_weighted) == (0.04, "loss", "k3", True)
    assert not config_from_trl(grpo_config(tmp_path, max_steps=4, use_bias_correction_kl=False)).kl_ratio_weighted
    assert (config.top_p, config.top_k, config.lr_scheduler, config.seed) == (0.9, 20, "cosine", 3)
    assert (config.reward_weights, config.adam_eps, config.keep_last, config.log_every) == ([1.0, 0.5], 1e-6, 5, 1)
    assert config.gradient_checkpointing  # TRL's default is on
    # GSPO: one loss per sequence averaged over sequences (grpo); TRL's other loss types weigh it by length
    gspo = config_from_trl(grpo_config(tmp_path, max_steps=10, loss_type="grpo", importance_sampling_level="sequence"))
    assert (gspo.ratio_level, gspo.loss_agg, gspo.sequence_loss_weight) == ("sequence_mean", "sequence_mean", "one")
    dr_gspo = config_from_trl(grpo_config(tmp_path, max_steps=10, loss_type="dr_grpo", importance_sampling_level="sequence"))
    assert (dr_gspo.ratio_level, dr_gspo.loss_agg, dr_gspo.sequence_loss_weight) == ("sequence_mean", "constant", "length")
    with pytest.raises(ConfigError, match="importance_sampling_level='sequence' with loss_type='vespo', beta"):
        config_from_trl(grpo_config(tmp_path, max_steps=10, loss_type="vespo", importance_sampling_level="sequence",
                                    beta=0.04))


def test_min_p_and_repetition_penalty_map_and_trls_transformers_path_stays_uncorrected(tmp_path):
    """Issue 22: min_p and repetition_penalty map to lmpg's own; TRL's transformers generation trains
    on their samples without an importance weight, so the port sets sampler_correction none there
    (lmpg's auto would correct); with vLLM the port keeps TRL's vLLM correction."""
    config = config_from_trl(grpo_config(tmp_path, max_steps=4, min_p=0.05, repetition_penalty=1.2))
    assert (config.min_p, config.repetition_penalty) == (0.05, 1.2)
    assert config.measures_sampler_mismatch and config.resolved_sampler_correction == "none"
    config = config_from_trl(grpo_config(tmp_path, max_steps=4))
    assert (config.min_p, config.repetition_penalty, config.sampler_correction) == (0.0, 1.0, "auto")
    config = config_from_trl(grpo_config(tmp_path, max_steps=4, min_p=0.05, use_vllm=True, vllm_mode="colocate"))
    assert config.resolved_sampler_correction == grpo_config(tmp_path).vllm_importance_sampling_mode


def test_generation_kwargs_set_the_fields_lmpg_has_and_name_the_others(tmp_path):
    """Issue 22: generation_kwargs (TRL passes them to SamplingParams / GenerationConfig, overriding its
    own fields) set lmpg's sampling fields; keys lmpg's samplers lack are refused in one line naming them."""
    config = config_from_trl(grpo_config(tmp_path, max_steps=4, top_p=0.9, generation_kwargs=dict(
        top_p=0.8, top_k=-1, min_p=0.02, repetition_penalty=1.1, temperature=0.7, max_tokens=12)))
    assert (config.top_p, config.top_k, config.min_p, config.repetition_penalty, config.temperature,
            config.max_new_tokens) == (0.8, 0, 0.02, 1.1, 0.7, 12)
    assert config_from_trl(grpo_config(tmp_path, max_steps=4, generation_kwargs={"max_new_tokens": 9})).max_new_tokens == 9
    with pytest.raises(ConfigError) as error:
        config_from_trl(grpo_config(tmp_path, max_steps=4, generation_kwargs=dict(
            top_p=0.8, suppress_tokens=[1], presence_penalty=0.5)))
    message = str(error.value)
    assert "\n" not in message and "'presence_penalty', 'suppress_tokens'" in message and "'top_p'" not in message


def test_options_lmpg_lacks_are_one_line_naming_each(tmp_path):
    args = grpo_config(tmp_path, max_steps=10, torch_compile=True, use_transformers_paged=True)
    with pytest.raises(ConfigError) as error:
        config_from_trl(args)
    message = str(error.value)
    assert "\n" not in message
    for fragment in ("torch_compile=True", "use_transformers_paged=True"):
        assert fragment in message
    with pytest.raises(ConfigError, match="max_steps unset"):
        config_from_trl(grpo_config(tmp_path))


def test_model_template_and_data_options_map(tmp_path):
    """Issue 22: chat_template_kwargs, model_init_kwargs (TRL loads in float32 unless they give a dtype),
    trust_remote_code, cast_lm_head_to_fp32 and shuffle_dataset map to lmpg's fields of the same names."""
    config = config_from_trl(grpo_config(tmp_path, max_steps=10, chat_template_kwargs={"enable_thinking": False},
                                         model_init_kwargs={"dtype": "bfloat16", "revision": "r1"},
                                         shuffle_dataset=False, trust_remote_code=True, cast_lm_head_to_fp32=True))
    assert config.chat_template_kwargs == {"enable_thinking": False}
    assert config.model_init_kwargs == {"dtype": "bfloat16", "revision": "r1"}
    assert (config.shuffle_dataset, config.trust_remote_code, config.cast_lm_head_to_fp32) == (False, True, True)
    import torch

    with_dtype = config_from_trl(grpo_config(tmp_path, max_steps=10, model_init_kwargs={"dtype": torch.bfloat16}))
    assert with_dtype.model_init_kwargs == {"dtype": "bfloat16"}  # plain text, for config.yaml
    default = config_from_trl(grpo_config(tmp_path, max_steps=10))
    assert default.model_init_kwargs == {"dtype": "float32"} and default.chat_template_kwargs == {}
    assert (default.shuffle_dataset, default.trust_remote_code, default.cast_lm_head_to_fp32) == (True, False, False)


def test_tool_calling_iterations_become_turns(tmp_path):
    """TRL's max_tool_calling_iterations N: N rounds of tool calls after the first turn, so N + 1 turns;
    max_completion_length caps the whole multi-turn completion, tool results included."""
    config = config_from_trl(grpo_config(tmp_path, max_steps=4, max_tool_calling_iterations=2,
                                           max_completion_length=64))
    assert (config.max_turns, config.max_new_tokens, config.max_episode_tokens) == (3, 64, 64)
    assert config_from_trl(grpo_config(tmp_path, max_steps=4)).max_turns == PGConfig().max_turns


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


def test_migration_guides_unscored_sample_claim_holds_in_trls_own_code(tmp_path):
    """docs/trl_migration.md, "Unscored samples": TRL 1.16 leaves a sample every reward function scored
    None out of the group mean and std and zeroes its advantage (it does not count it as reward 0),
    and its tokens still count in the loss normaliser. Checked by running TRL's own
    `_generate_and_score_completions` on a tiny model, beside lmpg's advantages for the same rewards."""
    import datasets
    import torch

    from lmpg.advantages import normalise, returns, subtract_baseline
    from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm

    rewards = [None, 1.0, 3.0, 0.0, 2.0, None, None, 5.0]  # two groups of G = 4

    def by_position(completions, **kwargs):
        return list(rewards)

    tok = make_char_tokenizer("0123456789+=ab ")
    model = make_tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2, seed=0)
    args = grpo_config(tmp_path, num_generations=4, per_device_train_batch_size=8, max_completion_length=6,
                       max_steps=1, beta=0.0, use_cpu=True, save_strategy="no", scale_rewards="group")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[by_position], args=args, processing_class=tok,
                                  train_dataset=datasets.Dataset.from_list([{"prompt": "1+1="}, {"prompt": "2+2="}]))
        out = trainer._generate_and_score_completions([{"prompt": "1+1="}] * 4 + [{"prompt": "2+2="}] * 4)
    trl_adv = out["advantages"]
    scored = torch.tensor([r is not None for r in rewards])
    assert trl_adv[~scored].eq(0).all()
    as_zero = torch.tensor([0.0 if r is None else r for r in rewards]).view(2, 4)  # what the old doc claimed
    old_claim = (as_zero - as_zero.mean(1, keepdim=True)) / (as_zero.std(1, keepdim=True) + 1e-4)
    assert not torch.allclose(trl_adv, old_claim.flatten(), atol=1e-3)
    # lmpg on the same rewards: same signs and ordering, larger by sqrt(n / (n - 1)) (population std over n scored)
    token_rewards = torch.tensor([[0.0 if r is None else r] for r in rewards])
    actions = torch.ones(8, 1, dtype=torch.bool)
    adv, _ = subtract_baseline(returns(token_rewards, actions), actions, group_size=4, kind="group_mean",
                               sample_mask=scored)
    lmpg_adv = normalise(adv, group_size=4, scope="group", sample_mask=scored)
    n = scored.view(2, 4).sum(1).repeat_interleave(4).float()
    torch.testing.assert_close(lmpg_adv[:, 0] * torch.sqrt((n - 1) / n), trl_adv, rtol=0, atol=2e-4)
    assert lmpg_adv[~scored].eq(0).all()
    # TRL's loss normaliser still counts the unscored samples' tokens (lmpg drops them)
    assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())


TRL_ENVIRONMENT_SCRIPT = """
import random

from trl import GRPOConfig

from lmpg.trl_compat import GRPOTrainer  # under TRL: from trl import GRPOTrainer


class IncrementEnv:  # TRL 1.16's documentation (grpo_trainer.md, environment_factory), verbatim
    # Reserved methods
    def reset(self, **kwargs) -> str | None:  # required; called at the start of each rollout
        self.counter = 0
        self.target = random.randint(1, 6)  # self-sample the task
        return f"Increment the counter by {self.target}."  # returned string becomes the prompt

    def get_reward(self) -> float:  # optional: the environment scores itself from its own state
        return float(self.counter == self.target)

    # Public methods (exposed as tools)
    def increment(self, step: int) -> int:
        \"\"\"
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        \"\"\"
        self.counter += step
        return self.counter


if __name__ == "__main__":
    trainer = GRPOTrainer(
        model=MODEL,
        args=GRPOConfig(max_steps=2, output_dir="env_out", num_generations=2, per_device_train_batch_size=4,
                        max_completion_length=8, max_tool_calling_iterations=1, bf16=False, report_to="none"),
        environment_factory=IncrementEnv,
    )
    trainer.train()
"""


def test_a_trl_environment_factory_script_ports_by_its_import(tmp_path):
    """TRL's documented environment_factory run, with no train_dataset (the environment owns the data)."""
    from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm

    tokenizer = make_char_tokenizer("0123456789abcdefghijklmnopqrstuvwxyzI .")
    make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "train_env.py").write_text(TRL_ENVIRONMENT_SCRIPT.replace("MODEL", repr(str(tmp_path / "model"))))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "CI": "1"}
    result = subprocess.run([sys.executable, "train_env.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "env_out"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2] and all(1 <= m["turns_max"] <= 2 for m in metrics)
    written = (run / "config.yaml").read_text()
    assert "\nenvironment: __main__:IncrementEnv\n" in written
    assert yaml.safe_load(written)["model"] == str(tmp_path / "model")  # was null
    notes = [line for line in written.splitlines() if line.startswith("# ")]
    assert any(n.startswith("# environment: __main__:IncrementEnv is a class of the script") for n in notes), notes
    assert any(n.startswith("# dataset: prompts passed in memory") for n in notes), notes


def test_environment_factory_must_be_importable_by_name():
    from lmpg.trl_compat import environment_spec

    class Local:
        def reset(self, **kwargs):
            return None

    with pytest.raises(ConfigError, match="not a class or function at the top level of a module"):
        environment_spec(Local)
    with pytest.raises(ConfigError, match="dict of several environments"):
        environment_spec({"a": Local})
    assert environment_spec(PGConfig) == "lmpg.config:PGConfig"


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
def test_every_trl_loss_type_maps(tmp_path, loss_type):
    """The loss types TRL 1.16's GRPOTrainer._compute_loss knows, each as lmpg's objective and aggregation
    (tests/test_losses_trl.py: the same value and gradient as TRL's code); the guide's defaults checked
    on GRPOConfig."""
    args = grpo_config(tmp_path, max_steps=4, loss_type=loss_type, epsilon_high=3.0, sapo_temperature_neg=2.0,
                       vespo_k_neg=4.0)
    assert (args.multi_objective_aggregation, grpo_config(tmp_path).loss_type) == ("sum_then_normalize", "dapo")
    config = config_from_trl(args)
    assert config.loss_agg == {"grpo": "sequence_mean", "bnpo": "token_mean", "dr_grpo": "constant", "dapo": "token_mean",
                               "cispo": "token_mean", "sapo": "sequence_mean", "luspo": "sequence_sum",
                               "vespo": "token_mean"}[loss_type]
    assert config.pg_objective == {"cispo": "cispo", "sapo": "sapo", "vespo": "vespo"}.get(loss_type, "ppo_clip")
    assert (config.cispo_weight_max, config.sapo_temperature_neg, config.vespo_k_neg) == (
        3.0 if loss_type == "cispo" else 5.0, 2.0 if loss_type == "sapo" else 1.05, 4.0 if loss_type == "vespo" else 3.0)


# each TRL 1.16 option lmpg implemented in issue 22, set on its own, then all together; and the metric
# the run logs for it
PORTED_OPTIONS = {
    "cispo": (dict(loss_type="cispo", epsilon_high=2.0), None),
    "sapo": (dict(loss_type="sapo", sapo_temperature_neg=2.0), None),
    "luspo": (dict(loss_type="luspo", importance_sampling_level="sequence"), None),
    "vespo": (dict(loss_type="vespo", vespo_k_neg=2.0), None),
    "dr_grpo-sequence": (dict(loss_type="dr_grpo", importance_sampling_level="sequence"), None),
    "bias-corrected-kl": (dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True), "kl"),
    "delta": (dict(delta=1.5), None),
    "mask_truncated_completions": (dict(mask_truncated_completions=True), "truncated_masked_frac"),
    "top_entropy_quantile": (dict(top_entropy_quantile=0.2), "high_entropy_frac"),
    "entropy_coef": (dict(entropy_coef=0.01), "entropy_coef"),
    "use_adaptive_entropy": (dict(use_adaptive_entropy=True, entropy_target=10.0), "entropy_coef"),
    "off_policy_mask_threshold": (dict(off_policy_mask_threshold=0.01), "off_policy_masked_frac"),
    "all": (dict(loss_type="dapo", beta=0.04, delta=1.5, mask_truncated_completions=True, top_entropy_quantile=0.5,
                 use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=10.0, off_policy_mask_threshold=0.01),
            "off_policy_masked_frac"),
}


@pytest.mark.parametrize("name", list(PORTED_OPTIONS))
def test_each_trl_loss_option_ports_and_trains_two_iterations(tmp_path, name, tiny_model, tokenizer, prompts_dataset):
    """A GRPOConfig with the option set, through lmpg.trl_compat.GRPOTrainer (config_from_trl): two
    iterations of two epochs each (so the second epoch is off-policy), finite losses, the policy moves,
    and the option's own metric is logged."""
    from lmpg.trl_compat import GRPOTrainer

    def distinct_characters(completions, **kwargs):  # spread within every group, so advantages are not 0
        return [len(set(c)) / 5 for c in completions]

    options, metric = PORTED_OPTIONS[name]
    args = grpo_config(tmp_path, num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                       num_iterations=2, max_completion_length=5, max_steps=4, learning_rate=1e-2, logging_steps=1,
                       save_strategy="no", **options)
    before = [p.detach().clone() for p in tiny_model.parameters()]
    trainer = GRPOTrainer(tiny_model, reward_funcs=[distinct_characters], args=args, train_dataset=prompts_dataset,
                          processing_class=tokenizer)
    metrics = trainer.train()
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert all(m["optimizer_steps"] == 2 and math.isfinite(m["loss"]) for m in metrics)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, tiny_model.parameters()))
    if metric is not None:
        assert all(metric in m for m in metrics), metric


# --- TRL 1.16's own tool-calling loop, beside lmpg's episodes -------------------------------------
CALL = '<tool_call>\n{"name": "increment", "arguments": {"step": 1}}\n</tool_call>'


def qwen_tokenizer(special_markers: bool = False):
    """A character tokenizer with Qwen 2.5's chat template (TRL's copy, so TRL parses its tool calls);
    special_markers: <tool_call> / </tool_call> as added special tokens, as some tokenizers mark them."""
    import string

    from trl.chat_template_utils import add_response_schema, qwen2_5_chat_template

    from lmpg.tiny import make_char_tokenizer

    tok = make_char_tokenizer(string.printable)
    markers = ["<tool_call>", "</tool_call>"] if special_markers else []
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"] + markers})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = qwen2_5_chat_template
    return add_response_schema(tok)


class FixedTurns:
    """A TurnSampler (lmpg.generation) whose every turn is the same tokens: the same policy as TRL's
    scripted generation below."""

    def __init__(self, ids):
        self.ids, self.calls = list(ids), 0

    def start(self, seeds):
        pass

    def sample(self, rows, histories, max_new_tokens):
        from lmpg.generation import SampledTurn

        self.calls += 1
        return [SampledTurn(list(self.ids), [0.0] * len(self.ids)) for _ in rows]

    def finish(self):
        pass


def trl_episodes(tmp_path, tok, turn_ids, **config):
    """TRL 1.16's GRPOTrainer with environment_factory=IncrementEnv (its documentation's) run on one
    batch of 2 rollouts by its own `_generate_and_score_completions`, its model's generation replaced
    by a fixed turn. Returns (environments, the completions its reward functions got, generate calls,
    its metrics)."""
    import datasets

    from lmpg.tiny import make_tiny_causal_lm
    from test_environments import IncrementEnv

    seen, generated = [], []

    def recorder(completions, **kwargs):
        seen.extend(completions)
        return [0.0] * len(completions)

    def generate(prompt_ids, images, multimodal_fields, num_generations, **kwargs):
        generated.append(len(prompt_ids))
        return [list(turn_ids) for _ in prompt_ids], None

    model = make_tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2, max_position_embeddings=4096)
    args = grpo_config(tmp_path, num_generations=2, per_device_train_batch_size=2, max_completion_length=1024,
                       max_steps=1, beta=0.0, use_cpu=True, save_strategy="no", **config)
    chat = {"prompt": [{"role": "user", "content": ""}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[recorder], args=args, processing_class=tok,
                                  environment_factory=IncrementEnv,
                                  train_dataset=datasets.Dataset.from_list([chat] * 2))
        trainer._generate_single_turn = generate
        trainer._generate_and_score_completions([chat] * 2)
    return trainer.environments, seen, len(generated), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def lmpg_episodes(tmp_path, tok, turn_ids, **config):
    """The same batch as `trl_episodes` through lmpg: the config converted from the same GRPOConfig."""
    import dataclasses

    from lmpg.episodes import EpisodeSampler
    from lmpg.tiny import make_tiny_causal_lm

    pg = dataclasses.replace(config_from_trl(grpo_config(tmp_path, num_generations=2, per_device_train_batch_size=2,
                                                         max_completion_length=1024, max_steps=1, **config)),
                             environment="test_environments:IncrementEnv")
    model = make_tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2, max_position_embeddings=4096)
    sampler = EpisodeSampler(pg, tok, [tok.eos_token_id])
    turns = FixedTurns(turn_ids)
    batch = sampler.sample(model, [[{"role": "user", "content": ""}]], [{}], [0], 0, [1, 2], turn_sampler=turns)
    return batch, turns.calls


@pytest.mark.parametrize("special_markers", [False, True])
def test_max_tool_calling_iterations_stops_where_trls_own_loop_stops(tmp_path, special_markers):
    """max_tool_calling_iterations=2 with a policy that calls increment(1) every turn: TRL 1.16 runs
    the calls of 2 turns and generates 3; the third turn's call is never run (the counter is 2).
    lmpg takes 3 turns and runs 2 rounds of calls too. With <tool_call> a special token, the calls
    are still found (the turn's text keeps the markers)."""
    trl_tok, tok = qwen_tokenizer(), qwen_tokenizer(special_markers)
    environments, completions, generated, metrics = trl_episodes(
        tmp_path / "trl", trl_tok, trl_tok.encode(CALL + "<|im_end|>", add_special_tokens=False),
        max_tool_calling_iterations=2)
    turn = tok.encode(CALL + "<|im_end|>", add_special_tokens=False)
    assert special_markers == (tok.decode(turn, skip_special_tokens=True).count("tool_call") == 0)
    assert [e.counter for e in environments] == [2, 2] and generated == 3 and metrics["tools/call_frequency"] == 2.0
    batch, calls = lmpg_episodes(tmp_path / "lmpg", tok, turn, max_tool_calling_iterations=2)
    assert calls == 3 and [ep.turns for ep in batch.episodes] == [3, 3]
    assert [ep.environment.counter for ep in batch.episodes] == [2, 2]
    assert [ep.tool_calls for ep in batch.episodes] == [2, 2] and all(ep.truncated for ep in batch.episodes)
    assert {ep.ended for ep in batch.episodes} == {"max_turns"}
    # what a reward function reads: the messages after the prompt, ending with the policy's last turn
    # (its uncalled tool call), in both
    roles = ["assistant", "tool", "assistant", "tool", "assistant"]
    assert [[m["role"] for m in c] for c in completions] == [roles] * 2
    assert [[m["role"] for m in ep.messages] for ep in batch.episodes] == [roles] * 2
    for c, ep in zip(completions, batch.episodes):
        assert c[-1]["tool_calls"] == ep.messages[-1]["tool_calls"] == [
            {"type": "function", "function": {"name": "increment", "arguments": {"step": 1}}}]
    # the environment's own reward, logged under its class name
    assert "rewards/IncrementEnv/mean" in metrics


def test_sync_ref_model_maps(tmp_path):
    config = config_from_trl(grpo_config(tmp_path, max_steps=10, beta=0.04, sync_ref_model=True,
                                         ref_model_mixup_alpha=0.9, ref_model_sync_steps=64))
    assert (config.sync_ref_model, config.ref_model_mixup_alpha, config.ref_model_sync_steps) == (True, 0.9, 64)
    with pytest.raises(ConfigError, match="sync_ref_model=true with kl_coef=0"):
        config_from_trl(grpo_config(tmp_path, max_steps=10, beta=0.0, sync_ref_model=True))


def test_gdpo_normalize_then_sum_equals_trls_own_code(tmp_path):
    """TRL 1.16's multi_objective_aggregation="normalize_then_sum" (its `_generate_and_score_completions`,
    installed and unchanged, on a tiny model) against lmpg's port of the same GRPOConfig on the same rewards:
    reward_aggregation normalize_then_sum (each function normalised in its group, weighted sum), then the
    batch mean and std. lmpg's population stds make every z sqrt(G / (G - 1)) times TRL's and the final
    division sqrt(N / (N - 1)), so lmpg's advantages are sqrt(N / (N - 1)) times TRL's (the eps differ:
    1e-4 in TRL, adv_eps in lmpg)."""
    import datasets
    import torch

    from lmpg.advantages import normalise, returns, subtract_baseline
    from lmpg.rewards.scorer import RewardScores
    from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm

    correct = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]  # two groups of G = 4
    length = [3.0, 9.0, 4.0, 0.0, 7.0, 2.0, 2.0, 10.0]  # a wide range beside a narrow one

    def by_position(values):
        return lambda completions, **kwargs: list(values)

    tok = make_char_tokenizer("0123456789+=ab ")
    args = grpo_config(tmp_path, num_generations=4, per_device_train_batch_size=8, max_completion_length=6,
                       max_steps=1, beta=0.0, use_cpu=True, save_strategy="no", scale_rewards="group",
                       multi_objective_aggregation="normalize_then_sum", reward_weights=[1.0, 0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.GRPOTrainer(model=make_tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2, seed=0),
                                  reward_funcs=[by_position(correct), by_position(length)], args=args,
                                  processing_class=tok,
                                  train_dataset=datasets.Dataset.from_list([{"prompt": "1+1="}, {"prompt": "2+2="}]))
        out = trainer._generate_and_score_completions([{"prompt": "1+1="}] * 4 + [{"prompt": "2+2="}] * 4)
    trl_adv = out["advantages"]

    config = config_from_trl(args)
    assert (config.reward_aggregation, config.baseline, config.adv_norm) == ("normalize_then_sum", "batch_mean", "batch")
    scores = RewardScores(names=["correct", "length"], values=[correct, length], weights=config.reward_weights)
    actions = torch.ones(8, 1, dtype=torch.bool)

    def lmpg_advantages(scores):
        rewards, scored = scores.to_token_rewards(actions)
        adv, _ = subtract_baseline(returns(rewards, actions), actions, group_size=4, kind=config.baseline,
                                   sample_mask=scored)
        return normalise(adv, group_size=4, scope=config.adv_norm, sample_mask=scored, eps=config.adv_eps)[:, 0]

    lmpg_adv = lmpg_advantages(scores.group_normalised(config.group_size, config.adv_eps))
    torch.testing.assert_close(lmpg_adv * (7 / 8) ** 0.5, trl_adv, rtol=1e-3, atol=1e-4)
    summed_first = lmpg_advantages(scores)  # the default aggregation: no longer TRL's GDPO numbers
    assert (summed_first * (7 / 8) ** 0.5 - trl_adv).abs().max() > 0.1


@pytest.fixture(scope="module")
def saved_tiny_model(tmp_path_factory):
    """A tiny model and its tokenizer saved to a directory, loaded by path as TRL scripts do."""
    from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm

    path = tmp_path_factory.mktemp("tiny")
    tokenizer = make_char_tokenizer("0123456789+=ab ")
    make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _lm_head_class(trainer):
    return type(trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings()).__name__


# Issue 22: each option this issue implemented, as a GRPOConfig sets it, and what its port must show
TRL_OPTIONS = {
    "min_p": (dict(min_p=0.1), lambda t: t.config.min_p == 0.1 and t.config.measures_sampler_mismatch),
    "repetition_penalty": (dict(repetition_penalty=1.3), lambda t: t.config.repetition_penalty == 1.3),
    "generation_kwargs": (dict(generation_kwargs={"top_k": 5, "max_tokens": 4}),
                          lambda t: (t.config.top_k, t.config.max_new_tokens) == (5, 4)),
    "chat_template_kwargs": (dict(chat_template_kwargs={"enable_thinking": False}),
                             lambda t: t.config.chat_template_kwargs == {"enable_thinking": False}),
    "model_init_kwargs": (dict(model_init_kwargs={"attn_implementation": "eager"}),
                          lambda t: t.accelerator.unwrap_model(t.model).config._attn_implementation == "eager"),
    "trust_remote_code": (dict(trust_remote_code=True), lambda t: t.config.trust_remote_code),
    "cast_lm_head_to_fp32": (dict(cast_lm_head_to_fp32=True), lambda t: _lm_head_class(t) == "Float32Linear"),
    "shuffle_dataset": (dict(shuffle_dataset=False), lambda t: t.prompt_order.state_dict()["shuffle"] is False),
    "sync_ref_model": (dict(beta=0.1, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5),
                       lambda t: t.ref_sync is not None and t.ref_sync.step == 2),
    "multi_objective_aggregation": (dict(multi_objective_aggregation="normalize_then_sum"),
                                    lambda t: t.config.reward_aggregation == "normalize_then_sum"),
}


@pytest.mark.parametrize("option", list(TRL_OPTIONS))
def test_each_option_issue_22_implemented_ports_and_trains_two_iterations(tmp_path, saved_tiny_model, option):
    """A GRPOConfig with the option set goes through lmpg's GRPOTrainer (config_from_trl) and trains two
    iterations on the tiny model loaded by path, with what the option asks in force."""
    import math

    import datasets

    from lmpg.trl_compat import GRPOTrainer

    settings, holds = TRL_OPTIONS[option]

    def digits(completions, **kwargs):
        return [sum(ch.isdigit() for ch in c[0]["content"]) / 6 for c in completions]

    def a_count(completions, **kwargs):
        return [c[0]["content"].count("a") / 6 for c in completions]

    args = grpo_config(tmp_path, num_generations=4, per_device_train_batch_size=8, max_completion_length=6,
                       max_steps=2, learning_rate=1e-3, use_cpu=True, save_strategy="no", gradient_checkpointing=False,
                       **settings)
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": f"{i}+{i}="}]} for i in range(6)])
    trainer = GRPOTrainer(model=str(saved_tiny_model), reward_funcs=[digits, a_count], args=args,
                          train_dataset=dataset)
    history = trainer.train()
    assert [m["iteration"] for m in history] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in history)
    assert holds(trainer)
