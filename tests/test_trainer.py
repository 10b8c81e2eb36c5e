"""The trainer end to end on a tiny model: learning, masking, exact first-step ratio, KL, determinism."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lmpg import PGConfig, PGTrainer
from lmpg.errors import ConfigError, DataError
from lmpg.forward import batch_logprobs, row_logprobs
from lmpg.logprobs import sequence_logprobs
from lmpg.metrics import read_jsonl
from lmpg.rollout import completion_mask_from_eos, sample_completions

from conftest import count_a, small_config


def test_reward_rises_end_to_end(tmp_path, tiny_model, tokenizer, prompts_dataset):
    config = small_config(tmp_path, iterations=24, batch_size=16, max_new_tokens=8, epochs_per_batch=2,
                          minibatch_size=8)
    metrics = PGTrainer(tiny_model, [count_a], prompts_dataset, config, tokenizer=tokenizer).train()
    first = sum(m["reward_mean"] for m in metrics[:4]) / 4
    last = sum(m["reward_mean"] for m in metrics[-4:]) / 4
    assert last > first + 0.3, (first, last)
    run = tmp_path / "run"
    assert (run / "final" / "config.json").exists() and (run / "config.yaml").exists()
    samples = read_jsonl(run / "samples.jsonl")
    assert len(samples) == 24 * 16 and {"prompt", "completion", "reward", "advantage"} <= set(samples[0])
    required = {"reward_mean", "reward_std", "reward/count_a", "adv_mean", "adv_std", "loss", "entropy",
                "ratio_min", "ratio_mean", "ratio_max", "clip_frac", "zero_spread_group_frac",
                "completion_len_mean", "completion_len_max", "truncated_frac"}
    assert required <= set(metrics[0])
    timings = read_jsonl(run / "timings.jsonl")
    assert {"tokens_per_s", "time_sample", "time_score", "time_update"} <= set(timings[0])


def test_logprobs_do_not_depend_on_padding(tiny_model, tokenizer):
    """A completion's log-probs are the same alone and inside a padded batch (prompt and completion
    padding are masked out of attention and positions count from the first real token)."""
    torch.manual_seed(0)
    roll = sample_completions(tiny_model, tokenizer, ["1+1=", "123+456="], 2, max_new_tokens=5)
    logp_batch, _ = sequence_logprobs(tiny_model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids,
                                      roll.completion_mask)
    for i in range(roll.prompt_ids.shape[0]):
        p = roll.prompt_ids[i][roll.prompt_mask[i]].unsqueeze(0)
        c = roll.completion_ids[i][roll.completion_mask[i]].unsqueeze(0)
        alone, _ = sequence_logprobs(tiny_model, p, torch.ones_like(p, dtype=torch.bool), c,
                                     torch.ones_like(c, dtype=torch.bool))
        torch.testing.assert_close(alone[0], logp_batch[i][roll.completion_mask[i]], atol=1e-5, rtol=1e-5)


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    mask, truncated = completion_mask_from_eos(ids, [1])
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert truncated.tolist() == [False, True, False]


def test_first_update_ratio_is_exactly_one(tmp_path, tiny_model, tokenizer, prompts_dataset):
    """With several minibatches the no-grad pi_old pass runs in the same micro-batches as the first
    update, so log pi_theta at the first step equals log pi_old bit for bit."""
    config = small_config(tmp_path, epochs_per_batch=2, minibatch_size=4)
    trainer = PGTrainer(tiny_model, [count_a], prompts_dataset, config, tokenizer=tokenizer)
    batch = trainer.sample(trainer.next_prompts())
    logp_old = batch_logprobs(trainer.model, batch, torch.arange(batch.batch_size), trainer.micro_batch_size, 1.0,
                              trainer.share_prompt_forward)
    first = torch.arange(trainer.micro_batch_size)
    logp, _ = row_logprobs(trainer.model, batch, first, 1.0, False, trainer.share_prompt_forward)
    assert torch.equal(logp.detach(), logp_old[first])


def test_constant_reward_gives_zero_advantage_and_no_nan(tmp_path, tiny_model, tokenizer, prompts_dataset):
    before = [p.detach().clone() for p in tiny_model.parameters()]
    config = small_config(tmp_path, adv_norm="group")
    metrics = PGTrainer(tiny_model, [lambda prompts, completions, **kw: [1.0] * len(completions)],
                        prompts_dataset, config, tokenizer=tokenizer).train()
    for m in metrics:
        assert m["zero_spread_group_frac"] == 1.0 and m["adv_zero_frac"] == 1.0
        assert m["loss"] == 0.0 and m["skipped_updates"] == 0
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, tiny_model.parameters()))


def test_kl_to_reference_starts_at_zero(tmp_path, tiny_model, tokenizer, prompts_dataset):
    config = small_config(tmp_path, kl_coef=0.1, iterations=3, learning_rate=1e-2)
    metrics = PGTrainer(tiny_model, [count_a], prompts_dataset, config, tokenizer=tokenizer).train()
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert metrics[-1]["kl"] > 1e-6


def test_per_token_rewards_with_reward_to_go(tmp_path, tiny_model, tokenizer, prompts_dataset):
    """With no baseline and no normalisation the advantage is the return itself: with reward_to_go
    and gamma = 0.5, A_t = sum_{t' >= t} 0.5^(t' - t) r_t', worked out here token by token from the
    per-token rewards the function returned."""
    a = tokenizer.convert_tokens_to_ids("a")
    returned = []

    def per_token(prompts, completions, completion_ids, **kw):
        rewards = [[1.0 if t == a else 0.1 * (k + 1) for k, t in enumerate(ids)] for ids in completion_ids]
        returned.extend(rewards)
        return rewards

    config = small_config(tmp_path, reward_to_go=True, gamma=0.5, baseline="none", adv_norm="none")
    trainer = PGTrainer(tiny_model, [per_token], prompts_dataset, config, tokenizer=tokenizer)
    trainer.prepare_run_dir()
    batch = trainer.step().batch
    B, T = batch.adv.shape
    expected = torch.zeros(B, T)
    for i, rewards in enumerate(returned):  # the rewards of row i, one per token, from its first token on
        assert batch.token_rewards[i, :len(rewards)].tolist() == pytest.approx(rewards)
        ret = 0.0
        for t in reversed(range(len(rewards))):
            ret = rewards[t] + 0.5 * ret
            expected[i, t] = ret
    assert len(returned) == B and batch.completion_mask.sum(1).tolist() == [len(r) for r in returned]
    m = batch.loss_mask
    torch.testing.assert_close(batch.adv[m], expected[m], atol=1e-6, rtol=1e-6)
    assert not torch.equal(batch.adv[m], batch.token_rewards[m])  # the discounted tail is in it


def test_same_seed_same_metrics(tmp_path, tokenizer, prompts_dataset):
    from lmpg.tiny import make_tiny_causal_lm

    runs = []
    for name in ("a", "b"):
        model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
        config = small_config(tmp_path, output_dir=str(tmp_path / name), iterations=3, epochs_per_batch=2,
                              minibatch_size=4)
        PGTrainer(model, [count_a], prompts_dataset, config, tokenizer=tokenizer).train()
        runs.append((tmp_path / name / "metrics.jsonl").read_text())
    assert runs[0] == runs[1]


def test_existing_run_is_not_overwritten(tmp_path, tiny_model, tokenizer, prompts_dataset):
    config = small_config(tmp_path, iterations=1)
    PGTrainer(tiny_model, [count_a], prompts_dataset, config, tokenizer=tokenizer).train()
    with pytest.raises(ConfigError, match="already holds a run; set resume=auto"):
        PGTrainer(tiny_model, [count_a], prompts_dataset, config, tokenizer=tokenizer).train()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an lmpg run"):
        PGTrainer(tiny_model, [count_a], prompts_dataset, small_config(tmp_path, output_dir=str(foreign)),
                  tokenizer=tokenizer).train()


def test_missing_prompt_column_lists_columns(tmp_path, tiny_model, tokenizer):
    import datasets

    ds = datasets.Dataset.from_list([{"question": "1+1=", "answer": "2"}])
    with pytest.raises(DataError, match="no 'prompt' column; its columns are question, answer"):
        PGTrainer(tiny_model, [count_a], ds, small_config(tmp_path), tokenizer=tokenizer)


def test_chat_prompts_use_the_template(tmp_path, tiny_model, tokenizer):
    import datasets

    seen = {}

    def record(prompts, completions, **kw):
        seen["prompt"], seen["completion"] = prompts[0], completions[0]
        return [0.0] * len(completions)

    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "1+1="}]}] * 4)
    PGTrainer(tiny_model, [record], ds, small_config(tmp_path, iterations=1), tokenizer=tokenizer).train()
    assert seen["prompt"] == [{"role": "user", "content": "1+1="}]
    assert seen["completion"][0]["role"] == "assistant"


@pytest.mark.parametrize("precision", ["bf16"])
def test_mixed_precision_and_gradient_checkpointing_run(tmp_path, tiny_model, tokenizer, prompts_dataset, precision):
    """The GPU options run end to end (bf16 autocast works on CPU too); values stay finite."""
    config = small_config(tmp_path, mixed_precision=precision, gradient_checkpointing=True, iterations=2,
                          minibatch_size=4)
    metrics = PGTrainer(tiny_model, [count_a], prompts_dataset, config, tokenizer=tokenizer).train()
    assert all(torch.isfinite(torch.tensor([m["loss"], m["grad_norm"]])).all() for m in metrics)
    assert metrics[0]["optimizer_steps"] == 2


def test_plot_tensorboard_and_quiet_progress(tmp_path, tiny_model, tokenizer, prompts_dataset, monkeypatch, capsys):
    """A run writes metrics.png, logs to TensorBoard when asked, and shows no progress bar off a TTY."""
    import tensorboard  # noqa: F401  a test dependency (pyproject [test]): missing, this fails, never skips
    monkeypatch.setenv("CI", "true")
    config = small_config(tmp_path, report_to=["tensorboard"], iterations=2, save_every=1)
    trainer = PGTrainer(tiny_model, [count_a], prompts_dataset, config, tokenizer=tokenizer)
    assert trainer._progress_bar() is None
    trainer.train()
    run = tmp_path / "run"
    png = run / "metrics.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = list(run.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    err = capsys.readouterr().err
    assert "lmpg:" not in err and "it/s" not in err  # no tqdm bar


def test_optimal_baselines_run(tmp_path, tokenizer, prompts_dataset):
    """baseline=optimal / optimal_token train; iteration 1 samples what group_mean samples (same seed),
    with other advantages; the weights' stats are logged."""
    from lmpg.tiny import make_tiny_causal_lm

    runs = {}
    for kind, extra in (("group_mean", {}), ("optimal", {}), ("optimal_token", {"reward_to_go": True})):
        model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
        config = small_config(tmp_path / kind, baseline=kind, max_new_tokens=8, **extra)
        metrics = PGTrainer(model, [count_a], prompts_dataset, config, tokenizer=tokenizer).train()
        assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
        runs[kind] = (metrics, read_jsonl(tmp_path / kind / "run" / "samples.jsonl"))
    base, _ = runs["group_mean"]
    for kind in ("optimal", "optimal_token"):
        metrics, samples = runs[kind]
        assert metrics[0]["reward_mean"] == base[0]["reward_mean"]
        assert [s["completion"] for s in samples[:8]] == [s["completion"] for s in runs["group_mean"][1][:8]]
        assert [s["advantage"] for s in samples[:8]] != [s["advantage"] for s in runs["group_mean"][1][:8]]
        assert metrics[0]["grad_sq_norm_mean"] > 0 and metrics[0]["grad_sq_norm_cv"] > 0


