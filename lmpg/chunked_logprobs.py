"""Log-probabilities from the last hidden states, a chunk of tokens at a time: no (B, T, V) logits.

    z_t = f(W h_t + b),  log pi(a_t | s_t) = z_{t, a_t} / tau - logsumexp_v(z_{t, v} / tau),
    H_t = - sum_v p_{t, v} log p_{t, v},  p_t = softmax(z_t / tau),

where h_t is the backbone's last hidden state (after its final norm), W, b the output layer and f the
model's own final-logit processing (Gemma 2/3: z = c tanh(z / c), `final_logit_softcapping`; Cohere:
z * `logit_scale`; Granite: z / `logits_scaling`). With a vocabulary of 151,936, one fp32 copy of the
logits of 64 completions of 1,024 tokens is 40 GB; here each chunk of `chunk_size` tokens is projected,
reduced to its (chunk,) log-probs and entropies, and freed before the next. The backward recomputes
each chunk's logits, so the backward never holds more than one chunk's (chunk, V) either; the price is
one more output-layer matmul per token (forward only). For a plain `nn.Linear` output layer (the usual
case, no autocast, no softcapping) the backward is written out (`LinearTokenLogprob`): with
d log pi(a_t|s_t) / d z_t = onehot(a_t) - p_t, each chunk's logits become their gradient in place and
W's gradient is summed in one (V, H) buffer (addmm_), as liger-kernel's fused linear cross-entropy does;
any other layer (LoRA on lm_head, softcapping, autocast) recomputes through autograd
(`torch.utils.checkpoint`), which holds a second (V, H) gradient per chunk while it sums them.

The hidden states come from a forward hook on the backbone (`model.get_decoder()`, through DDP and
peft wrappers) while the model itself runs with `logits_to_keep` an empty index (its output layer
then projects no position): the call still goes through every wrapper's forward (DDP's gradient
hooks, peft's adapters, accelerate's autocast). The output layer is the model's own module
(`get_output_embeddings()`), so LoRA on lm_head and a bias are used as they are.

A model this cannot split (no decoder / output embeddings, a logit processing not listed above, an
output that differs from the model's own logits) is checked once on two tokens and then served by
the full-logits path, with the reason logged (`output_head`).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 256
"""Tokens per chunk (PGConfig.logits_chunk_size's default): at V = 151,936 one fp32 chunk of logits is
156 MB; smaller chunks make the output layer's matmuls skinny and slower (benchmarks/README.md)."""


@dataclass(frozen=True)
class OutputHead:
    """The pieces of a causal LM the chunked path needs: where its last hidden states come out
    (`decoder`) and the map from a hidden state to logits (`head`, then `softcap` / `scale`)."""

    decoder: torch.nn.Module
    head: torch.nn.Module
    softcap: float | None = None
    scale: float = 1.0

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(n, H) hidden states -> (n, V) logits, as the model's forward computes them."""
        z = self.head(h)
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


_HEADS: "weakref.WeakKeyDictionary[torch.nn.Module, OutputHead | None]" = weakref.WeakKeyDictionary()


def unwrapped(model) -> torch.nn.Module:
    """The transformers model inside DDP / accelerate (`.module`) and peft (`get_base_model()`) wrappers."""
    base = getattr(model, "module", model)
    return base.get_base_model() if hasattr(base, "get_base_model") else base


def output_head(model) -> OutputHead | None:
    """The model's `OutputHead`, or None (logged once with the reason) where it cannot be split."""
    inner = unwrapped(model)
    if inner not in _HEADS:
        head, reason = _find_head(model, inner)
        if head is None:
            logger.warning("%s: computing full (B, T, V) logits, not chunked ones: %s", type(inner).__name__, reason)
        _HEADS[inner] = head
    return _HEADS[inner]


def _find_head(model, inner) -> tuple[OutputHead | None, str]:
    config = getattr(inner, "config", None)
    get_decoder = getattr(inner, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(decoder, torch.nn.Module) or decoder is inner or not isinstance(head, torch.nn.Module):
        return None, "no get_decoder() / get_output_embeddings() to take the hidden states from"
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite
        scale /= float(config.logits_scaling)
    found = OutputHead(decoder, head, getattr(config, "final_logit_softcapping", None), scale)
    try:
        mismatch = _check(model, found)
    except Exception as e:  # noqa: BLE001 - any failure means: use the model's own logits
        return None, f"the split forward failed ({type(e).__name__}: {e})"
    if mismatch is not None:
        return None, mismatch
    return found, ""


@torch.no_grad()
def _check(model, found: OutputHead) -> str | None:
    """None when the split reproduces the model's logits on two tokens, else why not."""
    device = next(found.head.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    captured = {}
    hook = found.decoder.register_forward_hook(lambda m, a, out: captured.update(h=_last_hidden(out)))
    try:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        empty = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                      logits_to_keep=torch.zeros(0, dtype=torch.long, device=device))
    finally:
        hook.remove()
    if "h" not in captured or captured["h"] is None:
        return "the decoder's output holds no last_hidden_state"
    if empty.logits.numel() != 0:
        return "the model ignores an index tensor as logits_to_keep"
    expected = out.logits.float()
    got = found.logits(captured["h"]).float()
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-3, rtol=1e-3):
        return "its logits are not lm_head(last hidden state) with a known final-logit processing"
    return None


def _last_hidden(out):
    h = out.get("last_hidden_state") if hasattr(out, "get") else None
    return h if h is not None else (out[0] if isinstance(out, tuple) else None)


def hidden_states(model, found: OutputHead, **inputs):
    """(last hidden states (B, L, H) after the final norm, the model's output) of one forward of
    `model` that projects no position through its output layer."""
    captured = {}
    hook = found.decoder.register_forward_hook(lambda m, a, out: captured.update(h=_last_hidden(out)))
    try:
        device = inputs["input_ids"].device
        out = model(**inputs, logits_to_keep=torch.zeros(0, dtype=torch.long, device=device))
    finally:
        hook.remove()
    return captured["h"], out


def _chunk_logp_entropy(found: OutputHead, h: torch.Tensor, tokens: torch.Tensor, temperature: float,
                        with_entropy: bool, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp (n,), entropy (n,), no grad unless entropy_grad; zeros unless with_entropy) of one chunk of
    hidden states."""
    z = found.logits(h).float()  # (n, V)
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        if with_entropy:
            p = torch.softmax(z, dim=-1)
            entropy = lse - (p * z).sum(-1)  # H = logsumexp(z) - sum_v p_v z_v
        else:
            entropy = lse.new_zeros(lse.shape)
    return logp, entropy


def _plain_linear(found: OutputHead, hidden: torch.Tensor) -> bool:
    """Whether `LinearTokenLogprob` computes what `found.logits` does: an exact nn.Linear output layer,
    no softcapping, no autocast (whose casts the hand-written backward would not repeat)."""
    return (type(found.head) is torch.nn.Linear and found.softcap is None
            and not torch.is_autocast_enabled(hidden.device.type))


def _linear_logits(h, weight, bias, scale: float, temperature: float) -> torch.Tensor:
    """(n, V) fp32 z / tau of hidden states h (n, H), in `OutputHead.logits`' order of operations."""
    z = torch.nn.functional.linear(h, weight, bias)
    if scale != 1.0:
        z = z * scale
    z = z.float()
    return z / temperature if temperature != 1.0 else z


class LinearTokenLogprob(torch.autograd.Function):
    """(log pi(a_t | s_t) (n,), entropy (n,)) of z = scale (h W^T + b) / tau, chunk by chunk; the entropy
    has no gradient unless entropy_grad.

    Backward, for upstream gradient g_t: d z_t = g_t (onehot(a_t) - p_t) scale / tau, then
    grad h_t = d z_t W, grad W = sum_t d z_t^T h_t, grad b = sum_t d z_t. Each chunk's logits are
    recomputed and turned into d z in place, and grad W is one buffer the chunks add into. With the
    entropy's upstream gradient e_t, d H_t / d z_t = -p_t (log p_t + H_t) adds, so
    d z_t = (g_t onehot(a_t) - p_t (g_t + e_t (log p_t + H_t))) scale / tau.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, scale, temperature, with_entropy, chunk_size, entropy_grad=False):
        logps, entropies = [], []
        for h, a in zip(hidden.split(chunk_size), tokens.split(chunk_size)):
            z = _linear_logits(h, weight, bias, scale, temperature)  # (c, V)
            lse = torch.logsumexp(z, dim=-1)
            logps.append(z.gather(-1, a.unsqueeze(-1)).squeeze(-1) - lse)
            if with_entropy:
                entropies.append(lse - (torch.softmax(z, dim=-1) * z).sum(-1))
        ctx.save_for_backward(hidden, weight, bias, tokens)
        ctx.scale, ctx.temperature, ctx.chunk_size = scale, temperature, chunk_size
        ctx.entropy_grad = with_entropy and entropy_grad
        logp = torch.cat(logps)
        entropy = torch.cat(entropies) if with_entropy else logp.new_zeros(logp.shape)
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, g, g_entropy):
        hidden, weight, bias, tokens = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        c, at = ctx.chunk_size, 0
        with_entropy = ctx.entropy_grad and g_entropy is not None
        g_entropy = g_entropy if with_entropy else g
        for h, a, gc, ec in zip(hidden.split(c), tokens.split(c), g.split(c), g_entropy.split(c)):
            z = _linear_logits(h, weight, bias, ctx.scale, ctx.temperature)  # (c, V)
            if with_entropy:
                logp_all = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))  # log p, in place
                p = logp_all.exp()
                entropy = -(p * logp_all).sum(-1, keepdim=True)
                dz = logp_all.add_(entropy).mul_(ec.unsqueeze(-1)).add_(gc.unsqueeze(-1)).mul_(p).neg_()
            else:
                dz = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True)).exp_()  # p, in place
                dz.mul_(-gc.unsqueeze(-1))
            dz.scatter_add_(-1, a.unsqueeze(-1), gc.unsqueeze(-1))
            dz = dz.mul_(ctx.scale / ctx.temperature).to(weight.dtype)
            if need_h:
                grad_h[at:at + len(h)] = dz @ weight
            if need_w:
                grad_w.addmm_(dz.T, h)
            if need_b:
                grad_b += dz.sum(0)
            at += len(h)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def chunked_token_logprobs(found: OutputHead, hidden: torch.Tensor, tokens: torch.Tensor,
                           temperature: float = 1.0, with_entropy: bool = False,
                           chunk_size: int = DEFAULT_CHUNK_SIZE, *, entropy_grad: bool = False) -> tuple[torch.Tensor, dict]:
    """log pi(a_t | s_t) of `tokens` from the hidden states that predict them, (B, T) fp32, a chunk of
    `chunk_size` tokens at a time (the module docstring has the equations).

    hidden: (B, T, H), position t predicting tokens[:, t]; tokens: (B, T) int64.
    Returns (logp, stats) with stats["entropy"] (B, T) (no grad unless entropy_grad) or None.
    """
    B, T, H = hidden.shape  # sequences, completion tokens, hidden size
    flat_h, flat_a = hidden.reshape(B * T, H), tokens.reshape(B * T)
    if B * T and _plain_linear(found, hidden):
        logp, entropy = LinearTokenLogprob.apply(flat_h, found.head.weight, found.head.bias, flat_a, found.scale,
                                                 temperature, with_entropy, chunk_size, entropy_grad)
        return logp.view(B, T), {"entropy": entropy.view(B, T) if with_entropy else None}
    logps, entropies = [], []
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    for h, a in zip(flat_h.split(chunk_size), flat_a.split(chunk_size)):
        if recompute:  # the backward recomputes this chunk's logits instead of keeping them
            logp, ent = checkpoint(_chunk_logp_entropy, found, h, a, temperature, with_entropy, entropy_grad,
                                   use_reentrant=False)
        else:
            logp, ent = _chunk_logp_entropy(found, h, a, temperature, with_entropy, entropy_grad)
        logps.append(logp)
        entropies.append(ent if entropy_grad else ent.detach())
    if not logps:
        empty = hidden.new_zeros(B, T, dtype=torch.float32)
        return empty, {"entropy": empty if with_entropy else None}
    logp = torch.cat(logps).view(B, T)
    return logp, {"entropy": torch.cat(entropies).view(B, T) if with_entropy else None}
