"""Seconds per policy-gradient iteration: lmpg, TRL's GRPOTrainer and a bare-PyTorch floor.

    python benchmarks/bench_iteration.py                        # default implementations on W1, W2, W2-lora
    python benchmarks/bench_iteration.py --impl lmpg --size W1 --iters 5
    python benchmarks/bench_iteration.py --impl lmpg,floor,trl --interleave   # ratios under shared load
    python benchmarks/bench_iteration.py --sweep --impl lmpg --size W1        # G 4/8/16, T 32/64/128
    python benchmarks/bench_iteration.py --quick                # smoke test, a few seconds
    python benchmarks/bench_iteration.py --json out.json        # also write every measurement
    python benchmarks/bench_iteration.py --summarize a.json b.json   # re-table saved results, run nothing

The pieces of the update timed alone (once `--micro` here): benchmarks/bench_components.py. The model,
tokenizer, prompts and reward: benchmarks/workload.py.

One iteration, the same work for every implementation:

1. sample G=4 completions for each of 8 prompts (32 completions of exactly 32 new tokens, temperature 1,
   no top-k / top-p, KV cache);
2. score them: the fraction of completion words that end in "7" (pure Python, microseconds);
3. advantages: group mean baseline, divided by the group std (GRPO);
4. log pi_old of the taken tokens, where the implementation needs a pass for it;
5. two epochs of one minibatch of 32 completions each: forward, clipped surrogate (eps 0.2, token
   mean), backward, gradient norm clipped at 1.0, AdamW step (lr 1e-5). No KL, no reference model.

Implementations, each timed through its public interface only (nothing wrapped or patched):

- lmpg: `PGTrainer.step()`, batch_size=32, group_size=4, epochs_per_batch=2, minibatch_size=32,
  sampler="lmpg", adv_norm="group", defaults otherwise. Variants, each a PGConfig switch
  (`LMPG_VARIANTS`): lmpg-nosnr (grad_snr=False), lmpg-generate (sampler="generate"),
  lmpg-sampler-logp (logp_old_source="sampler"), lmpg-fast (grad_snr off, logp_old_source="sampler"),
  lmpg-bf16 (mixed_precision="bf16", autocast on CPU too), lmpg-noshare (shared_prompt_forward=False:
  each row runs its prompt in the update forward), lmpg-full (logits_chunk_size=0: the full
  (B, T, V) logits instead of the default chunked log-probs from the hidden states), lmpg-gc
  (gradient_checkpointing=True). The phases are the `StepResult.timings` that step()
  returns (what timings.jsonl holds): sample = time_sample, score = time_score, old_logp = time_logp
  (the log pi_old and log pi_ref forwards and the advantages), update = time_update.
- trl: `GRPOTrainer` with num_generations=4, per_device_train_batch_size=32 (so generation_batch_size=32
  and one optimizer step per epoch), num_iterations=2, beta=0, max_completion_length=32, and what lmpg
  does set alike (gradient checkpointing off, fp32, lr, eps, grad clip, loss_type dapo = token mean,
  scale_rewards group, top_k 0). trl-gc: the same with gradient checkpointing on. trl-defaults:
  only the fields that define the work, TRL's defaults for the rest (gradient checkpointing on, bf16
  autocast, lr 1e-6, linear schedule). TRL's loop is its own: a `TrainerCallback` times each
  iteration (its two optimizer steps, generation included). TRL has no public per-phase timing (its
  profiling reports to wandb / mlflow / trackio only), so its phases are not split: the total only.
- floor: the algorithm written bare in `run_floor`: `model.generate`, one no-grad forward for pi_old,
  two forward/backward/clip/AdamW steps, its phases timed in its own loop.

Modes. Default: each implementation in a fresh subprocess per size (its own peak memory).
--interleave: the implementations of a size in one subprocess, one iteration of each in turn (TRL's
iterations drive the rounds; the others run between them, outside its timing), so the load of a
shared machine falls on all alike: the mode to take ratios in. No memory figures there.

Reported: seconds per iteration (median over the timed iterations after one warm-up iteration, pooled
over --repeats), CPU seconds per iteration (process time, all threads: what an iteration costs
whatever share of the cores other jobs leave it), completion tokens per second, the median wall
seconds of each phase (sample, score, old_logp, update, other = the rest of the wall time around the
iteration: prompts, metrics, logs; the floor's also in CPU seconds; none for TRL), and memory:
`peak_rss_mb` (ru_maxrss of the subprocess: imports, model and run) and `iter_peak_delta_mb` (the
peak RSS during the iterations, reset through /proc/self/clear_refs just before them, minus the RSS
then: what training adds to a built model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# workload sets the environment the measurements assume (OMP_WAIT_POLICY=PASSIVE, ...) before torch loads
from workload import (NUM_THREADS, SIZES, Workload, load_average, lora_config, make_model,  # noqa: E402
                      make_prompts, make_tokenizer, reset_peak_rss, reward_sevens, rss_mb, vm_hwm_mb)

import torch  # noqa: E402

LMPG_VARIANTS = {
    "lmpg": {},
    "lmpg-nosnr": {"grad_snr": False},
    "lmpg-generate": {"sampler": "generate"},
    "lmpg-sampler-logp": {"logp_old_source": "sampler"},
    "lmpg-fast": {"grad_snr": False, "logp_old_source": "sampler"},
    "lmpg-bf16": {"mixed_precision": "bf16"},  # autocast, as trl-defaults' bf16=True
    "lmpg-noshare": {"shared_prompt_forward": False},  # every row runs its prompt in the update forward
    "lmpg-full": {"logits_chunk_size": 0},  # the full (B, T, V) logits (lmpg before issue 16's default)
    "lmpg-gc": {"gradient_checkpointing": True},  # activations recomputed per layer in the backward
}
IMPLS = (*LMPG_VARIANTS, "floor", "trl", "trl-gc", "trl-defaults")
DEFAULT_IMPLS = ("lmpg", "lmpg-fast", "floor", "trl", "trl-defaults")
PHASES = ("sample", "score", "old_logp", "update", "other")


# ----------------------------------------------------------------------------- measuring
def timed(step) -> tuple[float, float, dict | None, dict | None]:
    """Run one iteration: (wall s, CPU s, wall phases, CPU phases). `step()` returns the seconds of
    its phases (wall, and CPU or None); what they leave of the measured total is `other`."""
    t0, c0 = time.perf_counter(), time.process_time()
    wall_phases, cpu_phases = step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, with_rest(wall_phases, wall), with_rest(cpu_phases, cpu)


def with_rest(phases: dict | None, total: float) -> dict | None:
    if phases is None:
        return None
    return {**phases, "other": max(total - sum(phases.values()), 0.0)}


# ----------------------------------------------------------------------------- 1. lmpg
def run_lmpg(w: Workload, variant: str, out_dir: str):
    """(model, step): step() runs `PGTrainer.step()` and returns its phases from StepResult.timings."""
    import datasets

    from lmpg import PGConfig, PGTrainer

    tok = make_tokenizer(w)
    model = make_model(tok, w.model_shape, w.seed)
    options = {"sampler": "lmpg", "logp_old_source": "forward", "grad_snr": True, **LMPG_VARIANTS[variant]}
    config = PGConfig(
        output_dir=out_dir, seed=w.seed, iterations=10**6, batch_size=w.batch_size, group_size=w.group_size,
        max_new_tokens=w.max_new_tokens, temperature=1.0, epochs_per_batch=w.epochs,
        minibatch_size=w.minibatch_size or w.batch_size, learning_rate=w.learning_rate,
        max_grad_norm=w.max_grad_norm, baseline="group_mean", adv_norm="group", loss_agg="token_mean",
        clip_eps_low=w.clip_eps, clip_eps_high=w.clip_eps, kl_coef=0.0, lora_r=w.lora_r, lora_alpha=16.0,
        sample_log_every=0, progress_bar=False, **options)
    dataset = datasets.Dataset.from_list([{"prompt": p} for p in make_prompts()])
    trainer = PGTrainer(model, [reward_sevens], dataset, config, tokenizer=tok)
    trainer.prepare_run_dir()

    def step():
        t = trainer.step().timings
        return {"sample": t["time_sample"], "score": t["time_score"], "old_logp": t["time_logp"],
                "update": t["time_update"]}, None

    return trainer.accelerator.unwrap_model(trainer.model), step


# ----------------------------------------------------------------------------- 2. TRL
def run_trl(w: Workload, variant: str, iters: int, warmup: int, out_dir: str, between=None):
    """TRL's loop runs inside train(): returns (model, trainer, timer) where trainer.train() runs all
    iterations and `timer` (a TrainerCallback) records when each iteration starts and ends.
    `between(k)`, if given, runs after TRL's iteration k, outside its timing (the interleaved mode
    runs the other implementations there)."""
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = make_tokenizer(w)
    model = make_model(tok, w.model_shape, w.seed)
    steps_per_iteration = w.epochs * (w.batch_size // (w.minibatch_size or w.batch_size))
    work = dict(output_dir=out_dir, per_device_train_batch_size=w.minibatch_size or w.batch_size,
                gradient_accumulation_steps=1, num_generations=w.group_size, num_iterations=w.epochs,
                max_completion_length=w.max_new_tokens, beta=0.0, temperature=1.0,
                max_steps=steps_per_iteration * (warmup + iters), use_cpu=True, report_to="none",
                save_strategy="no", disable_tqdm=True, seed=w.seed, dataloader_num_workers=0)
    if w.minibatch_size:
        work["generation_batch_size"] = w.batch_size
    if variant in ("trl", "trl-gc"):
        work.update(learning_rate=w.learning_rate, gradient_checkpointing=variant == "trl-gc", bf16=False,
                    top_k=0, top_p=1.0, epsilon=w.clip_eps, loss_type="dapo", scale_rewards="group",
                    max_grad_norm=w.max_grad_norm, disable_dropout=True, lr_scheduler_type="constant")
    args = GRPOConfig(**work)
    dataset = datasets.Dataset.from_list([{"prompt": p} for p in make_prompts()])
    peft_config = lora_config(w.lora_r) if w.lora_r else None

    class IterationTimer(TrainerCallback):
        """(wall s, CPU s, None, None) per iteration: from the end of the previous one (or the start of
        training) to the end of its last optimizer step."""

        def __init__(self):
            self.record = []
            self._start = None

        def _mark_start(self):
            self._start = (time.perf_counter(), time.process_time())

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark_start()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps_per_iteration == 0:
                wall, cpu = time.perf_counter(), time.process_time()
                self.record.append((wall - self._start[0], cpu - self._start[1], None, None))
                if between is not None:
                    between(len(self.record) - 1)
                self._mark_start()

    timer = IterationTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_sevens], args=args, train_dataset=dataset,
                          processing_class=tok, peft_config=peft_config, callbacks=[timer])
    return trainer.model, trainer, timer


# ----------------------------------------------------------------------------- 3. the floor
def floor_logprobs(model, input_ids, attention_mask, position_ids, completion_ids):
    """log pi(a_t | s_t) of the completion tokens, (B, T): one forward, logits of the last T+1
    positions only, log-softmax as z_a - logsumexp(z) (tau = 1)."""
    T = completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=T + 1, use_cache=False).logits[:, :-1]  # (B, T, V)
    return logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def run_floor(w: Workload, variant: str, out_dir: str):
    """(model, step): step() runs one iteration of the bare loop and returns its phases (wall, CPU)."""
    tok = make_tokenizer(w)
    model = make_model(tok, w.model_shape, w.seed)
    if w.lora_r:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(w.lora_r))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=w.learning_rate)
    prompts = make_prompts()
    G, T, eos, pad = w.group_size, w.max_new_tokens, tok.eos_token_id, tok.pad_token_id
    mb = w.minibatch_size or w.batch_size
    state = {"next": 0}
    torch.manual_seed(w.seed)

    def step():
        # 1. sample G completions per prompt from pi_old
        marks = [(time.perf_counter(), time.process_time())]
        start = state["next"] % len(prompts)
        batch = (prompts + prompts)[start:start + w.num_prompts]
        state["next"] += w.num_prompts
        enc = tok(batch, return_tensors="pt", padding=True)
        prompt_ids = enc["input_ids"].repeat_interleave(G, 0)  # (B, P)
        prompt_mask = enc["attention_mask"].repeat_interleave(G, 0)
        P = prompt_ids.shape[1]
        model.eval()
        with torch.no_grad():
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=T, eos_token_id=eos, pad_token_id=pad)
        model.train()
        completion_ids = out[:, P:]  # (B, T)
        is_eos = completion_ids == eos
        after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
        completion_mask = ~after_eos  # True up to and including the first EOS
        marks.append((time.perf_counter(), time.process_time()))

        # 2. score; advantages (r - mean_group) / (std_group + eps)
        texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
        r = torch.tensor(reward_sevens(batch, texts)).view(-1, G)  # (prompts, G)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1, 1)  # (B, 1)
        marks.append((time.perf_counter(), time.process_time()))

        # 3. log pi_old: one no-grad forward
        input_ids = torch.cat([prompt_ids, completion_ids], 1)  # (B, P+T)
        attention_mask = torch.cat([prompt_mask, completion_mask.long()], 1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            logp_old = floor_logprobs(model, input_ids, attention_mask, position_ids, completion_ids)
        marks.append((time.perf_counter(), time.process_time()))

        # 4. epochs x minibatches of: clipped surrogate (token mean), backward, clip the norm, AdamW
        for _ in range(w.epochs):
            for s in range(0, w.batch_size, mb):
                i = slice(s, s + mb)
                logp = floor_logprobs(model, input_ids[i], attention_mask[i], position_ids[i], completion_ids[i])
                ratio = torch.exp(logp - logp_old[i])
                objective = torch.minimum(ratio * adv[i], ratio.clamp(1 - w.clip_eps, 1 + w.clip_eps) * adv[i])
                loss = -(objective * completion_mask[i]).sum() / completion_mask[i].sum().clamp(min=1)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, w.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        marks.append((time.perf_counter(), time.process_time()))
        spans = list(zip(("sample", "score", "old_logp", "update"), zip(marks, marks[1:])))
        return ({phase: end[0] - start[0] for phase, (start, end) in spans},
                {phase: end[1] - start[1] for phase, (start, end) in spans})

    return model, step


# ----------------------------------------------------------------------------- runs
def _builder(impl: str):
    return {"lmpg": run_lmpg, "floor": run_floor}[impl.split("-")[0]]


def _result(impl: str, w: Workload, mode: str, warmup: int, record: list[tuple], model, **extra) -> dict:
    """One implementation's measurements from its per-iteration (wall s, CPU s, wall phases, CPU
    phases), the first `warmup` iterations dropped."""
    import transformers

    record = record[warmup:]
    seconds, cpu_seconds = [r[0] for r in record], [r[1] for r in record]
    s = statistics.median(seconds)
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None

    def median_phases(column: int) -> dict | None:
        if any(r[column] is None for r in record):
            return None
        return {p: statistics.median(r[column][p] for r in record) for p in PHASES}

    return {
        "impl": impl, "size": w.size, "mode": mode, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "workload": asdict(w),
        "iters": len(seconds), "warmup": warmup,
        "s_per_iter": s, "s_per_iter_min": min(seconds), "s_per_iter_all": seconds,
        "cpu_s_per_iter": statistics.median(cpu_seconds), "cpu_s_per_iter_all": cpu_seconds,
        "tokens_per_s": w.batch_size * w.max_new_tokens / s,
        "phases": median_phases(2), "phases_cpu": median_phases(3),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "load_after": load_average(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version},
        **extra,
    }


def run_worker(impl: str, w: Workload, iters: int, warmup: int = 1, threads: int = NUM_THREADS) -> dict:
    """Build `impl` on workload `w`, run warmup + iters iterations, return the measurements with
    memory (meaningful when this is the only implementation the process ran)."""
    torch.set_num_threads(threads)
    load_before = load_average()
    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_iteration_") as out_dir:
        run_dir = os.path.join(out_dir, "run")
        if impl.startswith("trl"):
            model, trainer, timer = run_trl(w, impl, iters, warmup, run_dir)
        else:
            model, step = _builder(impl)(w, impl, run_dir)
        setup_s = time.perf_counter() - t_setup
        base_rss = rss_mb()
        peak_reset = reset_peak_rss()
        if impl.startswith("trl"):
            trainer.train()
            record = timer.record
        else:
            record = [timed(step) for _ in range(warmup + iters)]
        iter_peak = vm_hwm_mb() if peak_reset else float("nan")
    _reset_accelerate()
    return _result(impl, w, "separate", warmup, record, model,
                   peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, base_rss_mb=base_rss,
                   iter_peak_mb=iter_peak, iter_peak_delta_mb=iter_peak - base_rss, setup_s=setup_s,
                   load_before=load_before)


def run_interleaved(impls: list[str], w: Workload, iters: int, warmup: int = 1, threads: int = NUM_THREADS) -> list[dict]:
    """All `impls` in this process, one iteration of each in turn (the order rotated every round), so
    that the load of a shared machine falls on all of them alike: the fair way to take their ratios.
    TRL drives the rounds: the others run between its iterations, outside its timing. No memory figures."""
    torch.set_num_threads(threads)
    local = [i for i in impls if not i.startswith("trl")]
    trl_impls = [i for i in impls if i.startswith("trl")]
    if len(trl_impls) > 1 or "trl-defaults" in trl_impls:
        raise ValueError("the interleaved mode takes at most one TRL run, 'trl' (trl-defaults changes the "
                         "process-wide accelerate state to bf16)")
    records = {i: [] for i in impls}
    models = {}
    with tempfile.TemporaryDirectory(prefix="bench_iteration_") as out_dir:
        steps = {}
        for i in local:
            models[i], steps[i] = _builder(i)(w, i, os.path.join(out_dir, i))

        def one_round(k: int):
            for i in local[k % len(local):] + local[:k % len(local)]:
                records[i].append(timed(steps[i]))

        if trl_impls:
            models["trl"], trainer, timer = run_trl(w, "trl", iters, warmup, os.path.join(out_dir, "trl"),
                                                    between=one_round if local else None)
            trainer.train()
            records["trl"] = timer.record
        else:
            for k in range(warmup + iters):
                one_round(k)
    _reset_accelerate()
    return [_result(i, w, "interleaved", warmup, records[i], models[i]) for i in impls]


def _reset_accelerate() -> None:
    """Forget accelerate's process-wide state (TRL's bf16 default sets it) so that the next
    implementation in this process can start its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def have_trl() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def run_in_subprocess(impls: list[str], w: Workload, iters: int, threads: int, interleave: bool) -> list[dict]:
    """run_worker (one implementation) or run_interleaved (several) in a fresh Python process."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", ",".join(impls), "--size", w.size,
               "--iters", str(iters), "--group-size", str(w.group_size), "--max-new-tokens", str(w.max_new_tokens),
               "--threads", str(threads), "--json", f.name]
        if w.minibatch_size:
            cmd += ["--minibatch-size", str(w.minibatch_size)]
        if interleave:
            cmd.append("--interleave")
        subprocess.run(cmd, check=True)
        return json.loads(Path(f.name).read_text())


# ----------------------------------------------------------------------------- report
def summarize(results: list[dict]) -> list[dict]:
    """Medians per (mode, impl, size, G, T, minibatch), pooled over repeats, with each row's ratios
    (wall and CPU) to the floor and to trl measured in the same mode on the same workload."""
    groups = defaultdict(list)
    for r in results:
        w = r["workload"]
        groups[(r["impl"], r["mode"], r["size"], w["group_size"], w["max_new_tokens"], w["minibatch_size"])].append(r)
    rows = []
    for (impl, mode, size, G, T, mb), rs in groups.items():
        pooled = lambda key: statistics.median(x for r in rs for x in r[key])  # noqa: E731
        med = lambda key: statistics.median(r[key] for r in rs) if key in rs[0] else None  # noqa: E731

        def phases(key):
            if any(r.get(key) is None for r in rs):
                return None
            return {p: statistics.median(r[key][p] for r in rs) for p in PHASES}

        s_iter = pooled("s_per_iter_all")
        rows.append({"impl": impl, "mode": mode, "size": size, "G": G, "T": T, "minibatch": mb,
                     "repeats": len(rs), "iters": sum(r["iters"] for r in rs),
                     "s_per_iter": s_iter, "cpu_s_per_iter": pooled("cpu_s_per_iter_all"),
                     "tokens_per_s": rs[0]["workload"]["num_prompts"] * G * T / s_iter,
                     "phases": phases("phases"), "phases_cpu": phases("phases_cpu"),
                     "peak_rss_mb": med("peak_rss_mb"), "iter_peak_delta_mb": med("iter_peak_delta_mb"),
                     "params": rs[0]["params"], "trainable_params": rs[0]["trainable_params"],
                     "load": statistics.median(r["load_after"] for r in rs)})
    by_key = {(r["impl"], r["mode"], r["size"], r["G"], r["T"], r["minibatch"]): r for r in rows}
    for r in rows:
        for ref in ("floor", "trl"):
            other = by_key.get((ref, r["mode"], r["size"], r["G"], r["T"], r["minibatch"]))
            r[f"vs_{ref}"] = r["s_per_iter"] / other["s_per_iter"] if other else None
            r[f"vs_{ref}_cpu"] = r["cpu_s_per_iter"] / other["cpu_s_per_iter"] if other else None
    return rows


def markdown_table(rows: list[dict]) -> str:
    """One line per row: wall and CPU seconds, wall seconds per phase (- where not split), memory, ratios."""
    head = ("| mode | size | impl | G | T | mb | iters | s/iter | CPU s/iter | tokens/s | sample | score | "
            "old_logp | update | other | peak RSS MB | iter peak +MB | /floor | /floor CPU | /trl | /trl CPU |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda v, spec: "-" if v is None or v != v else format(v, spec)  # noqa: E731
    for r in rows:
        ph = r["phases"] or {}
        phase_cells = " | ".join(fmt(ph.get(p), ".4f" if p == "score" else ".3f") for p in PHASES)
        lines.append(
            f"| {r['mode']} | {r['size']} | {r['impl']} | {r['G']} | {r['T']} | {r['minibatch'] or r['G'] * 8} | "
            f"{r['iters']} | {r['s_per_iter']:.3f} | {r['cpu_s_per_iter']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{phase_cells} | "
            f"{fmt(r['peak_rss_mb'], '.0f')} | {fmt(r['iter_peak_delta_mb'], '.0f')} | {fmt(r['vs_floor'], '.2f')} | "
            f"{fmt(r['vs_floor_cpu'], '.2f')} | {fmt(r['vs_trl'], '.2f')} | {fmt(r['vs_trl_cpu'], '.2f')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", default="all",
                    help=f"all ({', '.join(DEFAULT_IMPLS)}) or a comma list of {', '.join(IMPLS)}")
    ap.add_argument("--size", default="W1,W2,W2-lora", help="comma list of " + ", ".join(SIZES))
    ap.add_argument("--iters", type=int, default=5, help="timed iterations after one warm-up iteration")
    ap.add_argument("--repeats", type=int, default=1, help="fresh processes per configuration, order rotated")
    ap.add_argument("--threads", type=int, default=None,
                    help=f"torch.set_num_threads (default {NUM_THREADS}; 1 with --quick)")
    ap.add_argument("--interleave", action="store_true",
                    help="run the implementations of a size in one process, an iteration of each in turn "
                         "(ratios under shared load; no memory figures; trl-defaults left out)")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--minibatch-size", type=int, default=None, help="default: the whole batch")
    ap.add_argument("--sweep", action="store_true", help="G in 4, 8, 16 (T=32) and T in 32, 64, 128 (G=4)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: tiny model, T=8, 1 thread, 1 timed iteration, in this process "
                         "(floor and lmpg unless --impl)")
    ap.add_argument("--json", default=None, help="write the raw results and the summary here")
    ap.add_argument("--summarize", nargs="+", metavar="JSON", default=None,
                    help="print the table of results saved by --json (several files are pooled); run nothing")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.summarize:
        results = [r for f in args.summarize for r in json.loads(Path(f).read_text())["results"]]
        print(markdown_table(summarize(results)))
        return results
    if args.threads is None:
        args.threads = 1 if args.quick else NUM_THREADS

    impls = list(DEFAULT_IMPLS) if args.impl == "all" else args.impl.split(",")
    sizes = args.size.split(",")
    for name in impls:
        if name not in IMPLS:
            ap.error(f"unknown --impl {name}; choose from all, {', '.join(IMPLS)} (the variants that patched "
                     "the library, lmpg-sliced, -noprefill, -unfused, -before, are gone: benchmarks/README.md)")
    for name in sizes:
        if name not in SIZES:
            ap.error(f"unknown --size {name}; choose from {', '.join(SIZES)}")
    if not have_trl() and any(i.startswith("trl") for i in impls):
        print("TRL is not installed (pip install trl): skipping trl, trl-defaults", file=sys.stderr)
        impls = [i for i in impls if not i.startswith("trl")]

    if args.worker:
        w = Workload(size=sizes[0], group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                     minibatch_size=args.minibatch_size)
        results = (run_interleaved(impls, w, args.iters, threads=args.threads) if args.interleave
                   else [run_worker(impls[0], w, args.iters, threads=args.threads)])
        Path(args.json).write_text(json.dumps(results))
        return results

    if args.quick:
        w = Workload(size="quick", max_new_tokens=8)
        chosen = ["floor", "lmpg"] if args.impl == "all" else impls
        results = (run_interleaved(chosen, w, iters=1, threads=args.threads) if args.interleave
                   else [run_worker(i, w, iters=1, threads=args.threads) for i in chosen])
    else:
        workloads = []
        for size in sizes:
            base = Workload(size=size, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                            minibatch_size=args.minibatch_size)
            shapes = [base]
            if args.sweep:
                shapes = [replace(base, group_size=G) for G in (4, 8, 16)]
                shapes += [replace(base, max_new_tokens=T) for T in (64, 128)]
            for w in shapes:
                if args.interleave:
                    workloads.append(([i for i in impls if i != "trl-defaults"], w))
                else:
                    workloads += [([i], w) for i in impls]
        results = []
        for rep in range(args.repeats):
            k = rep % len(workloads)
            for names, w in workloads[k:] + workloads[:k]:  # rotated, so slow load drift is spread
                print(f"[{rep + 1}/{args.repeats}] {','.join(names)} {w.size} G={w.group_size} T={w.max_new_tokens} "
                      f"(load {load_average():.1f})", file=sys.stderr, flush=True)
                for r in run_in_subprocess(names, w, args.iters, args.threads, args.interleave):
                    results.append(r)
                    print(f"    {r['impl']}: {r['s_per_iter']:.3f} s/iter, {r['tokens_per_s']:.0f} tok/s",
                          file=sys.stderr, flush=True)
    rows = summarize(results)
    print(markdown_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "summary": rows}, indent=1))
    return results


if __name__ == "__main__":
    main()
