"""GPU check: lmpg's speed and memory at Qwen2.5-0.5B and 1.5B shapes, offline, random weights.

    python benchmarks/bench_gpu.py --out gpu_check          # one GPU, no network: about 7 minutes
    python benchmarks/bench_gpu.py --smoke --out /tmp/x     # the same code path on CPU, tiny shapes, seconds

`benchmarks/gpu_check.sh` runs it on the project's GPU machine (no pip, no hub; see docs/scaling.md).

Models: `Qwen2ForCausalLM` built from the configs of Qwen2.5-0.5B (24 layers, width 896, 14 heads,
2 KV heads, MLP 4864) and Qwen2.5-1.5B (28 layers, 1536, 12 heads, 2 KV heads, MLP 8960), vocabulary
151,936, tied embeddings, bf16 weights (what transformers 5 loads the hub checkpoints as), random
weights (seed 0). The tokenizer is word-level, built in-process with as many ids as the model's
vocabulary; prompts are random words. So speed and memory are those of the real shapes; nothing is
learnt and accuracy is not measured.

Rows, in priority order (each model's rows run until the time budget says the next would not fit;
the rest are listed as skipped, with the reason):

- sample-lmpg / sample-generate: `lmpg.rollout.sample_completions` with lmpg's sampler and with
  transformers' `generate` on the same prompts (B = prompts x G rows, T new tokens), after a short
  warm-up call; sampling tokens/s.
- full, full-gc, lora, lora-gc, full-kl, lora-kl: `PGTrainer.step()` `--iters` times (the first one
  warms up; the figures are the last one's) with the workload below: full fine-tuning or LoRA (r=16,
  alpha 32, every linear layer), `-gc` with gradient checkpointing, `-kl` with kl_coef=0.05 (full
  fine-tuning keeps a frozen copy as pi_ref; LoRA disables its adapter). Seconds per iteration and
  its phases come from the run's timings.jsonl; update tokens/s = completion tokens / time_update
  (the phase after scoring: pi_old / pi_ref forwards where needed, advantages, every epoch's steps).

The workload (defaults; a 0.5B user's GSM8K-style run, recipes/gsm8k_lora.yaml at T=512): 8 prompts of
128 tokens x G=8 = 64 completions of up to 512 tokens (random weights sample EOS with probability
~1/V, so nearly all run to 512), 2 epochs of minibatches of 32, micro-batches of 16, bf16 autocast,
AdamW, clipped token ratios, group-normalised advantages, PGConfig's defaults otherwise (grad_snr on).

Memory (CUDA only): `torch.cuda.max_memory_allocated()` over the row, its peak statistics reset and
the previous row's objects freed before it starts; `weights MB` is what the built model holds.

Output: <out>/gpu_check.json (every figure, the versions, the budget, skipped rows) and
<out>/gpu_check.md (the tables), rewritten after every row so a run stopped early keeps what it did.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workload import reward_sevens  # noqa: E402

from lmpg.tiny import make_word_tokenizer  # noqa: E402

# name: Qwen2Config fields (the published configs of the hub models), vocabulary size
MODELS = {
    "qwen2.5-0.5b": (dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, max_position_embeddings=32768), 151_936),
    "qwen2.5-1.5b": (dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                          num_key_value_heads=2, max_position_embeddings=32768), 151_936),
    "smoke": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256), 1024),
}
SAMPLERS = ("lmpg", "generate")
MODES = ("full", "full-gc", "lora", "lora-gc", "full-kl", "lora-kl")
# rows per model, in priority order: the 1.5B gets the rows that fit what the 0.5B leaves of the budget
DEFAULT_ROWS = {
    "qwen2.5-0.5b": ["sample-lmpg", "sample-generate", *MODES],
    "qwen2.5-1.5b": ["sample-lmpg", "lora-gc", "full-gc", "sample-generate", "lora", "full"],
    "smoke": ["sample-lmpg", "sample-generate", *MODES],
}


@dataclass
class Workload:
    num_prompts: int = 8
    group_size: int = 8
    """G: completions per prompt."""
    prompt_tokens: int = 128
    max_new_tokens: int = 512
    """T: completion length limit."""
    minibatch_size: int = 32
    micro_batch_size: int = 16
    epochs: int = 2
    iters: int = 2
    """PGTrainer.step() calls per training row; the first warms up, the last is reported."""
    learning_rate: float = 1e-6
    lora_r: int = 16
    lora_alpha: float = 32.0
    kl_coef: float = 0.05

    @property
    def batch_size(self) -> int:
        return self.num_prompts * self.group_size


SMOKE = Workload(num_prompts=2, group_size=2, prompt_tokens=6, max_new_tokens=6, minibatch_size=2,
                 micro_batch_size=1, lora_r=4)


# ----------------------------------------------------------------------------- inputs
def make_prompts(n: int, length: int, vocab_size: int, seed: int = 0) -> list[str]:
    """n prompts of exactly `length` random words (one token each)."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(vocab_size - 4)}" for _ in range(length)) for _ in range(n)]


