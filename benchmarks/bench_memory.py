"""Peak memory of an lmpg run: LoRA adapters vs full fine-tuning of the same model.

    python benchmarks/bench_memory.py                                # CPU: W2 and M built from a config
    python benchmarks/bench_memory.py --size M --modes full,lora --iters 1
    python benchmarks/bench_memory.py --model Qwen/Qwen2.5-0.5B-Instruct --mixed-precision bf16   # a GPU
    python benchmarks/bench_memory.py --quick                        # smoke test, seconds

Each (model, mode) runs in a fresh Python process: build the model, then `PGTrainer.step()` `--iters`
times on the iteration of benchmarks/bench_iteration.py (8 prompts x G=4 completions of exactly 32
tokens, two epochs of one minibatch, AdamW, EOS suppressed so every run does the same work).

Modes:
- full: every weight trains (AdamW keeps two fp32 moments per weight, plus its gradient);
- lora: peft LoRA r=16, alpha 16 on every linear layer; only the adapters train;
- full-kl / lora-kl: the same with kl_coef=0.05: full fine-tuning keeps a frozen copy of the model as
  pi_ref, LoRA uses the model with its adapter disabled (no copy);
- full-gc / lora-gc: with gradient checkpointing.

What is reported:
- on a GPU, `torch.cuda.max_memory_allocated()` over the run (everything the process allocated through
  torch: weights, gradients, optimizer state, activations, KV cache), and the same less what the
  loaded model already held;
- on a CPU, the peak resident set size (VmHWM, reset once the model is built) and the same less the
  resident size at that point, so imports and the model's own weights count in the first figure only.
  The workers run with MALLOC_MMAP_THRESHOLD_=65536: glibc then maps every block of 64 KiB or more
  (every tensor that matters) on its own and unmaps it when freed, so the resident size follows the
  live tensors. With glibc's default, freed activations stay in the heap and tensors allocated later
  (AdamW's moments) reuse them: the peak then shows the heap's high-water mark, and a W2 run measured
  LoRA and full fine-tuning level (1101 vs 984 MB) where the live tensors differ by 260 MB.
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

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402  (the iteration benchmarks' model, prompts, reward, memory probes)

SIZES = {"quick": (1, 64, 2), "W2": (7, 512, 8), "M": (12, 768, 12)}  # layers, width, heads (V = 4096)
MODES = ("full", "lora", "full-kl", "lora-kl", "full-gc", "lora-gc")
DEFAULT_MODES = ("full", "lora", "full-kl", "lora-kl")
MMAP_THRESHOLD = 65536  # bytes; see the module docstring


def build(size: str, model_name: str | None):
    """(model, tokenizer): `model_name` from the hub / a path, else a Llama of `size` from a config."""
    from lmpg.tiny import suppress_eos

    if model_name:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_name, padding_side="left")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32)
    else:
        from lmpg.tiny import make_tiny_causal_lm, make_word_tokenizer

        tok = make_word_tokenizer(workload.VOCAB_SIZE)
        n_layer, n_embd, n_head = SIZES[size]
        model = make_tiny_causal_lm(tok, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                    max_position_embeddings=256, seed=0)
    suppress_eos(model, tok.eos_token_id)
    return model, tok


def worker(size: str, model_name: str | None, mode: str, iters: int, mixed_precision: str) -> dict:
    """One mode in this process: the measurements as a dict."""
    import datasets

    from lmpg import PGConfig, PGTrainer

    torch.set_num_threads(workload.NUM_THREADS)
    cuda = torch.cuda.is_available()
    model, tok = build(size, model_name)
    params = sum(p.numel() for p in model.parameters())
    if cuda:
        model.to("cuda")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        base = workload.rss_mb()
        if not workload.reset_peak_rss():
            raise SystemExit("cannot reset the peak RSS mark (/proc/self/clear_refs); run on Linux")
    w = workload.Workload()
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as out_dir:
        config = PGConfig(
            output_dir=os.path.join(out_dir, "run"), seed=0, iterations=10**6, batch_size=w.batch_size,
            group_size=w.group_size, max_new_tokens=w.max_new_tokens, temperature=1.0, epochs_per_batch=w.epochs,
            learning_rate=w.learning_rate, baseline="group_mean", adv_norm="group", loss_agg="token_mean",
            kl_coef=0.05 if mode.endswith("-kl") else 0.0, lora_r=16 if mode.startswith("lora") else 0,
            lora_alpha=16.0, gradient_checkpointing=mode.endswith("-gc"), mixed_precision=mixed_precision,
            sample_log_every=0, progress_bar=False, grad_snr=False)
        dataset = datasets.Dataset.from_list([{"prompt": p} for p in workload.make_prompts()])
        trainer = PGTrainer(model, [workload.reward_sevens], dataset, config, tokenizer=tok)
        trainer.prepare_run_dir()
        for _ in range(iters):
            trainer.step()
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = workload.vm_hwm_mb()
    return {"model": model_name or size, "mode": mode, "device": "cuda" if cuda else "cpu",
            "mixed_precision": mixed_precision, "iters": iters, "params": params, "trainable_params": trainable,
            "base_mb": base, "peak_mb": peak, "peak_over_base_mb": peak - base,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "torch": torch.__version__}


def run_in_subprocess(size, model_name, mode, iters, mixed_precision) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--modes", mode, "--size", size,
               "--iters", str(iters), "--mixed-precision", mixed_precision, "--json", f.name]
        if model_name:
            cmd += ["--model", model_name]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        subprocess.run(cmd, check=True, env=env)
        return json.loads(Path(f.name).read_text())


def markdown_table(rows: list[dict]) -> str:
    full = {r["model"]: r for r in rows if r["mode"] == "full"}
    lines = ["| model | mode | device | params | trainable | peak MB | peak over model-loaded MB | vs full |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = full.get(r["model"])
        ratio = f"{r['peak_over_base_mb'] / ref['peak_over_base_mb']:.2f}" if ref else "-"
        lines.append(f"| {r['model']} | {r['mode']} | {r['device']} | {r['params'] / 1e6:.1f}M | "
                     f"{r['trainable_params'] / 1e6:.2f}M | {r['peak_mb']:.0f} | {r['peak_over_base_mb']:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="W2,M", help=f"models built from a config: {', '.join(SIZES)}")
    ap.add_argument("--model", default=None, help="a hub name or local path instead of --size")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"any of {', '.join(MODES)}")
    ap.add_argument("--iters", type=int, default=2, help="PGTrainer.step() calls per mode")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    ap.add_argument("--quick", action="store_true", help="the quick model, full and lora, one iteration")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.size, a.modes, a.iters = "quick", "full,lora", 1
    modes = a.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    sizes = [None] if a.model else a.size.split(",")
    unknown += [s for s in sizes if s is not None and s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown --modes/--size {', '.join(unknown)}; modes: {', '.join(MODES)}; "
                         f"sizes: {', '.join(SIZES)}")
    if a.worker:
        result = worker(sizes[0] or "", a.model, modes[0], a.iters, a.mixed_precision)
        Path(a.json).write_text(json.dumps(result))
        return [result]
    rows = [run_in_subprocess(s or "", a.model, m, a.iters, a.mixed_precision) for s in sizes for m in modes]
    print(markdown_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
