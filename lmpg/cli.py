"""The `lmpg` command line.

    lmpg train CONFIG.yaml [key=value ...]          train with the policy gradient
    lmpg eval MODEL DATA --reward SPEC [--k K]      mean reward, accuracy and pass@k on a dataset
    lmpg sample MODEL "prompt" [--column K=V]       print completions of one prompt with their rewards
    lmpg plot RUN_DIR [-o out.png]                  plot a run's metrics.jsonl
    lmpg rewards                                    list the built-in reward functions

User errors (bad config, data or reward function) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
import textwrap

from lmpg.errors import ConfigError, LmpgError


def _config_help() -> str:
    """Every PGConfig field with its default, its allowed values (choice fields) and its docstring,
    wrapped to the terminal (at most 100 columns)."""
    from lmpg.config import PGConfig, choices, field_docs

    width = min(shutil.get_terminal_size().columns, 100)
    allowed = choices()
    defaults = PGConfig().to_dict()
    indent = " " * 6
    lines = ["config fields (YAML keys or key=value overrides):"]
    for name, doc in field_docs().items():
        lines.append(f"  {name} = {defaults[name]!r}")
        if name in allowed:
            lines.extend(textwrap.wrap("one of: " + ", ".join(allowed[name]), width, initial_indent=indent,
                                       subsequent_indent=indent))
        lines.extend(textwrap.wrap(doc, width, initial_indent=indent, subsequent_indent=indent))
    return "\n".join(lines)


def cmd_train(args) -> int:
    from lmpg.config import PGConfig
    from lmpg.trainer import PGTrainer

    config = PGConfig.from_yaml(args.config, args.overrides)
    if not config.model:
        raise LmpgError("no model to train; set model: NAME_OR_PATH in the config or model=... on the command line")
    if not config.dataset:
        raise LmpgError("no prompts; set dataset: FILE_OR_HUB_NAME in the config or dataset=... on the command line")
    trainer = PGTrainer(config.model, None, config.dataset, config)
    trainer.train()
    print(f"done: {config.output_dir}")
    return 0


def _reward_summary(fn) -> str:
    """First docstring line of a reward: its own, a partial's function's, else its module's."""
    own = fn.__dict__.get("__doc__") if isinstance(fn, functools.partial) else fn.__doc__
    target = fn.func if isinstance(fn, functools.partial) else fn
    module = sys.modules.get(getattr(target, "__module__", "") or "")
    for doc in (own, target.__doc__, getattr(module, "__doc__", None)):
        lines = (doc or "").strip().splitlines()
        if lines:
            return lines[0]
    return ""


def cmd_rewards(args) -> int:
    from lmpg.rewards.specs import builtin_rewards

    builtins = builtin_rewards()
    width = max(len(n) for n in builtins)
    for name, fn in sorted(builtins.items()):
        print(f"{name:<{width}}  {_reward_summary(fn)}")
    return 0


def cmd_eval(args) -> int:
    from lmpg.evaluate import evaluate, load_policy

    model, tokenizer = load_policy(args.model)
    result = evaluate(model, tokenizer, args.data, args.reward, k=args.k, n=args.n, temperature=args.temperature,
                      top_p=args.top_p, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      greedy=args.greedy, success_threshold=args.threshold, prompt_column=args.prompt_column,
                      split=args.split, limit=args.limit, seed=args.seed, reward_weights=args.weights,
                      on_error=args.on_error, environment=args.environment, tool_format=args.tool_format,
                      max_turns=args.max_turns, tool_timeout=args.tool_timeout)
    if args.json:
        print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                          for k, v in result.items()}, indent=2))
        return 0
    decoding = "greedy" if args.greedy else f"temperature {args.temperature}"
    print(f"{result['prompts']} prompts x {result['samples_per_prompt']} samples ({decoding}, "
          f"max_new_tokens {args.max_new_tokens})")
    print(f"  reward_mean   {result['reward_mean']:.4f} ± {result['reward_std']:.4f}")
    print(f"  accuracy      {result['accuracy']:.4f}   (reward >= {args.threshold})")
    print(f"  pass@{args.k:<8d} {result[f'pass@{args.k}']:.4f}")
    per_fn = {k: v for k, v in result.items() if k.startswith("reward/")}
    width = max([13] + [len(k) for k in per_fn])
    for key, value in per_fn.items():
        print(f"  {key:<{width}} {value:.4f}")
    if "turns_mean" in result:
        print(f"  turns_mean    {result['turns_mean']:.2f}, tool calls {result['tool_calls_per_episode']:.2f} "
              f"(errors {result['tool_errors_per_episode']:.2f}) per episode")
    print(f"  length_mean   {result['completion_len_mean']:.1f} tokens, truncated {result['truncated_frac']:.1%}"
          + (f", unscored {result['unscored_frac']:.1%}" if result["unscored_frac"] else ""))
    return 0


