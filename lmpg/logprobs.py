"""Log-probabilities of the taken tokens under a causal LM.

log pi(a_t | s_t) = z_{t, a_t} / tau - logsumexp_v(z_{t, v} / tau)

where z are the model's logits at the position before token t and tau the sampling temperature:
the policy that sampled the batch is softmax(z / tau), so the ratio pi_theta / pi_old and the KL use
the same tempered distribution (top-k / top-p truncation is not part of pi; see `rollout`).

With `chunk_size` > 0 (config `logits_chunk_size`, 256 by default) no (B, T, V) logits exist
at all: the model returns its last hidden states and `lmpg.chunked_logprobs` projects them through the output layer a chunk of tokens at a time,
in the forward and again in the backward. A model that cannot be split that way, or chunk_size=0,
takes the full-logits path: only the completion positions are projected (`logits_to_keep`), and the
log-softmax is taken a few rows at a time so the (B, T, V) tensor is never copied to fp32 whole. With `group` given, each
distinct prompt runs through the model once and its KV cache serves the G completions sharing it
(`shared_prompt_completion_logits`).
"""

from __future__ import annotations

import torch

from lmpg.chunked_logprobs import chunked_token_logprobs, hidden_states, output_head
from lmpg.kvcache import cache_kwarg, cache_support, distinct_rows, repeat_cache_rows, returned_cache