def build_model(name: str, tokenizer, device: str, dtype=torch.bfloat16):
    """Qwen2ForCausalLM from the config of `name`, random weights (seed 0), built on `device`."""
    import transformers

    fields, vocab_size = MODELS[name]
    config = transformers.Qwen2Config(
        vocab_size=vocab_size, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, use_cache=True, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            with torch.device(device):  # initialised where it runs: seconds, not a minute of CPU init
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    model.generation_config = transformers.GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    return model


# ----------------------------------------------------------------------------- measuring
class Memory:
    """Peak CUDA memory of one row (None on CPU)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def start(self) -> float | None:
        """Reset the peak; the MB still allocated from earlier rows (the figures are counted above it)."""
        gc.collect()
        if not self.cuda:
            return None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self.base / 2**20

    def mark_weights(self) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return (torch.cuda.memory_allocated() - self.base) / 2**20

    def peak(self) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - self.base) / 2**20


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def sampling_row(name: str, sampler: str, w: Workload, tokenizer, prompts, device: str) -> dict:
    """Sampling tokens/s of `sampler` through lmpg.rollout.sample_completions (warm-up call first)."""
    from lmpg.rollout import sample_completions

    mem = Memory(device)
    leftover = mem.start()
    model = build_model(name, tokenizer, device)
    weights = mem.mark_weights()
    kwargs = dict(temperature=1.0, max_prompt_length=w.prompt_tokens, add_special_tokens=False, sampler=sampler)
    seeds = list(range(w.batch_size)) if sampler == "lmpg" else None
    torch.manual_seed(0)
    sample_completions(model, tokenizer, prompts, w.group_size, max_new_tokens=min(8, w.max_new_tokens),
                       seeds=seeds, **kwargs)
    sync(device)
    t0 = time.perf_counter()
    rollout = sample_completions(model, tokenizer, prompts, w.group_size, max_new_tokens=w.max_new_tokens,
                                 seeds=seeds, **kwargs)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = int(rollout.completion_mask.sum())
    row = {"model": name, "row": f"sample-{sampler}", "status": "ok", "rows": w.batch_size,
           "max_new_tokens": w.max_new_tokens, "tokens": tokens, "seconds": seconds,
           "tokens_per_s": tokens / seconds, "weights_mb": weights, "peak_mb": mem.peak(), "leftover_mb": leftover}
    del model, rollout
    return row


def training_row(name: str, mode: str, w: Workload, tokenizer, prompts, device: str, out_dir: str,
                 deadline: float) -> dict:
    """`PGTrainer.step()` w.iters times (fewer if the deadline would pass); the last step's figures."""
    from lmpg import PGConfig, PGTrainer
    from lmpg.data import PromptTable

    mem = Memory(device)
    leftover = mem.start()
    model = build_model(name, tokenizer, device)
    weights = mem.mark_weights()
    params = sum(p.numel() for p in model.parameters())
    config = PGConfig(
        output_dir=out_dir, seed=0, iterations=w.iters, batch_size=w.batch_size, group_size=w.group_size,
        max_new_tokens=w.max_new_tokens, max_prompt_length=w.prompt_tokens, temperature=1.0,
        epochs_per_batch=w.epochs, minibatch_size=w.minibatch_size, micro_batch_size=w.micro_batch_size,
        learning_rate=w.learning_rate, baseline="group_mean", adv_norm="group", loss_agg="token_mean",
        kl_coef=w.kl_coef if mode.endswith("-kl") else 0.0, lora_r=w.lora_r if mode.startswith("lora") else 0,
        lora_alpha=w.lora_alpha, gradient_checkpointing=mode.endswith("-gc"), mixed_precision="bf16",
        sample_log_every=0, progress_bar=False, log_every=10**6)
    dataset = PromptTable.from_rows([{"prompt": p} for p in prompts])
    trainer = PGTrainer(model, [reward_sevens], dataset, config, tokenizer=tokenizer)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    Path(out_dir).mkdir(parents=True)  # step() logs there; train() would also save checkpoints
    iter_seconds = []
    for _ in range(w.iters):
        t0 = time.perf_counter()
        trainer.step()
        sync(device)
        iter_seconds.append(time.perf_counter() - t0)
        if time.perf_counter() + iter_seconds[-1] > deadline:
            break
    timing = [json.loads(line) for line in (Path(out_dir) / "timings.jsonl").read_text().splitlines()][-1]
    phases = {k[len("time_"):]: v for k, v in timing.items() if k.startswith("time_") and k != "time_total"}
    tokens = timing["tokens_per_s"] * timing["time_total"]
    row = {"model": name, "row": mode, "status": "ok" if len(iter_seconds) == w.iters else
           f"ok, {len(iter_seconds)} of {w.iters} iterations (time budget): the figures include warm-up",
           "iterations": len(iter_seconds), "iter_seconds": iter_seconds, "s_per_iter": timing["time_total"],
           "phases": phases, "tokens": tokens, "sample_tokens_per_s": tokens / timing["time_sample"],
           "update_tokens_per_s": tokens / timing["time_update"], "params": params, "trainable_params": trainable,
           "weights_mb": weights, "peak_mb": mem.peak(), "leftover_mb": leftover}
    trainer.accelerator.free_memory()
    del trainer, model
    return row


# ----------------------------------------------------------------------------- the run
def estimate(row: str, model: str, done: list[dict]) -> float | None:
    """Seconds `row` of `model` should take (model build included), from the rows already run; None
    when there is nothing to go by. Sampling is bound by per-layer launches (scaled by layers),
    training by arithmetic (scaled by the weights of the layers)."""
    sampling = row.startswith("sample-")
    ok = [r for r in done if r["status"].startswith("ok") and r["row"].startswith("sample-") == sampling]
    if not ok:
        return None
    same = [r["wall_s"] for r in ok if r["model"] == model]
    if same:
        return max(same) * (1.3 if row.endswith(("-gc", "-kl")) else 1.0)
    size = (lambda f: f["num_hidden_layers"]) if sampling else (
        lambda f: f["num_hidden_layers"] * f["hidden_size"] * (f["hidden_size"] + f["intermediate_size"]))
    return max(r["wall_s"] * size(MODELS[model][0]) / size(MODELS[r["model"]][0]) for r in ok)


def run(models: list[str], w: Workload, device: str, budget_s: float, out: Path, rows_of=None,
        strict: bool = False) -> dict:
    """Every row of every model within `budget_s` seconds; the report (also written to `out`)."""
    t_start = time.perf_counter()
    deadline = t_start + budget_s
    report = {"device": device_name(device), "versions": versions(), "optional_packages": optional_packages(),
              "workload": asdict(w), "budget_s": budget_s, "rows": [], "skipped": []}
    done = report["rows"]
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        for name in models:
            _, vocab_size = MODELS[name]
            tokenizer = make_word_tokenizer(vocab_size)
            prompts = make_prompts(w.num_prompts, w.prompt_tokens, vocab_size)
            for row in (rows_of or DEFAULT_ROWS)[name]:
                left = deadline - time.perf_counter()
                guess = estimate(row, name, done)
                if guess is not None and guess > left:
                    report["skipped"].append({"model": name, "row": row, "reason": f"time budget: about {guess:.0f} s "
                                              f"needed, {max(left, 0):.0f} s of {budget_s:.0f} s left"})
                    continue
                t0 = time.perf_counter()
                print(f"[{t0 - t_start:6.1f} s] {name} {row} ...", file=sys.stderr, flush=True)
                try:
                    if row.startswith("sample-"):
                        result = sampling_row(name, row[len("sample-"):], w, tokenizer, prompts, device)
                    else:
                        result = training_row(name, row, w, tokenizer, prompts, device,
                                              os.path.join(tmp, f"{name}-{row}"), deadline)
                except Exception as e:  # noqa: BLE001 - one failing row (an OOM, say) must not lose the others
                    if strict:
                        raise
                    first = (str(e).strip().splitlines() or [""])[0][:300]
                    result = {"model": name, "row": row, "status": f"error: {type(e).__name__}: {first}",
                              "traceback": traceback.format_exc()[-3000:]}
                result["wall_s"] = time.perf_counter() - t0
                done.append(result)
                print(f"    {result['status']} ({result['wall_s']:.1f} s)", file=sys.stderr, flush=True)
                gc.collect()
                write(report, out, time.perf_counter() - t_start)
    write(report, out, time.perf_counter() - t_start)
    return report


def write(report: dict, out: Path, elapsed: float) -> None:
    report["elapsed_s"] = elapsed
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))


