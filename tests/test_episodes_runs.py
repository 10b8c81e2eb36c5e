"""Runs over episodes: SIGKILL and resume stays bitwise exact; two processes match one."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sigkill import sigkill_after_checkpoint


WORKER = Path(__file__).with_name("episodes_worker.py")
ITERATIONS = 5


def worker(output_dir, resume="never", iterations=ITERATIONS):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), str(output_dir), resume, str(iterations)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted_run_with_an_environment(tmp_path):
    reference, killed = worker(tmp_path / "ref"), worker(tmp_path / "killed")
    sigkill_after_checkpoint(killed, tmp_path / "killed", 2, timeout=180)
    resumed = worker(tmp_path / "killed", resume="auto")
    for proc in (reference, resumed):
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    ref, res = weights(tmp_path / "ref"), weights(tmp_path / "killed")
    assert all(torch.equal(ref[k], res[k]) for k in ref)
    assert (tmp_path / "ref" / "metrics.jsonl").read_text() == (tmp_path / "killed" / "metrics.jsonl").read_text()
    metrics = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert max(m["turns_max"] for m in metrics) >= 2  # real multi-turn episodes


def test_two_processes_match_one_with_an_environment(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for cmd in ([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER), str(tmp_path / "two"), "never", "2"],
                [sys.executable, str(WORKER), str(tmp_path / "one"), "never", "2"]):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    m1, m2 = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "two"))
    for a, b in zip(m1, m2):
        for key in ("reward_mean", "turns_mean", "tool_calls_per_episode", "completion_len_mean",
                    "env_steps"):  # env_steps: a reward function's log_metric, one value per episode of the batch
            assert a[key] == b[key], key
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=5e-5)
