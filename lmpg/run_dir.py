"""The run directory: what may be written where, and whether a run starts, resumes or is refused.

    output_dir/
        lmpg_run.json      marker: {"iteration", "iterations", "finished"} (a directory is an lmpg run)
        config.yaml        the resolved config
        metrics.jsonl      one line of deterministic figures per iteration
        timings.jsonl      one line of wall-clock figures per iteration
        samples.jsonl      logged completions with their rewards and advantages
        checkpoints/       lmpg.checkpoint
        final/             the trained policy (save_pretrained)

A run is never overwritten silently: a directory holding a run is resumed (resume=auto or a path),
replaced (overwrite_output_dir=true) or refused with a one-line error; a directory holding other
files is always refused. The one exception is a demo recipe's own directory, which holds only that
recipe's previous run and is replaced (`lmpg.recipe.prepare_recipe_dir`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lmpg.checkpoint import latest_checkpoint
from lmpg.config import PGConfig, import_path
from lmpg.errors import ConfigError
from lmpg.metrics import JsonlWriter, read_jsonl

RUN_MARKER = "lmpg_run.json"
LOG_FILES = ("metrics.jsonl", "timings.jsonl", "samples.jsonl")


def resume_checkpoint(config: PGConfig, out: Path) -> Path | None:
    """The checkpoint a run continues from, or None to start afresh."""
    if config.resume == "never":
        return None
    if config.resume == "auto":
        return latest_checkpoint(out)
    path = Path(config.resume)
    if not path.is_dir():
        raise ConfigError(f"resume={config.resume} is not a checkpoint directory; use resume=auto or a path "
                          f"under {out / 'checkpoints'}")
    return path


def must_replace(config: PGConfig, out: Path, resume_from: Path | None) -> bool:
    """Whether the old run's logs in `out` are to be removed before starting; refuses (ConfigError)
    a non-empty directory this config may not take over."""
    if resume_from is not None or not out.exists() or not any(out.iterdir()):
        return False
    marker = out / RUN_MARKER
    if not marker.exists():
        raise ConfigError(f"output_dir {out} already holds files that are not an lmpg run; "
                          "choose an empty or new output_dir")
    # resume=auto on a run that died before its first checkpoint: nothing to keep, start again
    if config.overwrite_output_dir or config.resume == "auto":
        return True
    raise ConfigError(f"output_dir {out} already holds a run; set resume=auto to continue it, "
                      "overwrite_output_dir=true to replace it, or choose another output_dir")


def described_config(config: PGConfig, model, dataset, reward_fns, reward_weights=None,
                     peft_config=None) -> tuple[PGConfig, list[str]]:
    """(config, notes): what a run started from Python writes to config.yaml, so that `lmpg train`
    can run it again. The model, dataset and reward functions PGTrainer was given fill the config
    fields left unset where they have a name to load again (a model's name or path, or its
    `name_or_path`; a dataset's path; a reward's spec or 'module:function'); each that has none, and
    an environment class of the script that ran (`__main__`), gets a note (a comment in config.yaml)."""
    changes, notes = {}, []
    rerun = "to rerun this file with `lmpg train`"
    if config.model is None:
        name = str(model) if isinstance(model, (str, Path)) else getattr(model, "name_or_path", None)
        if isinstance(name, str) and name:
            changes["model"] = name
            if not isinstance(model, (str, Path)):
                notes.append("model: the name_or_path of the model object passed in Python (weights changed "
                             "after it was loaded are not in it)")
        else:
            notes.append(f"model: a model built in Python, with no name or path; set model: NAME_OR_PATH {rerun}")
    if config.dataset is None:
        if isinstance(dataset, (str, Path)):
            changes["dataset"] = str(dataset)
        else:
            notes.append(f"dataset: prompts passed in memory; save them to a .jsonl file and set dataset: FILE {rerun}")
    if not config.rewards and reward_fns:
        fns = [reward_fns] if callable(reward_fns) or isinstance(reward_fns, str) else list(reward_fns)
        specs = [fn if isinstance(fn, str) else _importable(fn, "rewards") for fn in fns]
        if all(specs):
            changes["rewards"] = specs
            if reward_weights is not None and config.reward_weights is None:
                changes["reward_weights"] = [float(w) for w in reward_weights]
        else:
            names = ", ".join(getattr(fn, "__name__", type(fn).__name__) for fn, spec in zip(fns, specs) if not spec)
            notes.append(f"rewards: {names} passed in Python cannot be imported by name; move them to a module "
                         f"or a file and set rewards: [file.py:function, ...] {rerun}")
    if peft_config is not None and config.lora_r == 0:
        notes.append(f"lora: a peft_config passed in Python; set lora_r, lora_alpha, ... {rerun}")
    if (config.environment or "").startswith("__main__:"):
        notes.append(f"environment: {config.environment} is a class of the script that ran, which `lmpg train` "
                     f"cannot import; move it to a module or a file and set environment: file.py:Class {rerun}")
    return (dataclasses.replace(config, **changes) if changes else config), notes


def _importable(fn, name: str) -> str | None:
    """'module:function' of fn when another process can import it by that name, else None."""
    try:
        spec = import_path(fn, name)
    except ConfigError:
        return None
    return None if spec.startswith("__main__:") else spec


def create_run_dir(config: PGConfig, out: Path, replace: bool, notes: list[str] = ()) -> None:
    """(Main process.) Remove a replaced run's logs, make the directory, check it is writable, write
    config.yaml (notes as comments at its top)."""
    if replace:
        for name in LOG_FILES:
            (out / name).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir {out} is not writable ({e.strerror}); choose a writable directory") from None
    config.save_yaml(out / "config.yaml", notes)


def write_marker(out: Path, iteration: int, iterations: int, finished: bool) -> None:
    (out / RUN_MARKER).write_text(json.dumps({"iteration": iteration, "iterations": iterations,
                                              "finished": finished}))


def truncate_logs(out: Path, metrics_lines: int, iteration: int) -> None:
    """(Main process, on resume.) Drop log lines written after the checkpoint being resumed."""
    JsonlWriter(out / "metrics.jsonl").truncate_to(metrics_lines)
    JsonlWriter(out / "timings.jsonl").truncate_to(iteration)
    samples = out / "samples.jsonl"
    kept = [r for r in read_jsonl(samples) if r["iteration"] <= iteration]
    if samples.exists() or kept:
        samples.write_text("".join(json.dumps(r) + "\n" for r in kept))
