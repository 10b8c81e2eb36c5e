"""DAPO's dynamic sampling on the default recipe: held-out accuracy at equal wall time and at equal
sampled tokens, with it off and on.

    python benchmarks/bench_dynamic_sampling.py [--seeds 0 1 2] [--iterations 40] [--eval-every 5] \
        [--json out.json] [key=value ...]

For each seed, the recipe's steps 1-5 (`recipes/addition_cpu.py --fast`: a tiny Llama, 2-digit sums,
the imitation warm start) run once; then RL runs twice from that same warm start, with
`dynamic_sampling` false and true (same seed, so round 0 of every iteration draws the same prompts
order; everything else the recipe's YAML and --fast overrides, plus key=value), the two runs
alternating in one process. Every `--eval-every` iterations the held-out accuracy is measured
(greedy and one sample at temperature 1, the recipe's `measure`) outside the timed part. A run's
clock is the wall time of its `PGTrainer.step` calls; its tokens are the policy tokens it sampled
(dynamic sampling's extra rounds included). The table reads each run's accuracy at the last
evaluation within a budget: the smaller of the two runs' final times (and half of it), and the
smaller of their final token counts (and half).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from addition_cpu import ALPHABET, FAST_OVERRIDES, AdditionRecipe, measure  # noqa: E402

from lmpg import PGTrainer  # noqa: E402
from lmpg.recipe import split_settings  # noqa: E402
from lmpg.sft import imitation_warm_start  # noqa: E402
from lmpg.tasks import addition  # noqa: E402
from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm  # noqa: E402
from reward_fns import exact_match  # noqa: E402

# the runs compared from each warm start: PGConfig overrides
MODES = {"off": dict(dynamic_sampling=False),
         "on": dict(dynamic_sampling=True),  # extra rounds of a batch's worth of prompts, as DAPO
         "on, M=4": dict(dynamic_sampling=True, dynamic_sampling_round_prompts=4)}
FRACTIONS = (0.25, 0.5, 1.0)


def rl_curve(model, tokenizer, recipe, config, train, heldout, eval_every: int) -> list[dict]:
    """RL from `model` for config.iterations iterations: a point per evaluation (iteration, seconds
    and sampled tokens so far, held-out accuracy, and dynamic sampling's figures since the last one)."""
    trainer = PGTrainer(model, [exact_match], datasets.Dataset.from_dict(addition.problem_columns(train)), config,
                        tokenizer=tokenizer)
    trainer.prepare_run_dir()
    policy = trainer.accelerator.unwrap_model(trainer.model)
    seconds, tokens, points, window = 0.0, 0, [], []
    points.append({"iteration": 0, "seconds": 0.0, "tokens": 0, **measure(policy, tokenizer, heldout,
                                                                           recipe.eval_batch_size, config.seed)})
    try:
        while trainer.iteration < config.iterations:
            start = time.perf_counter()
            result = trainer.step()
            seconds += time.perf_counter() - start
            m = result.metrics
            tokens += m.get("dynamic_sampling/sampled_tokens", result.batch.num_tokens)
            window.append(m)
            if trainer.iteration % eval_every == 0 or trainer.iteration == config.iterations:
                point = {"iteration": trainer.iteration, "seconds": seconds, "tokens": tokens,
                         **measure(policy, tokenizer, heldout, recipe.eval_batch_size, config.seed),
                         "reward_mean": statistics.fmean(w["reward_mean"] for w in window),
                         "zero_spread_group_frac": statistics.fmean(w["zero_spread_group_frac"] for w in window)}
                if config.dynamic_sampling:
                    for key in ("extra_rounds", "spread_frac", "short_groups"):
                        point[key] = statistics.fmean(w[f"dynamic_sampling/{key}"] for w in window)
                points.append(point)
                window = []
    finally:
        if trainer.scorer is not None:
            trainer.scorer.close()
    return points


def at_budget(points: list[dict], axis: str, budget: float) -> dict:
    """The last evaluation at or within `budget` of `axis` (seconds or tokens)."""
    return [p for p in points if p[axis] <= budget * (1 + 1e-9)][-1]


def run_seed(seed: int, iterations: int, eval_every: int, overrides: list[str], workdir: Path) -> dict:
    recipe, config = split_settings(AdditionRecipe, ROOT / "recipes" / "addition_cpu.yaml",
                                    FAST_OVERRIDES + [f"seed={seed}", f"iterations={iterations}"] + overrides)
    torch.set_num_threads(recipe.num_threads)
    tokenizer = make_char_tokenizer(ALPHABET)
    model = make_tiny_causal_lm(tokenizer, n_layer=recipe.n_layer, n_embd=recipe.n_embd, n_head=recipe.n_head,
                                seed=seed)
    train, heldout = addition.make_problems(recipe.n_train, recipe.n_heldout, recipe.n_digits, seed=seed)
    start = time.perf_counter()
    demonstrations = addition.sample_demonstrations(train, recipe.forget_probability, seed=seed)
    imitation_warm_start(model, tokenizer, [p.prompt for p in train], demonstrations, steps=recipe.sft_steps,
                         batch_size=recipe.sft_batch_size, lr=recipe.sft_learning_rate, seed=seed)
    warm_state = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"seed {seed}: warm start in {time.perf_counter() - start:.0f} s", flush=True)
    curves = {}
    for mode, overrides in MODES.items():
        policy = make_tiny_causal_lm(tokenizer, n_layer=recipe.n_layer, n_embd=recipe.n_embd, n_head=recipe.n_head,
                                     seed=seed)
        policy.load_state_dict(warm_state)
        run_config = dataclasses.replace(config, output_dir=str(workdir / f"seed{seed}-{len(curves)}"), **overrides,
                                         log_every=10**6, overwrite_output_dir=True)
        curves[mode] = rl_curve(policy, tokenizer, recipe, run_config, train, heldout, eval_every)
        last = curves[mode][-1]
        print(f"seed {seed} dynamic_sampling {mode}: {last['iteration']} iterations, {last['seconds']:.1f} s, "
              f"{last['tokens']} tokens, greedy {last['greedy']:.3f}, sampled {last['sampled']:.3f}", flush=True)
    return {"seed": seed, "curves": curves}


