"""The vLLM sampler's figures (issue 21): sampling speed, seconds per iteration, the mismatch.

    python benchmarks/bench_vllm.py sampling                 # tokens/s: lmpg's sampler, HF generate, vLLM
    python benchmarks/bench_vllm.py iteration --shape W2 --new-tokens 512
    python benchmarks/bench_vllm.py mismatch                  # KL and ratio range, fp32 and bf16 engines
    python benchmarks/bench_vllm.py correction                # the weights each sampler_correction mode gives

Models: Qwen2 built from a config (random weights, fp32, word-level tokenizer, no hub), at the shapes
of the issue's table (`SHAPES`); every completion runs to its budget (EOS never stops a sampler:
lmpg's and generate's have no EOS id, vLLM `ignore_eos`), so each sampler makes the same number of
tokens. Threads: 2 (the machine's cores); the engine runs in this process, eager, fp32 unless
stated. Each figure is the best of `--repeats` timed runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402,F401 - sets the environment before torch loads

import torch  # noqa: E402

from workload import ModelShape, load_average, make_model  # noqa: E402

SHAPES = {
    "4x256": ModelShape(4, 256, 4, arch="qwen2", n_kv_head=2, vocab_size=4096),
    "8x512": ModelShape(8, 512, 8, arch="qwen2", n_kv_head=2, vocab_size=4096),
    "0.5B": ModelShape(24, 896, 14, arch="qwen2", n_kv_head=2, intermediate=4864, vocab_size=151_936),
}
CASES = [("4x256", 32, 32), ("8x512", 32, 32), ("8x512", 64, 128), ("8x512", 16, 512), ("0.5B", 16, 32)]
"""(shape, completions, new tokens) of the sampling table: the issue's, and 512-token completions."""


def build(shape_name: str, seed: int = 0):
    """(tokenizer, model) of a SHAPES entry, without the EOS-suppressing bias (vLLM's Qwen2 has no
    output-layer bias); every sampler below is told not to stop at EOS instead."""
    from lmpg.tiny import make_word_tokenizer

    tokenizer = make_word_tokenizer(SHAPES[shape_name].vocab_size)
    return tokenizer, make_model(tokenizer, SHAPES[shape_name], seed=seed, eos_suppressed=False).eval()


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (16,), generator=g).tolist() for _ in range(n)]


