"""The one sampling interface of lmpg: token-in, token-out turns for many sequences.

Single completions and multi-turn episodes generate through a `TurnSampler`: lmpg's own KV-cache
sampler or an inference engine (`lmpg.vllm_sampler`), interchangeably.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class SampledTurn:
    token_ids: list[int]
    """The sampled tokens; ends with an EOS id unless the budget ran out."""
    logp: list[float]
    """log q(a_t | s_t) of each token under the distribution the sampler drew it from."""


class TurnSampler(Protocol):
    def start(self, seeds: list[int]) -> None:
        """A new batch of B rows; row i draws from its own random stream seeded by seeds[i], continued
        over that row's turns."""

    def sample(self, rows: list[int], histories: list[list[int]], max_new_tokens: list[int]) -> list[SampledTurn]:
        """For each live row (an index into the started batch): its next turn after histories[j], the
        row's whole token history (prompt tokens, no padding, then everything after), at most
        max_new_tokens[j] tokens."""

    def finish(self) -> None:
        """Drop the batch's caches."""


def engine_sampler(config, policy, tokenizer, eos_ids: list[int], *, max_sequences: int, max_model_len: int,
                   workdir) -> TurnSampler | None:
    """The inference-engine sampler `config.sampler` names, built from the policy; None for lmpg's own
    samplers ('lmpg', 'generate'), which read the policy directly."""
    if config.sampler != "vllm":
        return None
    from lmpg.vllm_sampler import VllmSampler

    return VllmSampler(policy, tokenizer, eos_ids=eos_ids, temperature=config.temperature, top_p=config.top_p,
                       top_k=config.top_k, max_model_len=config.vllm_max_model_len or max_model_len,
                       max_sequences=max_sequences, workdir=workdir, seed=config.seed,
                       memory_utilization=config.vllm_gpu_memory_utilization, dtype=config.vllm_dtype,
                       enforce_eager=config.vllm_enforce_eager, sleep_mode=config.vllm_enable_sleep_mode)
