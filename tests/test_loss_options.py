"""The loss-side options of issue 22 in the trainer: truncated samples out of the baselines and the
loss, the adaptive entropy coefficient across a checkpoint, the high-entropy threshold over processes.
Their maths against TRL's own code: tests/test_losses_trl.py."""

import torch

from lmpg import PGTrainer
from lmpg.update import gather_values

from conftest import count_a, small_config


def test_mask_truncated_completions_leaves_cut_samples_out_of_baselines_and_loss(tmp_path, tiny_model, tokenizer,
                                                                               prompts_dataset):
    """max_new_tokens=3 cuts most samples: they get advantage 0, the group mean is over the others
    only (baseline group_mean, no std), the loss counts none of their tokens, and the share of rows
    left out is logged."""
    config = small_config(tmp_path, max_new_tokens=3, batch_size=16, group_size=4, iterations=1,
                          mask_truncated_completions=True)
    trainer = PGTrainer(tiny_model, [count_a], prompts_dataset, config, tokenizer=tokenizer)
    trainer.prepare_run_dir()
    result = trainer.step()
    batch = result.batch
    assert torch.equal(batch.excluded, batch.truncated.bool())  # single-turn: no EOS by the limit
    assert 0 < int(batch.excluded.sum()) < batch.batch_size
    assert result.metrics["truncated_masked_frac"] == float(batch.excluded.float().mean())
    assert not batch.loss_mask[batch.excluded].any()
    R = batch.token_rewards.sum(1).view(-1, 4)
    kept = (~batch.excluded).view(-1, 4).to(R.dtype)
    mean_kept = (R * kept).sum(1, keepdim=True) / kept.sum(1, keepdim=True).clamp(min=1)
    want = ((R - mean_kept) * kept).flatten()
    first = batch.adv[torch.arange(batch.batch_size), 0]  # every token shares its row's advantage
    torch.testing.assert_close(first, want, rtol=0, atol=1e-6)
    plain = PGTrainer(tiny_model, [count_a], prompts_dataset,
                      small_config(tmp_path / "plain", max_new_tokens=3, batch_size=16, iterations=1),
                      tokenizer=tokenizer).train()
    assert "truncated_masked_frac" not in plain[0]


def test_adaptive_entropy_coefficient_survives_a_checkpoint(tmp_path, tokenizer, prompts_dataset):
    """The coefficient moves every optimizer step (the tiny model's entropy ~2.7 nats is below the
    target 5, so it grows) and a resumed run starts from the saved one, not from entropy_coef."""
    from lmpg.tiny import make_tiny_causal_lm

    kw = dict(adaptive_entropy=True, entropy_coef=0.01, entropy_target=5.0, entropy_coef_delta=0.002,
              minibatch_size=4)
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
    metrics = PGTrainer(model, [count_a], prompts_dataset, small_config(tmp_path, **kw), tokenizer=tokenizer).train()
    # 2 optimizer steps per iteration: 0.01 + 2 * 0.002, then + 2 * 0.002 more
    assert [round(m["entropy_coef"], 12) for m in metrics] == [0.014, 0.018]
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
    history = PGTrainer(model, [count_a], prompts_dataset, small_config(tmp_path, iterations=3, resume="auto", **kw),
                        tokenizer=tokenizer).train()
    assert [m["iteration"] for m in history] == [3]
    assert round(history[-1]["entropy_coef"], 12) == 0.022


def test_gather_values_concatenates_ragged_tensors_over_processes():
    """Two processes with 3 and 1 counted tokens: each pads to 3 with NaN, the padding is dropped."""
    shares = [torch.tensor([0.5, 1.5, 2.5]), torch.tensor([4.0])]

    def gather(t):  # accelerate's gather of two processes holding the same shape
        if t.numel() == 1 and t.dtype == torch.int64:
            return torch.cat([torch.tensor([len(s)]) for s in shares])
        width = t.numel()
        return torch.cat([torch.cat([s, torch.full((width - len(s),), float("nan"))]) for s in shares])

    assert gather_values(gather, shares[0]).tolist() == [0.5, 1.5, 2.5, 4.0]
    assert gather_values(lambda t: t, torch.tensor([1.0, 2.0])).tolist() == [1.0, 2.0]
