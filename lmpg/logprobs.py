"""Log-probabilities of the taken tokens under a causal LM.

log pi(a_t | s_t) = z_{t, a_t} / tau - logsumexp_v(z_{t, v} / tau)

where z are the model's logits at the position before token t and tau the sampling temperature:
the policy that sampled the batch is softmax(z / tau), so the ratio pi_theta / pi_old and the KL use
the same tempered distribution (top-k / top-p truncation is not part of pi; see `rollout`).

Only the completion positions are computed (`logits_to_keep`), and the log-softmax is taken row by
row so the (B, T, V) tensor is never copied to fp32 whole.
"""

from __future__ import annotations

import torch


def selective_log_softmax(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                          chunk_rows: int = 4) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`, (B, T), in fp32.

    logits: (B, T, V); tokens: (B, T) int64. Processes `chunk_rows` sequences at a time.
    """
    B, T, V = logits.shape  # sequences, completion tokens, vocabulary
    out = []
    for s in range(0, B, chunk_rows):
        z = logits[s:s + chunk_rows].float() / temperature  # (b, T, V)
        taken = z.gather(-1, tokens[s:s + chunk_rows].unsqueeze(-1)).squeeze(-1)
        out.append(taken - torch.logsumexp(z, dim=-1))
    return torch.cat(out, 0) if out else logits.new_zeros(B, T, dtype=torch.float32)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0, chunk_rows: int = 4) -> torch.Tensor:
    """H_t = - sum_v p_v log p_v of softmax(logits / temperature), (B, T), no grad."""
    B, T, V = logits.shape
    out = []
    for s in range(0, B, chunk_rows):
        logp = torch.log_softmax(logits[s:s + chunk_rows].float() / temperature, dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out, 0) if out else logits.new_zeros(B, T, dtype=torch.float32)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as `generate` numbers them with left
    padding: cumsum(mask) - 1, clamped at 0 on the padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logits(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Logits that predict each completion token, (B, T, V).

    The input is [left-padded prompt | right-padded completion]; the logit predicting completion
    token t sits at position P - 1 + t. Padding after the completion is masked out of attention.
    """
    B, P = prompt_ids.shape  # sequences, prompt tokens (left padded)
    T = completion_ids.shape[1]  # completion tokens
    input_ids = torch.cat([prompt_ids, completion_ids], 1)  # (B, P+T)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1).long()
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), logits_to_keep=T + 1,
                use_cache=False)
    return out.logits[:, :-1, :]  # (B, T, V)


def sequence_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                      temperature: float = 1.0, with_entropy: bool = False):
    """(logp (B, T), entropy (B, T) or None) of the completion tokens under `model`."""
    logits = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    logp = selective_log_softmax(logits, completion_ids, temperature)
    entropy = token_entropy(logits.detach(), temperature) if with_entropy else None
    return logp, entropy
