"""The `lmpg` command line: help texts, one-line user errors (exit 2, no traceback), and train -> plot ->
eval -> sample end to end on a tiny model saved to disk, a local jsonl dataset and a reward in a .py file."""

import json
import os
import subprocess
import sys

import datasets  # noqa: F401  imported before any capsys test: its log handler then binds to the real stderr
import pytest
import yaml

from lmpg.cli import main
from lmpg.config import PGConfig, field_docs

REWARD_FILE = '''
def count_a(prompts, completions, **kwargs):
    """Fraction of 'a' characters among 8."""
    return [c.count("a") / 8 for c in completions]


def always_one(prompts, completions, **kwargs):
    return [1.0] * len(completions)
'''


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny model, a jsonl dataset, a reward file and a YAML config, all on disk."""
    from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm

    root = tmp_path_factory.mktemp("cli")
    tokenizer = make_char_tokenizer("0123456789+=ab ")
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "data.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n"
                                             for i in range(8)))
    (root / "rewards.py").write_text(REWARD_FILE)
    config = {"model": str(root / "model"), "dataset": str(root / "data.jsonl"),
              "rewards": [f"{root / 'rewards.py'}:count_a"], "output_dir": str(root / "run"), "iterations": 3,
              "batch_size": 8, "group_size": 4, "max_new_tokens": 6, "learning_rate": 3e-3,
              "sample_log_every": 0, "progress_bar": False, "kl_coef": 0.05}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def run_cli(capsys, argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("lmpg: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ----------------------------------------------------------------------------------------- help
def test_help_lists_every_command_on_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "sample", "plot", "rewards"):
        lines = [line for line in out.splitlines() if line.strip().startswith(command + " ")]
        assert len(lines) == 1, (command, out)
        help_text = lines[0].strip()[len(command):].strip()
        assert help_text, f"{command} has no one-line help"
        following = out.splitlines()[out.splitlines().index(lines[0]) + 1]
        assert not following.startswith(" " * 10), f"{command}'s help wraps onto a second line"


def test_train_help_shows_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    defaults = PGConfig().to_dict()
    for name in field_docs():
        assert f"  {name} = {defaults[name]!r}" in out, name
    assert "Completions per iteration" in out  # batch_size's doc


@pytest.mark.parametrize("columns", [300, 72])
def test_train_help_wraps_the_field_docs_to_the_terminal(capsys, monkeypatch, columns):
    """The field docstrings are wrapped in the source; --help joins and wraps them again to the terminal's
    width, at most 100 columns, and lists each choice field's allowed values."""
    from lmpg.config import choices

    monkeypatch.setenv("COLUMNS", str(columns))
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= min(columns, 100)
    lines = out.splitlines()
    fields = lines[lines.index("config fields (YAML keys or key=value overrides):"):]
    # docstrings wrapped over source lines read on as one paragraph (no source indentation inside)
    assert not [line for line in fields if "  " in line.strip()]
    assert "processes and after a resume); 'generate'" in " ".join(out.split())
    for name, allowed in choices().items():
        at = next(i for i, line in enumerate(lines) if line.startswith(f"  {name} = "))
        assert " ".join(lines[at + 1].split()).startswith("one of: " + allowed[0]), name
        assert "one of: " + ", ".join(allowed) in " ".join(" ".join(lines[at + 1:at + 3]).split()), name


@pytest.mark.parametrize("command", ["eval", "sample", "plot"])
def test_subcommand_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: lmpg " + command in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("override, fragments", [
    ("learning_rat=1", ["unknown config key 'learning_rat'", "did you mean 'learning_rate'"]),
    ("learning_rate=fast", ["learning_rate='fast'", "must be float"]),
    ("batch_size=6", ["batch_size=6 is not divisible by group_size=4"]),
    ("epochs_per_batch=0", ["epochs_per_batch=0 must be >= 1"]),
    ("loss_agg=mean", ["loss_agg='mean' is not valid", "token_mean"]),
    ("nonsense", ["override 'nonsense' is not key=value"]),
])
def test_config_errors_are_one_line(capsys, workspace, override, fragments):
    code, _, err = run_cli(capsys, ["train", workspace / "config.yaml", override])
    assert_one_line_error(code, err, *fragments)


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, ["train", tmp_path / "none.yaml"])
    assert_one_line_error(code, err, "cannot read config file", "none.yaml")


