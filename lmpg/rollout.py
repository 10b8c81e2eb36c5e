"""Sampling trajectories: G completions per prompt from the current policy.

A prompt is the initial state s_0, each generated token a_t an action, and the completion (up to and
including the first EOS, or `max_new_tokens` tokens) the trajectory. Sampling uses the model's KV
cache through `generate`, under no_grad.

The policy is softmax(logits / temperature). top_k / top_p / min_p truncate the sampler's
distribution and repetition_penalty reshapes it (`lmpg.sampler.sampling_logits`); the log-probabilities
used in the loss are of the untruncated tempered policy, as in TRL, so with any of them on the sampler
is off-policy: the batch carries the sampler's own q (`sampler_logp`) and the trainer measures and
may correct the mismatch (`lmpg.mismatch`). Leave them off for the exact estimator.
"""

from __future__ import annotations

import torch

from lmpg.batch import TrajectoryBatch
from lmpg.errors import ConfigError


def reward_inputs(batch: TrajectoryBatch, prompts: list) -> tuple[list, list, list[list[int]]]:
    """(prompts, completions, completion_ids) aligned to the B rows, as reward functions take them:
    each row's prompt; its completion as text, or as [{"role": "assistant", ...}] when the prompts
    are chat messages (TRL's convention); the ids of its existing tokens (completion_mask)."""
    from lmpg.data import is_conversational

    prompts_rep = [prompts[i] for i in batch.prompt_index]
    completions = [[{"role": "assistant", "content": t}] for t in batch.completions] \
        if is_conversational(prompts[0]) else list(batch.completions)
    completion_ids = [row[m].tolist() for row, m in zip(batch.completion_ids, batch.completion_mask)]
    return prompts_rep, completions, completion_ids


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(completion_mask, truncated): True up to and including the first EOS; truncated rows have none."""
    B, T = completion_ids.shape
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_token_ids:
        is_eos |= completion_ids == e
    has_eos = is_eos.any(1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(1), torch.full((B,), T, device=completion_ids.device))
    positions = torch.arange(T, device=completion_ids.device).unsqueeze(0)  # (1, T)
    mask = positions <= first_eos.unsqueeze(1)
    mask &= positions < T
    return mask, ~has_eos


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS plus the generation config's."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(e) for e in extra)
    return sorted(ids)


def encode_prompts(tokenizer, prompt_texts: list[str], max_prompt_length: int, add_special_tokens: bool,
                   device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded (prompt_ids, prompt_mask, number truncated); long prompts keep their last tokens.

    A prompt that encodes to no tokens (the empty string) starts from the tokenizer's BOS token, as
    an unconditional sample does; with no BOS token it is refused (ConfigError)."""
    encoded = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in prompt_texts]
    for i, e in enumerate(encoded):
        if not e:
            if tokenizer.bos_token_id is None:
                raise ConfigError(f"prompt {i} of the batch ({prompt_texts[i]!r}) encodes to no tokens and the "
                                  "tokenizer has no BOS token to start from; give it some text or set "
                                  "tokenizer.bos_token")
            encoded[i] = [tokenizer.bos_token_id]
    truncated = sum(len(e) > max_prompt_length for e in encoded)
    encoded = [e[-max_prompt_length:] for e in encoded]
    P = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(encoded), P), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), P), dtype=torch.bool)
    for i, e in enumerate(encoded):
        if e:
            ids[i, P - len(e):] = torch.tensor(e, dtype=torch.long)
            mask[i, P - len(e):] = True
    return ids.to(device), mask.to(device), truncated


