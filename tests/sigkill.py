"""Killing a training run mid-way, for the resume tests (tests/test_checkpoint.py, test_episodes_runs.py,
test_dynamic_sampling.py, test_vllm_sampler.py)."""

import os
import signal
import time
from pathlib import Path

from lmpg.checkpoint import list_checkpoints


def sigkill_after_checkpoint(proc, run_dir: Path, iteration: int, *, timeout: float, min_checkpoints: int = 1,
                             tail: int = 2000) -> None:
    """SIGKILL `proc` once `run_dir` holds at least `min_checkpoints` checkpoints, the latest of
    `iteration` or later; asserts the run was still going then (alive, within `timeout` seconds) and
    never wrote its final model."""
    deadline = time.time() + timeout

    def latest() -> int:
        checkpoints = list_checkpoints(run_dir)
        return int(checkpoints[-1].name.split("-")[1]) if len(checkpoints) >= min_checkpoints else -1

    while latest() < iteration:
        assert proc.poll() is None, proc.stderr.read().decode()[-tail:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (Path(run_dir) / "final").exists()  # it really died before the end
