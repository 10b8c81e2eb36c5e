"""Log-probs of a TrajectoryBatch's rows under a model: the forward passes of an iteration.

One function for every forward over a batch (pi_old, pi_ref and the update's pi_theta), so they
split rows into the same micro-batches and trim padding the same way: the first update step then
recomputes pi_old's log-probs bit for bit and its ratio is exactly 1.
"""

from __future__ import annotations

import torch

from lmpg.batch import TrajectoryBatch
from lmpg.logprobs import sequence_logprobs


def micro_batches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    """`rows` cut into consecutive chunks of `size` (the last may be shorter)."""
    return [rows[s:s + size] for s in range(0, len(rows), size)]


def row_logprobs(model, batch: TrajectoryBatch, rows: torch.Tensor, temperature: float, with_entropy: bool,
                 share_prompt: bool = False, chunk_size: int = 0,
                 entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp (b, T), entropy (b, T) or None) of `rows`, padding trimmed: the columns of left padding
    every row shares and the completion columns past the longest row are dropped before the forward,
    and the outputs padded back with zeros to the batch's T. share_prompt: run each distinct prompt
    once (`sequence_logprobs(group=...)`). entropy_grad: the entropy keeps its gradient."""
    prompt_mask, completion_mask = batch.prompt_mask[rows], batch.completion_mask[rows]
    P, T = prompt_mask.shape[1], completion_mask.shape[1]
    p_start = P - int(prompt_mask.sum(1).max()) if P else 0
    t_end = int(completion_mask.sum(1).max()) if T else 0
    group = batch.group[rows.to(batch.group.device)].to(batch.prompt_ids.device) if share_prompt else None
    logp, ent = sequence_logprobs(model, batch.prompt_ids[rows][:, p_start:], prompt_mask[:, p_start:],
                                  batch.completion_ids[rows][:, :t_end], completion_mask[:, :t_end],
                                  temperature, with_entropy, group=group, chunk_size=chunk_size,
                                  entropy_grad=entropy_grad)
    if t_end < T:
        pad = (0, T - t_end)
        logp = torch.nn.functional.pad(logp, pad)
        ent = torch.nn.functional.pad(ent, pad) if ent is not None else None
    return logp, ent


@torch.no_grad()
def batch_logprobs(model, batch: TrajectoryBatch, rows: torch.Tensor, micro_batch_size: int, temperature: float,
                   share_prompt: bool = False, chunk_size: int = 0) -> torch.Tensor:
    """log pi(a_t | s_t) of `rows`, (len(rows), T), no grad, in micro-batches of `micro_batch_size`."""
    out = torch.zeros(len(rows), batch.completion_ids.shape[1], device=batch.completion_ids.device)
    at = 0
    for idx in micro_batches(rows, micro_batch_size):
        out[at:at + len(idx)] = row_logprobs(model, batch, idx, temperature, False, share_prompt, chunk_size)[0]
        at += len(idx)
    return out
