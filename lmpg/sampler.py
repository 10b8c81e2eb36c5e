"""lmpg's own autoregressive sampler: KV cache, per-row random streams, log-probs on the way.

Why not `model.generate`: three things a policy-gradient trainer needs that it does not give.

1. Per-row random streams. Sample i draws its noise from its own generator, seeded by
   (run seed, iteration, global prompt position, sample index). What a sample is does not depend on
   which process drew it or on what else was in its batch, so `accelerate launch` with N processes
   samples exactly the trajectories one process would, and a resumed run samples what the
   uninterrupted one did.
2. The log-probabilities of the sampled tokens under the distribution q they were drawn from,
   computed from the logits the sampler already has. Without truncation or penalty q is the tempered
   policy softmax(z / tau) itself, pi_old (they can serve as log pi_old; see the trainer).
3. Less per-token overhead: one forward and one Gumbel-max draw per step, nothing else.

Sampling with the Gumbel-max trick: a_t = argmax_v (y_v + g_v), g_v = -log(-log u_v), u ~ U(0, 1),
draws a_t ~ q = softmax(y) exactly (Gumbel 1954; Maddison et al. 2014), y the processed logits of
`sampling_logits`, in vLLM's order (vllm/v1/sample/sampler.py):

    1. repetition penalty on the raw logits z, for every token v the row holds (prompt or sampled):
       z_v / r where z_v > 0, z_v * r elsewhere (CTRL, Keskar et al. 2019; HF's and vLLM's rule);
    2. temperature: z / tau;
    3. min_p: drop v with softmax(.)_v < min_p * max_u softmax(.)_u (Nguyen et al. 2024);
    4. top-k, then top-p (nucleus, Holtzman et al. 2020) on what remains;

dropped logits set to -inf. q == pi_old exactly when none of them is on (`processes_sampling`).
transformers' generate applies min_p after top-k / top-p instead: the two orders keep different sets
only when min_p and top_p are both on.
"""

from __future__ import annotations

import torch

from lmpg.kvcache import cache_kwarg, cache_support, distinct_rows, repeat_cache_rows, returned_cache
from lmpg.logprobs import logit_grad_sq_norm, position_ids_from_mask

_SEED_MIX = (1_000_003, 7_919, 104_729, 15_485_863)


