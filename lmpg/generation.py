"""Turn samplers: what writes the policy's next turn in each live episode (`lmpg.episodes`).

The episode loop owns the histories and the environments; a `TurnSampler` owns generation. Each
turn the loop hands it the live rows' whole token histories (prompt, no padding, then every token
after it, the policy's and the environment's) and gets back each row's sampled tokens with their
log-probs under the sampling distribution. A sampler may keep whatever it likes between calls (a
KV cache, a vLLM engine's prefix cache): it only ever sees full histories, so any sampler that
produces the same tokens plugs into the same loop.

Two implementations: `LmpgTurnSampler` (the policy itself, below) and `lmpg.vllm_sampler.VllmSampler`
(an inference engine built from the policy, `sampler: vllm`; `engine_sampler` builds it).

Every row draws from its own random stream, seeded once per batch (`start`) and continued over
that row's turns, so a row's episode does not depend on which other rows are live or how the batch
is split over processes (`lmpg.sampler.row_seed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from lmpg.kvcache import cache_kwarg, returned_cache
from lmpg.sampler import gumbel_noise, sampling_logits, seen_tokens


@dataclass
class SampledTurn:
    """One row's turn as the sampler drew it."""

    token_ids: list[int]
    """Sampled tokens; ends with an EOS id unless the budget ran out."""
    logp: list[float]
    """log q(a_t | s_t) of each token under the distribution the sampler drew it from, after the
    repetition penalty, temperature, min_p, top-k and top-p (`lmpg.sampler.sampling_logits`; vLLM's
    processed log-probs, `lmpg.vllm_sampler`). With none of them on but the temperature, lmpg's
    sampler's q is pi_old's own softmax(z / temperature); otherwise the trainer compares q with pi_old
    (`lmpg.mismatch`)."""


class TurnSampler(Protocol):
    """What the episode loop generates turns with (module docstring)."""

    def start(self, seeds: list[int]) -> None:
        """A new batch of B rows; row i draws from its own random stream seeded by seeds[i],
        continued over that row's turns."""

    def sample(self, rows: list[int], histories: list[list[int]], max_new_tokens: list[int]) -> list[SampledTurn]:
        """For each live row (an index into the started batch): its next turn after histories[j]
        (the row's whole token history: prompt tokens, no padding, then everything after), at most
        max_new_tokens[j] tokens."""

    def finish(self) -> None:
        """Drop the batch's caches."""


