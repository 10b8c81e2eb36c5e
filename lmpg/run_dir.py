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
recipe's previous run and is replaced (`prepare_recipe_dir`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from lmpg.checkpoint import latest_checkpoint
from lmpg.config import PGConfig
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


def create_run_dir(config: PGConfig, out: Path, replace: bool) -> None:
    """(Main process.) Remove a replaced run's logs, make the directory, check it is writable, write
    config.yaml."""
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
    config.save_yaml(out / "config.yaml")


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