def selective_log_softmax(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                          chunk_rows: int = 4) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`, (B, T), in fp32.

    logits: (B, T, V); tokens: (B, T) int64. Processes `chunk_rows` sequences at a time.
    """
    B, T, V = logits.shape  # sequences, completion tokens, vocabulary
    if B == 0:
        return logits.new_zeros(B, T, dtype=torch.float32)
    out = []
    # split, not slicing: the backward of B/chunk_rows slices would write B/chunk_rows full-size
    # gradient buffers (quadratic in B); split's backward concatenates the chunks' gradients once.
    for z, a in zip(logits.split(chunk_rows), tokens.split(chunk_rows)):
        z = _tempered(z, temperature)  # (b, T, V) fp32
        taken = z.gather(-1, a.unsqueeze(-1)).squeeze(-1)
        out.append(taken - torch.logsumexp(z, dim=-1))
    return torch.cat(out, 0)


def _tempered(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """z / temperature in fp32; no division (and no extra (b, T, V) buffer) at temperature 1."""
    z = z.float()
    return z if temperature == 1.0 else z / temperature


def token_entropy(logits: torch.Tensor, temperature: float = 1.0, chunk_rows: int = 4, *,
                  with_grad: bool = False) -> torch.Tensor:
    """H_t = - sum_v p_v log p_v of softmax(logits / temperature), (B, T); no grad unless `with_grad`
    (the entropy bonus differentiates it)."""
    B, T, V = logits.shape
    if B == 0:
        return logits.new_zeros(B, T, dtype=torch.float32)
    out = []
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        for z in logits.split(chunk_rows):
            logp = torch.log_softmax(_tempered(z, temperature), dim=-1)
            out.append(-(logp.exp() * logp).sum(-1))
        return torch.cat(out, 0)


def logit_grad_sq_norm(logp_all: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """||grad_z log pi(a | s)||^2 = (1 - 2 pi(a | s) + sum_v pi(v | s)^2) / tau^2 at each taken token.

    pi = softmax(z / tau); d log pi(a) / d z_v = (delta_{va} - pi_v) / tau, whose squared norm over v
    is the expression above. logp_all: (..., V) log pi (the tempered log-softmax); tokens: (...) int64.
    Summed over a trajectory's actions it is the weight of `lmpg.advantages.optimal_baseline`.
    """
    logp_a = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    sum_sq = torch.logsumexp(2 * logp_all, dim=-1).exp()  # sum_v pi_v^2
    return (1 - 2 * logp_a.exp() + sum_sq) / temperature ** 2


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as `generate` numbers them with left
    padding: cumsum(mask) - 1, clamped at 0 on the padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _logits(model, keep: int, **inputs):
    """(logits of the last `keep` positions, output) of one forward."""
    out = model(**inputs, logits_to_keep=keep)
    return out.logits, out


def _hidden(found):
    """The `_logits` of the chunked path: the last hidden states (..., H) in place of the logits."""
    def run(model, keep: int, **inputs):
        h, out = hidden_states(model, found, **inputs)
        return h[:, -keep:], out
    return run


def completion_logits(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      completion_ids: torch.Tensor, completion_mask: torch.Tensor, features=_logits) -> torch.Tensor:
    """Logits that predict each completion token, (B, T, V) (with features=_hidden(head): the hidden
    states, (B, T, H)).

    The input is [left-padded prompt | right-padded completion]; the logit predicting completion
    token t sits at position P - 1 + t. Padding after the completion is masked out of attention.
    """
    B, P = prompt_ids.shape  # sequences, prompt tokens (left padded)
    T = completion_ids.shape[1]  # completion tokens
    input_ids = torch.cat([prompt_ids, completion_ids], 1)  # (B, P+T)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1).long()
    z, _ = features(model, T + 1, input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return z[:, :-1, :]  # (B, T, V)


def shared_prompt_completion_logits(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                                    completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                                    group: torch.Tensor, features=_logits) -> torch.Tensor:
    """`completion_logits` with each distinct prompt run through the model once, (B, T, V).

    group: (B,) a prompt id per row; rows with one id hold the same prompt (`Rollout.prompt_index`).

    1. the b distinct prompts through the model with a KV cache: their last position's logits
       predict completion token 0;
    2. the cache repeated to the B rows (differentiable: `lmpg.kvcache.repeat_cache_rows`);
    3. the B completions but their last token on that cache: the logits predicting tokens 1..T-1.

    Positions and attention masks are those of `completion_logits`, so the two agree up to float
    rounding; the prompt work drops from B to b rows. The model must return a transformers Cache
    and keep it in training mode: not under gradient checkpointing. Through DDP it is sound (each
    weight's gradient is still ready once per backward); not through FSDP / DeepSpeed, whose hooks
    gather and free shards around each forward (the trainer checks both).
    """
    B, P = prompt_ids.shape  # sequences, prompt tokens (left padded)
    T = completion_ids.shape[1]  # completion tokens
    first, inverse = distinct_rows(group)  # (b,), (B,)
    mask = torch.cat([prompt_mask, completion_mask], 1).long()  # (B, P+T)
    positions = position_ids_from_mask(mask)
    z, out = features(model, 1, input_ids=prompt_ids[first], attention_mask=mask[first, :P],
                      position_ids=positions[first, :P], use_cache=True)
    first_logits = z[inverse]  # (B, 1, V)
    if T == 1:
        return first_logits
    cache = repeat_cache_rows(returned_cache(out), inverse)  # (b, ...) -> (B, ...)
    z, _ = features(model, T - 1, input_ids=completion_ids[:, :-1], attention_mask=mask[:, :-1],
                    position_ids=positions[:, P:-1], use_cache=True, **{cache_kwarg(model): cache})
    return torch.cat([first_logits, z], 1)  # (B, T, V)


def sequence_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                      temperature: float = 1.0, with_entropy: bool = False, group: torch.Tensor | None = None,
                      chunk_size: int = 0, entropy_grad: bool = False):
    """(logp (B, T), entropy (B, T) or None) of the completion tokens under `model`.

    group: (B,) prompt ids; given, rows sharing a prompt share its forward
    (`shared_prompt_completion_logits`), else every row runs whole (`completion_logits`).
    chunk_size: tokens per output-layer chunk (`lmpg.chunked_logprobs`); 0 computes the full logits.
    entropy_grad: the entropy carries its gradient (the entropy bonus); else it is detached."""
    found = output_head(model) if chunk_size > 0 else None
    features = _hidden(found) if found is not None else _logits
    shareable = group is not None and prompt_ids.shape[1] > 0 and completion_ids.shape[1] > 0
    shareable = shareable and cache_support(model).continue_chunk  # recurrent caches: the plain forward
    if shareable and len(torch.unique(group)) < len(group):
        z = shared_prompt_completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                            group, features)
    else:
        z = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, features)
    if found is not None:  # z: (B, T, H) hidden states
        logp, stats = chunked_token_logprobs(found, z, completion_ids, temperature, with_entropy, chunk_size,
                                             entropy_grad=entropy_grad)
        return logp, stats["entropy"]
    logp = selective_log_softmax(z, completion_ids, temperature)
    entropy = None
    if with_entropy:
        entropy = token_entropy(z if entropy_grad else z.detach(), temperature, with_grad=entropy_grad)
    return logp, entropy