@pytest.mark.parametrize("overrides,match", [
    (dict(baseline="optimal", group_size=1, batch_size=4), "group_size >= 2"),
    (dict(baseline="optimal", sampler="generate"), "sampler=lmpg"),
    (dict(baseline="optimal_token", adv_norm="group"), "adv_norm=none"),
])
def test_optimal_baselines_reject_what_they_cannot_do(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        small_config(tmp_path, **overrides)


def test_samples_jsonl_keeps_the_first_groups_of_each_iteration(tmp_path, tokenizer, prompts_dataset, capsys):
    """sample_groups_per_iteration=1 keeps each iteration's first prompt's G=4 completions, exactly
    the lines an unbounded run (None) writes for it; 0 writes none, and the console still shows samples."""
    from lmpg.tiny import make_tiny_causal_lm

    runs = {}
    for groups in (None, 1, 0):
        model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
        config = small_config(tmp_path / str(groups), sample_groups_per_iteration=groups, sample_log_every=1)
        PGTrainer(model, [count_a], prompts_dataset, config, tokenizer=tokenizer).train()
        runs[groups] = read_jsonl(tmp_path / str(groups) / "run" / "samples.jsonl")
    assert len(runs[None]) == 2 * 8 and len(runs[1]) == 2 * 4 and runs[0] == []
    assert runs[1] == runs[None][0:4] + runs[None][8:12]
    assert len({s["prompt"] for s in runs[1][:4]}) == 1  # one whole group
    assert "[sample it 2]" in capsys.readouterr().out


def test_sample_groups_per_iteration_must_not_be_negative(tmp_path):
    with pytest.raises(ConfigError, match="sample_groups_per_iteration=-1 must be >= 0"):
        small_config(tmp_path, sample_groups_per_iteration=-1)


def test_policy_turn_endings_tell_a_cut_turn_from_running_out_of_turns():
    """Hand-built episodes (EOS = 1, environment tokens 7): a turn cut mid-way, an episode out of
    turns, one the environment finished, one truncated after a whole turn short of max_turns."""
    from types import SimpleNamespace

    from lmpg.batch import TrajectoryBatch
    from lmpg.trainer import policy_turn_endings

    rows = [([5, 1, 7, 7, 5, 1], [1, 1, 0, 0, 1, 1], 2, True),  # out of turns (max_turns = 2)
            ([5, 5, 5, 0, 0, 0], [1, 1, 1, 0, 0, 0], 1, True),  # cut at max_new_tokens
            ([5, 1, 7, 1, 0, 0], [1, 1, 0, 1, 0, 0], 2, False),  # the environment said done
            ([5, 1, 7, 0, 0, 0], [1, 1, 0, 0, 0, 0], 1, True)]  # truncated after a whole turn, turns left
    ids = torch.tensor([r[0] for r in rows])
    actions = torch.tensor([r[1] for r in rows], dtype=torch.bool)
    batch = TrajectoryBatch(prompt_ids=torch.zeros(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1, dtype=torch.bool),
                            completion_ids=ids, completion_mask=ids != 0, action_mask=actions,
                            truncated=torch.tensor([r[3] for r in rows]), group=torch.arange(4),
                            policy_version=torch.zeros(4, dtype=torch.long), completions=[""] * 4,
                            episodes=[SimpleNamespace(turns=r[2]) for r in rows])
    cut, out_of_turns = policy_turn_endings(batch, [1], max_turns=2)
    assert cut.tolist() == [False, True, False, False]
    assert out_of_turns.tolist() == [True, False, False, False]
    single_turn = dataclasses.replace(batch, episodes=None)
    assert policy_turn_endings(single_turn, [1], max_turns=2)[0].tolist() == [True, True, False, True]


GAME_WITH_LONG_OBSERVATIONS = '''
class Game:
    def reset(self, **row):
        self.turn = 0
        return ":"

    def step(self, action):
        self.turn += 1
        return "0123456789" * 2, 1.0, self.turn == 3
'''


def test_episode_lengths_count_the_policys_tokens_and_truncation_names_its_cause(tmp_path, tiny_model, tokenizer,
                                                                                 prompts_dataset):
    """completion_len_* counts the policy's own tokens, episode_len_* all tokens after the prompt;
    a game that needs 3 turns under max_turns=2 ends every episode cut mid-turn or out of turns."""
    def eos_bias(module, inputs, output):  # random weights: end turns quickly so that some finish them
        out = output.clone()
        out[..., tokenizer.eos_token_id] += 3.0
        return out

    tiny_model.lm_head.register_forward_hook(eos_bias)
    (tmp_path / "game.py").write_text(GAME_WITH_LONG_OBSERVATIONS)
    config = small_config(tmp_path, environment=f"{tmp_path / 'game.py'}:Game", max_turns=2, max_new_tokens=4,
                          max_episode_tokens=64)
    trainer = PGTrainer(tiny_model, None, prompts_dataset, config, tokenizer=tokenizer)
    batches, iteration_metrics = [], trainer.iteration_metrics
    trainer.iteration_metrics = lambda batch, *args: batches.append(batch) or iteration_metrics(batch, *args)
    metrics = trainer.train()
    for m, batch in zip(metrics, batches):
        actions, tokens = batch.action_mask.sum(1).float(), batch.completion_mask.sum(1).float()
        assert m["completion_len_mean"] == pytest.approx(float(actions.mean()))
        assert m["completion_len_max"] == float(actions.max())
        assert m["episode_len_mean"] == pytest.approx(float(tokens.mean()))
        assert m["episode_len_mean"] > m["completion_len_mean"]  # the observations are long
        assert m["truncated_episodes"] == 8
        assert m["truncated_frac"] + m["max_turns_frac"] == pytest.approx(1.0)
    assert sum(m["max_turns_frac"] for m in metrics) > 0 and sum(m["truncated_frac"] for m in metrics) > 0
    documented = (Path(__file__).parents[1] / "docs" / "diagnostics.md").read_text()
    timings = read_jsonl(tmp_path / "run" / "timings.jsonl")[0]
    undocumented = [k for k in [*metrics[0], *timings] if f"`{k}`" not in documented and not k.startswith("reward/")]
    assert set(undocumented) == {"iteration"}, undocumented  # every figure an episode run logs is in the docs


def test_config_yaml_of_a_python_run_reruns_with_lmpg_train(tmp_path, tiny_model, tokenizer, prompts_dataset):
    """A run started from Python with a model path, a dataset file and an importable reward writes a
    config.yaml naming them, and `lmpg train` on it gives the same run; what has no name is a comment."""
    import yaml

    from lmpg.cli import main

    tiny_model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    prompts_dataset.to_json(tmp_path / "data.jsonl")
    config = small_config(tmp_path, iterations=1)
    PGTrainer(str(tmp_path / "model"), [count_a], str(tmp_path / "data.jsonl"), config).train()
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (written["model"], written["dataset"], written["rewards"]) == \
        (str(tmp_path / "model"), str(tmp_path / "data.jsonl"), ["conftest:count_a"])
    assert main(["train", str(tmp_path / "run" / "config.yaml"), f"output_dir={tmp_path / 'again'}"]) == 0
    assert (tmp_path / "again" / "metrics.jsonl").read_text() == (tmp_path / "run" / "metrics.jsonl").read_text()

    PGTrainer(tiny_model, [lambda completions, **kw: [0.0] * len(completions)], prompts_dataset,
              small_config(tmp_path / "mem", iterations=1), tokenizer=tokenizer).train()
    text = (tmp_path / "mem" / "run" / "config.yaml").read_text()
    notes = [line.split(":")[0] for line in text.splitlines() if line.startswith("# ")]
    assert notes == ["# model", "# dataset", "# rewards"], text
    assert yaml.safe_load(text)["model"] is None and yaml.safe_load(text)["rewards"] == []


def test_lmpg_sampler_with_min_p_logs_and_corrects_the_mismatch(tmp_path, tiny_model, tokenizer, prompts_dataset):
    """Issue 22: with min_p (truncation only) lmpg's sampler reports q, the trainer logs the mismatch and
    rho_t = pi_old / q = Z_t, the policy mass of the kept set, is <= 1 (the clamp never acts); the batch's
    advantages are the uncorrected ones times exp(logp_old - sampler_logp)."""
    with torch.no_grad():
        tiny_model.get_output_embeddings().weight.mul_(3.0)  # a peaked policy, where min_p drops tokens
    config = small_config(tmp_path, min_p=0.2, iterations=1)
    trainer = PGTrainer(tiny_model, [lambda completions, **kw: [len(set(c)) / 6 for c in completions]], prompts_dataset,
                        config, tokenizer=tokenizer)
    trainer.prepare_run_dir()
    result = trainer.step()
    m = result.metrics
    assert m["mismatch_ratio_max"] <= 1 + 1e-6 and m["mismatch_ratio_min"] < 0.999
    assert m["correction_truncated_frac"] == 0.0 and m["mismatch_kl"] > 0
    batch = result.batch
    rho = torch.exp(batch.logp_old - batch.sampler_logp)[batch.action_mask]
    assert float(rho.max()) <= 1 + 1e-5
    corrected = batch.adv.clone()
    trainer.compute_advantages(batch)  # the same rewards: the advantages before the correction
    weights = torch.where(batch.action_mask, torch.exp(batch.logp_old - batch.sampler_logp), torch.ones_like(batch.adv))
    torch.testing.assert_close(corrected, batch.adv * weights, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(corrected, batch.adv)


# ---- issue 22: TRL's model, template and data options


def test_chat_template_kwargs_reach_the_prompts(tmp_path, tiny_model, tokenizer):
    import datasets

    tokenizer.chat_template = "{%- for m in messages -%}{{- m['content'] -}}{%- endfor -%}{%- if tag %}+{% endif %}"
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "1+1="}]}] * 4)
    for kwargs, text in (({"tag": True}, "1+1=+"), ({}, "1+1=")):
        config = small_config(tmp_path / str(len(kwargs)), chat_template_kwargs=kwargs)
        trainer = PGTrainer(tiny_model, [count_a], ds, config, tokenizer=tokenizer)
        assert trainer.next_prompts().texts == [text] * 2


