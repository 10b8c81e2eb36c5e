"""The calculator recipe end to end, fast version: RL over episodes beats the warm start and the
demonstrator, and calls the tool more."""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

# every phase in seconds: 1-digit sums, a 1-layer model, 2 warm-start steps, 1 RL iteration
TINY = ["n_digits=1", "n_train=24", "n_heldout=12", "sft_steps=2", "sft_batch_size=8", "n_layer=1", "n_embd=16",
        "n_head=2", "iterations=1", "batch_size=16", "max_new_tokens=8", "log_every=1"]


def test_fast_recipe_rl_over_episodes_beats_imitation(tmp_path):
    import calculator_cpu

    calculator_cpu.main(["--fast", "--output-dir", str(tmp_path / "run")])
    table = json.loads((tmp_path / "run" / "success.json").read_text())["table"]
    rl, warm, demo = table["rl_policy"], table["warm_start"], table["demonstrator"]
    assert rl["greedy"]["success"] > warm["greedy"]["success"] + 0.2
    assert rl["greedy"]["success"] > demo["greedy"]["success"] + 0.2
    assert rl["sampled"]["success"] > max(warm["sampled"]["success"], demo["sampled"]["success"])
    assert rl["sampled"]["tool_calls"] > warm["sampled"]["tool_calls"] + 0.3


def test_fast_with_the_recipes_own_yaml_runs_into_the_fast_directory_and_a_second_run_replaces_it(tmp_path,
                                                                                              monkeypatch):
    """`python recipes/calculator_cpu.py recipes/calculator_cpu.yaml --fast`, as the README writes it,
    twice: runs/calculator_cpu_fast (not the full run's directory), the second run replacing the first."""
    import calculator_cpu

    monkeypatch.chdir(tmp_path)  # the YAML's output_dir, runs/calculator_cpu, is relative
    own_yaml = os.path.relpath(REPO / "recipes" / "calculator_cpu.yaml", tmp_path)  # named, not the default
    fast = tmp_path / "runs" / "calculator_cpu_fast"
    calculator_cpu.main([own_yaml, "--fast"] + TINY)
    assert (fast / "success.json").exists() and not (tmp_path / "runs" / "calculator_cpu").exists()
    (fast / "checkpoints" / "stale").mkdir(parents=True)
    calculator_cpu.main([own_yaml, "--fast"] + TINY)
    assert (fast / "success.json").exists() and not (fast / "checkpoints" / "stale").exists()
