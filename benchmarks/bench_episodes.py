"""Multi-turn sampling with the KV cache carried across turns vs a full prefill every turn.

    python benchmarks/bench_episodes.py [--turns 8] [--tokens 16] [--batch 32] [--repeats 5]

A tiny Llama (4 layers, 256 wide, random weights with EOS biased so turns end after ~tokens/2) plays
a step-API game that answers each turn with a 24-character observation for `--turns` turns. Both
variants sample the very same episodes (checked); they alternate in one process (A B A B ...), and
the median wall time of each is printed with the speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmpg.environments import EpisodeEnv
from lmpg.episodes import EpisodeLimits, sample_episodes
from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm


class Chatter:
    def reset(self, **row):
        self.turn = 0
        return None

    def step(self, action):
        self.turn += 1
        return "ab" * 12, 0.0, False


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = make_char_tokenizer("ab0123456789+= ", model_max_length=1024)
    model = make_tiny_causal_lm(tok, n_layer=4, n_embd=256, n_head=4, max_position_embeddings=1024, seed=0)
    model.lm_head.register_forward_hook(lambda m, i, o: o + 4.0 * (torch.arange(o.shape[-1]) == tok.eos_token_id))
    prompts = ["12+34=" * 8] * (args.batch // 4)
    limits = EpisodeLimits(args.turns, args.tokens, 10_000)

    def run(carry):
        t0 = time.perf_counter()
        out = sample_episodes(model, tok, prompts, [{}] * len(prompts), lambda: EpisodeEnv(Chatter()), 4,
                              seeds=list(range(args.batch)), env_seeds=[0] * len(prompts), limits=limits,
                              eos_ids=[tok.eos_token_id], carry_cache=carry)
        return time.perf_counter() - t0, out

    times = {True: [], False: []}
    ref = None
    for _ in range(args.repeats):
        for carry in (True, False):
            seconds, out = run(carry)
            times[carry].append(seconds)
            ref = out.completion_ids if ref is None else ref
            assert torch.equal(out.completion_ids, ref), "both variants must sample the same episodes"
    turns = sum(e.turns for e in out.episodes) / len(out.episodes)
    tokens = int(out.completion_mask.sum())
    a, b = statistics.median(times[True]), statistics.median(times[False])
    print(f"{args.batch} episodes, {turns:.1f} turns each, {tokens} tokens after the prompts, "
          f"{args.threads} thread(s), {args.repeats} alternating repeats")
    print(f"cache across turns   {a:.2f} s (median)")
    print(f"prefill every turn   {b:.2f} s (median)")
    print(f"speed-up             {b / a:.2f}x")


if __name__ == "__main__":
    main()