def test_config_without_model(capsys, tmp_path):
    code, _, err = run_cli(capsys, ["train", "dataset=x.jsonl"])
    assert_one_line_error(code, err, "no model to train")


# ----------------------------------------------------------------------------------------- data, model, reward, output errors
def _write(path, text):
    path.write_text(text)
    return path


def test_missing_prompt_column_lists_the_columns(capsys, workspace, tmp_path):
    data = _write(tmp_path / "q.jsonl", '{"question": "1+1=", "answer": "2"}\n')
    code, _, err = run_cli(capsys, ["train", workspace / "config.yaml", f"dataset={data}"])
    assert_one_line_error(code, err, "no 'prompt' column", "question, answer", "prompt_column")


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("header_only.csv", "prompt\n"),
                                        ("empty_list.json", "[]")])
def test_empty_dataset_file(capsys, workspace, tmp_path, name, text):
    data = _write(tmp_path / name, text)
    code, _, err = run_cli(capsys, ["train", workspace / "config.yaml", f"dataset={data}"])
    assert_one_line_error(code, err, "is empty")


def test_empty_dataset_is_one_line_error(capsys, workspace, tmp_path):
    """Whatever the wording, an empty file is a one-line error with exit 2."""
    data = _write(tmp_path / "zero.jsonl", "")
    code, _, err = run_cli(capsys, ["train", workspace / "config.yaml", f"dataset={data}"])
    assert_one_line_error(code, err, "zero.jsonl")


def test_unreadable_dataset_files(capsys, workspace, tmp_path):
    bad = _write(tmp_path / "bad.jsonl", "{not json\n")
    code, _, err = run_cli(capsys, ["train", workspace / "config.yaml", f"dataset={bad}"])
    assert_one_line_error(code, err, "cannot read dataset file", "bad.jsonl")
    code, _, err = run_cli(capsys, ["train", workspace / "config.yaml", f"dataset={tmp_path / 'missing.jsonl'}"])
    assert_one_line_error(code, err, "missing.jsonl does not exist")
    text = _write(tmp_path / "prompts.txt", "1+1=\n")
    code, _, err = run_cli(capsys, ["train", workspace / "config.yaml", f"dataset={text}"])
    assert_one_line_error(code, err, "unknown format")


def test_model_path_that_does_not_exist(capsys, workspace, tmp_path):
    code, _, err = run_cli(capsys, ["train", workspace / "config.yaml", f"model={tmp_path / 'no_model'}"])
    assert_one_line_error(code, err, "model path", "does not exist")


@pytest.mark.parametrize("spec, fragment", [
    ("no_such_pkg.rewards:fn", "module 'no_such_pkg.rewards' not found"),
    ("{root}/rewards.py:count_b", "has no attribute 'count_b'"),
    ("{root}/missing.py:fn", "file not found"),
    ("not_a_builtin", "is not a built-in"),
])
def test_reward_spec_that_does_not_resolve(capsys, workspace, spec, fragment):
    spec = spec.format(root=workspace)
    code, _, err = run_cli(capsys, ["train", workspace / "config.yaml", f"rewards=[{spec}]"])
    assert_one_line_error(code, err, fragment)


def test_output_dir_not_writable(capsys, workspace, tmp_path):
    blocker = _write(tmp_path / "a_file", "")  # a directory cannot be made under a file, even as root
    code, _, err = run_cli(capsys, ["train", workspace / "config.yaml", f"output_dir={blocker / 'run'}"])
    assert_one_line_error(code, err, "is not writable")