def test_model_init_kwargs_and_trust_remote_code_load_a_model_by_path(tmp_path, tiny_model, tokenizer, monkeypatch):
    """model_init_kwargs go to from_pretrained (a string dtype too), trust_remote_code to the model's and
    the tokenizer's from_pretrained, the revision to the tokenizer's."""
    import transformers

    from lmpg.modeling import load_model_and_tokenizer

    tiny_model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    config = small_config(tmp_path, model_init_kwargs={"dtype": "bfloat16", "attn_implementation": "eager"})
    trainer = PGTrainer(str(tmp_path / "m"), [count_a], [{"prompt": "1+1="}] * 4, config)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert next(policy.parameters()).dtype == torch.bfloat16 and policy.config._attn_implementation == "eager"
    calls = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = auto.from_pretrained.__func__
        monkeypatch.setattr(auto, "from_pretrained", classmethod(
            lambda cls, name, _original=original, **kw: calls.append((cls.__name__, kw)) or _original(cls, name, **kw)))
    load_model_and_tokenizer(str(tmp_path / "m"), model_init_kwargs={"revision": "main"}, trust_remote_code=True)
    assert calls == [("AutoModelForCausalLM", {"revision": "main", "trust_remote_code": True}),
                     ("AutoTokenizer", {"trust_remote_code": True, "revision": "main"})]


