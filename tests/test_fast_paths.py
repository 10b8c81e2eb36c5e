"""Every fast path computes what the plain path computes.

- logp_old_source: the sampler's log-probs in place of a no-grad forward give the same losses;
- sampler="generate" and sampler="lmpg" both give valid rollouts from the untruncated policy;
- the shared-prompt forward (shared_prompt_forward=True) gives the plain forward's log-probs and
  gradients, with and without LoRA, and the same training run; the trainer turns it off where it
  cannot work (gradient checkpointing);
- the split log-softmax gives the values and gradients of the definition and of the sliced version
  it replaced;
- the sampler's shared prefill draws what a row-by-row prefill draws;
- fused AdamW takes the for-each AdamW's step.
"""

import pytest
import torch

from lmpg import PGConfig, PGTrainer
from lmpg.kvcache import distinct_rows
from lmpg.logprobs import completion_logits, selective_log_softmax, shared_prompt_completion_logits
from lmpg.rollout import sample_completions
from lmpg.tiny import make_tiny_causal_lm, make_word_tokenizer, suppress_eos

from conftest import count_a


def quick_model(tok):
    """The benchmarks' quick model (benchmarks/workload.py): 1 layer, width 64, EOS suppressed."""
    model = make_tiny_causal_lm(tok, n_layer=1, n_embd=64, n_head=2, max_position_embeddings=256, seed=0)
    suppress_eos(model, tok.eos_token_id)
    return model


def sliced_selective_log_softmax(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                                 chunk_rows: int = 4) -> torch.Tensor:
    """lmpg.logprobs.selective_log_softmax before it took its chunks with `split` (the reference the
    split version must match): autograd gives every slice `logits[s:s + 4]` a backward that writes its
    chunk's gradient into a zero tensor of the full (B, T, V) shape, O(B^2 T V) work in all."""
    B, T, V = logits.shape
    out = []
    for s in range(0, B, chunk_rows):
        z = logits[s:s + chunk_rows].float() / temperature
        out.append(z.gather(-1, tokens[s:s + chunk_rows].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1))
    return torch.cat(out, 0) if out else logits.new_zeros(B, T, dtype=torch.float32)


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
def test_both_samplers_give_valid_untruncated_rollouts(sampler):
    """Shapes, masks, padding and decoded text are consistent, and with top_k=0 the sampled tokens are
    spread over the whole vocabulary, even when the model's generation_config asks for top-k / top-p
    (transformers' own default is top_k=50)."""
    from lmpg.tiny import make_tiny_causal_lm

    tok = make_word_tokenizer(256)
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


def test_eos_suppression_keeps_every_completion_full_length():
    tok = make_word_tokenizer(256)
    model = quick_model(tok)
    roll = sample_completions(model, tok, ["w1 w2"], 16, max_new_tokens=20, seeds=list(range(16)))
    assert roll.completion_mask.all() and roll.truncated.all()