class LmpgTurnSampler:
    """lmpg's own sampler for turns: the policy itself, Gumbel-max per-row streams, the KV cache
    carried across turns.

    It keeps the cache of the rows it sampled last call, and of each row the tokens that cache
    holds; a row's next history must extend those tokens, and only the suffix is prefilled (the
    previous turn's last token, never fed while sampling, then the environment's tokens). It falls
    back to prefilling every history in full when carry_cache is off, when the cache cannot select
    rows (`batch_select_indices`), or when a history does not extend what the cache holds.
    """

    def __init__(self, model, *, pad_id: int, eos_ids: list[int], temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, carry_cache: bool = True):
        self.model, self.pad_id, self.eos_ids = model, pad_id, list(eos_ids)
        self.temperature, self.carry_cache = temperature, carry_cache
        self.processing = dict(top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
        self.device = next(model.parameters()).device
        self.cache_arg = cache_kwarg(model)
        self.generators: list[torch.Generator] = []
        self._drop_cache()
        self._was_training = None

    def _drop_cache(self) -> None:
        self.past, self.past_mask = None, None  # the KV cache and its (rows, length) attention mask
        self.cached_rows: list[int] = []  # the started-batch row of each cache row
        self.cached_ids: dict[int, list[int]] = {}  # per row, the tokens its cache row holds

    def start(self, seeds: list[int]) -> None:
        self.generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        self._drop_cache()
        self._was_training = self.model.training
        self.model.eval()

    def finish(self) -> None:
        self._drop_cache()
        if self._was_training is not None:
            self.model.train(self._was_training)
            self._was_training = None

    def _cache_extends(self, rows: list[int], histories: list[list[int]]) -> bool:
        """The cache holds a proper prefix of every row's history (so the suffix can be fed on it)."""
        if not self.carry_cache or self.past is None or not hasattr(self.past, "batch_select_indices"):
            return False
        for r, h in zip(rows, histories):
            held = self.cached_ids.get(r)
            if held is None or len(h) <= len(held) or h[:len(held)] != held:
                return False
        return True

    @torch.no_grad()
    def sample(self, rows: list[int], histories: list[list[int]], max_new_tokens: list[int]) -> list[SampledTurn]:
        if self._cache_extends(rows, histories):
            keep = torch.tensor([self.cached_rows.index(r) for r in rows], device=self.device)
            self.past.batch_select_indices(keep)
            self.past_mask = self.past_mask[keep]
            blocks = [h[len(self.cached_ids[r]):] for r, h in zip(rows, histories)]
        else:
            self.past, self.past_mask = None, None
            blocks = histories
        tokens, logps = self._generate(blocks, [self.generators[r] for r in rows], max_new_tokens, histories)
        # a row's last sampled token is never fed: the cache holds its history and the rest of its turn
        self.cached_rows = list(rows)
        self.cached_ids = {r: h + t[:-1] if t else list(h) for r, h, t in zip(rows, histories, tokens)}
        return [SampledTurn(t, lp) for t, lp in zip(tokens, logps)]

    def _generate(self, blocks: list[list[int]], generators: list[torch.Generator], budget: list[int],
                  histories: list[list[int]]):
        """One turn for the given rows: feed each row's new tokens (left padded) on the cache, then
        sample until every row has its EOS or its token budget. Returns per row the sampled tokens
        and their log-probs under q (`lmpg.sampler.sampling_logits`; the repetition penalty counts
        every token of the row's whole history, as vLLM counts a request's prompt); leaves the cache and its attention mask (pads
        and finished rows' columns masked out) in self.past / self.past_mask for the next turn."""
        device, pad, model, past, past_mask = self.device, self.pad_id, self.model, self.past, self.past_mask
        eos = torch.tensor(self.eos_ids, device=device)
        n = len(blocks)
        W = max(len(b) for b in blocks)
        block = torch.full((n, W), pad, dtype=torch.long, device=device)
        block_mask = torch.zeros(n, W, dtype=torch.long, device=device)
        for j, b in enumerate(blocks):
            block[j, W - len(b):] = torch.tensor(b, dtype=torch.long, device=device)
            block_mask[j, W - len(b):] = 1
        cached = past_mask.sum(1, keepdim=True) if past_mask is not None else torch.zeros(n, 1, dtype=torch.long,
                                                                                           device=device)
        positions = (cached + block_mask.cumsum(1) - 1).clamp(min=0)
        mask = block_mask if past_mask is None else torch.cat([past_mask, block_mask], 1)
        kwargs = {self.cache_arg: past} if past is not None else {}
        out = model(input_ids=block, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                    **kwargs)
        past = returned_cache(out)
        logits = out.logits[:, -1, :]
        next_position = positions[:, -1:] + 1
        budget_t = torch.tensor(budget, device=device)
        finished = budget_t <= 0
        tokens, logps = [[] for _ in range(n)], [[] for _ in range(n)]
        seen = seen_tokens(histories, logits.shape[-1], device) if self.processing["repetition_penalty"] != 1.0 else None
        step = 0
        while not bool(finished.all()):
            y = sampling_logits(logits, temperature=self.temperature, seen=seen, **self.processing)  # (n, V)
            noise = gumbel_noise(generators, y.shape[-1], device)
            token = torch.argmax(y + noise, dim=-1)
            logp = torch.log_softmax(y, dim=-1).gather(1, token.unsqueeze(1)).squeeze(1)
            for j in (~finished).nonzero().flatten().tolist():
                tokens[j].append(int(token[j]))
                logps[j].append(float(logp[j]))
            step += 1
            was_live = ~finished
            if seen is not None:
                seen[torch.arange(n, device=device), token] |= was_live
            finished = finished | torch.isin(token, eos) | (step >= budget_t)
            feed = was_live & ~finished  # a row's last token (its EOS) is not fed: the next turn feeds it
            if bool(finished.all()):
                break
            mask = torch.cat([mask, feed.long().unsqueeze(1)], 1)
            out = model(input_ids=torch.where(feed, token, torch.full_like(token, pad)).unsqueeze(1),
                        attention_mask=mask, position_ids=next_position, use_cache=True, **{self.cache_arg: past})
            past = returned_cache(out)
            logits = out.logits[:, -1, :]
            next_position = next_position + feed.long().unsqueeze(1)
        self.past, self.past_mask = past, mask
        return tokens, logps


def engine_sampler(config, policy, tokenizer, eos_ids: list[int], *, max_sequences: int, max_model_len: int,
                   workdir) -> TurnSampler | None:
    """The inference-engine sampler `config.sampler` names, built from the policy; None for lmpg's own
    samplers ('lmpg', 'generate'), which read the policy directly."""
    if config.sampler != "vllm":
        return None
    from lmpg.vllm_sampler import VllmSampler

    return VllmSampler(policy, tokenizer, eos_ids=eos_ids, temperature=config.temperature, top_p=config.top_p,
                       top_k=config.top_k, min_p=config.min_p, repetition_penalty=config.repetition_penalty,
                       trust_remote_code=config.trust_remote_code, max_model_len=config.vllm_max_model_len or max_model_len,
                       max_sequences=max_sequences, workdir=workdir, seed=config.seed,
                       memory_utilization=config.vllm_gpu_memory_utilization, dtype=config.vllm_dtype,
                       enforce_eager=config.vllm_enforce_eager, sleep_mode=config.vllm_enable_sleep_mode)