def engine(model, tokenizer, *, rows: int, max_len: int, dtype: str | None = None, ignore_eos: bool = True,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    from lmpg.vllm_sampler import VllmSampler

    return VllmSampler(model, tokenizer, eos_ids=[tokenizer.eos_token_id], temperature=temperature, top_p=top_p,
                       top_k=top_k, max_model_len=max_len, max_sequences=rows, workdir=tempfile.mkdtemp(),
                       dtype=dtype, ignore_eos=ignore_eos)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def sampling(args) -> list[dict]:
    from lmpg.sampler import sample_tokens

    rows = []
    for shape_name, n, T in CASES:
        if args.shapes and shape_name not in args.shapes:
            continue
        tokenizer, model = build(shape_name)
        groups = prompts(n // 4, SHAPES[shape_name].vocab_size)
        ids = torch.tensor([p for p in groups for _ in range(4)])
        mask = torch.ones_like(ids, dtype=torch.bool)
        seeds = list(range(len(ids)))

        def lmpg_sampler():
            sample_tokens(model, ids, mask, seeds, max_new_tokens=T, eos_ids=[], pad_id=tokenizer.pad_token_id)

        def hf_generate():
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask.long(), do_sample=True, max_new_tokens=T,
                               min_new_tokens=T, pad_token_id=tokenizer.pad_token_id, top_k=None, top_p=None)

        sampler = engine(model, tokenizer, rows=len(ids), max_len=16 + T + 8)
        histories = ids.tolist()

        def vllm_sampler():
            sampler.start(seeds)
            turns = sampler.sample(list(range(len(ids))), histories, [T] * len(ids))
            sampler.finish()
            assert all(len(t.token_ids) == T for t in turns)

        row = {"shape": shape_name, "completions": n, "new_tokens": T}
        for name, fn in (("lmpg", lmpg_sampler), ("generate", hf_generate), ("vllm", vllm_sampler)):
            row[f"{name}_tok_s"] = round(n * T / best_time(fn, args.repeats), 1)
        row["load"] = load_average()
        print(json.dumps(row), flush=True)
        rows.append(row)
        sampler.close()
        del sampler
    return rows


def iteration(args) -> list[dict]:
    import datasets

    from lmpg import PGConfig, PGTrainer

    tokenizer, _ = build(args.shape)
    texts = [" ".join(f"w{t - 4}" for t in p) for p in prompts(64, SHAPES[args.shape].vocab_size)]
    data = datasets.Dataset.from_dict({"prompt": texts})

    def reward(prompts, completions, **kwargs):
        return [sum(w.endswith("7") for w in c.split()) / max(len(c.split()), 1) for c in completions]

    rows = []
    for sampler in args.samplers:
        _, model = build(args.shape)
        config = PGConfig(output_dir=tempfile.mkdtemp(), overwrite_output_dir=True, iterations=args.iters,
                          batch_size=args.batch, group_size=4, max_new_tokens=args.new_tokens, sampler=sampler,
                          epochs_per_batch=2, learning_rate=1e-5, progress_bar=False, sample_log_every=0,
                          gradient_checkpointing=args.gradient_checkpointing, grad_snr=False)
        trainer = PGTrainer(model, [reward], data, config, tokenizer=tokenizer)
        trainer.train()
        timings = [json.loads(line) for line in (trainer.output_dir / "timings.jsonl").read_text().splitlines()]
        steady = timings[1:] or timings  # the first iteration warms caches up
        mean = {k: sum(t[k] for t in steady) / len(steady) for k in steady[0] if k.startswith("time_")}
        metrics = [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
        row = {"shape": args.shape, "sampler": sampler, "batch": args.batch, "new_tokens": args.new_tokens,
               "s_per_iter": round(mean["time_total"], 2),
               **{k: round(v, 3) for k, v in mean.items() if k != "time_total"},
               "sync_share": round(mean.get("time_sync", 0.0) / mean["time_total"], 4),
               "completion_len_mean": metrics[-1]["completion_len_mean"], "load": load_average()}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if trainer.turn_sampler is not None:
            trainer.turn_sampler.close()
    return rows


def sampled_ratios(model, tokenizer, dtype: str, n: int, T: int, **sampling_kwargs):
    """(log pi_old - log q) (n, T) of n completions sampled by an engine of `dtype` from an fp32 trainer."""
    from lmpg.forward import batch_logprobs  # noqa: F401 - the trainer's own forward below
    from lmpg.rollout import sample_turns

    sampler = engine(model, tokenizer, rows=n, max_len=16 + T + 8, dtype=dtype, **sampling_kwargs)
    ids = torch.tensor([p for p in prompts(n // 4, len(tokenizer)) for _ in range(4)])
    completion_ids, logp_q = sample_turns(sampler, ids, torch.ones_like(ids, dtype=torch.bool), list(range(n)), T,
                                          pad_id=tokenizer.pad_token_id)
    sampler.close()
    with torch.no_grad():
        logits = model(input_ids=torch.cat([ids, completion_ids], 1)).logits[:, ids.shape[1] - 1:-1].float()
    t = sampling_kwargs.get("temperature", 1.0)
    logp_old = torch.log_softmax(logits / t, -1).gather(2, completion_ids.unsqueeze(2)).squeeze(2)
    return logp_old - logp_q


def mismatch(args) -> list[dict]:
    from lmpg.mismatch import mismatch_stats

    rows = []
    for shape_name in args.shapes or ["8x512"]:
        tokenizer, model = build(shape_name)
        for dtype in ("float32", "bfloat16"):
            for label, kw in (("T=1", {}), ("T=0.7, top_p=0.9", {"temperature": 0.7, "top_p": 0.9})):
                log_rho = sampled_ratios(model, tokenizer, dtype, args.rows, args.new_tokens, **kw)
                mask = torch.ones_like(log_rho, dtype=torch.bool)
                stats = mismatch_stats(log_rho, torch.zeros_like(log_rho), mask)
                row = {"shape": shape_name, "engine_dtype": dtype, "sampling": label, "tokens": int(mask.sum()),
                       **{k: float(f"{v:.4g}") for k, v in stats.items()},
                       "seq_log_ratio_abs_max": round(float(log_rho.sum(1).abs().max()), 4)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def correction(args) -> list[dict]:
    """Per mode, on the ratios a bf16 engine gives an fp32 trainer: the weights' effective sample size
    (sum w)^2 / (n sum w^2) over the action tokens (1: no variance added), and the share of the
    weights clamped or zeroed (the estimator's bias)."""
    from lmpg.mismatch import correction_weights

    tokenizer, model = build(args.shapes[0] if args.shapes else "8x512")
    rows = []
    for dtype, kw in (("bfloat16", {}), ("bfloat16", {"temperature": 0.7, "top_p": 0.9})):
        log_rho = sampled_ratios(model, tokenizer, dtype, args.rows, args.new_tokens, **kw)
        mask = torch.ones_like(log_rho, dtype=torch.bool)
        for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
            c_min = 1 / 3 if mode.endswith("mask") else None
            w, stats = correction_weights(log_rho, torch.zeros_like(log_rho), mask, mode=mode, c_max=3.0, c_min=c_min)
            ess = float(w.sum() ** 2 / (w.numel() * (w ** 2).sum()))
            row = {"engine_dtype": dtype, "sampling": kw or "T=1", "new_tokens": args.new_tokens, "mode": mode,
                   "ess_frac": round(ess, 5), "w_min": round(float(w.min()), 4), "w_max": round(float(w.max()), 4),
                   **stats}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=["sampling", "iteration", "mismatch", "correction"])
    ap.add_argument("--shapes", nargs="*", default=None, help="SHAPES names (default: all cases of the task)")
    ap.add_argument("--shape", default="8x512", help="iteration: the model")
    ap.add_argument("--samplers", nargs="*", default=["lmpg", "vllm"], help="iteration: samplers to compare")
    ap.add_argument("--batch", type=int, default=16, help="iteration: completions per iteration")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3, help="iteration: iterations (the first is not counted)")
    ap.add_argument("--rows", type=int, default=32, help="mismatch / correction: completions sampled")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--out", default=None, help="also write the rows as JSON lines here")
    args = ap.parse_args(argv)
    torch.set_num_threads(workload.NUM_THREADS)
    rows = {"sampling": sampling, "iteration": iteration, "mismatch": mismatch, "correction": correction}[args.task](args)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps({"task": args.task, **row}) + "\n")


if __name__ == "__main__":
    main()
