"""The chunked log-probs (lmpg.chunked_logprobs) compute what the full (B, T, V) logits give.

fp32: log-probs, entropies and every parameter's gradient (lm_head included, tied or not, LoRA on
lm_head, Gemma 2's logit softcapping, temperature) to float rounding; bf16 within 2e-2 on the
log-probs (bf16 has 8 mantissa bits: the logits themselves carry errors of that order). No op in
the forward or the backward produces a tensor the size of the (B, T, V) logits.
"""

import logging

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from lmpg.chunked_logprobs import output_head
from lmpg.logprobs import sequence_logprobs
from lmpg.rollout import sample_completions


def _llama(tokenizer, tied=True):
    from lmpg.tiny import make_tiny_causal_lm

    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
    if not tied:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 1.5)
    return model


def _gemma2(tokenizer):
    config = transformers.Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(config)


def _lora_on_head(tokenizer):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(_llama(tokenizer, tied=False),
                          LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))


def _rollout(model, tokenizer):
    roll = sample_completions(model, tokenizer, ["1+1=", "22+3=", "4="], 3, max_new_tokens=7, seeds=list(range(9)))
    roll.completion_mask[4, 3:] = False  # an early end in one row
    return roll


def _logp_and_grads(model, roll, chunk_size, temperature=1.0, group=None):
    model.zero_grad(set_to_none=True)
    logp, ent = sequence_logprobs(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids,
                                  roll.completion_mask, temperature, True, group=group, chunk_size=chunk_size)
    weights = torch.linspace(-1, 2, logp.numel()).view_as(logp)  # any upstream gradient, not just ones
    (logp * weights).masked_fill(~roll.completion_mask, 0).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), ent, grads


@pytest.mark.parametrize("build", [_llama, lambda t: _llama(t, tied=False), _gemma2, _lora_on_head],
                         ids=["tied", "untied", "gemma2-softcap", "lora-on-lm_head"])
