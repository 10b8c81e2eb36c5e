"""The default recipe end to end, fast version: RL beats the warm start and the demonstrator; and a
second run of a recipe just works (its own directory replaced), while a user error is one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmpg import PGConfig
from lmpg.errors import ConfigError
from lmpg.recipe import prepare_recipe_dir
from lmpg.run_dir import RUN_MARKER

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

# every phase of the recipe in seconds: 1-digit sums, a 1-layer model, 2 warm-start steps, 1 RL iteration
TINY = ["n_digits=1", "n_train=24", "n_heldout=12", "sft_steps=2", "sft_batch_size=8", "eval_batch_size=12",
        "n_layer=1", "n_embd=16", "n_head=2", "iterations=1", "batch_size=16", "max_new_tokens=3", "log_every=1"]


def test_fast_recipe_rl_beats_imitation(tmp_path):
    import addition_cpu

    addition_cpu.main(["--fast", "--output-dir", str(tmp_path / "run")])
    result = json.loads((tmp_path / "run" / "accuracy.json").read_text())["accuracy"]
    assert result["rl_policy"]["greedy"] > result["warm_start"]["greedy"] + 0.1
    assert result["rl_policy"]["greedy"] > result["demonstrator"]["greedy"] + 0.1


def test_a_second_run_replaces_the_recipes_own_directory(tmp_path, monkeypatch):
    """Run twice with the default directory, as `bash scripts/default_recipe.sh` twice does: the
    second run replaces the first; --fast has a directory of its own beside the full run's."""
    import addition_cpu

    monkeypatch.chdir(tmp_path)  # the YAML's output_dir, runs/addition_cpu, is relative
    addition_cpu.main(TINY)
    first = (tmp_path / "runs" / "addition_cpu" / "accuracy.json").read_text()
    (tmp_path / "runs" / "addition_cpu" / "checkpoints" / "stale").mkdir(parents=True)
    addition_cpu.main(TINY)
    assert not (tmp_path / "runs" / "addition_cpu" / "checkpoints" / "stale").exists()
    assert json.loads((tmp_path / "runs" / "addition_cpu" / "accuracy.json").read_text()).keys() == \
        json.loads(first).keys()
    addition_cpu.main(["--fast"] + TINY)
    assert (tmp_path / "runs" / "addition_cpu_fast" / "accuracy.json").exists()
    assert (tmp_path / "runs" / "addition_cpu" / "accuracy.json").exists()


def test_a_named_directory_that_holds_something_is_refused_before_any_work(tmp_path):
    import addition_cpu

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="already holds files; pass --output-dir with a new directory"):
        addition_cpu.main(["--output-dir", str(tmp_path / "mine")] + TINY)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------ prepare_recipe_dir
def config_in(path: Path, **kw) -> PGConfig:
    return PGConfig(output_dir=str(path), **kw)


def test_a_fast_run_gets_its_own_directory_unless_one_is_named(tmp_path):
    assert prepare_recipe_dir(config_in(tmp_path / "demo"), chosen=False, fast=True,
                              marker="accuracy.json").output_dir == str(tmp_path / "demo_fast")
    assert prepare_recipe_dir(config_in(tmp_path / "demo"), chosen=True, fast=True,
                              marker="accuracy.json").output_dir == str(tmp_path / "demo")
    assert prepare_recipe_dir(config_in(tmp_path / "demo"), chosen=False, fast=False,
                              marker="accuracy.json").output_dir == str(tmp_path / "demo")


@pytest.mark.parametrize("marker", ["accuracy.json", RUN_MARKER])
def test_the_own_directory_holding_a_previous_run_is_replaced(tmp_path, marker):
    """A finished run (the recipe's result file) or one stopped during RL (the trainer's marker)."""
    out = tmp_path / "demo"
    (out / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (out / marker).write_text("{}")
    config = prepare_recipe_dir(config_in(out), chosen=False, fast=False, marker="accuracy.json")
    assert config.output_dir == str(out) and not out.exists()


@pytest.mark.parametrize("chosen,files,match", [
    (False, {"notes.txt": "mine"}, "already holds files"),  # the own directory, but not a run of the recipe
    (True, {"accuracy.json": "{}"}, "already holds a run"),  # a run in a directory the user named
    (True, {"notes.txt": "mine"}, "already holds files"),
])
def test_anything_else_is_refused_in_one_line_and_kept(tmp_path, chosen, files, match):
    out = tmp_path / "demo"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        prepare_recipe_dir(config_in(out), chosen=chosen, fast=False, marker="accuracy.json")
    assert "\n" not in str(err.value) and "--output-dir" in str(err.value)
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_overwrite_output_dir_hands_a_named_directory_to_the_trainer(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / RUN_MARKER).write_text("{}")
    config = prepare_recipe_dir(config_in(out, overwrite_output_dir=True), chosen=True, fast=False,
                                marker="accuracy.json")
    assert config.output_dir == str(out) and (out / RUN_MARKER).exists()  # the trainer replaces its logs


def test_an_empty_or_new_directory_is_used_as_it_is(tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new"):
        assert prepare_recipe_dir(config_in(out), chosen=True, fast=False, marker="x").output_dir == str(out)


# --------------------------------------------------------------------- user errors from the command line
@pytest.mark.parametrize("recipe,error", [("addition_cpu.py", "named_dir"), ("calculator_cpu.py", "bad_field"),
                                          ("calculator_cpu.py", "bad_recipe_field"), ("addition_cpu.py", "too_few_sums")])
def test_a_user_error_in_a_recipe_is_one_line_with_status_2(tmp_path, recipe, error):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    args = {"named_dir": ["--output-dir", str(tmp_path / "mine")], "bad_field": ["baseline=best"],
            "bad_recipe_field": ["n_digits=two"], "too_few_sums": ["n_digits=1", "n_train=40",
                                                                    "--output-dir", str(tmp_path / "new")]}[error]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / recipe)] + args, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{recipe}: error: ")]
    assert len(lines) == 1, proc.stderr
    assert {"named_dir": "already holds files", "bad_field": "baseline='best' is not valid",
            "bad_recipe_field": "n_digits='two' is not a valid int", "too_few_sums": "lower n_train"}[error] in lines[0]
