"""The fixed workload of the CPU iteration benchmarks: model shapes, tokenizer, prompts, reward, memory probes.

Imported by bench_iteration.py (seconds per iteration), bench_components.py (the update's pieces
alone), bench_memory.py and bench_vocab_memory.py (peak memory). Importing it first sets the
environment the measurements assume (below), before torch loads.

- The model: a Llama built from a config (`lmpg.tiny.make_tiny_causal_lm`, seed 0, tied embeddings)
  on a word-level tokenizer (`lmpg.tiny.make_word_tokenizer`) with V = 4096, so the (B, T, V)
  log-softmax costs what it costs with a real vocabulary. `SIZES`: quick (1 layer, width 64), W1 (3
  layers, width 256, 4.2M parameters), W2 (7 layers, width 512, 31.5M), W2-lora (W2 with LoRA r=16,
  alpha 16 on every linear layer). A `ModelShape` with arch="qwen2" builds a Qwen2 instead
  (bench_vocab_memory.py's real-vocabulary shapes).
- No early stop: `lmpg.tiny.suppress_eos` gives the output layer a frozen bias of -1e4 on the EOS
  logit (a bias parameter of `lm_head`, which TRL's fused log-prob head reads too), so every
  completion of every sampler is exactly max_new_tokens long.
- The prompts: 12 to 20 random words; the reward (`reward_sevens`): the fraction of completion
  words that end in "7" (pure Python, microseconds).
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

# Threads that wait at an OpenMP barrier sleep instead of spinning. On a machine shared with other jobs
# the default (spin) made iterations 5 to 20 times slower and 3 times as variable: a spinning thread
# holds a core the descheduled other thread needs. Set before torch loads libgomp; the same for all.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB_SIZE = 4096
NUM_THREADS = 2


@dataclass(frozen=True)
class ModelShape:
    """A causal LM built from a config: a Llama (`lmpg.tiny.make_tiny_causal_lm`) or a Qwen2."""

    n_layer: int
    n_embd: int
    n_head: int
    lora_r: int = 0
    """LoRA rank on every linear layer (0: full fine-tuning)."""
    arch: str = "llama"
    """llama, or qwen2 (grouped-query attention, `n_kv_head` and `intermediate` used)."""
    n_kv_head: int | None = None
    intermediate: int | None = None
    vocab_size: int = VOCAB_SIZE


SIZES = {
    "quick": ModelShape(1, 64, 2),
    "W1": ModelShape(3, 256, 4),
    "W2": ModelShape(7, 512, 8),
    "W2-lora": ModelShape(7, 512, 8, lora_r=16),
}


@dataclass
class Workload:
    """What one iteration does; every implementation gets the same one."""

    size: str = "W1"
    """A name in SIZES, or the name of `shape` when that is given."""
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
    shape: ModelShape | None = None
    """The model, where `size` is not a name in SIZES."""

    @property
    def batch_size(self) -> int:
        return self.num_prompts * self.group_size

    @property
    def model_shape(self) -> ModelShape:
        return self.shape if self.shape is not None else SIZES[self.size]

    @property
    def lora_r(self) -> int:
        return self.model_shape.lora_r


def make_tokenizer(w: Workload):
    """The word-level tokenizer of `w`'s vocabulary size."""
    from lmpg.tiny import make_word_tokenizer

    return make_word_tokenizer(w.model_shape.vocab_size)


def make_model(tokenizer, shape: ModelShape | str, seed: int = 0, eos_suppressed: bool = True):
    """A model of `shape` (or the SIZES name) with random weights from `seed`, EOS suppressed (an
    output-layer bias; eos_suppressed=False leaves the model as built, for engines whose model class has
    no such bias, bench_vllm.py)."""
    from lmpg.tiny import make_tiny_causal_lm, suppress_eos

    s = SIZES[shape] if isinstance(shape, str) else shape
    if s.arch == "llama":
        model = make_tiny_causal_lm(tokenizer, n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head,
                                    max_position_embeddings=256, seed=seed)
    elif s.arch == "qwen2":
        import torch
        import transformers

        config = transformers.Qwen2Config(
            vocab_size=s.vocab_size, hidden_size=s.n_embd, num_hidden_layers=s.n_layer, num_attention_heads=s.n_head,
            num_key_value_heads=s.n_kv_head or s.n_head, intermediate_size=s.intermediate or 4 * s.n_embd,
            max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.Qwen2ForCausalLM(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.do_sample = True
    else:
        raise ValueError(f"unknown arch {s.arch!r}; choose llama or qwen2")
    if eos_suppressed:
        suppress_eos(model, tokenizer.eos_token_id)
    return model


def lora_config(r: int):
    """The LoRA adapter all implementations get: rank r, alpha 16, every linear layer."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def make_prompts(n: int = 64, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> list[str]:
    """n prompts of 12 to 20 random words."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(vocab_size - 4)}" for _ in range(rng.randint(12, 20))) for _ in range(n)]


def reward_sevens(prompts, completions, **kwargs) -> list[float]:
    """Fraction of the completion's words that end in '7' (about 0.1 for a random policy)."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(w.endswith("7") for w in words) / max(len(words), 1))
    return out


# ----------------------------------------------------------------------------- memory and load
def rss_mb() -> float:
    """This process's resident set now, MB."""
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
    """This process's peak resident set since start or the last `reset_peak_rss`, MB."""
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
