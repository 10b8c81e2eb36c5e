"""Faults a run must survive or report clearly: broken rewards, long prompts, EOS-first completions,
truncation, tokenizers without a pad token."""

import logging

import pytest
import torch

from lmpg import PGConfig, PGTrainer
from lmpg.checkpoint import list_checkpoints
from lmpg.errors import RewardError
from lmpg.metrics import read_jsonl

from conftest import count_a
from conftest import small_config as config


def test_reward_error_stops_the_run_and_keeps_checkpoints(tmp_path, tiny_model, tokenizer, prompts_dataset):
    def flaky(prompts, completions, step, **kw):
        if step == 2:
            raise ZeroDivisionError("boom")
        return [0.0] * len(completions)

    trainer = PGTrainer(tiny_model, [flaky], prompts_dataset, config(tmp_path, iterations=4, save_every=1),
                        tokenizer=tokenizer)
    with pytest.raises(RewardError, match="flaky.*ZeroDivisionError.*boom"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-000001", "checkpoint-000002"]
    # the run continues from its last checkpoint once the reward is fixed
    from lmpg.tiny import make_tiny_causal_lm
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
    metrics = PGTrainer(model, [count_a], prompts_dataset, config(tmp_path, iterations=4, save_every=1, resume="auto"),
                        tokenizer=tokenizer).train()
    assert [m["iteration"] for m in metrics] == [3, 4]  # train() returns the iterations it ran
    assert [m["iteration"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_reward_errors_as_none_are_counted(tmp_path, tiny_model, tokenizer, prompts_dataset):
    def sometimes_inf(prompts, completions, **kw):  # NaN would be no signal (TRL's None), not an error
        return [float("inf") if i % 4 == 0 else 1.0 for i in range(len(completions))]

    metrics = PGTrainer(tiny_model, [sometimes_inf], prompts_dataset, config(tmp_path, reward_on_error="none"),
                        tokenizer=tokenizer).train()
    assert metrics[0]["reward_errors/sometimes_inf"] == 2
    assert metrics[0]["unscored_frac"] == pytest.approx(0.25)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)


def test_long_prompts_are_cut_and_counted(tmp_path, tiny_model, tokenizer):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "1" * 40}, {"prompt": "2+2="}])
    metrics = PGTrainer(tiny_model, [count_a], ds, config(tmp_path, max_prompt_length=10, iterations=1),
                        tokenizer=tokenizer).train()
    assert metrics[0]["prompts_truncated"] == 1


def test_eos_first_and_truncated_completions_are_counted(tmp_path, tiny_model, tokenizer, prompts_dataset,
                                                         monkeypatch):
    """Completions that are EOS alone, and completions cut at max_new_tokens, are counted, and
    training on them stays finite."""
    eos, a = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("a")
    rows = [[eos] + [a] * 5, [a, a, eos, a, a, a], [a] * 6, [eos] * 6]  # EOS first, normal, truncated, EOS first

    def fixed_tokens(model, prompt_ids, prompt_mask, seeds, **kw):
        B = prompt_ids.shape[0]
        ids = torch.tensor([rows[i % 4] for i in range(B)])
        return ids, torch.zeros(B, 6)

    monkeypatch.setattr("lmpg.sampler.sample_tokens", fixed_tokens)
    metrics = PGTrainer(tiny_model, [count_a], prompts_dataset, config(tmp_path, iterations=1),
                        tokenizer=tokenizer).train()
    assert metrics[0]["eos_first_frac"] == 0.5
    assert metrics[0]["truncated_frac"] == 0.25
    assert metrics[0]["completion_len_mean"] == (1 + 3 + 6 + 1) / 4
    assert metrics[0]["completion_len_max"] == 6
    assert all(torch.isfinite(torch.tensor([metrics[0]["loss"], metrics[0]["entropy"]])))


def test_tokenizer_without_pad_token_uses_eos_with_a_warning(tmp_path, tiny_model, tokenizer, prompts_dataset, caplog):
    tokenizer.pad_token = None
    with caplog.at_level(logging.WARNING, logger="lmpg"):
        trainer = PGTrainer(tiny_model, [count_a], prompts_dataset, config(tmp_path, iterations=1), tokenizer=tokenizer)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert "no pad token" in caplog.text
    assert trainer.train()[0]["completion_len_mean"] > 0
