"""What the demo recipes (recipes/*_cpu.py) share: their command line, settings and run directory.

    python recipes/NAME.py [CONFIG.yaml] [key=value ...] [--output-dir DIR] [--fast]

A key=value names a field of the recipe's own settings dataclass or of PGConfig
(`lmpg.config.split_settings`); `--fast` puts the recipe's smoke-run overrides first, so the user's
own overrides still win; the output directory is made ready by `lmpg.run_dir.prepare_recipe_dir`
(the recipe's own directory is replaced on a second run, one the user named is never touched).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lmpg.config import PGConfig, split_settings
from lmpg.run_dir import prepare_recipe_dir


def recipe_settings(argv: list[str] | None, *, description: str, settings_cls, default_config: Path,
                    fast_overrides: list[str], marker: str) -> tuple[Any, PGConfig]:
    """(settings, config) of a recipe run from its command line, its output directory ready.

    default_config: the recipe's YAML; marker: the file a finished run of the recipe leaves in its
    output directory (a directory holding it is a previous run of this recipe)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=str(default_config),
                        help=f"YAML of PGConfig fields (default: {default_config.name})")
    parser.add_argument("overrides", nargs="*", help=f"key=value, a PGConfig or {settings_cls.__name__} field")
    parser.add_argument("--output-dir", default=None,
                        help="run directory, new or empty (default: output_dir of the YAML, with _fast for --fast, "
                             "where a second run replaces the first)")
    parser.add_argument("--fast", action="store_true", help="a short smoke run (what the tests run)")
    args = parser.parse_args(argv)
    if "=" in args.config:  # no YAML given: the first positional is an override
        args.overrides.insert(0, args.config)
        args.config = parser.get_default("config")
    overrides = (fast_overrides if args.fast else []) + args.overrides
    overrides += [f"output_dir={args.output_dir}"] if args.output_dir else []
    settings, config = split_settings(settings_cls, args.config, overrides)
    chosen = bool(args.output_dir) or args.config != parser.get_default("config") or any(
        item.partition("=")[0].strip() == "output_dir" for item in args.overrides)
    return settings, prepare_recipe_dir(config, chosen=chosen, fast=args.fast, marker=marker)
