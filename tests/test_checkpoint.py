"""Checkpoints: atomic saves, exact resume after SIGKILL, non-finite updates skipped and counted."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmpg import PGConfig, PGTrainer
from lmpg.checkpoint import list_checkpoints, save_checkpoint
from lmpg.errors import TrainingError

from conftest import count_a
from sigkill import sigkill_after_checkpoint

WORKER = Path(__file__).with_name("resume_worker.py")
ITERATIONS = 8


def run_worker(output_dir, resume="never", iterations=ITERATIONS):
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent)}
    return subprocess.Popen([sys.executable, str(WORKER), str(output_dir), resume, str(iterations)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def final_weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    reference = run_worker(tmp_path / "ref")
    killed = run_worker(tmp_path / "killed")
    # kill once at least three checkpoints exist: a point in the middle of iteration 4 or later
    sigkill_after_checkpoint(killed, tmp_path / "killed", 3, timeout=120, min_checkpoints=2)
    resumed = run_worker(tmp_path / "killed", resume="auto")
    for proc in (reference, resumed):
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    ref_w, res_w = final_weights(tmp_path / "ref"), final_weights(tmp_path / "killed")
    assert ref_w.keys() == res_w.keys()
    for name in ref_w:
        assert torch.equal(ref_w[name], res_w[name]), name  # bitwise on CPU
    assert (tmp_path / "ref" / "metrics.jsonl").read_text() == (tmp_path / "killed" / "metrics.jsonl").read_text()
    assert len((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()) == ITERATIONS


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    def save_ok(path):
        path.mkdir()
        (path / "w").write_text("good")

    def save_disk_full(path):
        path.mkdir()
        raise OSError(28, "No space left on device")

    save_checkpoint(tmp_path, 1, save_ok, {"iteration": 1}, keep_last=2)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, save_disk_full, {"iteration": 2}, keep_last=2)
    found = list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["checkpoint-000001"]
    assert (found[0] / "model" / "w").read_text() == "good"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_keep_last_deletes_older_checkpoints(tmp_path):
    for it in range(1, 5):
        save_checkpoint(tmp_path, it, lambda p: p.mkdir(), {"iteration": it}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000003", "checkpoint-000004"]


def _nan_on(iterations_with_nan):
    import lmpg.update as update_module

    real = update_module.policy_gradient_loss

    def loss_with_nan(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        if _nan_on.trainer.iteration + 1 in iterations_with_nan:
            loss = loss * float("nan")
        return loss, stats

    return loss_with_nan


def test_non_finite_update_is_skipped_and_counted(tmp_path, tiny_model, tokenizer, prompts_dataset, monkeypatch):
    config = PGConfig(output_dir=str(tmp_path / "run"), iterations=3, batch_size=8, group_size=4, max_new_tokens=6,
                      learning_rate=3e-3, sample_log_every=0, progress_bar=False)
    trainer = PGTrainer(tiny_model, [count_a], prompts_dataset, config, tokenizer=tokenizer)
    _nan_on.trainer = trainer
    monkeypatch.setattr("lmpg.update.policy_gradient_loss", _nan_on({2}))
    metrics = trainer.train()
    assert [m["skipped_updates"] for m in metrics] == [0, 1, 0]
    assert metrics[-1]["skipped_updates_total"] == 1
    assert all(torch.isfinite(p).all() for p in tiny_model.parameters())


def test_too_many_non_finite_updates_stop_with_location(tmp_path, tiny_model, tokenizer, prompts_dataset, monkeypatch):
    config = PGConfig(output_dir=str(tmp_path / "run"), iterations=6, batch_size=8, group_size=4, max_new_tokens=6,
                      save_every=1, max_consecutive_skips=2, sample_log_every=0, progress_bar=False)
    trainer = PGTrainer(tiny_model, [count_a], prompts_dataset, config, tokenizer=tokenizer)
    _nan_on.trainer = trainer
    monkeypatch.setattr("lmpg.update.policy_gradient_loss", _nan_on({3, 4, 5, 6}))
    with pytest.raises(TrainingError, match=r"2 consecutive updates .* iteration 4, epoch 0, minibatch 0"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == "checkpoint-000003"


def test_resume_auto_without_checkpoint_starts_again(tmp_path, tiny_model, tokenizer, prompts_dataset):
    """A run that died before its first checkpoint left metrics but nothing to resume: resume=auto
    starts it again instead of refusing, and the old lines do not linger."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "lmpg_run.json").write_text('{"iteration": 0, "iterations": 2, "finished": false}')
    (run / "metrics.jsonl").write_text('{"iteration": 1, "stale": true}\n')
    config = PGConfig(output_dir=str(run), iterations=2, batch_size=8, group_size=4, max_new_tokens=6,
                      resume="auto", sample_log_every=0, progress_bar=False)
    metrics = PGTrainer(tiny_model, [count_a], prompts_dataset, config, tokenizer=tokenizer).train()
    assert [m["iteration"] for m in metrics] == [1, 2] and "stale" not in metrics[0]
