"""What the demo recipes (recipes/*_cpu.py) share: their command line, settings and run directory.

    python recipes/NAME.py [CONFIG.yaml] [key=value ...] [--output-dir DIR] [--fast]

A key=value names a field of the recipe's own settings dataclass or of PGConfig
(`split_settings`); `--fast` puts the recipe's smoke-run overrides first, so the user's
own overrides still win; the output directory is made ready by `prepare_recipe_dir`
(the recipe's own directory is replaced on a second run, one the user named is never touched).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from lmpg.config import PGConfig
from lmpg.errors import ConfigError
from lmpg.run_dir import RUN_MARKER


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
    args = parser.parse_intermixed_args(argv)  # key=value after --fast too, as the usage line writes it
    if "=" in args.config:  # no YAML given: the first positional is an override
        args.overrides.insert(0, args.config)
        args.config = parser.get_default("config")
    overrides = (fast_overrides if args.fast else []) + args.overrides
    overrides += [f"output_dir={args.output_dir}"] if args.output_dir else []
    settings, config = split_settings(settings_cls, args.config, overrides)
    # the recipe's own YAML named on the command line (`recipes/NAME.yaml`, as the README writes it)
    # is still the recipe's own directory; only a YAML of the user's names a directory of theirs
    own_yaml = Path(args.config).resolve() == Path(default_config).resolve()
    chosen = bool(args.output_dir) or not own_yaml or any(
        item.partition("=")[0].strip() == "output_dir" for item in args.overrides)
    return settings, prepare_recipe_dir(config, chosen=chosen, fast=args.fast, marker=marker)


def split_settings(settings_cls, config_path: str | Path | None, overrides: list[str]) -> tuple[Any, PGConfig]:
    """(settings, config) for a script with settings of its own beside PGConfig's (a recipe): the
    `key=value` overrides that name a field of the dataclass `settings_cls` build it, read as its
    defaults' types; the rest, over the YAML at config_path, build the PGConfig. A value that does
    not convert is a one-line ConfigError."""
    own = {f.name: f.default for f in fields(settings_cls)}
    values, rest = {}, []
    for item in overrides:
        key, _, raw = item.partition("=")
        key = key.strip()
        if key not in own:
            rest.append(item)
            continue
        try:
            values[key] = type(own[key])(yaml.safe_load(raw))
        except (TypeError, ValueError, yaml.YAMLError):
            raise ConfigError(f"{key}={raw!r} is not a valid {type(own[key]).__name__}; e.g. {key}={own[key]}") from None
    return settings_cls(**values), PGConfig.from_yaml(config_path, rest)


def prepare_recipe_dir(config: PGConfig, *, chosen: bool, fast: bool, marker: str) -> PGConfig:
    """The config a demo recipe runs with, its output directory ready, so that a newcomer's second run
    just works and nothing of the user's is lost.

    chosen: whether the user named the directory (--output-dir, an output_dir override, their own
    YAML). If not, it is the recipe's own: its YAML's output_dir, with `_fast` appended for a --fast
    run (a smoke run never takes the full run's place), and a previous run of the recipe there (its
    `marker` file, or an lmpg run's marker) is removed. Any other non-empty directory is refused in one
    line (ConfigError), except that overwrite_output_dir=true hands it to the trainer (must_replace).
    """
    if fast and not chosen:
        config = dataclasses.replace(config, output_dir=f"{config.output_dir}_fast")
    out = Path(config.output_dir)
    if not out.is_dir() or not any(out.iterdir()):
        return config
    if not chosen and any((out / name).exists() for name in (marker, RUN_MARKER)):
        shutil.rmtree(out)
        return config
    if config.overwrite_output_dir:
        return config
    what = "a run" if (out / marker).exists() or (out / RUN_MARKER).exists() else "files"
    raise ConfigError(f"output_dir {out} already holds {what}; pass --output-dir with a new directory, remove it, "
                      "or set overwrite_output_dir=true to replace a run")
