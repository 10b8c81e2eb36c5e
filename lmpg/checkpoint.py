"""Checkpoints a kill cannot corrupt, and the exact state needed to resume a run bit for bit.

A checkpoint is a directory `checkpoint-{iteration:06d}` under `{output_dir}/checkpoints` holding
the policy (or its adapter), optimizer and scheduler state, RNG states (python, numpy, torch, CUDA),
the prompt order's position, the iteration counter and the number of metrics lines written (and, with
`sync_ref_model`, the reference model's mixed weights, `lmpg.reference`). It is
written to a temporary directory first and renamed into place: rename is atomic on POSIX, so a kill
during a save leaves the previous checkpoints intact and no half-written one visible.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from lmpg.errors import TrainingError

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are not listed)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir: str | Path, iteration: int, save_model, state: dict, keep_last: int) -> Path:
    """Write a checkpoint atomically; `save_model(dir)` writes the weights; returns the final path.

    On any error (disk full, say) the temporary directory is removed and the error re-raised, and
    the earlier checkpoints are untouched.
    """
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{iteration:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        save_model(tmp / "model")
        torch.save(state, tmp / STATE_FILE)
        (tmp / "meta.json").write_text(json.dumps({"iteration": iteration}))
        _fsync_dir(tmp)
        if final.exists():  # same iteration saved before (e.g. a resumed run re-saving): replace
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(checkpoint: str | Path) -> dict:
    return torch.load(Path(checkpoint) / STATE_FILE, weights_only=False)


def _fsync_dir(path: Path) -> None:
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


@contextlib.contextmanager
def quiet_hf_progress():
    """Hide transformers' 'Writing model shards' bars for the duration of a save, then restore."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_weights(model, path: Path) -> None:
    """save_pretrained of an unwrapped model (only the adapter for a peft model), safetensors."""
    with quiet_hf_progress():
        model.save_pretrained(str(path), safe_serialization=True)


def load_weights(model, weights_dir: Path) -> None:
    """Load what `save_weights` wrote into an unwrapped model: the adapter of a peft model, else the
    full state dict (tied weights may be absent); a mismatch is a one-line TrainingError."""
    from safetensors.torch import load_file

    from lmpg.modeling import is_peft_model

    weights_dir = Path(weights_dir)
    if is_peft_model(model):
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(str(weights_dir / "adapter_model.safetensors")))
        return
    weights = {}
    for f in sorted(weights_dir.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise TrainingError(f"checkpoint {weights_dir.parent} does not match the model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}); resume with the same model")
