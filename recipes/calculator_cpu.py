"""Sums with a calculator tool on a laptop CPU: multi-turn episodes where the environment matters.

    python recipes/calculator_cpu.py recipes/calculator_cpu.yaml [--output-dir DIR] [--fast] [key=value ...]

Nothing is downloaded. Keys are fields of lmpg.PGConfig (the RL phase, in the YAML) or of
CalculatorRecipe below. --fast is a ~1 minute smoke run for tests.

1. build a character tokenizer (with a chat template that renders tool results) and a tiny Llama;
2. make 3-digit addition problems, train and held-out disjoint;
3. measure the demonstrator, who calls the calculator only 40% of the time and otherwise adds in its
   head, forgetting the units carry (lmpg/tasks/calculator.py);
4. imitation warm start on its episodes, the tool's tokens in the input but not in the targets;
5. measure the warm start: held-out success and tool calls per episode, greedy and sampled;
6. RL with lmpg over episodes (environment: lmpg.tasks.calculator:Calculator, reward 1 for the sum);
7. measure the RL policy; print the table and save it to success.json in the run directory.
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
from lmpg.environments import EpisodeEnv
from lmpg.episodes import ChatBridge, EpisodeLimits, reward_completions, render_episode_prompt, sample_episodes
from lmpg.recipe import recipe_settings
from lmpg.sampler import row_seed
from lmpg.sft import imitate_tokens
from lmpg.tasks import calculator
from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm


@dataclass
class CalculatorRecipe:
    n_digits: int = 3
    """Digits of each operand."""
    n_train: int = 8000
    """Training problems: one demonstration each for the warm start, and the RL prompts."""
    n_heldout: int = 500
    """Held-out problems (never trained on, in either operand order)."""
    tool_probability: float = calculator.TOOL_PROBABILITY
    """How often the demonstrator calls the calculator."""
    n_layer: int = 2
    """Transformer layers of the tiny Llama."""
    n_embd: int = 96
    """Hidden size of the tiny Llama."""
    n_head: int = 4
    """Attention heads."""
    sft_steps: int = 600
    """Optimizer steps of the imitation warm start."""
    sft_batch_size: int = 64
    """Demonstrations per warm-start step."""
    sft_learning_rate: float = 2e-3
    """Peak learning rate of the warm start."""
    num_threads: int = 1
    """torch CPU threads (1 is the safe default on a shared machine)."""


FAST_OVERRIDES = ["n_digits=2", "n_train=2000", "n_heldout=200", "sft_steps=400", "iterations=20",
                  "batch_size=64", "max_new_tokens=11", "log_every=5"]


def demonstration_tokens(tokenizer, problems, episodes):
    """(input_ids, attention_mask, target_mask) (N, L): prompt, then each turn; the assistant's tokens
    (and their EOS) are targets, the tool's are not."""
    env = EpisodeEnv(calculator.Calculator(), "simple")
    bridge = ChatBridge(tokenizer, "tool", env.schemas)
    rows = []
    for problem, messages in zip(problems, episodes):
        text, _ = render_episode_prompt(tokenizer, calculator.prompt_messages(problem), None, env.schemas)
        ids = tokenizer.encode(text, add_special_tokens=False)
        target = [False] * len(ids)
        for m in messages:
            new = (tokenizer.encode(m["content"], add_special_tokens=False) + [tokenizer.eos_token_id]
                   if m["role"] == "assistant" else bridge.ids(m["content"]))
            ids, target = ids + new, target + [m["role"] == "assistant"] * len(new)
        rows.append((ids, target))
    L = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros(len(rows), L, dtype=torch.bool)
    target_mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, (ids, target) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = True
        target_mask[i, :len(ids)] = torch.tensor(target)
    return input_ids, attention, target_mask


def measure(model, tokenizer, problems, config, greedy: bool, batch: int = 250) -> dict:
    """Held-out success and tool calls per episode, one episode per problem (greedy or sampled)."""
    success, tools, turns = [], [], []
    limits = EpisodeLimits(config.max_turns, config.max_new_tokens, config.max_episode_tokens)
    for start in range(0, len(problems), batch):
        chunk = problems[start:start + batch]
        out = sample_episodes(model, tokenizer, [calculator.prompt_messages(p) for p in chunk], [{}] * len(chunk),
                              lambda: EpisodeEnv(calculator.Calculator(), "simple"), 1,
                              seeds=[row_seed(config.seed, -1, start + i, 0) for i in range(len(chunk))],
                              env_seeds=[0] * len(chunk), limits=limits, eos_ids=[tokenizer.eos_token_id],
                              top_k=1 if greedy else 0)
        success += calculator.sum_reward(None, reward_completions(out, True), [str(p.a + p.b) for p in chunk])
        tools += [e.tool_calls for e in out.episodes]
        turns += [e.turns for e in out.episodes]
    n = len(problems)
    return {"success": sum(success) / n, "tool_calls": sum(tools) / n, "turns": sum(turns) / n}


