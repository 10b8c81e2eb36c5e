"""Seconds per policy-gradient iteration: lmpg, TRL's GRPOTrainer and a bare-PyTorch floor.

    python benchmarks/bench_iteration.py                        # all implementations on W1, W2, W2-lora
    python benchmarks/bench_iteration.py --impl lmpg --size W1 --iters 5
    python benchmarks/bench_iteration.py --impl lmpg,floor,trl --interleave   # ratios under shared load
    python benchmarks/bench_iteration.py --sweep --impl lmpg --size W1        # G 4/8/16, T 32/64/128
    python benchmarks/bench_iteration.py --micro --size W2     # each speed-up's piece, before vs after, alone
    python benchmarks/bench_iteration.py --quick                # smoke test, a few seconds
    python benchmarks/bench_iteration.py --json out.json        # also write every measurement

One iteration, the same work for every implementation:

1. sample G=4 completions for each of 8 prompts (32 completions of exactly 32 new tokens, temperature 1,
   no top-k / top-p, KV cache);
2. score them: the fraction of completion words that end in "7" (pure Python, microseconds);
3. advantages: group mean baseline, divided by the group std (GRPO);
4. log pi_old of the taken tokens, where the implementation needs a pass for it;
5. two epochs of one minibatch of 32 completions each: forward, clipped surrogate (eps 0.2, token
   mean), backward, gradient norm clipped at 1.0, AdamW step (lr 1e-5). No KL, no reference model.

Implementations:

- lmpg: `PGTrainer.step()`, batch_size=32, group_size=4, epochs_per_batch=2, minibatch_size=32,
  sampler="lmpg", adv_norm="group", defaults otherwise. Variants: lmpg-nosnr (grad_snr=False),
  lmpg-generate (sampler="generate"), lmpg-sampler-logp (logp_old_source="sampler"), lmpg-fast
  (grad_snr off, logp_old_source="sampler"), lmpg-bf16 (mixed_precision="bf16", autocast on CPU too).
  Each speed-up of the library switched back off, to measure it: lmpg-noshare (each row runs its
  prompt in the update forward), lmpg-sliced (log-softmax chunks by slicing: quadratic backward),
  lmpg-noprefill (the sampler prefills every row), lmpg-unfused (for-each AdamW), lmpg-before (all
  four off: lmpg as of commit f4aafdf).
- trl: `GRPOTrainer` with num_generations=4, per_device_train_batch_size=32 (so generation_batch_size=32
  and one optimizer step per epoch), num_iterations=2, beta=0, max_completion_length=32, and what lmpg
  does set alike (gradient checkpointing off, fp32, lr, eps, grad clip, loss_type dapo = token mean,
  scale_rewards group, top_k 0). trl-defaults: only the fields that define the work, TRL's defaults for
  the rest (gradient checkpointing on, bf16 autocast, lr 1e-6, linear schedule). TRL's loop is its
  own: a callback times each iteration (its two optimizer steps, generation included).
- floor: the algorithm written bare in `run_floor`: `model.generate`, one no-grad forward for pi_old,
  two forward/backward/clip/AdamW steps.

Modes. Default: each implementation in a fresh subprocess per size (its own peak memory).
--interleave: the implementations of a size in one subprocess, one iteration of each in turn (TRL's
iterations drive the rounds; the others run between them, outside its timing), so the load of a
shared machine falls on all alike: the mode to take ratios in. No memory figures there.

The model: a Llama built from a config (`lmpg.tiny.make_tiny_causal_lm`, seed 0, tied embeddings) on a
word-level tokenizer built in-process with V = 4096 (4 special tokens + 4092 words), so the (B, T, V)
log-softmax costs what it costs with a real vocabulary. W1: 3 layers, width 256 (4.2M parameters);
W2: 7 layers, width 512 (31.5M); W2-lora: W2 with LoRA r=16, alpha=16 on every linear layer (peft,
the same adapter config in all three).

No early stop for anyone: the output layer gets a frozen bias of -1e4 on the EOS logit (a bias
parameter of `lm_head`, which TRL's fused log-prob head reads too), so EOS has probability 0 for every
sampler and every completion is exactly max_new_tokens long.

Reported: seconds per iteration (median over the timed iterations after one warm-up iteration, pooled
over --repeats), completion tokens per second, the median seconds of each phase (sample, score,
old_logp, update, other), and memory: `peak_rss_mb` (ru_maxrss of the subprocess: imports, model and
run) and `iter_peak_delta_mb` (the peak RSS during the iterations, reset through /proc/self/clear_refs
just before them, minus the RSS then: what training adds to a built model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# Threads that wait at an OpenMP barrier sleep instead of spinning. On a machine shared with other jobs
# the default (spin) made iterations 5 to 20 times slower and 3 times as variable: a spinning thread
# holds a core the descheduled other thread needs. Set before torch loads libgomp; the same for all.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

VOCAB_SIZE = 4096
NUM_THREADS = 2
EOS_BIAS = -1e4
SIZES = {
    # name: (n_layer, n_embd, n_head, lora_r)
    "quick": (1, 64, 2, 0),
    "W1": (3, 256, 4, 0),
    "W2": (7, 512, 8, 0),
    "W2-lora": (7, 512, 8, 16),
}
IMPLS = ("lmpg", "lmpg-nosnr", "lmpg-generate", "lmpg-sampler-logp", "lmpg-fast", "lmpg-bf16", "lmpg-noshare",
         "lmpg-sliced", "lmpg-noprefill", "lmpg-unfused", "lmpg-before", "floor", "trl", "trl-defaults")
DEFAULT_IMPLS = ("lmpg", "lmpg-fast", "floor", "trl", "trl-defaults")
PHASES = ("sample", "score", "old_logp", "update", "other")


@dataclass
class Workload:
    """What one iteration does; every implementation gets the same one."""

    size: str = "W1"
    num_prompts: int = 8
    """Prompts per iteration."""
    group_size: int = 4
    """G: completions per prompt."""
    max_new_tokens: int = 32
    """T: tokens per completion (every completion has exactly T: EOS is suppressed)."""
    minibatch_size: int | None = None
    """Completions per optimizer step (default: the whole batch, one step per epoch)."""
    epochs: int = 2
    learning_rate: float = 1e-5
    clip_eps: float = 0.2
    max_grad_norm: float = 1.0
    seed: int = 0

    @property
    def batch_size(self) -> int:
        return self.num_prompts * self.group_size

    @property
    def lora_r(self) -> int:
        return SIZES[self.size][3]


# ----------------------------------------------------------------------------- shared inputs
def make_word_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A word-level tokenizer with `vocab_size` ids: <pad> <eos> <bos> <unk>, then words w0, w1, ...

    Words are split on whitespace and decoded with spaces between them; no special token is added by
    encoding. Padding on the left, as a decoder-only sampler wants.
    """
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lmpg.tiny import SPECIAL_TOKENS, UNK_TOKEN

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for i in range(vocab_size - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        padding_side="left", model_max_length=1024)