def device_name(device: str) -> str:
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
    return f"cpu, {torch.get_num_threads()} threads"


def versions() -> dict:
    import accelerate
    import peft
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__, "peft": peft.__version__}


def optional_packages() -> dict:
    """Whether datasets and math-verify work here (carried as wheels on the GPU machine, or absent)."""
    out = {}
    try:
        import datasets

        out["datasets"] = f"{datasets.__version__}, from_list ok: {len(datasets.Dataset.from_list([{'a': 1}])) == 1}"
    except Exception as e:  # noqa: BLE001
        out["datasets"] = f"unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    try:
        import math_verify

        from reward_fns import math_answer

        score = math_answer([""], ["\\boxed{\\frac{1}{2}}"], answer=["0.5"])[0]
        out["math_verify"] = f"{math_verify.__version__ if hasattr(math_verify, '__version__') else 'installed'}, " \
                             f"math_answer(\\frac{{1}}{{2}} vs 0.5) = {score}"
    except Exception as e:  # noqa: BLE001
        out["math_verify"] = f"unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return out


def markdown(report: dict) -> str:
    f = lambda v, spec=".0f": "-" if v is None else format(v, spec)  # noqa: E731
    w = report["workload"]
    lines = [f"GPU check: {report['device']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"Workload: {w['num_prompts']} prompts of {w['prompt_tokens']} tokens x G={w['group_size']} = "
             f"{w['num_prompts'] * w['group_size']} completions of up to {w['max_new_tokens']} tokens; "
             f"{w['epochs']} epochs, minibatch {w['minibatch_size']}, micro-batch {w['micro_batch_size']}, bf16. "
             f"Random weights: speed and memory are real, accuracy is not measured. "
             f"{report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget.", "",
             "| model | sampler | rows | tokens | s | tokens/s | weights MB | peak MB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if r["row"].startswith("sample-") and r["status"] == "ok":
            lines.append(f"| {r['model']} | {r['row'][7:]} | {r['rows']} | {r['tokens']} | {r['seconds']:.2f} | "
                         f"{r['tokens_per_s']:.0f} | {f(r['weights_mb'])} | {f(r['peak_mb'])} |")
    lines += ["", "| model | mode | iters | s/iter | " + " | ".join(f"{p} s" for p in phase_names(report)) +
              " | sample tok/s | update tok/s | trainable | weights MB | peak MB |",
              "|---|---|---:|---:|" + "---:|" * len(phase_names(report)) + "---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if not r["row"].startswith("sample-") and r["status"].startswith("ok"):
            phases = " | ".join(f(r["phases"].get(p), ".2f") for p in phase_names(report))
            lines.append(f"| {r['model']} | {r['row']} | {r['iterations']} | {r['s_per_iter']:.2f} | {phases} | "
                         f"{r['sample_tokens_per_s']:.0f} | {r['update_tokens_per_s']:.0f} | "
                         f"{r['trainable_params'] / 1e6:.1f}M | {f(r['weights_mb'])} | {f(r['peak_mb'])} |")
    notes = [f"- {r['model']} {r['row']}: {r['status']}" for r in report["rows"] if r["status"] != "ok"]
    notes += [f"- {s['model']} {s['row']}: skipped, {s['reason']}" for s in report["skipped"]]
    notes += [f"- {k}: {v}" for k, v in report["optional_packages"].items()]
    return "\n".join(lines + [""] + notes) + "\n"


def phase_names(report: dict) -> list[str]:
    names = []
    for r in report["rows"]:
        for p in r.get("phases", {}):
            if p not in names:
                names.append(p)
    return names


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check"), help="output folder (default $OUT or gpu_check)")
    ap.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-1.5b", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--budget", type=float, default=390.0,
                    help="seconds for all rows; a row expected not to fit is skipped and listed (default 390)")
    ap.add_argument("--iters", type=int, default=None, help="PGTrainer.step() calls per training row (default 2)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--rows", default=None,
                    help="comma list of rows for every model (default: each model's own list, see above)")
    ap.add_argument("--smoke", action="store_true", help="CPU, a 2-layer model at V=1024, tiny batch: the same code path")
    a = ap.parse_args(argv)
    if a.smoke:
        models, w, device = ["smoke"], SMOKE, "cpu"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: this check is for a GPU machine (--smoke runs it on CPU)")
        models, w, device = a.models.split(","), Workload(), "cuda"
        unknown = [m for m in models if m not in MODELS]
        if unknown:
            ap.error(f"unknown --models {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if a.iters is not None:
        w = replace(w, iters=a.iters)
    if a.max_new_tokens is not None:
        w = replace(w, max_new_tokens=a.max_new_tokens)
    rows_of = None
    if a.rows:
        rows = a.rows.split(",")
        known = [f"sample-{s}" for s in SAMPLERS] + list(MODES)
        if [r for r in rows if r not in known]:
            ap.error(f"unknown --rows {', '.join(r for r in rows if r not in known)}; choose from {', '.join(known)}")
        rows_of = {m: rows for m in models}
    report = run(models, w, device, a.budget, Path(a.out), rows_of, strict=a.smoke)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
