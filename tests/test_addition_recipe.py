"""The default recipe end to end, fast version: RL beats the warm start and the demonstrator."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))


def test_fast_recipe_rl_beats_imitation(tmp_path):
    import addition_cpu

    addition_cpu.main(["--fast", "--output-dir", str(tmp_path / "run")])
    result = json.loads((tmp_path / "run" / "accuracy.json").read_text())["accuracy"]
    assert result["rl_policy"]["greedy"] > result["warm_start"]["greedy"] + 0.1
    assert result["rl_policy"]["greedy"] > result["demonstrator"]["greedy"] + 0.1