def suppress_eos(model, eos_token_id: int, bias: float = EOS_BIAS) -> None:
    """Give the output layer a frozen bias with `bias` on the EOS logit (0 elsewhere): no sampler
    ever draws EOS, the loss sees the same policy, and the weight stays tied to the embedding."""
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    b = torch.zeros(head.out_features)
    b[eos_token_id] = bias
    biased.bias = torch.nn.Parameter(b, requires_grad=False)
    model.lm_head = biased


def make_model(tokenizer, size: str, seed: int = 0):
    from lmpg.tiny import make_tiny_causal_lm

    n_layer, n_embd, n_head, _ = SIZES[size]
    model = make_tiny_causal_lm(tokenizer, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                max_position_embeddings=256, seed=seed)
    suppress_eos(model, tokenizer.eos_token_id)
    return model


def lora_config(r: int):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def make_prompts(n: int = 64, seed: int = 0) -> list[str]:
    """n prompts of 12 to 20 random words."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(VOCAB_SIZE - 4)}" for _ in range(rng.randint(12, 20))) for _ in range(n)]


def reward_sevens(prompts, completions, **kwargs) -> list[float]:
    """Fraction of the completion's words that end in '7' (about 0.1 for a random policy)."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(w.endswith("7") for w in words) / max(len(words), 1))
    return out