def test_real_process_prints_no_traceback(workspace):
    """The installed CLI, run as a process: a user error is one line on stderr, exit status 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "lmpg.cli", "train", str(workspace / "config.yaml"),
                           "learning_rat=1"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "lmpg: error: unknown config key 'learning_rat'; did you mean 'learning_rate'?"
    assert proc.stdout == ""


# ----------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained_run(workspace):
    """`lmpg train config.yaml` run once for the end-to-end tests below."""
    code = main(["train", str(workspace / "config.yaml"), "iterations=3"])
    assert code == 0
    return workspace / "run"


def test_train_writes_the_run_directory(trained_run, workspace):
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl", "timings.jsonl"):
        assert (trained_run / name).is_file(), name
    assert (trained_run / "final" / "config.json").is_file()
    assert (trained_run / "final" / "tokenizer.json").is_file()
    resolved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert set(resolved) == set(PGConfig().to_dict())  # every field, defaults filled in
    assert resolved["iterations"] == 3 and resolved["kl_coef"] == 0.05 and resolved["adv_norm"] == "none"
    metrics = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    assert "reward/count_a" in metrics[0] and "kl" in metrics[0]
    samples = (trained_run / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 * 8


def test_train_refuses_to_overwrite_a_run(capsys, trained_run, workspace):
    code, _, err = run_cli(capsys, ["train", workspace / "config.yaml"])
    assert_one_line_error(code, err, "already holds a run", "resume=auto")


def test_plot_writes_a_png(capsys, trained_run, tmp_path):
    out = tmp_path / "plot.png"
    code, stdout, _ = run_cli(capsys, ["plot", trained_run, "-o", out])
    assert code == 0 and stdout.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run_cli(capsys, ["plot", tmp_path / "not_a_run"])
    assert_one_line_error(code, err, "metrics.jsonl does not exist")


def test_eval_json(capsys, trained_run, workspace):
    code, out, _ = run_cli(capsys, ["eval", trained_run / "final", workspace / "data.jsonl",
                                    "--reward", f"{workspace / 'rewards.py'}:always_one", "--reward", "exact_match",
                                    "--k", "2", "--n", "3", "--max-new-tokens", "4", "--json"])
    assert code == 0
    result = json.loads(out)
    assert result["prompts"] == 8 and result["samples_per_prompt"] == 3 and result["k"] == 2
    assert result["reward/always_one"] == 1.0 and result["accuracy"] == 1.0 and result["pass@2"] == 1.0
    assert 0.0 <= result["reward/exact_match"] <= 1.0


def test_eval_text_and_errors(capsys, trained_run, workspace, tmp_path):
    reward = f"{workspace / 'rewards.py'}:count_a"
    code, out, _ = run_cli(capsys, ["eval", workspace / "model", workspace / "data.jsonl", "--reward", reward,
                                    "--max-new-tokens", "4", "--limit", "2"])
    assert code == 0 and "2 prompts x 1 samples" in out and "pass@1" in out and "reward/count_a" in out
    code, _, err = run_cli(capsys, ["eval", tmp_path / "nope", workspace / "data.jsonl", "--reward", reward])
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run_cli(capsys, ["eval", workspace / "model", workspace / "data.jsonl", "--reward", reward,
                                    "--k", "4", "--n", "2"])
    assert_one_line_error(code, err, "n >= 4")
    code, _, err = run_cli(capsys, ["eval", workspace / "model", workspace / "data.jsonl"])
    assert_one_line_error(code, err, "no reward function")
    code, _, err = run_cli(capsys, ["eval", workspace / "model", workspace / "data.jsonl", "--reward", "nope.mod:fn"])
    assert_one_line_error(code, err, "module 'nope.mod' not found")


def test_sample_prints_completions_with_rewards(capsys, trained_run, workspace):
    code, out, _ = run_cli(capsys, ["sample", trained_run / "final", "3+3=", "--n", "3",
                                    "--reward", f"{workspace / 'rewards.py'}:always_one", "--max-new-tokens", "5"])
    assert code == 0
    assert out.splitlines()[0] == "prompt: '3+3='"
    headers = [line for line in out.splitlines() if line.startswith("[")]
    assert len(headers) == 3 and all("reward 1.0000" in h for h in headers)
    code, out, _ = run_cli(capsys, ["sample", workspace / "model", "3+3=", "--greedy", "--max-new-tokens", "5"])
    assert code == 0 and len([line for line in out.splitlines() if line.startswith("[")]) == 1


def test_sample_an_empty_prompt_starts_from_bos(capsys, workspace):
    code, out, err = run_cli(capsys, ["sample", workspace / "model", "", "--n", "2", "--max-new-tokens", "4"])
    assert code == 0, err
    assert out.startswith("prompt: ''\n") and "[1]" in out and "Traceback" not in err


def test_sample_passes_the_prompts_columns_to_the_rewards(capsys, workspace):
    (workspace / "correct.py").write_text(
        "def correct(completions, answer, **kwargs):\n"
        "    return [1.0 if a == '46' else 0.0 for a in answer]\n")
    argv = ["sample", workspace / "model", "12+34=", "--greedy", "--max-new-tokens", "3",
            "--reward", f"{workspace / 'correct.py'}:correct"]
    code, out, _ = run_cli(capsys, argv + ["--column", "answer=46"])
    assert code == 0 and "reward 1.0000" in out
    code, _, err = run_cli(capsys, argv)
    assert_one_line_error(code, err, "reward function 'correct' needs argument 'answer'", "--column answer=VALUE")
    code, _, err = run_cli(capsys, argv + ["--column", "answer"])
    assert_one_line_error(code, err, "--column 'answer' must be NAME=VALUE")


def test_sample_with_a_reference_reward_and_no_column_says_how_to_pass_one(capsys, workspace):
    argv = ["sample", workspace / "model", "12+34=", "--greedy", "--max-new-tokens", "3", "--reward", "exact_match"]
    code, out, _ = run_cli(capsys, argv)
    assert code == 0 and "reward None" in out and "--column NAME=VALUE" in out
    code, out, _ = run_cli(capsys, argv + ["--column", "answer=46"])
    assert code == 0 and "reward None" not in out and "--column NAME=VALUE" not in out


STEP_GAME = '''
class Game:
    def reset(self, **row):
        return ":"

    def step(self, action):
        return "ok", 1.0, False
'''


@pytest.mark.parametrize("command", ["eval", "sample"])
@pytest.mark.parametrize("flag, fragment", [(["--max-turns", "0"], "max_turns=0 must be >= 1"),
                                            (["--tool-timeout", "0"], "tool_timeout=0.0 must be > 0"),
                                            (["--tool-timeout", "-1"], "tool_timeout=-1.0 must be > 0")])
def test_eval_and_sample_refuse_bad_episode_limits_in_one_line(capsys, workspace, command, flag, fragment):
    (workspace / "game.py").write_text(STEP_GAME)
    where = [workspace / "data.jsonl"] if command == "eval" else ["1+1="]
    code, _, err = run_cli(capsys, [command, workspace / "model", *where, "--environment",
                                    f"{workspace / 'game.py'}:Game", "--max-new-tokens", "2", *flag])
    assert_one_line_error(code, err, fragment)


SLOW_TOOL = '''
import time


class SlowTool:
    def reset(self, **row):
        return None

    def ab(self) -> str:
        """Answers after two seconds."""
        time.sleep(2)
        return "late"
'''


def scripted_policy(monkeypatch, alphabet: str, text: str):
    """`lmpg.evaluate.load_policy` made to return a tiny model whose every forward writes the next
    character of `text`, then EOS (one forward per sampled token: one episode, cached turns)."""
    import torch

    import lmpg.evaluate
    from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm

    tok = make_char_tokenizer(alphabet)
    model = make_tiny_causal_lm(tok, n_layer=1, n_embd=16, n_head=2, seed=0)
    script = [tok.convert_tokens_to_ids(c) for c in text] + [tok.eos_token_id]
    forwards = []

    def scripted(module, inputs, output):
        target = script[len(forwards)] if len(forwards) < len(script) else tok.eos_token_id
        forwards.append(target)
        forced = torch.full_like(output, -1e4)
        forced[..., target] = 0.0
        return forced

    model.lm_head.register_forward_hook(scripted)
    monkeypatch.setattr(lmpg.evaluate, "load_policy", lambda path: (model, tok))


def test_sample_tool_timeout_reaches_the_tools(capsys, tmp_path, monkeypatch):
    """A policy scripted to write `ab()` then EOS: the tool sleeps 2 s, --tool-timeout 0.2 makes it an error."""
    scripted_policy(monkeypatch, "ab()q", "ab()")
    (tmp_path / "slow.py").write_text(SLOW_TOOL)
    code, out, err = run_cli(capsys, ["sample", "scripted", "q", "--greedy", "--environment",
                                      f"{tmp_path / 'slow.py'}:SlowTool", "--tool-format", "simple",
                                      "--max-turns", "2", "--max-new-tokens", "6", "--tool-timeout", "0.2"])
    assert code == 0, err
    assert "assistant: ab()" in out and "error: ab timed out after 0.2 s" in out, out


def test_a_reward_needing_environments_without_one_is_told_to_pass_environment(capsys, workspace):
    (workspace / "env_reward.py").write_text(
        "def solved(completions, environments, **kwargs):\n"
        "    return [float(env.solved) for env in environments]\n")
    for argv in (["sample", workspace / "model", "1+1="], ["eval", workspace / "model", workspace / "data.jsonl"]):
        code, _, err = run_cli(capsys, argv + ["--max-new-tokens", "2", "--reward",
                                               f"{workspace / 'env_reward.py'}:solved"])
        assert_one_line_error(code, err, "needs argument 'environments'", "--environment SPEC")
        assert "--column" not in err


def test_rewards_lists_every_builtin_with_a_description(capsys):
    from reward_fns import BUILTIN_REWARDS

    code, out, _ = run_cli(capsys, ["rewards"])
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(BUILTIN_REWARDS)
    for line, name in zip(lines, sorted(BUILTIN_REWARDS)):
        assert line.startswith(name) and "partial(func" not in line and line[len(name):].strip(), line


def test_config_doc_covers_every_field():
    """docs/config.md has a row for every PGConfig field (it is generated from field_docs())."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    missing = [name for name in field_docs() if f"| `{name}` |" not in text]
    assert not missing, f"docs/config.md lacks {missing}; add a row per field"


GUESS_ENV = '''
class Guess:
    def reset(self, **row):
        return " guess:"

    def step(self, action):
        return "right", 1.0, True
'''


def test_sample_shows_an_episode_turn_by_turn_with_the_environments_reward(capsys, monkeypatch, tmp_path):
    """Issue 24: `lmpg sample --environment` without --reward prints the environment's reward, and each
    episode as it happened: reset's text, the action with its reward, the last observation, why it ended."""
    scripted_policy(monkeypatch, "ab q:", "ab")
    (tmp_path / "guess.py").write_text(GUESS_ENV)
    code, out, err = run_cli(capsys, ["sample", "scripted", "q", "--greedy", "--environment",
                                      f"{tmp_path / 'guess.py'}:Guess", "--max-turns", "2", "--max-new-tokens", "4"])
    assert code == 0, err
    assert "reward 1.0000" in out.splitlines()[1], out
    for line in ("reset:  guess:", "assistant: ab  [reward 1.0000]", "right", "ended: done"):
        assert line in out, (line, out)
