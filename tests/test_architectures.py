"""lmpg on every cache transformers builds: attention, sliding-window, recurrent (Mamba, Mamba2) and
hybrid models, each a tiny model from its config.

For each architecture:
- `cache_support` says what its cache allows: attention caches share the sampler's prefill and the
  update forward; recurrent and hybrid caches share the prefill only (the update runs the plain
  forward, see `lmpg.kvcache`);
- the sampler's log-probs equal the plain forward's to 5e-7 in fp32 (the incremental pass rounds
  differently: an ulp or two of log-probs near -3), 1e-6 for recurrent layers, whose forward sums
  the scan in chunks and the sampler step by step (3 ulps seen, Mamba2 at temperature 0.7);
- the shared prefill draws the tokens a row-by-row prefill draws, a sample does not depend on the
  padding of its batch, and the update's forward (shared where the cache allows) gives the plain
  forward's log-probs and gradients;
- two PGTrainer iterations train it: the parameters change and the loss is finite.
"""

import math

import pytest
import torch
import transformers

from lmpg import PGConfig, PGTrainer
from lmpg.kvcache import CacheSupport, cache_support, repeat_cache_rows, returned_cache
from lmpg.logprobs import completion_logits, selective_log_softmax, sequence_logprobs
from lmpg.modeling import disable_dropout
from lmpg.rollout import sample_completions
from lmpg.sampler import sample_tokens


ATTENTION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=64, max_position_embeddings=64, head_dim=16)
SLIDING = dict(ATTENTION, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
MAMBA2_HEADS = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=8)

# model_type -> config fields (beside vocabulary and special tokens): 2 layers, hidden size 32
ARCHITECTURES = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "llama": ATTENTION,
    "qwen2": ATTENTION,
    "qwen3": ATTENTION,
    "qwen3_moe": dict(ATTENTION, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "mistral": dict(ATTENTION, sliding_window=4),
    "phi3": dict(ATTENTION, num_key_value_heads=2),
    "gemma2": SLIDING,
    "gemma3_text": SLIDING,
    "olmo2": ATTENTION,
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64),
    # recurrent: conv and SSM states only
    "mamba": dict(hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4),
    "mamba2": dict(hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, num_heads=4, head_dim=16,
                   n_groups=1, chunk_size=8),
    # hybrids: a Mamba / Mamba2 / gated-delta-net / short-conv layer and an attention layer
    "jamba": dict(ATTENTION, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  num_experts=2, num_experts_per_tok=1, mamba_d_state=8),
    "bamba": dict(ATTENTION, attn_layer_indices=[1], **MAMBA2_HEADS),
    "falcon_h1": dict(ATTENTION, mamba_d_ssm=64, **MAMBA2_HEADS),  # both in each layer
    "granitemoehybrid": dict(ATTENTION, layer_types=["mamba", "attention"], num_local_experts=2,
                             num_experts_per_tok=1, shared_intermediate_size=32, **MAMBA2_HEADS),
    "zamba2": dict(hidden_size=32, num_hidden_layers=2, layers_block_type=["mamba", "hybrid"], mamba_d_state=8,
                   n_mamba_heads=4, num_attention_heads=2, chunk_size=8, intermediate_size=64,
                   max_position_embeddings=64, adapter_rank=4),
    "qwen3_next": dict(ATTENTION, layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                       linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2, num_experts=2,
                       num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "lfm2": dict(ATTENTION, full_attn_idxs=[1], block_auto_adjust_ff_dim=False),
}
RECURRENT = {"mamba", "mamba2", "jamba", "bamba", "falcon_h1", "granitemoehybrid", "zamba2", "qwen3_next", "lfm2"}
PROMPTS = ["1+1=", "12+34="]  # two lengths: left padding


def char_sum(prompts, completions, **kwargs):
    """Reward: a function of every character, so a group's completions almost never tie."""
    return [sum(i * ord(ch) for i, ch in enumerate(c, 1)) % 97 / 96 for c in completions]


def make_model(model_type, tokenizer, seed=0):
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **ARCHITECTURES[model_type])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    disable_dropout(model)  # as PGTrainer does (GPT-2 and GPT-NeoX configs have dropout)
    return model


@pytest.fixture(params=list(ARCHITECTURES))
def arch(request, tokenizer):
    return request.param, make_model(request.param, tokenizer)


def _rollout(model, tokenizer, temperature=1.0):
    return sample_completions(model, tokenizer, PROMPTS, 3, max_new_tokens=6, temperature=temperature,
                              seeds=list(range(6)))


def test_cache_support_follows_the_cache(arch):
    name, model = arch
    expected = CacheSupport(repeat_rows=True, continue_chunk=name not in RECURRENT,
                            step_mask=name not in ("mamba", "mamba2"))
    assert cache_support(model) == expected
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    repeat_cache_rows(returned_cache(out), torch.tensor([0, 0]))  # its real cache repeats rows