# ----------------------------------------------------------------------------- measuring
class PhaseClock:
    """Wall-clock and CPU seconds per phase, accumulated by wrapped methods until `lap()`.

    CPU seconds (process time, all threads) are what an iteration costs whatever share of the cores
    other jobs leave it: on a shared machine they are the steadier figure (wall / CPU ran from 0.55 to
    1.0 with 2 threads here, as other jobs came and went).
    """

    def __init__(self):
        self.wall = defaultdict(float)
        self.cpu = defaultdict(float)

    def add(self, phase: str, wall: float, cpu: float) -> None:
        self.wall[phase] += wall
        self.cpu[phase] += cpu

    def wrap(self, obj, attr: str, phase) -> None:
        """Time calls of obj.attr into `phase` (a name, or a function of the call's args giving one)."""
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                name = phase(*args, **kwargs) if callable(phase) else phase
                self.add(name, time.perf_counter() - t0, time.process_time() - c0)

        setattr(obj, attr, timed)

    def lap(self, total_wall: float, total_cpu: float, rest: str = "other") -> tuple[dict, dict]:
        """(wall, cpu) seconds of this iteration's phases; what no phase timed goes to `rest`."""
        out = []
        for spent, total in ((self.wall, total_wall), (self.cpu, total_cpu)):
            phases = {p: spent.get(p, 0.0) for p in PHASES if p != "other"}
            phases["other"] = 0.0
            phases[rest] += max(total - sum(phases.values()), 0.0)
            out.append(phases)
        self.wall.clear()
        self.cpu.clear()
        return out[0], out[1]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# ----------------------------------------------------------------------------- 1. lmpg
def run_lmpg(w: Workload, variant: str, iters: int, warmup: int, clock: PhaseClock, out_dir: str):
    from lmpg import PGConfig
    from lmpg.trainer import PGTrainer
    import datasets

    tok = make_word_tokenizer()
    model = make_model(tok, w.size, w.seed)
    options = dict(sampler="lmpg", logp_old_source="forward", grad_snr=True)
    if variant == "lmpg-nosnr":
        options["grad_snr"] = False
    elif variant == "lmpg-generate":
        options["sampler"] = "generate"
    elif variant == "lmpg-sampler-logp":
        options["logp_old_source"] = "sampler"
    elif variant == "lmpg-fast":
        options.update(grad_snr=False, logp_old_source="sampler")
    off = WITHOUT.get(variant, set())
    if "noshare" in off:
        options["shared_prompt_forward"] = False
    elif variant == "lmpg-bf16":
        options["mixed_precision"] = "bf16"  # autocast, as trl-defaults' bf16=True
    config = PGConfig(
        output_dir=out_dir, seed=w.seed, iterations=10**6, batch_size=w.batch_size, group_size=w.group_size,
        max_new_tokens=w.max_new_tokens, temperature=1.0, epochs_per_batch=w.epochs,
        minibatch_size=w.minibatch_size or w.batch_size, learning_rate=w.learning_rate,
        max_grad_norm=w.max_grad_norm, baseline="group_mean", adv_norm="group", loss_agg="token_mean",
        clip_eps_low=w.clip_eps, clip_eps_high=w.clip_eps, kl_coef=0.0, lora_r=w.lora_r, lora_alpha=16.0,
        sample_log_every=0, progress_bar=False, **options)
    dataset = datasets.Dataset.from_list([{"prompt": p} for p in make_prompts()])
    import lmpg.trainer

    with patched(lmpg.trainer, "make_adamw", unfused_adamw, "unfused" in off):
        trainer = PGTrainer(model, [reward_sevens], dataset, config, tokenizer=tok)
    if off:
        without_speedups(trainer, off)
    trainer.prepare_run_dir()
    clock.wrap(trainer, "sample", "sample")
    clock.wrap(trainer, "score", "score")
    clock.wrap(trainer, "fill_logp_old", "old_logp")
    clock.wrap(trainer, "update", "update")
    model = trainer.accelerator.unwrap_model(trainer.model)

    def one_iteration():
        trainer.step()

    return model, one_iteration