def test_cast_lm_head_to_fp32_gives_fp32_logits_under_bf16(tiny_model, tokenizer):
    """The output layer in fp32 (TRL's cast_lm_head_to_fp32): a bf16 model's logits come out fp32 and
    equal the fp32 matmul of its hidden states, under autocast too; the tied input embedding still
    feeds bf16 to the layers after it; LoRA on the output layer is refused in one line."""
    from lmpg.modeling import cast_lm_head_to_fp32

    model = tiny_model.to(torch.bfloat16)
    assert model.config.tie_word_embeddings
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    before = model(input_ids=ids, output_hidden_states=True)
    assert before.logits.dtype == torch.bfloat16
    cast_lm_head_to_fp32(model)
    head = model.get_output_embeddings()
    assert head.weight.dtype == torch.float32 and head.weight is model.get_input_embeddings().weight
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, output_hidden_states=True)
        assert out.logits.dtype == torch.float32 and out.hidden_states[0].dtype == torch.bfloat16
        want = out.hidden_states[-1].float() @ head.weight.T
        torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-5)
    assert (out.logits - before.logits.float()).abs().max() > 0  # bf16 logits were rounded
    from peft import LoraConfig, get_peft_model

    from lmpg.errors import ConfigError
    from lmpg.tiny import make_tiny_causal_lm

    lora = get_peft_model(make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2),
                          LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ConfigError, match="cast_lm_head_to_fp32 needs a plain nn.Linear") as err:
        cast_lm_head_to_fp32(lora)
    assert "\n" not in str(err.value)


