"""The quickstart's reward function works on every prompt format the quickstart advertises."""

import json
from pathlib import Path

import pytest

from lmpg.data import load_prompt_dataset
from lmpg.rewards import RewardScorer

QUICKSTART = Path(__file__).resolve().parents[1] / "docs" / "quickstart.md"


def quickstart_correct():
    text = QUICKSTART.read_text()
    block = next(b.split("```", 1)[0] for b in text.split("```python\n")[1:] if b.startswith("def correct("))
    namespace = {}
    exec(block, namespace)
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


@pytest.mark.parametrize("fmt, chat", [("jsonl", False), ("jsonl", True), ("json", False), ("json", True),
                                       ("csv", False), ("parquet", False), ("parquet", True)])
def test_quickstart_correct_scores_every_advertised_format(tmp_path, fmt, chat):
    dataset = load_prompt_dataset(str(write(tmp_path / f"train.{fmt}", fmt, chat)), "train", "prompt")
    if fmt == "csv":
        assert isinstance(dataset[0]["answer"], int)
    prompts, answers = dataset["prompt"], dataset["answer"]
    right = [[{"role": "assistant", "content": " 46"}], [{"role": "assistant", "content": "16"}]] if chat \
        else [" 46", "16"]
    with RewardScorer([quickstart_correct()]) as scorer:
        scores = scorer.score(prompts, right, [[1], [1]], columns={"answer": answers})
    assert scores.values == [[1.0, 0.0]]
