"""Issue 12's "tried as a new user would" points, each run the way the docs tell a new user to."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmpg.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm

    root = tmp_path_factory.mktemp("model")
    tokenizer = make_char_tokenizer("0123456789+=ab ")
    make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def sample(capsys, model_dir, *extra):
    code = main(["sample", str(model_dir), "12+34=", "--greedy", "--max-new-tokens", "3", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.splitlines()


def test_sample_with_a_builtin_reward_scores_given_the_rows_columns(capsys, model_dir):
    """`lmpg sample MODEL "12+34=" --reward exact_match` scored None: sample had no way to pass the
    row's `answer`. With --column the built-in reward scores the completion."""
    lines = sample(capsys, model_dir)
    completion = lines[-1][4:]  # the greedy completion, indented by 4
    wrong = sample(capsys, model_dir, "--reward", "exact_match", "--column", "answer=46")
    assert "reward 0.0000" in wrong[1]
    right = sample(capsys, model_dir, "--reward", "exact_match", "--column", f"answer={completion}")
    assert "reward 1.0000" in right[1]
    assert "reward None" in sample(capsys, model_dir, "--reward", "exact_match")[1]  # no answer: no signal


def test_process_executor_in_a_script_without_main_guard_says_so_in_one_line(tmp_path, model_dir):
    """docs/rewards.md's PGTrainer line, run at a script's top level without the guard the docs ask for."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        from lmpg import PGConfig, PGTrainer

        def my_reward(completions, **kwargs):
            return [float(len(c)) for c in completions]

        dataset = [{{"prompt": "1+1="}}, {{"prompt": "2+2="}}]
        model = {str(model_dir)!r}
        PGTrainer(model, [my_reward], dataset, PGConfig(reward_executor="process", reward_workers=1, iterations=1,
                  batch_size=4, group_size=2, max_new_tokens=3, output_dir="run", progress_bar=False)).train()
    """))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lmpg.errors.RewardError: reward_executor: process starts worker processes that import "
                           "train.py"), result.stderr[-2000:]
    assert 'put it under `if __name__ == "__main__":`' in last and "BrokenProcessPool" not in result.stderr
    docs = (ROOT / "docs" / "rewards.md").read_text()
    assert "process` needs the usual guard, or lmpg stops with one line saying so" in docs