def test_sampler_logprobs_equal_the_forward(arch, tokenizer):
    name, model = arch
    temperature = 0.7
    roll = _rollout(model, tokenizer, temperature)
    with torch.no_grad():
        plain = selective_log_softmax(completion_logits(model, roll.prompt_ids, roll.prompt_mask,
                                                        roll.completion_ids, roll.completion_mask),
                                      roll.completion_ids, temperature)
    m = roll.completion_mask
    atol = 1e-6 if name in RECURRENT else 5e-7
    torch.testing.assert_close(roll.sampler_logp[m], plain[m], atol=atol, rtol=0)


def test_shared_prefill_draws_what_a_row_by_row_prefill_draws(arch, tokenizer):
    """Row by row (B = 1) nothing is shared; log-probs to 1e-6, as the prefill runs at another batch
    size (recurrent scans then round differently, up to 3 ulps here). Rows 1 and 5 hold repeated
    cache rows: the second copy of prompt 0, the third of prompt 1."""
    name, model = arch
    roll = _rollout(model, tokenizer)
    kw = dict(max_new_tokens=6, eos_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
    shared_ids, shared_logp = sample_tokens(model, roll.prompt_ids, roll.prompt_mask, list(range(6)), **kw)
    for i in (1, 5):
        ids, logp = sample_tokens(model, roll.prompt_ids[i:i + 1], roll.prompt_mask[i:i + 1], [i], **kw)
        T = ids.shape[1]
        assert torch.equal(shared_ids[i, :T], ids[0]) and torch.all(shared_ids[i, T:] == tokenizer.pad_token_id)
        torch.testing.assert_close(shared_logp[i, :T], logp[0], atol=1e-6, rtol=0)


def test_a_sample_does_not_depend_on_its_batch(arch, tokenizer):
    """Same seeds, same completions alone or beside longer and shorter prompts (other left padding),
    recurrent states included: N processes sample what one does."""
    name, model = arch
    alone = sample_completions(model, tokenizer, ["12+34="], 2, max_new_tokens=6, seeds=[11, 12])
    batch = sample_completions(model, tokenizer, ["1+1=", "12+34=", "999+1000="], 2, max_new_tokens=6,
                               seeds=[1, 2, 11, 12, 3, 4])
    assert batch.completions[2:4] == alone.completions


def test_update_forward_equals_the_plain_forward(arch, tokenizer):
    """Log-probs and gradients of the update's forward (with group: shared where the cache allows)
    equal the plain forward's."""
    name, model = arch
    roll = _rollout(model, tokenizer)
    args = (roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    m = roll.completion_mask
    model.train()
    results = []
    for group in (None, torch.tensor(roll.prompt_index)):
        model.zero_grad()
        logp, _ = sequence_logprobs(model, *args, group=group)
        logp.masked_fill(~m, 0).sum().backward()
        results.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (update, update_grads) = results
    torch.testing.assert_close(update[m], plain[m], atol=5e-7, rtol=0)
    assert update_grads.keys() == plain_grads.keys()
    for n, g in plain_grads.items():
        torch.testing.assert_close(update_grads[n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_a_cache_it_does_not_know_shares_nothing(tokenizer):
    """A model that builds a cache class of its own (transformers' list: MiniMax, xLSTM, ...) or a
    cache subclass: the sampler prefills every row and the update runs the plain forward."""

    class OwnCacheLlama(transformers.LlamaForCausalLM):
        @classmethod
        def _supports_default_dynamic_cache(cls):
            return False

    model = make_model("llama", tokenizer)
    model.__class__ = OwnCacheLlama
    assert cache_support(model) == CacheSupport(repeat_rows=False, continue_chunk=False, step_mask=True)
    roll = _rollout(model, tokenizer)  # would fail in repeat_cache_rows if it tried to share
    with torch.no_grad():
        plain = selective_log_softmax(completion_logits(model, roll.prompt_ids, roll.prompt_mask,
                                                        roll.completion_ids, roll.completion_mask),
                                      roll.completion_ids)
    m = roll.completion_mask
    torch.testing.assert_close(roll.sampler_logp[m], plain[m], atol=5e-7, rtol=0)

    class StatefulCache(transformers.DynamicCache):
        pass

    with pytest.raises(TypeError, match="cannot repeat rows"):
        repeat_cache_rows(StatefulCache(), torch.tensor([0, 0]))


def test_two_iterations_train(arch, tokenizer, prompts_dataset, tmp_path, monkeypatch):
    name, model = arch
    monkeypatch.setattr("lmpg.plot.plot_run", lambda run_dir: None)  # matplotlib: seconds per run, no architecture
    before = [p.detach().clone() for p in model.parameters()]
    config = PGConfig(output_dir=str(tmp_path / "run"), iterations=2, batch_size=4, group_size=2, max_new_tokens=4,
                      learning_rate=1e-2, epochs_per_batch=2, minibatch_size=2, sample_log_every=0,
                      progress_bar=False, grad_snr=False)
    metrics = PGTrainer(model, [char_sum], prompts_dataset, config, tokenizer=tokenizer).train()
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
