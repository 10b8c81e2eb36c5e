"""Addition on a laptop CPU: imitate a careless demonstrator, then go past it with the policy gradient.

    python recipes/addition_cpu.py recipes/addition_cpu.yaml [--output-dir DIR] [--fast] [key=value ...]

Nothing is downloaded. Keys are fields of lmpg.PGConfig (the RL phase, in the YAML) or of
AdditionRecipe below (task, model, warm start). --fast is a < 1 minute smoke run for tests.

1. build a character tokenizer and a tiny Llama from a config;
2. make 3-digit addition problems ("123+459=" -> "285", the sum reversed), train and held-out disjoint;
3. measure the demonstrator, who forgets the carry out of the units column 80% of the time;
4. imitation warm start: supervised learning on one demonstration per training problem;
5. measure the warm start, greedy and sampled at temperature 1;
6. RL with lmpg on the exact-answer reward: G samples per prompt, group-mean baseline;
7. measure the RL policy; print the accuracy table and the wall time of each phase, and save both
   to accuracy.json in the run directory.

Imitation reproduces the demonstrator, mistakes included: its greedy answer forgets the carry like
the demonstrator's. Sampling still finds the right answer now and then, and the reward singles it
out, so after RL the policy beats the demonstrator it learned from (see lmpg/tasks/addition.py).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from lmpg import PGTrainer
from lmpg.cli import exit_status
from lmpg.evaluate import evaluate
from lmpg.recipe import recipe_settings
from lmpg.sft import imitation_warm_start
from lmpg.tasks import addition
from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm
from reward_fns import exact_match

ALPHABET = "0123456789+="


@dataclass
class AdditionRecipe:
    n_digits: int = 3
    """Digits of each operand."""
    n_train: int = 20000
    """Training problems: one demonstration each for the warm start, and the RL prompts."""
    n_heldout: int = 2000
    """Held-out problems for the accuracy table (never trained on, in either operand order)."""
    forget_probability: float = addition.FORGET_PROBABILITY
    """How often the demonstrator forgets the carry out of the units column."""
    n_layer: int = 2
    """Transformer layers of the tiny Llama."""
    n_embd: int = 128
    """Hidden size of the tiny Llama."""
    n_head: int = 8
    """Attention heads of the tiny Llama (8 reached the demonstrator for every seed tried; 4 stalled for some)."""
    sft_steps: int = 1500
    """Optimizer steps of the imitation warm start."""
    sft_batch_size: int = 128
    """Demonstrations per warm-start step."""
    sft_learning_rate: float = 2e-3
    """Peak AdamW learning rate of the warm start (linear warmup, cosine decay). At 3e-3 or 1e-3 the
    loss stayed on a plateau for some seeds; 2e-3 reached the demonstrator within 1000 steps for
    every seed tried."""
    eval_batch_size: int = 500
    """Prompts per generate call when measuring accuracy."""
    num_threads: int = 1
    """torch CPU threads. One is the safe default on a shared 2-core machine: with another busy
    process, two threads made each warm-start step 26 times slower (their OpenMP barriers wait for a
    core), one thread only about twice. Set 2 on an idle machine."""


# A smoke run of every step (tests): 2-digit sums, a smaller model, a few RL iterations.
FAST_OVERRIDES = [
    "n_digits=2", "n_train=2000", "n_heldout=400", "sft_steps=600", "sft_batch_size=64",
    "iterations=40", "batch_size=128", "max_new_tokens=4", "log_every=10",
]


def measure(model, tokenizer, problems: list[addition.AdditionProblem], batch_size: int, seed: int) -> dict:
    """Held-out accuracy of `model` (lmpg.evaluate with the training reward, exact_match): greedy, and
    one sample per problem at temperature 1 (the expected reward of the policy RL trains)."""
    n_digits = max(len(str(max(p.a, p.b))) for p in problems)
    common = dict(max_new_tokens=n_digits + 2, batch_size=batch_size, seed=seed)  # n + 1 digits, then EOS
    heldout = addition.problem_columns(problems)
    return {
        "greedy": evaluate(model, tokenizer, heldout, exact_match, greedy=True, **common)["accuracy"],
        "sampled": evaluate(model, tokenizer, heldout, exact_match, temperature=1.0, **common)["accuracy"],
    }


def format_report(accuracy: dict, seconds: dict, n_heldout: int) -> str:
    """The accuracy table and the wall time of each phase, as printed at the end of the run."""
    names = {"demonstrator": "demonstrator", "warm_start": "warm start (imitation)", "rl_policy": "RL policy"}
    lines = [f"{f'held-out accuracy ({n_heldout} problems)':<36}{'greedy':>8}{'sampled':>10}"]
    lines += [f"{names[k]:<36}{v['greedy']:>8.3f}{v['sampled']:>10.3f}" for k, v in accuracy.items()]
    lines += ["", "wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    recipe, config = recipe_settings(argv, description=__doc__, settings_cls=AdditionRecipe,
                                     default_config=Path(__file__).with_suffix(".yaml"),
                                     fast_overrides=FAST_OVERRIDES, marker="accuracy.json")
    output_dir = Path(config.output_dir)
    torch.set_num_threads(recipe.num_threads)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        seconds[phase] = time.perf_counter() - clock
        clock = time.perf_counter()

    # 1. tokenizer and tiny model, built in-process
    tokenizer = make_char_tokenizer(ALPHABET)
    model = make_tiny_causal_lm(tokenizer, n_layer=recipe.n_layer, n_embd=recipe.n_embd,
                                n_head=recipe.n_head, seed=config.seed)
    # 2. problems
    train, heldout = addition.make_problems(recipe.n_train, recipe.n_heldout, recipe.n_digits, seed=config.seed)
    lap("setup")

    # 3. the demonstrator (exact: it is a known distribution)
    accuracy = {"demonstrator": {
        "greedy": addition.demonstrator_accuracy(heldout, True, recipe.forget_probability),
        "sampled": addition.demonstrator_accuracy(heldout, False, recipe.forget_probability),
    }}

    # 4. imitation warm start
    demonstrations = addition.sample_demonstrations(train, recipe.forget_probability, seed=config.seed)
    sft_stats = imitation_warm_start(model, tokenizer, [p.prompt for p in train], demonstrations,
                                     steps=recipe.sft_steps, batch_size=recipe.sft_batch_size,
                                     lr=recipe.sft_learning_rate, seed=config.seed)
    print(f"warm start: nll {sft_stats['loss_first']:.3f} -> {sft_stats['loss_last']:.3f} "
          f"in {sft_stats['steps']} steps", flush=True)
    lap("warm_start")

    # 5. measure the warm start
    accuracy["warm_start"] = measure(model, tokenizer, heldout, recipe.eval_batch_size, config.seed)
    if accuracy["warm_start"]["greedy"] < 0.9 * accuracy["demonstrator"]["greedy"]:
        print(f"warning: the warm start ({accuracy['warm_start']['greedy']:.3f} greedy) has not caught up "
              f"with the demonstrator ({accuracy['demonstrator']['greedy']:.3f}), so RL starts from a weaker "
              "policy; raise sft_steps or try another seed", flush=True)
    lap("eval_warm_start")

    # 6. RL with lmpg on the exact-answer reward
    prompts = datasets.Dataset.from_dict(addition.problem_columns(train))
    trainer = PGTrainer(model, [exact_match], prompts, config, tokenizer=tokenizer)
    metrics = trainer.train()
    lap("rl")

    # 7. measure the RL policy; report
    policy = trainer.accelerator.unwrap_model(trainer.model)
    accuracy["rl_policy"] = measure(policy, tokenizer, heldout, recipe.eval_batch_size, config.seed)
    lap("eval_rl_policy")
    seconds["total"] = sum(seconds.values())
    result = {
        "accuracy": accuracy,
        "seconds": seconds,
        "heldout_problems": len(heldout),
        "warm_start_nll": {"first": sft_stats["loss_first"], "last": sft_stats["loss_last"]},
        "rl_reward_mean": {"first": metrics[0]["reward_mean"], "last": metrics[-1]["reward_mean"]},
        "recipe": dataclasses.asdict(recipe),
    }
    print(format_report(accuracy, seconds, len(heldout)), flush=True)
    (output_dir / "accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(exit_status(lambda: 0 if main() else 1, prog="addition_cpu.py"))