@torch.no_grad()
def sample_completions(model, tokenizer, prompt_texts: list[str], group_size: int, *, max_new_tokens: int,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                       repetition_penalty: float = 1.0, max_prompt_length: int = 512, add_special_tokens: bool = True,
                       eos_ids: list[int] | None = None, seeds: list[int] | None = None,
                       sampler: str = "lmpg", policy_version: int = 0,
                       with_grad_sq_norm: bool = False, turn_sampler=None) -> TrajectoryBatch:
    """Sample `group_size` completions for each prompt text (KV cache on).

    sampler="lmpg" (default): `lmpg.sampler.sample_tokens`, one random stream per sample from
    `seeds` (B = len(prompt_texts) * group_size of them; default: drawn from the global torch RNG);
    the batch then carries the sampler's log q in `sampler_logp` and, with `with_grad_sq_norm`,
    each token's ||grad_z log pi(a_t | s_t)||^2 in `grad_sq_norm`.
    sampler="generate": transformers' `model.generate` on the global torch RNG.
    turn_sampler: a `lmpg.generation.TurnSampler` (an inference engine) that samples instead, one
    turn per row from `seeds`; `sampler_logp` is then its q (`lmpg.vllm_sampler`).
    policy_version: the iteration whose policy samples (recorded per row).
    Single-turn: every token after the prompt is an action, so action_mask equals completion_mask.
    """
    from lmpg.sampler import sample_tokens

    device = next(model.parameters()).device
    prompt_ids, prompt_mask, n_trunc = encode_prompts(tokenizer, prompt_texts, max_prompt_length,
                                                      add_special_tokens, device)
    prompt_ids = prompt_ids.repeat_interleave(group_size, 0)  # (B, P)
    prompt_mask = prompt_mask.repeat_interleave(group_size, 0)
    B = prompt_ids.shape[0]
    eos_ids = eos_ids or eos_token_ids(tokenizer, model)
    sampler_logp, grad_sq_norm = None, []
    was_training = model.training
    model.eval()
    try:
        if with_grad_sq_norm and (turn_sampler is not None or sampler != "lmpg"):
            raise ValueError("grad_sq_norm comes from lmpg's sampler; use sampler='lmpg'")
        if turn_sampler is not None or sampler == "lmpg":  # per-row random streams
            if seeds is None:
                seeds = torch.randint(0, 2**62, (B,)).tolist()
            if len(seeds) != B:
                raise ValueError(f"got {len(seeds)} seeds for {B} samples")
        if turn_sampler is not None:
            completion_ids, sampler_logp = sample_turns(turn_sampler, prompt_ids, prompt_mask, seeds, max_new_tokens,
                                                        pad_id=tokenizer.pad_token_id)
        elif sampler == "lmpg":
            completion_ids, sampler_logp, *grad_sq_norm = sample_tokens(
                model, prompt_ids, prompt_mask, seeds, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                pad_id=tokenizer.pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, with_grad_sq_norm=with_grad_sq_norm)
        elif sampler == "generate":
            out = model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask.long(), do_sample=True,
                temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else None,
                min_p=min_p if min_p > 0 else None, repetition_penalty=repetition_penalty,
                max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
                use_cache=True, return_dict_in_generate=False,
            )
            completion_ids = out[:, prompt_ids.shape[1]:]  # (B, T)
        else:
            raise ValueError(f"unknown sampler {sampler!r}; use 'lmpg' or 'generate'")
    finally:
        model.train(was_training)
    completion_mask, truncated = completion_mask_from_eos(completion_ids, eos_ids)
    completion_ids = torch.where(completion_mask, completion_ids,
                                 torch.full_like(completion_ids, tokenizer.pad_token_id))
    completions = tokenizer.batch_decode(
        [row[m].tolist() for row, m in zip(completion_ids, completion_mask)], skip_special_tokens=True)
    group = torch.arange(B, device=device) // group_size
    return TrajectoryBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                           completion_mask=completion_mask, action_mask=completion_mask.clone(),
                           truncated=truncated, group=group,
                           policy_version=torch.full((B,), policy_version, dtype=torch.long, device=device),
                           completions=completions, sampler_logp=sampler_logp, prompts_truncated=n_trunc,
                           grad_sq_norm=grad_sq_norm[0] if grad_sq_norm else None)


def sample_turns(turn_sampler, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, seeds: list[int],
                 max_new_tokens: int, *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One turn per row from a `lmpg.generation.TurnSampler`, row i from seeds[i]: (completion_ids (B, T)
    right padded, logp (B, T) fp32, 0 on padding), from left-padded prompts."""
    B = prompt_ids.shape[0]
    histories = [row[m].tolist() for row, m in zip(prompt_ids, prompt_mask)]
    turn_sampler.start(seeds)
    try:
        turns = turn_sampler.sample(list(range(B)), histories, [max_new_tokens] * B)
    finally:
        turn_sampler.finish()
    T = max((len(t.token_ids) for t in turns), default=0)
    completion_ids = torch.full((B, T), pad_id, dtype=torch.long)
    logp = torch.zeros(B, T)
    for i, t in enumerate(turns):
        completion_ids[i, :len(t.token_ids)] = torch.tensor(t.token_ids, dtype=torch.long)
        logp[i, :len(t.logp)] = torch.tensor(t.logp)
    return completion_ids.to(prompt_ids.device), logp.to(prompt_ids.device)