def _tiny_rollout():
    tok = make_word_tokenizer(256)
    model = quick_model(tok)
    prompts = ["w1 w2 w3 w4 w5", "w6", "w7 w8 w9"]  # different lengths: left padding to share
    roll = sample_completions(model, tok, prompts, 3, max_new_tokens=7, seeds=list(range(9)))
    # an early EOS in one row, as a real model would emit: the mask ends there, padding follows
    roll.completion_mask[4, 3:] = False
    roll.completion_ids[4, 3:] = tok.pad_token_id
    return model, roll


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_forward_equals_the_plain_forward(lora):
    model, roll = _tiny_rollout()
    if lora:  # adapters with nonzero B, so they change the outputs
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    group = torch.tensor(roll.prompt_index)
    args = (roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    plain = selective_log_softmax(completion_logits(model, *args), roll.completion_ids)
    plain.masked_fill(~roll.completion_mask, 0).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    shared = selective_log_softmax(shared_prompt_completion_logits(model, *args, group), roll.completion_ids)
    shared.masked_fill(~roll.completion_mask, 0).sum().backward()
    m = roll.completion_mask
    torch.testing.assert_close(shared[m], plain[m], atol=1e-5, rtol=0)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.fixture
def plain_run(tmp_path, tokenizer, prompts_dataset):
    return train(tmp_path, "plain", tokenizer, prompts_dataset, shared_prompt_forward=False)


def test_shared_prompt_forward_gives_the_same_training_run(tmp_path, tokenizer, prompts_dataset, plain_run):
    """Three iterations, two epochs of two minibatches: the no-grad pi_old forward and the update both
    go through the shared-prompt forward in one run and the plain one in the other."""
    shared = train(tmp_path, "shared", tokenizer, prompts_dataset, shared_prompt_forward=True)
    for a, b in zip(plain_run, shared):
        for key in ("loss", "ratio_mean", "reward_mean", "entropy", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a[key], b[key])


def test_shared_prompt_forward_is_used_only_where_it_works(tmp_path, tokenizer, prompts_dataset, tiny_model):
    def trainer(**kw):
        return PGTrainer(tiny_model, [count_a], prompts_dataset, run_config(tmp_path, "t", **kw), tokenizer=tokenizer)

    assert trainer().share_prompt_forward
    assert not trainer(shared_prompt_forward=False).share_prompt_forward
    assert not trainer(gradient_checkpointing=True).share_prompt_forward  # no KV cache in training


def test_distinct_rows():
    rows = torch.tensor([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4]])
    first, inverse = distinct_rows(rows)
    assert torch.equal(rows[first][inverse], rows)
    assert len(first) == 3 and sorted(first.tolist()) == [0, 1, 3]  # the first row holding each
    first, inverse = distinct_rows(torch.tensor([7, 7, 7, 2]))
    assert torch.equal(first[inverse], torch.tensor([0, 0, 0, 3]))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_split_log_softmax_equals_the_definition_and_the_sliced_one(temperature):
    torch.manual_seed(0)
    logits = torch.randn(10, 5, 33, requires_grad=True)  # B not a multiple of the 4-row chunks
    tokens = torch.randint(0, 33, (10, 5))
    weights = torch.randn(10, 5)
    split = selective_log_softmax(logits, tokens, temperature)
    (grad_split,) = torch.autograd.grad((split * weights).sum(), logits)
    sliced = sliced_selective_log_softmax(logits, tokens, temperature)
    (grad_sliced,) = torch.autograd.grad((sliced * weights).sum(), logits)
    reference = torch.log_softmax(logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), logits)
    torch.testing.assert_close(split, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(split, sliced, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_split, grad_reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_split, grad_sliced, atol=1e-6, rtol=0)


def test_shared_prefill_sampler_draws_what_a_row_by_row_prefill_draws():
    from lmpg.sampler import sample_tokens

    tok = make_word_tokenizer(256)
    model = quick_model(tok)
    roll = sample_completions(model, tok, ["w1 w2 w3 w4 w5", "w6", "w7 w8 w9"], 3, max_new_tokens=1, seeds=[0] * 9)
    kw = dict(max_new_tokens=10, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, temperature=0.7)
    seeds = list(range(9))
    shared_ids, shared_logp = sample_tokens(model, roll.prompt_ids, roll.prompt_mask, seeds, **kw)
    for i in range(9):  # one row at a time: nothing to share
        ids, logp = sample_tokens(model, roll.prompt_ids[i:i + 1], roll.prompt_mask[i:i + 1], seeds[i:i + 1], **kw)
        T = ids.shape[1]
        assert torch.equal(shared_ids[i, :T], ids[0]) and torch.all(shared_ids[i, T:] == tok.pad_token_id)
        torch.testing.assert_close(shared_logp[i, :T], logp[0], atol=1e-5, rtol=0)


def test_fused_adamw_takes_the_same_step():
    from lmpg.trainer import make_adamw

    torch.manual_seed(0)
    params = [torch.randn(50, 7, requires_grad=True), torch.randn(13, requires_grad=True)]
    copies = [p.detach().clone().requires_grad_() for p in params]
    config = PGConfig(learning_rate=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                              eps=config.adam_eps, weight_decay=config.weight_decay)  # for-each, as before
    fused = make_adamw(copies, config)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(3):
        for ps, opt in ((params, plain), (copies, fused)):
            opt.zero_grad()
            sum((p ** 2).sum() for p in ps).backward()
            opt.step()
    for a, b in zip(params, copies):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