# Each of the four speed-ups in the library, switched back off, to measure what it buys
# (benchmarks/README.md, "each change"). lmpg-before switches all four off: lmpg as of f4aafdf.
WITHOUT = {
    "lmpg-noshare": {"noshare"},  # shared_prompt_forward=False: every row runs its prompt in the update
    "lmpg-sliced": {"sliced"},  # log-softmax chunks by slicing (quadratic backward)
    "lmpg-noprefill": {"noprefill"},  # the sampler prefills every row, not each distinct prompt once
    "lmpg-unfused": {"unfused"},  # for-each AdamW instead of fused
    "lmpg-before": {"noshare", "sliced", "noprefill", "unfused"},
}


def sliced_selective_log_softmax(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                                 chunk_rows: int = 4) -> torch.Tensor:
    """lmpg.logprobs.selective_log_softmax before it took its chunks with `split`: autograd gives every
    slice `logits[s:s + 4]` a backward that writes its chunk's gradient into a zero tensor of the full
    (B, T, V) shape, and the B/4 of them are summed: O(B^2 T V) work in the backward."""
    B, T, V = logits.shape
    out = []
    for s in range(0, B, chunk_rows):
        z = logits[s:s + chunk_rows].float() / temperature
        out.append(z.gather(-1, tokens[s:s + chunk_rows].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1))
    return torch.cat(out, 0) if out else logits.new_zeros(B, T, dtype=torch.float32)


def every_row_distinct(rows: torch.Tensor):
    """A stand-in for lmpg.kvcache.distinct_rows that shares nothing (first = inverse = all rows)."""
    index = torch.arange(rows.shape[0], device=rows.device)
    return index, index


def unfused_adamw(params, c):
    return torch.optim.AdamW(params, lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_eps,
                             weight_decay=c.weight_decay)


@contextlib.contextmanager
def patched(obj, name: str, value, on: bool = True):
    """obj.name = value inside the block (when `on`)."""
    if not on:
        yield
        return
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


def without_speedups(trainer, off: set):
    """Wrap the trainer's sample and update so the switched-off speed-ups are patched out while they run
    (the patches are module-level, so they are undone between calls: other implementations run
    interleaved in the same process)."""
    import lmpg.logprobs
    import lmpg.sampler

    def wrap(method):
        def run(*args, **kwargs):
            with patched(lmpg.logprobs, "selective_log_softmax", sliced_selective_log_softmax, "sliced" in off), \
                    patched(lmpg.sampler, "distinct_rows", every_row_distinct, "noprefill" in off):
                return method(*args, **kwargs)
        return run

    trainer.sample = wrap(trainer.sample)
    trainer.fill_logp_old = wrap(trainer.fill_logp_old)
    trainer.update = wrap(trainer.update)


# ----------------------------------------------------------------------------- 2. TRL
def run_trl(w: Workload, variant: str, iters: int, warmup: int, clock: PhaseClock, out_dir: str, between=None):
    """TRL's loop runs inside train(): returns (model, runner) where runner["trainer"].train() runs all
    iterations and a callback records when each iteration starts and ends. `between(k)`, if given, runs
    after TRL's iteration k, outside its timing (the interleaved mode runs the other implementations there)."""
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = make_word_tokenizer()
    model = make_model(tok, w.size, w.seed)
    steps_per_iteration = w.epochs * (w.batch_size // (w.minibatch_size or w.batch_size))
    work = dict(output_dir=out_dir, per_device_train_batch_size=w.minibatch_size or w.batch_size,
                gradient_accumulation_steps=1, num_generations=w.group_size, num_iterations=w.epochs,
                max_completion_length=w.max_new_tokens, beta=0.0, temperature=1.0,
                max_steps=steps_per_iteration * (warmup + iters), use_cpu=True, report_to="none",
                save_strategy="no", disable_tqdm=True, seed=w.seed, dataloader_num_workers=0)
    if w.minibatch_size:
        work["generation_batch_size"] = w.batch_size
    if variant == "trl":
        work.update(learning_rate=w.learning_rate, gradient_checkpointing=False, bf16=False, top_k=0, top_p=1.0,
                    epsilon=w.clip_eps, loss_type="dapo", scale_rewards="group", max_grad_norm=w.max_grad_norm,
                    disable_dropout=True, lr_scheduler_type="constant")
    args = GRPOConfig(**work)
    dataset = datasets.Dataset.from_list([{"prompt": p} for p in make_prompts()])
    peft_config = lora_config(w.lora_r) if w.lora_r else None
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_sevens], args=args, train_dataset=dataset,
                          processing_class=tok, peft_config=peft_config)

    iteration_of = lambda: trainer.state.global_step // steps_per_iteration  # noqa: E731
    clocks = defaultdict(PhaseClock)  # iteration -> its phases

    def wrap(attr, phase):
        fn = getattr(trainer, attr)

        def timed(*a, **k):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                name = phase() if callable(phase) else phase
                clocks[iteration_of()].add(name, time.perf_counter() - t0, time.process_time() - c0)
        setattr(trainer, attr, timed)

    wrap("_generate", "sample")
    wrap("_calculate_rewards", "score")
    wrap("_get_per_token_logps_and_entropies", lambda: "update" if torch.is_grad_enabled() else "old_logp")

    class IterationTimer(TrainerCallback):
        def __init__(self):
            self.spans = []  # (wall start, wall end, cpu start, cpu end) per iteration
            self._start = None

        def _mark_start(self):
            self._start = (time.perf_counter(), time.process_time())

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark_start()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps_per_iteration == 0:
                wall, cpu = time.perf_counter(), time.process_time()
                self.spans.append((self._start[0], wall, self._start[1], cpu))
                if between is not None:
                    between(len(self.spans) - 1)
                self._mark_start()

    timer = IterationTimer()
    trainer.add_callback(timer)
    runner = {"trainer": trainer, "timer": timer, "clocks": clocks}
    return trainer.model, runner


