"""The `lmpg` command line.

    lmpg train CONFIG.yaml [key=value ...]   train with the policy gradient
    lmpg rewards                             list the built-in reward functions

User errors (bad config, data or reward function) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from lmpg.errors import LmpgError


def _config_help() -> str:
    from lmpg.config import PGConfig, field_docs

    docs = field_docs()
    defaults = PGConfig().to_dict()
    lines = ["config fields (YAML keys or key=value overrides):"]
    for name, doc in docs.items():
        lines.append(f"  {name} = {defaults[name]!r}")
        lines.extend(textwrap.wrap(doc, 96, initial_indent="      ", subsequent_indent="      "))
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


def cmd_rewards(args) -> int:
    from reward_fns import BUILTIN_REWARDS

    width = max(len(n) for n in BUILTIN_REWARDS)
    for name, fn in sorted(BUILTIN_REWARDS.items()):
        doc = (fn.__doc__ or "").strip().splitlines()
        print(f"{name:<{width}}  {doc[0] if doc else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmpg", description="Policy-gradient fine-tuning of causal language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train a policy with the policy gradient from a YAML config",
                           description="Train a policy. Fields come from CONFIG.yaml, then key=value overrides.",
                           epilog=_config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", nargs="?", help="YAML config file (optional if everything is given as key=value)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, values parsed as YAML")
    train.set_defaults(func=cmd_train)
    rewards = sub.add_parser("rewards", help="list the built-in reward functions with their one-line docs")
    rewards.set_defaults(func=cmd_rewards)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and args.config and "=" in args.config:
        args.overrides.insert(0, args.config)  # `lmpg train key=value ...` without a file
        args.config = None
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except LmpgError as e:
        print(f"lmpg: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmpg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
