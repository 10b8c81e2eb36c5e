"""group_mean vs optimal (and optimal_token) baselines: gradient SNR and reward curve, same seeds.

    python benchmarks/bench_baselines.py                         # 3 seeds, both tasks
    python benchmarks/bench_baselines.py --seeds 0,1,2,3 --baselines group_mean,optimal,optimal_token

Two tasks, each run once per (seed, baseline), the baselines interleaved seed by seed so that they
share the machine's conditions:

1. addition: the default recipe (recipes/addition_cpu.py) in its --fast form (2-digit sums, a warm
   start by imitation, then 40 RL iterations of 128 completions, G = 8), with micro_batch_size=32 so
   the first epoch has 4 micro-batch gradients to estimate the SNR from;
2. count_a: the tiny model of the tests from scratch (1 layer, 32 wide), reward = share of 'a'
   among 8 characters, completions of up to 8 tokens (lengths vary: EOS can come at any step),
   30 iterations of 32 completions, G = 8, micro_batch_size=8.

Per run: the mean over iterations of grad_snr (lmpg.diagnostics: ||g_bar||^2 / (tr Sigma / J) from
the J micro-batch gradients; higher is better) and of grad_sq_norm_cv (how unequal the weights are),
the reward of the first and the last 5 iterations, and for addition the held-out accuracy of the RL
policy. Printed as a table and written to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes"))

import datasets  # noqa: E402
import torch  # noqa: E402

from lmpg import PGConfig, PGTrainer  # noqa: E402
from lmpg.metrics import read_jsonl  # noqa: E402
from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm  # noqa: E402


def count_a(prompts, completions, **kwargs):
    """Share of 'a' characters among 8 (the tests' reward)."""
    return [c.count("a") / 8 for c in completions]


def run_addition(seed: int, baseline: str, out: Path) -> dict:
    import addition_cpu

    result = addition_cpu.main(["--fast", f"seed={seed}", f"baseline={baseline}", "grad_snr=true",
                                "micro_batch_size=32", "log_every=1000", "--output-dir", str(out)])
    return {"metrics": read_jsonl(out / "metrics.jsonl"), "heldout": result["accuracy"]["rl_policy"],
            "warm_start": result["accuracy"]["warm_start"]}


def run_count_a(seed: int, baseline: str, out: Path) -> dict:
    tokenizer = make_char_tokenizer("0123456789+=ab ")
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=seed)
    prompts = datasets.Dataset.from_list([{"prompt": f"{i}+{i}="} for i in range(48)])
    config = PGConfig(output_dir=str(out), seed=seed, iterations=30, batch_size=32, group_size=8,
                      max_new_tokens=8, learning_rate=3e-3, micro_batch_size=8, baseline=baseline,
                      grad_snr=True, sample_log_every=0, log_every=1000, progress_bar=False)
    PGTrainer(model, [count_a], prompts, config, tokenizer=tokenizer).train()
    return {"metrics": read_jsonl(out / "metrics.jsonl")}


TASKS = {"addition": run_addition, "count_a": run_count_a}


def summarise(run: dict) -> dict:
    m = run["metrics"]
    snr = [r["grad_snr"] for r in m if r.get("grad_snr") is not None]
    cv = [r["grad_sq_norm_cv"] for r in m if "grad_sq_norm_cv" in r]
    row = {"grad_snr_mean": statistics.fmean(snr) if snr else float("nan"),
           "grad_snr_median": statistics.median(snr) if snr else float("nan"),
           "reward_first": m[0]["reward_mean"],
           "reward_last5": statistics.fmean(r["reward_mean"] for r in m[-5:]),
           "reward_curve": [round(r["reward_mean"], 4) for r in m],
           "weight_cv_mean": statistics.fmean(cv) if cv else None}
    if "heldout" in run:
        row["heldout_greedy"] = run["heldout"]["greedy"]
        row["heldout_sampled"] = run["heldout"]["sampled"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--baselines", default="group_mean,optimal")
    parser.add_argument("--tasks", default="addition,count_a")
    parser.add_argument("--out", default="bench_baselines.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    baselines = args.baselines.split(",")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            for seed in seeds:
                for baseline in baselines:  # interleaved: the baselines of one seed run back to back
                    t0 = time.perf_counter()
                    run = TASKS[task](seed, baseline, Path(tmp) / f"{task}_{baseline}_{seed}")
                    row = summarise(run) | {"seconds": time.perf_counter() - t0}
                    results.setdefault(task, {}).setdefault(baseline, {})[seed] = row
                    print(f"{task} seed {seed} {baseline}: snr {row['grad_snr_mean']:.3f} reward "
                          f"{row['reward_first']:.3f} -> {row['reward_last5']:.3f} ({row['seconds']:.0f} s)", flush=True)
                    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print("\n| task | baseline | grad_snr (mean over iterations; per seed) | reward first -> last 5 (per seed) | held-out greedy |")
    print("| --- | --- | --- | --- | --- |")
    for task, by_baseline in results.items():
        for baseline, by_seed in by_baseline.items():
            rows = list(by_seed.values())
            snr = " / ".join(f"{r['grad_snr_mean']:.2f}" for r in rows)
            rew = " / ".join(f"{r['reward_first']:.3f}->{r['reward_last5']:.3f}" for r in rows)
            acc = " / ".join(f"{r['heldout_greedy']:.3f}" for r in rows) if "heldout_greedy" in rows[0] else "-"
            print(f"| {task} | {baseline} | {statistics.fmean(r['grad_snr_mean'] for r in rows):.2f} ({snr}) | "
                  f"{rew} | {acc} |")


if __name__ == "__main__":
    main()
