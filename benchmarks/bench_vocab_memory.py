"""Memory and time at a real vocabulary: lmpg with chunked log-probs, lmpg with full logits, TRL, the floor.

    python benchmarks/bench_vocab_memory.py                       # Qwen2.5-0.5B shape: 16 x 32 tokens, then T growth
    python benchmarks/bench_vocab_memory.py --shape 1.5B           # Qwen2.5-1.5B's shape (not run by default)
    python benchmarks/bench_vocab_memory.py --no-growth --rounds 2
    python benchmarks/bench_vocab_memory.py --quick                # smoke test: a tiny Qwen2, seconds
    python benchmarks/bench_vocab_memory.py --impl lmpg-gc,trl-gc --main-T 512 --main-warmup 0 --no-growth

The model is a Qwen2 built from a config with Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads /
2 KV heads, intermediate 4864, vocabulary 151,936, tied embeddings; 494M parameters), random weights,
fp32, 2 CPU threads, on a word-level tokenizer of 151,936 ids. The iteration is
benchmarks/bench_iteration.py's with 4 prompts x G=4 completions of exactly 32 tokens (`--main-T`; EOS
suppressed), two epochs of one minibatch, AdamW, no KL.

Implementations (each in a fresh process, one after another, the order rotated every round):
- lmpg: the library's default, log-probs from the hidden states in chunks of logits_chunk_size=256;
- lmpg-full: the same with the full (B, T, V) logits (logits_chunk_size=0; lmpg before issue 16);
- trl: TRL's GRPOTrainer set up as in bench_iteration.py ("trl" there);
- floor: bench_iteration.py's bare loop (full logits);
- lmpg-gc, trl-gc: lmpg and trl with gradient checkpointing on (not run by default).

Reported per run: seconds per iteration (median of the timed iterations, one warm-up dropped), the
process's peak RSS (ru_maxrss: imports, model, run) and the peak over the RSS before the iterations.
Every worker runs with MALLOC_MMAP_THRESHOLD_=65536 so the resident size follows the live tensors
(benchmarks/bench_memory.py's docstring says why).

Growth with length: 1 prompt x G=4 completions at T = 32, 128, 512, one iteration, lmpg and trl
(`--growth-impls`): the peak RSS over the model-loaded RSS, and its growth per completion token over
the shortest T. One fp32 row of logits is V x 4 B = 0.61 MB at V = 151,936; a token's activations
are a few dozen hidden-size vectors per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/README.md, "the machine"

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_iteration  # noqa: E402
from workload import ModelShape, Workload  # noqa: E402

SHAPES = {
    # Qwen2 configs: layers, hidden, heads, KV heads, intermediate, vocabulary
    "0.5B": ModelShape(24, 896, 14, arch="qwen2", n_kv_head=2, intermediate=4864, vocab_size=151_936),
    "1.5B": ModelShape(28, 1536, 12, arch="qwen2", n_kv_head=2, intermediate=8960, vocab_size=151_936),
    "quick": ModelShape(2, 64, 4, arch="qwen2", n_kv_head=2, intermediate=128, vocab_size=4096),
}
IMPLS = ("lmpg", "lmpg-full", "trl", "floor")  # the default; any of bench_iteration.IMPLS runs
MMAP_THRESHOLD = 65536


def worker(impl: str, shape: str, num_prompts: int, T: int, iters: int, warmup: int) -> dict:
    w = Workload(size=shape, num_prompts=num_prompts, group_size=4, max_new_tokens=T, shape=SHAPES[shape])
    r = bench_iteration.run_worker(impl, w, iters, warmup=warmup)
    r["impl"] = impl
    return r


def run(impl, shape, num_prompts, T, iters, warmup) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--shape", shape, "--prompts",
               str(num_prompts), "--T", str(T), "--iters", str(iters), "--warmup", str(warmup), "--json", f.name]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        subprocess.run(cmd, check=True, env=env)
        r = json.loads(Path(f.name).read_text())[0]
    print(f"  {impl} T={T} B={num_prompts * 4}: {r['s_per_iter']:.1f} s/iter, peak {r['peak_rss_mb']:.0f} MB, "
          f"+iter {r['iter_peak_delta_mb']:.0f} MB (load {r['load_after']:.1f})", file=sys.stderr, flush=True)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="0.5B", choices=list(SHAPES))
    ap.add_argument("--impl", default=",".join(IMPLS))
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the main comparison (order rotated)")
    ap.add_argument("--iters", type=int, default=1, help="timed iterations after one warm-up")
    ap.add_argument("--growth", default="32,128,512", help="T values of the growth runs (4 completions)")
    ap.add_argument("--growth-impls", default="lmpg,trl", help="implementations of the growth runs")
    ap.add_argument("--no-growth", action="store_true")
    ap.add_argument("--main-warmup", type=int, default=1, help="untimed iterations before the timed ones")
    ap.add_argument("--main-T", type=int, default=32, help="completion tokens of the main comparison")
    ap.add_argument("--no-main", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prompts", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--T", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        r = worker(a.worker, a.shape, a.prompts, a.T, a.iters, a.warmup)
        Path(a.json).write_text(json.dumps([r]))
        return
    if a.quick:
        a.shape, a.growth = "quick", "8,16"
    impls = a.impl.split(",")
    for name in {*impls, *a.growth_impls.split(",")} - set(bench_iteration.IMPLS):
        ap.error(f"unknown implementation {name}; choose from {', '.join(bench_iteration.IMPLS)}")
    main_rows, growth_rows = [], []
    if not a.no_main:
        for k in range(a.rounds):
            for impl in impls[k % len(impls):] + impls[:k % len(impls)]:
                main_rows.append(run(impl, a.shape, 4, 8 if a.quick else a.main_T, a.iters, a.main_warmup))
    if not a.no_growth:
        for T in (int(t) for t in a.growth.split(",")):
            for impl in a.growth_impls.split(","):
                growth_rows.append(run(impl, a.shape, 1, T, 1, 0))
    print(table(main_rows, growth_rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"main": main_rows, "growth": growth_rows}, indent=1))


def table(main_rows, growth_rows) -> str:
    import statistics

    lines = []
    if main_rows:
        by = {}
        for r in main_rows:
            by.setdefault(r["impl"], []).append(r)
        med = {i: (statistics.median(x for r in rs for x in r["s_per_iter_all"]),
                   statistics.median(r["peak_rss_mb"] for r in rs),
                   statistics.median(r["iter_peak_delta_mb"] for r in rs)) for i, rs in by.items()}
        trl = med.get("trl") or med.get("trl-gc")  # the TRL row the others are divided by
        lines += ["| impl | s/iter | peak RSS MB | peak over model-loaded MB | time / trl | peak / trl |",
                  "|---|---:|---:|---:|---:|---:|"]
        for i, (s, peak, delta) in med.items():
            ratio = (f"{s / trl[0]:.2f} | {peak / trl[1]:.2f}") if trl else "- | -"
            lines.append(f"| {i} | {s:.1f} | {peak:.0f} | {delta:.0f} | {ratio} |")
    if growth_rows:
        lines += ["", "| impl | T | s/iter | peak RSS MB | peak over model-loaded MB | MB per token over the shortest T |",
                  "|---|---:|---:|---:|---:|---:|"]
        first = {}
        for r in sorted(growth_rows, key=lambda r: r["workload"]["max_new_tokens"]):
            T, delta = r["workload"]["max_new_tokens"], r["iter_peak_delta_mb"]
            T0, delta0 = first.setdefault(r["impl"], (T, delta))
            # 4 completions of T tokens each: the growth per completion token
            per_token = f"{(delta - delta0) / (4 * (T - T0)):.3f}" if T > T0 else "-"
            lines.append(f"| {r['impl']} | {T} | {r['s_per_iter']:.1f} | {r['peak_rss_mb']:.0f} | {delta:.0f} | {per_token} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