@pytest.mark.parametrize("shared", [False, True], ids=["plain", "shared-prompt"])
def test_chunked_equals_full_logits_fp32(tokenizer, build, shared):
    model = build(tokenizer)
    roll = _rollout(model, tokenizer)
    assert output_head(model) is not None
    group = torch.tensor(roll.prompt_index) if shared else None
    full = _logp_and_grads(model, roll, 0, 0.7, group)
    chunked = _logp_and_grads(model, roll, 5, 0.7, group)  # 5 tokens: chunks cross row boundaries
    m = roll.completion_mask
    torch.testing.assert_close(chunked[0][m], full[0][m], atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked[1][m], full[1][m], atol=1e-5, rtol=0)
    assert chunked[2].keys() == full[2].keys()
    assert any(p.grad is not None for p in output_head(model).head.parameters())  # the output layer trains
    for n, g in full[2].items():
        torch.testing.assert_close(chunked[2][n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_chunked_equals_full_logits_bf16(tokenizer):
    model = _llama(tokenizer).to(torch.bfloat16)
    roll = _rollout(model, tokenizer)
    full, chunked = _logp_and_grads(model, roll, 0), _logp_and_grads(model, roll, 4)
    m = roll.completion_mask
    torch.testing.assert_close(chunked[0][m], full[0][m], atol=2e-2, rtol=0)
    torch.testing.assert_close(chunked[1][m], full[1][m], atol=2e-2, rtol=0)
    for n, g in full[2].items():
        torch.testing.assert_close(chunked[2][n].float(), g.float(), atol=2e-2, rtol=5e-2, msg=n)


class _LargestOutput(TorchDispatchMode):
    """The largest numel among the outputs of every op run inside."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_the_size_of_the_logits_in_forward_or_backward(tokenizer):
    from lmpg.tiny import make_tiny_causal_lm

    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=8, n_head=2, seed=0)
    roll = _rollout(model, tokenizer)
    model.resize_token_embeddings(4096)  # V = 4096 >> hidden 8, as in a real LM
    B, T = roll.completion_ids.shape
    V = model.config.vocab_size
    for chunk_size, bounded in ((2, True), (0, False)):
        probe = _LargestOutput()
        with probe:
            _logp_and_grads(model, roll, chunk_size)
        assert (probe.largest < B * T * V) == bounded, (chunk_size, probe.largest, B * T * V)


class _NoDecoder(torch.nn.Module):
    """A causal LM without get_decoder(): the chunked path cannot take it apart."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_a_model_that_cannot_be_split_takes_the_full_logits_path(tokenizer, caplog):
    inner = _llama(tokenizer)
    roll = _rollout(inner, tokenizer)
    model = _NoDecoder(inner)
    with caplog.at_level(logging.WARNING, logger="lmpg.chunked_logprobs"):
        logp, _ = sequence_logprobs(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids,
                                    roll.completion_mask, chunk_size=4)
    assert "full (B, T, V) logits" in caplog.text and "get_decoder" in caplog.text
    expected, _ = sequence_logprobs(inner, roll.prompt_ids, roll.prompt_mask, roll.completion_ids,
                                    roll.completion_mask, chunk_size=0)
    torch.testing.assert_close(logp, expected)


@pytest.mark.parametrize("bias", [False, True])
def test_written_out_backward_equals_autograd_through_checkpoints(bias):
    """`LinearTokenLogprob` (a plain nn.Linear output layer) gives the log-probs, entropies and
    gradients (hidden states, weight, bias) of the autograd path the other layers take, with a
    logit scale, a temperature, and a last chunk shorter than the others. Both take the logits to
    fp32 (`.float()`) and cast their gradient back at different points, so they agree to fp32
    rounding; a wrong term in the gradient would be off by far more."""
    from lmpg.chunked_logprobs import OutputHead, chunked_token_logprobs

    torch.manual_seed(0)
    n, H, V = 10, 8, 50
    linear = torch.nn.Linear(H, V, bias=bias)
    hidden = torch.randn(2, n // 2, H, dtype=torch.float64)
    tokens = torch.randint(V, (2, n // 2))
    upstream = torch.linspace(-1, 2, n).view(2, n // 2).double()
    results = []
    for head in (linear.double(), torch.nn.Sequential(linear).double()):  # plain: written out; wrapped: autograd
        h = hidden.clone().requires_grad_(True)
        found = OutputHead(decoder=torch.nn.Identity(), head=head, scale=0.5)
        logp, stats = chunked_token_logprobs(found, h, tokens, temperature=0.7, with_entropy=True, chunk_size=3)
        linear.zero_grad(set_to_none=True)
        (logp * upstream).sum().backward()
        results.append((logp, stats["entropy"], h.grad, linear.weight.grad, linear.bias.grad if bias else None))
    for fast, reference in zip(*results):
        torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bias", [False, True])
def test_entropy_gradient_written_out_equals_autograd(bias):
    """With entropy_grad (the entropy bonus), `LinearTokenLogprob`'s backward adds the entropy's term
    -p (log p + H): log-probs and entropies both weighted by an upstream gradient give the hidden
    states', weight's and bias's gradients of the autograd path (checkpointed chunks), and of the full
    logits (`token_entropy(with_grad=True)`)."""
    from lmpg.chunked_logprobs import OutputHead, chunked_token_logprobs
    from lmpg.logprobs import selective_log_softmax, token_entropy

    torch.manual_seed(1)
    n, H, V = 10, 8, 50
    linear = torch.nn.Linear(H, V, bias=bias)
    hidden = torch.randn(2, n // 2, H, dtype=torch.float64)
    tokens = torch.randint(V, (2, n // 2))
    up_logp = torch.linspace(-1, 2, n).view(2, n // 2).double()
    up_entropy = torch.linspace(3, -0.5, n).view(2, n // 2).double()
    results = []
    for head in (linear.double(), torch.nn.Sequential(linear).double(), None):  # written out; autograd; full
        h = hidden.clone().requires_grad_(True)
        linear.zero_grad(set_to_none=True)
        if head is None:
            z = linear(h) * 0.5
            logp, entropy = selective_log_softmax(z, tokens, 0.7), token_entropy(z, 0.7, with_grad=True)
            logp, entropy = logp.double(), entropy.double()
        else:
            found = OutputHead(decoder=torch.nn.Identity(), head=head, scale=0.5)
            logp, stats = chunked_token_logprobs(found, h, tokens, temperature=0.7, with_entropy=True, chunk_size=3,
                                                 entropy_grad=True)
            entropy = stats["entropy"]
        assert entropy.requires_grad
        ((logp * up_logp).sum() + (entropy * up_entropy).sum()).backward()
        results.append((entropy, h.grad, linear.weight.grad, linear.bias.grad if bias else None))
    for fast, reference, full in zip(*results):  # fp32 logits on all three paths: fp32 rounding apart
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(full.to(fast.dtype) if full is not None else None, fast, rtol=1e-5, atol=1e-6)
    # without entropy_grad the entropy is detached and the gradients are the log-probs' alone
    found = OutputHead(decoder=torch.nn.Identity(), head=linear.double(), scale=0.5)
    _, stats = chunked_token_logprobs(found, hidden.clone().requires_grad_(True), tokens, temperature=0.7,
                                      with_entropy=True, chunk_size=3)
    assert not stats["entropy"].requires_grad
