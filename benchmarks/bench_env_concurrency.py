"""Environment time per turn when the live episodes' environment calls run together vs one after another.

    python benchmarks/bench_env_concurrency.py [--episodes 64] [--sleep 1.0] [--workers 1 8 0]

A TRL-shaped environment whose one tool sleeps `--sleep` seconds (an API call, a sandbox): every
episode's policy calls it in its first turn and answers in its second, so each batch has one turn
of tool calls. The turns are fixed tokens (a `TurnSampler` that writes them, `lmpg.generation`),
so the time measured is the environment's: `time_env`, the sum of the episodes' `env_seconds`
(their shares of the wall time spent in environment code), for each `--workers` setting
(`env_workers`; 0: None, all live episodes at once).
"""

from __future__ import annotations

import argparse
import time

from lmpg.environments import EpisodeEnv
from lmpg.episodes import EpisodeLimits, sample_episodes
from lmpg.generation import SampledTurn
from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm

SLEEP = [1.0]


class SlowTool:
    def reset(self, **row):
        return None

    def wait(self, x: int) -> int:
        """
        Sleep, then answer.

        Args:
            x: anything.
        """
        time.sleep(SLEEP[0])
        return x


class FixedTurns:
    """Turn k of every episode is turns[k]."""

    def __init__(self, turns):
        self.turns, self.k = turns, 0

    def start(self, seeds):
        self.k = 0

    def sample(self, rows, histories, max_new_tokens):
        turn = self.turns[self.k]
        self.k += 1
        return [SampledTurn(list(turn), [0.0] * len(turn)) for _ in rows]

    def finish(self):
        pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--sleep", type=float, default=1.0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 8, 0])
    args = p.parse_args()
    SLEEP[0] = args.sleep
    tok = make_char_tokenizer("wait(1)0123456789")
    model = make_tiny_causal_lm(tok, n_layer=1, n_embd=16, n_head=2, seed=0)
    eos = tok.eos_token_id
    turns = [tok.encode("wait(1)", add_special_tokens=False) + [eos], tok.encode("1", add_special_tokens=False) + [eos]]
    G = 4
    prompts = ["1"] * (args.episodes // G)
    print(f"{args.episodes} episodes, one turn of tool calls each, the tool sleeps {args.sleep:g} s")
    for workers in args.workers:
        t0 = time.perf_counter()
        out = sample_episodes(model, tok, prompts, [{}] * len(prompts), lambda: EpisodeEnv(SlowTool(), "simple"), G,
                              seeds=list(range(args.episodes)), env_seeds=[0] * len(prompts),
                              limits=EpisodeLimits(2, 8), eos_ids=[eos], turn_sampler=FixedTurns(turns),
                              env_workers=workers or None, env_timeout=None)
        wall = time.perf_counter() - t0
        assert all(e.tool_calls == 1 and e.tool_errors == 0 for e in out.episodes)
        time_env = sum(e.env_seconds for e in out.episodes)
        name = "all at once (None)" if not workers else f"{workers} at once"
        print(f"env_workers {name:<20} time_env {time_env:7.2f} s per turn of tool calls (wall {wall:.2f} s)")


if __name__ == "__main__":
    main()