def trl_results(runner) -> tuple[list[float], list[float], list[dict], list[dict]]:
    """Per iteration: wall seconds, CPU seconds, wall phases, CPU phases. TRL's "update" is what is
    left of the iteration after sampling, scoring and the log pi_old forward: its training forwards,
    backward, clipping, optimizer and bookkeeping."""
    spans = runner["timer"].spans
    seconds = [end - start for start, end, _, _ in spans]
    cpu_seconds = [end - start for _, _, start, end in spans]
    laps = [runner["clocks"][k].lap(seconds[k], cpu_seconds[k], rest="update") for k in range(len(spans))]
    return seconds, cpu_seconds, [w for w, _ in laps], [c for _, c in laps]


# ----------------------------------------------------------------------------- 3. the floor
def floor_logprobs(model, input_ids, attention_mask, position_ids, completion_ids):
    """log pi(a_t | s_t) of the completion tokens, (B, T): one forward, logits of the last T+1
    positions only, log-softmax as z_a - logsumexp(z) (tau = 1)."""
    T = completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=T + 1, use_cache=False).logits[:, :-1]  # (B, T, V)
    return logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def run_floor(w: Workload, variant: str, iters: int, warmup: int, clock: PhaseClock, out_dir: str):
    tok = make_word_tokenizer()
    model = make_model(tok, w.size, w.seed)
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

    def one_iteration():
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
        for phase, (start, end) in zip(("sample", "score", "old_logp", "update"), zip(marks, marks[1:])):
            clock.add(phase, end[0] - start[0], end[1] - start[1])

    return model, one_iteration