def row_seed(seed: int, iteration: int, prompt_position: int, sample: int) -> int:
    """A 63-bit seed for one sample's random stream, distinct for distinct arguments in practice."""
    x = 0x9E3779B97F4A7C15
    for v, m in zip((seed, iteration, prompt_position, sample), _SEED_MIX):
        x = ((x ^ (v + m)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Logits with everything outside the min_p, then top-k, then nucleus (top-p) set at -inf
    (steps 3 and 4 of the module docstring). (B, V) -> (B, V)."""
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens above it already hold top_p of the mass (always keep the first)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def penalise_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Step 1 of the module docstring: z_v / penalty where z_v > 0, z_v * penalty elsewhere, on the
    tokens `seen` (B, V) bool marks (the row's prompt and sampled tokens), the rest unchanged.
    (B, V) -> (B, V). transformers' RepetitionPenaltyLogitsProcessor and vLLM's both penalise the
    prompt's tokens too."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def processes_sampling(*, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                       repetition_penalty: float = 1.0) -> bool:
    """Whether these settings make the sampling distribution q differ from the tempered policy pi_old."""
    return top_k > 0 or top_p < 1.0 or min_p > 0.0 or repetition_penalty != 1.0


def sampling_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    min_p: float = 0.0, repetition_penalty: float = 1.0,
                    seen: torch.Tensor | None = None) -> torch.Tensor:
    """The logits y of the distribution q = softmax(y) a token is drawn from (module docstring,
    steps 1 to 4), fp32 (B, V). Without penalty or truncation y = z / tau, the tempered policy's.
    seen: (B, V) bool, the tokens each row holds (needed with repetition_penalty != 1)."""
    z = logits.float()
    if repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty needs the tokens each row has seen")
        z = penalise_repetition(z, seen, repetition_penalty)
    return filter_logits(z / temperature, top_k, top_p, min_p)


def seen_tokens(rows: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """(B, V) bool: True at every token id of each row (a row's prompt, no padding, and its tokens so far)."""
    seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        if row:
            seen[i, torch.tensor(row, dtype=torch.long, device=device)] = True
    return seen


def gumbel_noise(generators: list[torch.Generator], vocab_size: int, device) -> torch.Tensor:
    """(B, V) standard Gumbel noise, row i from generators[i]."""
    u = torch.stack([torch.rand(vocab_size, generator=g, device=device) for g in generators])
    u = u.clamp_(min=torch.finfo(u.dtype).tiny)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def sample_tokens(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, seeds: list[int], *,
                  max_new_tokens: int, eos_ids: list[int], pad_id: int, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                  with_grad_sq_norm: bool = False):
    """Sample one completion per row of the left-padded prompts.

    Returns (completion_ids (B, T) with pad after each row's first EOS, logp (B, T) fp32: log q(a_t | s_t)
    of the distribution each token was drawn from (`sampling_logits`; the tempered policy
    softmax(z / tau) itself when no truncation or penalty is on), 0 after EOS). T <= max_new_tokens
    (the loop stops once every row has ended). with_grad_sq_norm: a third output (B, T) fp32, each
    sampled token's ||grad_z log pi(a_t | s_t)||^2 under the tempered policy
    (`lmpg.logprobs.logit_grad_sq_norm`), 0 after EOS.

    Rows with the same prompt (the G samples of a group) are prefilled once and their KV cache
    repeated where the model's cache allows (`lmpg.kvcache.cache_support`; else every row prefills);
    each row still draws from its own stream, so the samples are those of a row-by-row prefill up to
    float rounding of the prefill logits.
    """
    B = prompt_ids.shape[0]
    if not bool(prompt_mask.any(1).all()):  # the first step would attend to nothing
        raise ValueError("every row needs at least one prompt token; start an empty prompt from BOS "
                         "(lmpg.rollout.encode_prompts does)")
    device = prompt_ids.device
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    eos = torch.tensor(eos_ids, device=device)
    attention_mask = prompt_mask.long()
    positions = position_ids_from_mask(attention_mask)
    first, inverse = distinct_rows(torch.cat([prompt_ids, attention_mask], 1))
    support = cache_support(model)
    shared = len(first) < B and support.repeat_rows  # else every row prefills
    rows = first if shared else slice(None)
    out = model(input_ids=prompt_ids[rows], attention_mask=attention_mask[rows], position_ids=positions[rows],
                use_cache=True, logits_to_keep=1)
    last_logits = out.logits[:, -1, :]  # (b, V)
    cache_arg = cache_kwarg(model)
    past = returned_cache(out)
    if shared:
        past = repeat_cache_rows(past, inverse)
        last_logits = last_logits[inverse]  # (B, V)
    next_position = positions[:, -1:] + 1  # (B, 1)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    processing = dict(top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
    q_is_policy = not processes_sampling(**processing)
    seen = seen_tokens([row[m].tolist() for row, m in zip(prompt_ids, prompt_mask)], last_logits.shape[-1], device) \
        if repetition_penalty != 1.0 else None
    tokens, logps, grad_sq = [], [], []
    for step in range(max_new_tokens):
        y = sampling_logits(last_logits, temperature=temperature, seen=seen, **processing)  # (B, V) q's logits
        token = torch.argmax(y + gumbel_noise(generators, y.shape[-1], device), dim=-1)  # (B,)
        logq_all = torch.log_softmax(y, dim=-1)
        logp = logq_all.gather(1, token.unsqueeze(1)).squeeze(1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        logps.append(torch.where(finished, torch.zeros_like(logp), logp))
        if with_grad_sq_norm:  # of the tempered policy's log-prob, whatever q is
            logp_all = logq_all if q_is_policy else torch.log_softmax(last_logits.float() / temperature, dim=-1)
            grad_sq.append(torch.where(finished, 0.0, logit_grad_sq_norm(logp_all, token, temperature)))
        if seen is not None:
            seen[torch.arange(B, device=device), token] |= ~finished
        finished |= torch.isin(token, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones(B, 1, dtype=attention_mask.dtype, device=device)], 1)
        out = model(input_ids=token.unsqueeze(1), attention_mask=attention_mask if support.step_mask else None,
                    position_ids=next_position, use_cache=True, **{cache_arg: past})
        past = returned_cache(out)
        last_logits = out.logits[:, -1, :]
        next_position = next_position + 1
    if not tokens:
        empty = (prompt_ids.new_zeros(B, 0), torch.zeros(B, 0, device=device))
        return empty + (torch.zeros(B, 0, device=device),) if with_grad_sq_norm else empty
    out = (torch.stack(tokens, 1), torch.stack(logps, 1))
    return out + (torch.stack(grad_sq, 1),) if with_grad_sq_norm else out