def format_report(table: dict, seconds: dict, n: int) -> str:
    names = {"demonstrator": "demonstrator", "warm_start": "warm start (imitation)", "rl_policy": "RL policy"}
    lines = [f"{f'held-out ({n} sums)':<26}{'success':>9}{'tool calls':>12}{'success':>10}{'tool calls':>12}",
             f"{'':<26}{'greedy':>21}{'sampled':>22}"]
    for k, v in table.items():
        g, s = v["greedy"], v["sampled"]
        lines.append(f"{names[k]:<26}{g['success']:>9.3f}{g['tool_calls']:>12.3f}{s['success']:>10.3f}"
                     f"{s['tool_calls']:>12.3f}")
    lines += ["", "wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())]
    return "\n".join(lines)


def main(argv=None) -> dict:
    recipe, config = recipe_settings(argv, description=__doc__, settings_cls=CalculatorRecipe,
                                     default_config=Path(__file__).with_suffix(".yaml"),
                                     fast_overrides=FAST_OVERRIDES, marker="success.json")
    output_dir = Path(config.output_dir)
    torch.set_num_threads(recipe.num_threads)
    seconds, clock = {}, [time.perf_counter()]

    def lap(phase):
        seconds[phase] = time.perf_counter() - clock[0]
        clock[0] = time.perf_counter()

    # 1. tokenizer with a tool-rendering chat template, tiny model
    tokenizer = make_char_tokenizer(calculator.ALPHABET, model_max_length=128)
    tokenizer.chat_template = calculator.CHAT_TEMPLATE
    model = make_tiny_causal_lm(tokenizer, n_layer=recipe.n_layer, n_embd=recipe.n_embd, n_head=recipe.n_head,
                                max_position_embeddings=128, seed=config.seed)
    # 2. problems
    train, heldout = calculator.make_problems(recipe.n_train, recipe.n_heldout, recipe.n_digits, seed=config.seed)
    # 3. the demonstrator (exact)
    table = {"demonstrator": calculator.demonstrator_success(heldout, recipe.tool_probability)}
    lap("setup")

    # 4. imitation warm start on the demonstrator's episodes
    demos = calculator.sample_demonstrations(train, recipe.tool_probability, seed=config.seed)
    stats = imitate_tokens(model, *demonstration_tokens(tokenizer, train, demos), steps=recipe.sft_steps,
                           batch_size=recipe.sft_batch_size, lr=recipe.sft_learning_rate, seed=config.seed)
    print(f"warm start: nll {stats['loss_first']:.3f} -> {stats['loss_last']:.3f} in {stats['steps']} steps", flush=True)
    lap("warm_start")

    # 5. measure the warm start
    table["warm_start"] = {"greedy": measure(model, tokenizer, heldout, config, True),
                           "sampled": measure(model, tokenizer, heldout, config, False)}
    lap("eval_warm_start")

    # 6. RL over episodes
    prompts = datasets.Dataset.from_dict({"prompt": [calculator.prompt_messages(p) for p in train],
                                          "answer": [str(p.a + p.b) for p in train]})
    trainer = PGTrainer(model, [calculator.sum_reward], prompts, config, tokenizer=tokenizer)
    metrics = trainer.train()
    lap("rl")

    # 7. measure the RL policy
    policy = trainer.accelerator.unwrap_model(trainer.model)
    table["rl_policy"] = {"greedy": measure(policy, tokenizer, heldout, config, True),
                          "sampled": measure(policy, tokenizer, heldout, config, False)}
    lap("eval_rl_policy")
    seconds["total"] = sum(seconds.values())
    result = {"table": table, "seconds": seconds, "heldout_problems": len(heldout),
              "rl_reward_mean": {"first": metrics[0]["reward_mean"], "last": metrics[-1]["reward_mean"]},
              "rl_tool_calls_per_episode": {"first": metrics[0]["tool_calls_per_episode"],
                                            "last": metrics[-1]["tool_calls_per_episode"]},
              "recipe": dataclasses.asdict(recipe)}
    print(format_report(table, seconds, len(heldout)), flush=True)
    (output_dir / "success.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(exit_status(lambda: 0 if main() else 1, prog="calculator_cpu.py"))
