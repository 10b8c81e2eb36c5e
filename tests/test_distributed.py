"""`accelerate launch` with 2 CPU processes computes what one process computes on the same global
batch: same samples, same losses, same updated weights (to float tolerance), for every loss
aggregation, with and without gradient accumulation (micro-batches)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import CASES  # noqa: E402

WORKER = Path(__file__).with_name("distributed_worker.py")


def _run(cmd, cwd):
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    # `--multi_gpu` picks accelerate's torchrun launcher; on a machine without a GPU lmpg builds its
    # Accelerator with cpu=True, so the processes form a gloo (MULTI_CPU) group.
    _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER), str(root / "two")], root)
    _run([sys.executable, str(WORKER), str(root / "one")], root)
    return root


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("agg,micro", CASES)
def test_two_processes_match_one(runs, agg, micro):
    one, two = runs / "one" / f"{agg}-{micro}", runs / "two" / f"{agg}-{micro}"
    m1, m2 = _metrics(one), _metrics(two)
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        assert a["reward_mean"] == b["reward_mean"]  # the very same samples
        assert a["completion_len_mean"] == b["completion_len_mean"]
        for key in ("loss", "pg_loss", "ratio_mean", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    w1 = load_file(str(one / "final" / "model.safetensors"))
    w2 = load_file(str(two / "final" / "model.safetensors"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-4)  # AdamW magnifies reduction-order rounding on near-zero gradients (5.03e-5 seen at 26e0324 already)


@pytest.mark.parametrize("agg", ["token_mean", "sequence_mean", "sequence_sum", "constant"])
def test_gradient_accumulation_matches_whole_minibatch(runs, agg):
    whole, accumulated = runs / "one" / f"{agg}-None", runs / "one" / f"{agg}-2"
    for a, b in zip(_metrics(whole), _metrics(accumulated)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
    w1 = load_file(str(whole / "final" / "model.safetensors"))
    w2 = load_file(str(accumulated / "final" / "model.safetensors"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=5e-5)


@pytest.mark.parametrize("kind,whole", [("NO", True), ("MULTI_CPU", True), ("MULTI_GPU", True), ("FSDP", False),
                                        ("DEEPSPEED", False)])
def test_chunked_log_probs_and_the_shared_prompt_forward_only_where_weights_are_whole(kind, whole):
    """Both read the weights after the model's forward returned: FSDP / DeepSpeed have re-sharded them."""
    from types import SimpleNamespace

    from accelerate import DistributedType

    from lmpg import distributed

    acc = SimpleNamespace(distributed_type=getattr(DistributedType, kind))
    assert distributed.supports_chunked_logprobs(acc) is whole
    assert distributed.supports_shared_prompt_forward(acc) is whole