def episode_lines(rec: dict) -> list[str]:
    """An episode's samples record as text, turn by turn: reset's text, each turn (role, content, the
    environment's reward for an action), why it ended and any environment error."""
    lines = [f"reset: {rec['reset']}"] if rec.get("reset") else []
    for turn in rec["turns"]:
        reward = f"  [reward {turn['reward']:.4f}]" if turn.get("reward") is not None else ""
        lines.append(f"{turn['role']}: {turn['content']}{reward}")
    lines.append(f"ended: {rec['ended']}" + (f" ({rec['error']})" if rec.get("error") else ""))
    return lines


def cmd_sample(args) -> int:
    from lmpg.evaluate import load_policy, sample_and_score

    columns = {}
    for item in args.column:  # the prompt's row: reference columns such as answer=46
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--column {item!r} must be NAME=VALUE, e.g. --column answer=46")
        columns[name.strip()] = [value]
    model, tokenizer = load_policy(args.model)
    records = sample_and_score(model, tokenizer, [args.prompt], args.reward, args.n, columns=columns,
                               temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                               greedy=args.greedy, seed=args.seed, reward_weights=args.weights,
                               on_error=args.on_error, environment=args.environment, tool_format=args.tool_format,
                               max_turns=args.max_turns, tool_timeout=args.tool_timeout)
    print(f"prompt: {args.prompt!r}")
    for i, rec in enumerate(records):
        parts = [f"[{i}]"]
        if args.reward or (args.environment and rec["reward"] is not None):  # an environment rewards by itself
            reward = "None" if rec["reward"] is None else f"{rec['reward']:.4f}"
            per_fn = ", ".join(f"{k[len('reward/'):]} {v if v is None else format(v, '.4f')}"
                               for k, v in rec.items() if k.startswith("reward/"))
            parts.append(f"reward {reward}" + (f" ({per_fn})" if len(args.reward) > 1 else ""))
        parts.append(f"{rec['length']} tokens" + (", truncated" if rec["truncated"] else ""))
        print("  ".join(parts))
        if "turns" in rec:  # an episode, turn by turn: what reset() said, each action, reward, observation, the end
            print(textwrap.indent("\n".join(episode_lines(rec)), "    "))
            continue
        print(textwrap.indent(rec["completion"] or "(empty)", "    "))
    if args.reward and not columns and all(rec["reward"] is None for rec in records):
        print("every reward is None: a reward that compares with a reference (exact_match's `answer`, "
              "math_answer's `solution`) needs the prompt's row; pass it with --column NAME=VALUE, "
              "e.g. --column answer=46")
    return 0


def cmd_plot(args) -> int:
    from lmpg.plot import plot_run

    print(plot_run(args.run_dir, args.output))
    return 0


