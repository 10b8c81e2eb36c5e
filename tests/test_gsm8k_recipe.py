"""The GPU recipe's code path on CPU: a tiny model saved to disk, a local GSM8K-shaped file, LoRA,
gradient checkpointing, micro-batches, two epochs per batch."""

import json
import re
import string
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))


@pytest.fixture
def saved_tiny_model(tmp_path):
    from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm

    tokenizer = make_char_tokenizer(string.ascii_letters + string.digits + string.punctuation + " \n",
                                    model_max_length=512)
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, max_position_embeddings=512)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def question_number(prompt) -> int:
    """i of the chat prompt made from "Tom has {i} apples ..."."""
    return int(re.search(r"Tom has (\d+) apples", prompt[-1]["content"]).group(1))


def test_gsm8k_recipe_runs_on_a_tiny_model(tmp_path, saved_tiny_model, monkeypatch):
    """The recipe trains with its config (YAML plus overrides: reward weights, learning rate, LoRA rank,
    steps) and reports the greedy accuracy of the first --eval-questions held-out questions, before and
    after. A tiny model never answers a GSM8K question, so with the real math_answer both accuracies
    would be 0 whatever the recipe computed: the recipe's math_answer is replaced by one that checks the
    reference the recipe passes it (the number after '####') and marks questions 0-2 correct, so the
    first 4 questions score 3/4 (all 8 would score 3/8). reward_weights=[0.5, 0.2], not the default
    1s, so that a weight the recipe dropped would show."""
    import gsm8k_lora

    wrong_references = []

    def math_answer(prompts, completions, answer, **kwargs):
        numbers = [question_number(p) for p in prompts]
        wrong_references.extend(a for i, a in zip(numbers, answer) if a != str(2 * i + 2))
        return [1.0 if i < 3 else 0.0 for i in numbers]

    monkeypatch.setattr(gsm8k_lora, "math_answer", math_answer)
    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many?", "answer": f"{i}+{i + 2}=#### {2 * i + 2}"}
            for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    result = gsm8k_lora.main([
        str(Path(gsm8k_lora.__file__).with_suffix(".yaml")), f"model={saved_tiny_model}", f"dataset={data}",
        f"output_dir={out}", "iterations=2", "batch_size=8", "group_size=4", "minibatch_size=4",
        "micro_batch_size=2", "max_new_tokens=8", "mixed_precision=no", "lora_r=4", "save_every=1",
        "warmup_steps=0", "sampler=lmpg", "vllm_enable_sleep_mode=false", "reward_weights=[0.5, 0.2]", "--eval-dataset", str(data), "--eval-questions", "4"])
    assert result == {"greedy_accuracy_before": 0.75, "greedy_accuracy_after": 0.75, "eval_questions": 4}
    assert json.loads((out / "eval.json").read_text()) == result
    assert not wrong_references
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 4

    resolved = yaml.safe_load((out / "config.yaml").read_text())  # the run's config: YAML + overrides
    assert resolved["reward_weights"] == [0.5, 0.2]
    w_answer, w_format = resolved["reward_weights"]  # math_answer, format_tags
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["optimizer_steps"] == 4  # 2 minibatches x 2 epochs
        assert m["lr"] == pytest.approx(resolved["learning_rate"]) == 5e-5  # the YAML's, constant, no warmup
        assert m["completion_len_max"] <= 8 and m["unscored_frac"] == 0.0
        assert m["reward_mean"] == pytest.approx(w_answer * m["reward/math_answer"] + w_format * m["reward/format_tags"])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 8 and samples[0]["prompt"][0]["role"] == "system"
    assert {s["reward/math_answer"] for s in samples} == {0.0, 1.0}  # both kinds trained on: the weights show
    for s in samples:
        assert s["reward/math_answer"] == (1.0 if question_number(s["prompt"]) < 3 else 0.0)
        assert s["reward"] == pytest.approx(w_answer * s["reward/math_answer"] + w_format * s["reward/format_tags"])