def table(results: list[dict]) -> str:
    """Markdown: per budget, each run's held-out accuracy (greedy, mean over seeds and each seed's),
    then what an iteration of each run cost."""
    modes = list(MODES)
    lines = ["| budget (per seed) | " + " | ".join(f"dynamic_sampling {m}" for m in modes) + " |",
             "| --- |" + " --- |" * len(modes)]
    for axis, unit in (("seconds", "s"), ("tokens", "tokens")):
        for fraction in FRACTIONS:
            budgets = [fraction * min(r["curves"][m][-1][axis] for m in modes) for r in results]
            cells = []
            for m in modes:
                points = [at_budget(r["curves"][m], axis, b) for r, b in zip(results, budgets)]
                greedy = [p["greedy"] for p in points]
                cells.append(f"{statistics.fmean(greedy):.3f} ({' '.join(f'{g:.3f}' for g in greedy)}; "
                             f"it {' '.join(str(p['iteration']) for p in points)})")
            lines.append(f"| {fraction:g} × least final {axis} ({', '.join(f'{b:.0f}' for b in budgets)} {unit}) | "
                         + " | ".join(cells) + " |")
    lines += ["", "| per iteration (mean over seeds and iterations) | " + " | ".join(modes) + " |",
              "| --- |" + " --- |" * len(modes)]
    finals = {m: [r["curves"][m][-1] for r in results] for m in modes}
    rows = {"seconds": lambda ps: statistics.fmean(p["seconds"] / p["iteration"] for p in ps),
            "sampled tokens": lambda ps: statistics.fmean(p["tokens"] / p["iteration"] for p in ps),
            "greedy accuracy at the end": lambda ps: statistics.fmean(p["greedy"] for p in ps)}
    for name, value in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{value(finals[m]):.3g}" for m in modes) + " |")
    for key in ("zero_spread_group_frac", "extra_rounds", "spread_frac", "short_groups"):
        cells = []
        for m in modes:
            values = [p[key] for r in results for p in r["curves"][m][1:] if key in p]
            cells.append(f"{statistics.fmean(values):.3g}" if values else "—")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=80)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--json", default=None, help="write every evaluation point here")
    ap.add_argument("overrides", nargs="*", help="key=value: a PGConfig or AdditionRecipe field")
    args = ap.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lmpg-bench-ds-") as workdir:
        results = [run_seed(s, args.iterations, args.eval_every, args.overrides, Path(workdir)) for s in args.seeds]
    print(f"\nload average before: {load[0]:.1f}, after: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load_before": load, "load_after": os.getloadavg(),
                                               "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