def _add_generation_args(p: argparse.ArgumentParser, n_help: str) -> None:
    from lmpg.rewards.scorer import ON_ERROR
    from lmpg.tools import TOOL_FORMATS

    p.add_argument("--reward", action="append", default=[], metavar="SPEC",
                   help="reward function: 'pkg.mod:fn', 'path/file.py:fn' or a built-in name (repeatable)")
    p.add_argument("--weights", type=float, nargs="+", default=None, metavar="W",
                   help="one weight per --reward (default 1.0 each); the reward is the weighted sum")
    p.add_argument("--n", type=int, default=None, help=n_help)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion length limit (default 64)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding: one completion per prompt")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--environment", default=None, metavar="SPEC",
                   help="run multi-turn episodes with this environment: 'pkg.module:Class' or 'file.py:Class'")
    p.add_argument("--tool-format", choices=TOOL_FORMATS, default="hermes",
                   help="how the policy writes tool calls (default hermes: <tool_call>{json}</tool_call>)")
    p.add_argument("--max-turns", type=int, default=4, help="policy turns per episode (default 4)")
    p.add_argument("--tool-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a tool call running longer becomes an error observation (default 10)")
    p.add_argument("--on-error", choices=ON_ERROR, default="raise",
                   help="a reward function that raises: stop (raise, default) or score the sample None")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmpg", description="Policy-gradient fine-tuning of causal language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train a policy with the policy gradient from a YAML config",
                           description="Train a policy. Fields come from CONFIG.yaml, then key=value overrides.",
                           epilog=_config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", nargs="?", help="YAML config file (optional if everything is given as key=value)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, values parsed as YAML")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="mean reward, accuracy and pass@k on a prompt dataset",
                        description="Sample n completions per prompt, score them, and report mean reward, accuracy "
                                    "(fraction with reward >= threshold) and the unbiased pass@k (Chen et al. 2021).")
    ev.add_argument("model", metavar="MODEL_OR_ADAPTER", help="saved model dir, hub name, or peft adapter dir")
    ev.add_argument("data", metavar="DATA", help="local .jsonl/.json/.csv/.parquet file with a prompt column")
    _add_generation_args(ev, "samples per prompt, n >= k (default: k)")
    ev.add_argument("--k", type=int, default=1, help="the k of pass@k (default 1)")
    ev.add_argument("--threshold", type=float, default=1.0,
                    help="a completion is correct when its reward >= this (default 1.0)")
    ev.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    ev.add_argument("--prompt-column", default="prompt", help="column holding the prompts (default prompt)")
    ev.add_argument("--split", default="train", help="split to read (default train)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.set_defaults(func=cmd_eval)

    sample = sub.add_parser("sample", help="print completions of one prompt with their rewards",
                            description="Generate completions of one prompt and print each with its reward.")
    sample.add_argument("model", metavar="MODEL_OR_ADAPTER", help="saved model dir, hub name, or peft adapter dir")
    sample.add_argument("prompt", help="the prompt text")
    sample.add_argument("--column", action="append", default=[], metavar="NAME=VALUE",
                        help="a column of the prompt's row for the rewards, e.g. --column answer=46 (repeatable)")
    _add_generation_args(sample, "completions to generate (default 4; 1 with --greedy)")
    sample.set_defaults(func=cmd_sample)

    plot = sub.add_parser("plot", help="plot a run's metrics.jsonl to a PNG",
                          description="Plot RUN_DIR/metrics.jsonl to a PNG (default RUN_DIR/metrics.png).")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by lmpg train")
    plot.add_argument("-o", "--output", default=None, metavar="OUT.png", help="where to write the PNG")
    plot.set_defaults(func=cmd_plot)

    rewards = sub.add_parser("rewards", help="list the built-in reward functions with their one-line docs")
    rewards.set_defaults(func=cmd_rewards)
    return parser


def exit_status(call, prog: str = "lmpg") -> int:
    """`call()`'s exit status, with a user error (LmpgError) printed as one line `PROG: error: ...` on
    stderr and status 2, and Ctrl-C as status 130; anything else is a bug and keeps its traceback.
    Recipes run their main() through it too."""
    try:
        return call()
    except LmpgError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.config and "=" in args.config:
        args.overrides.insert(0, args.config)  # `lmpg train key=value ...` without a file
        args.config = None
    if args.command == "sample" and args.n is None:
        args.n = 1 if args.greedy else 4
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return exit_status(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