# ----------------------------------------------------------------------------- components
def _cpu_median(fn, repeats: int) -> float:
    """Median CPU seconds of fn() over `repeats` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return statistics.median(times)


def run_micro(size: str = "W2", repeats: int = 7, threads: int = NUM_THREADS) -> dict:
    """CPU seconds of the pieces behind the library's speed-ups, before and after, each alone, on `size`'s model and an
    iteration's shapes (B = 32 rows of 8 prompts, T = 32): the evidence for gains too small to resolve
    in whole iterations on a shared machine."""
    from lmpg.diagnostics import GradientMoments
    from lmpg.logprobs import completion_logits, selective_log_softmax, shared_prompt_completion_logits
    from lmpg.rollout import sample_completions

    torch.set_num_threads(threads)
    tok = make_word_tokenizer()
    model = make_model(tok, size)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {"size": size, "threads": threads, "repeats": repeats}

    # 1. one AdamW step: for-each (before) vs fused (lmpg now)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for name, kw in (("adamw_step_s", {}), ("adamw_fused_step_s", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=1e-9, **kw)
        out[name] = _cpu_median(opt.step, repeats)

    # 2. GradientMoments on one micro-batch, as the update runs it (grad_snr=True; the result is NaN
    # with one micro-batch): gradients unset before the backward, set after it
    grads = [p.grad for p in params]

    def moments():
        m = GradientMoments(params)
        for p in params:
            p.grad = None
        m.before_backward()
        for p, g in zip(params, grads):
            p.grad = g
        m.after_backward(scale=1.0)
        m.result()
    out["grad_snr_moments_s"] = _cpu_median(moments, repeats)

    # 3. selective log-softmax forward + backward on (B, T, V) logits: sliced chunks (before) vs split
    for B in (32, 64, 128):
        logits = torch.randn(B, 32, VOCAB_SIZE)
        tokens = torch.randint(0, VOCAB_SIZE, (B, 32))
        for name, fn in (("sliced", sliced_selective_log_softmax), ("split", selective_log_softmax)):
            def fwd_bwd(fn=fn):
                z = logits.clone().requires_grad_()
                fn(z, tokens).sum().backward()
            out[f"log_softmax_{name}_B{B}_s"] = _cpu_median(fwd_bwd, repeats)

    # 4. a rollout of 8 prompts x 4 samples, then the training forward + backward: plain vs shared prompt
    roll = sample_completions(model, tok, make_prompts()[:8], 4, max_new_tokens=32, seeds=list(range(32)))
    group = torch.as_tensor(roll.prompt_index)
    args = (roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    for name, logits_fn in (("plain", lambda: completion_logits(model, *args)),
                            ("shared_prompt", lambda: shared_prompt_completion_logits(model, *args, group))):
        def fwd_bwd(logits_fn=logits_fn):
            selective_log_softmax(logits_fn(), roll.completion_ids).sum().backward()
            model.zero_grad(set_to_none=True)
        out[f"train_fwd_bwd_{name}_s"] = _cpu_median(fwd_bwd, max(repeats // 2, 3))

    # 5. the sampler: every row prefilled (before) vs each distinct prompt once (whole sampling)
    import lmpg.sampler

    for name, share in (("every_row_prefill", False), ("shared_prefill", True)):
        def sample(share=share):
            with patched(lmpg.sampler, "distinct_rows", every_row_distinct, not share):
                lmpg.sampler.sample_tokens(model, roll.prompt_ids, roll.prompt_mask, list(range(32)), max_new_tokens=32,
                                           eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
        out[f"sample_{name}_s"] = _cpu_median(sample, max(repeats // 2, 3))
    return out


# ----------------------------------------------------------------------------- runs
BUILDERS = {"lmpg": lambda: run_lmpg, "floor": lambda: run_floor, "trl": lambda: run_trl}


def _builder(impl: str):
    return BUILDERS[impl.split("-")[0]]()


def _result(impl: str, w: Workload, mode: str, warmup: int, seconds, cpu_seconds, phases, phases_cpu, model,
            **extra) -> dict:
    """One implementation's measurements (the first `warmup` iterations dropped)."""
    import transformers

    seconds, cpu_seconds = seconds[warmup:], cpu_seconds[warmup:]
    phases, phases_cpu = phases[warmup:], phases_cpu[warmup:]
    s = statistics.median(seconds)
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    return {
        "impl": impl, "size": w.size, "mode": mode, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "workload": asdict(w),
        "iters": len(seconds), "warmup": warmup,
        "s_per_iter": s, "s_per_iter_min": min(seconds), "s_per_iter_all": seconds,
        "cpu_s_per_iter": statistics.median(cpu_seconds), "cpu_s_per_iter_all": cpu_seconds,
        "tokens_per_s": w.batch_size * w.max_new_tokens / s,
        "phases": {p: statistics.median(ph[p] for ph in phases) for p in PHASES},
        "phases_cpu": {p: statistics.median(ph[p] for ph in phases_cpu) for p in PHASES},
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
    clock = PhaseClock()
    load_before = load_average()
    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_iteration_") as out_dir:
        model, runner = _builder(impl)(w, impl, iters, warmup, clock, os.path.join(out_dir, "run"))
        setup_s = time.perf_counter() - t_setup
        base_rss = rss_mb()
        peak_reset = reset_peak_rss()
        if impl.startswith("trl"):
            runner["trainer"].train()
            seconds, cpu_seconds, phases, phases_cpu = trl_results(runner)
        else:
            seconds, cpu_seconds, phases, phases_cpu = [], [], [], []
            for _ in range(warmup + iters):
                t0, c0 = time.perf_counter(), time.process_time()
                runner()
                seconds.append(time.perf_counter() - t0)
                cpu_seconds.append(time.process_time() - c0)
                wall, cpu = clock.lap(seconds[-1], cpu_seconds[-1])
                phases.append(wall)
                phases_cpu.append(cpu)
        iter_peak = vm_hwm_mb() if peak_reset else float("nan")
    _reset_accelerate()
    return _result(impl, w, "separate", warmup, seconds, cpu_seconds, phases, phases_cpu, model,
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
    record = {i: ([], [], [], []) for i in impls}  # wall s, CPU s, wall phases, CPU phases
    with tempfile.TemporaryDirectory(prefix="bench_iteration_") as out_dir:
        built = {}
        for i in local:
            clock = PhaseClock()
            built[i] = (clock, *_builder(i)(w, i, iters, warmup, clock, os.path.join(out_dir, i)))

        def one_round(k: int):
            for i in local[k % len(local):] + local[:k % len(local)]:
                clock, _, step = built[i]
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                wall_phases, cpu_phases = clock.lap(wall, cpu)
                for column, value in zip(record[i], (wall, cpu, wall_phases, cpu_phases)):
                    column.append(value)

        if trl_impls:
            model, runner = run_trl(w, "trl", iters, warmup, PhaseClock(), os.path.join(out_dir, "trl"),
                                    between=one_round if local else None)
            runner["trainer"].train()
            record["trl"] = trl_results(runner)
            built["trl"] = (None, model, None)
        else:
            for k in range(warmup + iters):
                one_round(k)
    _reset_accelerate()
    return [_result(i, w, "interleaved", warmup, *record[i], built[i][1]) for i in impls]


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
        s_iter = pooled("s_per_iter_all")
        rows.append({"impl": impl, "mode": mode, "size": size, "G": G, "T": T, "minibatch": mb,
                     "repeats": len(rs), "iters": sum(r["iters"] for r in rs),
                     "s_per_iter": s_iter, "cpu_s_per_iter": pooled("cpu_s_per_iter_all"),
                     "tokens_per_s": rs[0]["workload"]["num_prompts"] * G * T / s_iter,
                     "phases": {p: statistics.median(r["phases"][p] for r in rs) for p in PHASES},
                     "phases_cpu": {p: statistics.median(r["phases_cpu"][p] for r in rs) for p in PHASES}
                     if "phases_cpu" in rs[0] else None,
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
    """One line per row: wall and CPU seconds, phases (CPU seconds where measured), memory, ratios."""
    head = ("| mode | size | impl | G | T | mb | iters | s/iter | CPU s/iter | tokens/s | sample | score | "
            "old_logp | update | other | peak RSS MB | iter peak +MB | /floor | /floor CPU | /trl | /trl CPU |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda v, spec: "-" if v is None or v != v else format(v, spec)  # noqa: E731
    for r in rows:
        ph = r["phases_cpu"] or r["phases"]
        lines.append(
            f"| {r['mode']} | {r['size']} | {r['impl']} | {r['G']} | {r['T']} | {r['minibatch'] or r['G'] * 8} | "
            f"{r['iters']} | {r['s_per_iter']:.3f} | {r['cpu_s_per_iter']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{ph['sample']:.3f} | {ph['score']:.4f} | {ph['old_logp']:.3f} | {ph['update']:.3f} | {ph['other']:.3f} | "
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
    ap.add_argument("--micro", action="store_true",
                    help="time each speed-up's component before and after, alone (CPU seconds), on each --size")
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
            ap.error(f"unknown --impl {name}; choose from all, {', '.join(IMPLS)}")
    for name in sizes:
        if name not in SIZES:
            ap.error(f"unknown --size {name}; choose from {', '.join(SIZES)}")
    if not have_trl() and any(i.startswith("trl") for i in impls):
        print("TRL is not installed (pip install trl): skipping trl, trl-defaults", file=sys.stderr)
        impls = [i for i in impls if not i.startswith("trl")]

    if args.micro:
        results = [run_micro(size, threads=args.threads) for size in sizes]
        print(json.dumps(results, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return results

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
