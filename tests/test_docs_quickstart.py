"""The docs' reward function (quickstart.md, README's "Use it") works on every prompt format the quickstart advertises."""

import json
import math
import re
import shlex
from pathlib import Path

import pytest

from lmpg.data import load_prompt_dataset
from lmpg.rewards import RewardScorer

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "quickstart.md", ROOT / "README.md"]  # the quickstart's my_rewards.py, README's "Use it"


def docs_correct(doc: Path):
    """The `correct` reward as written in `doc`: its python block starting at `def correct(`, up to the
    first blank line (README's block goes on to train a hub model)."""
    block = next(b for b in doc.read_text().split("```python\n")[1:] if "def correct(" in b)
    function = block[block.index("def correct("):].split("```", 1)[0].split("\n\n", 1)[0]
    namespace = {}
    exec(function, namespace)
    return namespace["correct"]


ROWS = [{"prompt": "What is 12+34?", "answer": "46"}, {"prompt": "What is 7+8?", "answer": "15"}]


def write(path: Path, fmt: str, chat: bool) -> Path:
    rows = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}] if chat else r["prompt"]} for r in ROWS]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":  # pandas-free: the answers are bare numbers, so they load as integers
        path.write_text("prompt,answer\n" + "".join(f"{r['prompt']},{r['answer']}\n" for r in rows))
    else:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
@pytest.mark.parametrize("fmt, chat", [("jsonl", False), ("jsonl", True), ("json", False), ("json", True),
                                       ("csv", False), ("parquet", False), ("parquet", True)])
def test_the_docs_correct_scores_every_advertised_format(tmp_path, doc, fmt, chat):
    dataset = load_prompt_dataset(str(write(tmp_path / f"train.{fmt}", fmt, chat)), "train", "prompt")
    if fmt == "csv":
        assert isinstance(dataset[0]["answer"], int)
    prompts, answers = dataset["prompt"], dataset["answer"]
    right = [[{"role": "assistant", "content": " 46"}], [{"role": "assistant", "content": "16"}]] if chat \
        else [" 46", "16"]
    with RewardScorer([docs_correct(doc)]) as scorer:
        scores = scorer.score(prompts, right, [[1], [1]], columns={"answer": answers})
    assert scores.values == [[1.0, 0.0]]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_the_docs_correct_on_the_completions_lmpg_gives_for_chat_prompts(tmp_path, doc, tiny_model, tokenizer):
    """Chat prompts as lmpg itself samples them (completions are message lists): the docs' `correct`
    gives 1.0 where the greedy completion is the answer."""
    from lmpg.evaluate import evaluate

    chat = [{"prompt": [{"role": "user", "content": "12+34="}], "answer": "46"}]
    first = evaluate(tiny_model, tokenizer, chat, [docs_correct(doc)], n=1, greedy=True, max_new_tokens=3,
                     return_samples=True)
    assert first["accuracy"] == 0.0
    completion = first["samples"][0]["completion"]
    chat[0]["answer"] = completion
    again = evaluate(tiny_model, tokenizer, chat, [docs_correct(doc)], n=1, greedy=True, max_new_tokens=3)
    assert again["accuracy"] == 1.0, completion


def test_the_quickstarts_sample_command_scores_every_sample(tmp_path, tiny_model, tokenizer, capsys):
    """Section 5's `lmpg sample ... --reward exact_match` as written (the tiny model in place of
    runs/sums/final): every sample gets a number, not None."""
    from lmpg.cli import main

    (line,) = [line for line in (ROOT / "docs" / "quickstart.md").read_text().splitlines()
               if line.startswith("lmpg sample ")]
    argv = shlex.split(line)[1:]
    assert argv[:2] == ["sample", "runs/sums/final"] and "exact_match" in argv
    tiny_model.save_pretrained(tmp_path / "final")
    tokenizer.save_pretrained(tmp_path / "final")
    argv[1] = str(tmp_path / "final")
    assert main(argv + ["--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    rewards = [re.search(r"reward (\S+)", line).group(1) for line in out.splitlines() if line.startswith("[")]
    assert len(rewards) == 4 and all(r != "None" and math.isfinite(float(r)) for r in rewards), out
