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

import json
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
