"""The calculator recipe end to end, fast version: RL over episodes beats the warm start and the
demonstrator, and calls the tool more."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))


def test_fast_recipe_rl_over_episodes_beats_imitation(tmp_path):
    import calculator_cpu

    calculator_cpu.main(["--fast", "--output-dir", str(tmp_path / "run")])
    table = json.loads((tmp_path / "run" / "success.json").read_text())["table"]
    rl, warm, demo = table["rl_policy"], table["warm_start"], table["demonstrator"]
    assert rl["greedy"]["success"] > warm["greedy"]["success"] + 0.2
    assert rl["greedy"]["success"] > demo["greedy"]["success"] + 0.2
    assert rl["sampled"]["success"] > max(warm["sampled"]["success"], demo["sampled"]["success"])
    assert rl["sampled"]["tool_calls"] > warm["sampled"]["tool_calls"] + 0.3
