"""Every fast path computes what the plain path computes.

- logp_old_source: the sampler's log-probs in place of a no-grad forward give the same losses;
- sampler="generate" and sampler="lmpg" both give valid rollouts from the untruncated policy;
- the changes proposed in benchmarks/bench_iteration.py: the shared-prompt forward gives the plain
  forward's log-probs and gradients, the split log-softmax the sliced one's values and gradients, and
  both the same training run; the shared-prefill sampler draws the same samples as lmpg's sampler;
- fused AdamW (also proposed there) takes the same step as the for-loop AdamW.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lmpg import PGConfig, PGTrainer
from lmpg.logprobs import completion_logits, selective_log_softmax
from lmpg.rollout import sample_completions

from conftest import count_a

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_iteration.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_iteration", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_iteration", module)
    spec.loader.exec_module(module)
    return module


def run_config(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), iterations=3, batch_size=8, group_size=4, max_new_tokens=6,
                learning_rate=3e-3, epochs_per_batch=2, minibatch_size=4, sample_log_every=0,
                progress_bar=False, grad_snr=False)
    base.update(kw)
    return PGConfig(**base)


def train(tmp_path, name, tokenizer, prompts_dataset, setup=None, **kw):
    from lmpg.tiny import make_tiny_causal_lm

    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
    trainer = PGTrainer(model, [count_a], prompts_dataset, run_config(tmp_path, name, **kw), tokenizer=tokenizer)
    if setup is not None:
        setup(trainer)
    return trainer.train()


def test_logp_old_from_sampler_gives_the_forward_losses(tmp_path, tokenizer, prompts_dataset):
    """Two minibatches per epoch, so the second minibatch's log pi_old comes from the no-grad forward
    in one run and from the sampler in the other."""
    forward = train(tmp_path, "forward", tokenizer, prompts_dataset, logp_old_source="forward")
    sampler = train(tmp_path, "sampler", tokenizer, prompts_dataset, logp_old_source="sampler")
    for a, b in zip(forward, sampler):
        for key in ("loss", "pg_loss", "ratio_mean", "reward_mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a[key], b[key])


def _ranks_of_sampled_tokens(model, roll):
    with torch.no_grad():
        z = completion_logits(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    rank = (z > z.gather(-1, roll.completion_ids.unsqueeze(-1))).sum(-1)  # (B, T) tokens with a larger logit
    return rank[roll.completion_mask]


@pytest.mark.parametrize("sampler", ["lmpg", "generate"])
def test_both_samplers_give_valid_untruncated_rollouts(bench, sampler):
    """Shapes, masks, padding and decoded text are consistent, and with top_k=0 the sampled tokens are
    spread over the whole vocabulary, even when the model's generation_config asks for top-k / top-p
    (transformers' own default is top_k=50)."""
    from lmpg.tiny import make_tiny_causal_lm

    tok = bench.make_word_tokenizer(256)
    model = make_tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2, seed=0)
    model.generation_config.top_k, model.generation_config.top_p = 20, 0.5
    torch.manual_seed(0)
    roll = sample_completions(model, tok, ["w1 w2 w3", "w4"], 8, max_new_tokens=12, sampler=sampler,
                              seeds=list(range(16)) if sampler == "lmpg" else None)
    B, T = roll.completion_ids.shape
    assert B == 16 and T <= 12 and roll.prompt_ids.shape[0] == 16
    assert roll.prompt_index == [i // 8 for i in range(16)]
    assert torch.all(roll.completion_ids[~roll.completion_mask] == tok.pad_token_id)
    assert torch.all(roll.completion_mask.sum(1) >= 1)
    assert torch.equal(roll.truncated, ~(roll.completion_ids == tok.eos_token_id).any(1))
    for text, ids, m in zip(roll.completions, roll.completion_ids, roll.completion_mask):
        assert text == tok.decode(ids[m].tolist(), skip_special_tokens=True)
    ranks = _ranks_of_sampled_tokens(model, roll)
    # near-uniform policy over 256 tokens: about 90% of draws lie outside the top 20
    assert ranks.max() >= 100 and (ranks >= 20).float().mean() > 0.6, ranks


def test_eos_suppression_keeps_every_completion_full_length(bench):
    tok = bench.make_word_tokenizer(256)
    model = bench.make_model(tok, "quick")
    roll = sample_completions(model, tok, ["w1 w2"], 16, max_new_tokens=20, seeds=list(range(16)))
    assert roll.completion_mask.all() and roll.truncated.all()


def _tiny_rollout(bench):
    tok = bench.make_word_tokenizer(256)
    model = bench.make_model(tok, "quick")
    prompts = ["w1 w2 w3 w4 w5", "w6", "w7 w8 w9"]  # different lengths: left padding to share
    roll = sample_completions(model, tok, prompts, 3, max_new_tokens=7, seeds=list(range(9)))
    # an early EOS in one row, as a real model would emit: the mask ends there, padding follows
    roll.completion_mask[4, 3:] = False
    roll.completion_ids[4, 3:] = tok.pad_token_id
    return model, roll


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_forward_equals_the_plain_forward(bench, lora):
    model, roll = _tiny_rollout(bench)
    if lora:  # adapters with nonzero B, so they change the outputs
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    group = torch.tensor(roll.prompt_index)
    args = (roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    plain = selective_log_softmax(completion_logits(model, *args), roll.completion_ids)
    plain.masked_fill(~roll.completion_mask, 0).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    shared = selective_log_softmax(bench.shared_prefix_completion_logits(model, *args, group), roll.completion_ids)
    shared.masked_fill(~roll.completion_mask, 0).sum().backward()
    m = roll.completion_mask
    torch.testing.assert_close(shared[m], plain[m], atol=1e-5, rtol=0)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    import datasets

    from conftest import ALPHABET
    from lmpg.tiny import make_char_tokenizer

    prompts = datasets.Dataset.from_list([{"prompt": f"{i}+{i}="} for i in range(12)])
    return train(tmp_path_factory.mktemp("plain"), "plain", make_char_tokenizer(ALPHABET), prompts)


@pytest.mark.parametrize("share_prompt,split", [(True, False), (False, True), (True, True)])
def test_proposed_forward_gives_the_same_training_run(bench, tmp_path, tokenizer, prompts_dataset, plain_run,
                                                      share_prompt, split):
    import functools

    def setup(trainer):
        trainer._forward = functools.partial(bench.proposed_forward, trainer, share_prompt=share_prompt, split=split)

    plain = plain_run
    fast = train(tmp_path, "fast", tokenizer, prompts_dataset, setup=setup)
    for a, b in zip(plain, fast):
        for key in ("loss", "ratio_mean", "reward_mean", "entropy"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a[key], b[key])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_split_log_softmax_equals_the_sliced_one(bench, temperature):
    torch.manual_seed(0)
    logits = torch.randn(10, 5, 33, requires_grad=True)  # B not a multiple of the 4-row chunks
    tokens = torch.randint(0, 33, (10, 5))
    weights = torch.randn(10, 5)
    plain = selective_log_softmax(logits, tokens, temperature)
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), logits)
    split = bench.selective_log_softmax_split(logits, tokens, temperature)
    (grad_split,) = torch.autograd.grad((split * weights).sum(), logits)
    reference = torch.log_softmax(logits.detach() / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(split, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(split.detach(), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_split, grad_plain, atol=1e-6, rtol=0)


def test_shared_prefill_sampler_draws_the_same_samples(bench):
    from lmpg.sampler import sample_tokens

    tok = bench.make_word_tokenizer(256)
    model = bench.make_model(tok, "quick")
    roll = sample_completions(model, tok, ["w1 w2 w3 w4 w5", "w6", "w7 w8 w9"], 3, max_new_tokens=1, seeds=[0] * 9)
    kw = dict(max_new_tokens=10, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, temperature=0.7)
    seeds = list(range(9))
    ids, logp = sample_tokens(model, roll.prompt_ids, roll.prompt_mask, seeds, **kw)
    ids_shared, logp_shared = bench.sample_tokens_shared_prefill(model, roll.prompt_ids, roll.prompt_mask, seeds, **kw)
    assert torch.equal(ids_shared, ids)
    torch.testing.assert_close(logp_shared, logp, atol=1e-5, rtol=0)


def test_fused_adamw_takes_the_same_step(bench):
    torch.manual_seed(0)
    params = [torch.randn(50, 7, requires_grad=True), torch.randn(13, requires_grad=True)]
    copies = [p.detach().clone().requires_grad_() for p in params]
    plain = torch.optim.AdamW(params, lr=1e-2)
    with bench.fused_adamw():
        fused = torch.optim.AdamW(copies, lr=1e-2)
    assert fused.defaults["fused"]
    for _ in range(3):
        for ps, opt in ((params, plain), (copies, fused)):
            opt.zero_grad()
            sum((p ** 2).sum() for p in ps).backward()
            opt.step()
    for a, b in zip(params, copies):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