def test_dataset_order_without_shuffle_survives_a_resume(tmp_path, tiny_model, tokenizer, prompts_dataset):
    """shuffle_dataset=False: iterations take the rows in dataset order, and a run resumed from its
    checkpoint takes the same rows next as the uninterrupted one."""
    config = small_config(tmp_path, shuffle_dataset=False, iterations=3, save_every=1, keep_last=5)
    trainer = PGTrainer(tiny_model, [count_a], prompts_dataset, config, tokenizer=tokenizer)
    trainer.train()
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    by_iteration = [[s["prompt"] for s in samples if s["iteration"] == i][::4] for i in (1, 2, 3)]
    assert by_iteration == [["0+0=", "1+1="], ["2+2=", "3+3="], ["4+4=", "5+5="]]
    resumed = PGTrainer(tiny_model, [count_a], prompts_dataset,
                        dataclasses.replace(config, resume=str(tmp_path / "run" / "checkpoints" / "checkpoint-000001")),
                        tokenizer=tokenizer)
    resumed.prepare_run_dir()
    assert resumed.next_prompts().prompts == ["2+2=", "3+3="]


def test_normalize_then_sum_trains_on_each_rewards_group_normalised_sum(tmp_path, tiny_model, tokenizer,
                                                                        prompts_dataset):
    """reward_aggregation=normalize_then_sum (GDPO): the returns sum each function's group-normalised
    reward, weighted; reward_mean still logs the task's raw weighted sum."""
    from lmpg.advantages import group_normalised_rewards

    def digits(completions, **kw):
        return [sum(ch.isdigit() for ch in c) * 10.0 for c in completions]

    config = small_config(tmp_path, iterations=1, reward_aggregation="normalize_then_sum", reward_weights=[1.0, 0.5])
    trainer = PGTrainer(tiny_model, [count_a, digits], prompts_dataset, config, tokenizer=tokenizer)
    trainer.prepare_run_dir()
    result = trainer.step()
    batch = result.batch
    raw = torch.tensor([count_a(None, batch.completions), digits(batch.completions)], dtype=torch.float64).T
    z, _ = group_normalised_rewards(raw, 4, eps=config.adv_eps)
    want = (z * torch.tensor([1.0, 0.5], dtype=torch.float64)).sum(1)
    torch.testing.assert_close(batch.normalised_rewards.sum(1).double(), want, atol=1e-5, rtol=1e-5)
    assert result.metrics["reward_mean"] == pytest.approx(float((raw * torch.tensor([1.0, 0.5])).sum(1).mean()), rel=1e-5)
    assert float(want.abs().max()) > 0
    # what the returns summed: each group's z sum to 0, so the group-mean baseline leaves them as they are
    torch.testing.assert_close(batch.adv[:, 0].double(), want, atol=1e-5, rtol=1e-5)
