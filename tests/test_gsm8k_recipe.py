"""The GPU recipe's code path on CPU: a tiny model saved to disk, a local GSM8K-shaped file, LoRA,
gradient checkpointing, micro-batches, two epochs per batch."""

import json
import string
import sys
from pathlib import Path

import pytest

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


def test_gsm8k_recipe_runs_on_a_tiny_model(tmp_path, saved_tiny_model):
    import gsm8k_lora

    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many?", "answer": f"{i}+{i + 2}=#### {2 * i + 2}"}
            for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    result = gsm8k_lora.main([
        str(Path(gsm8k_lora.__file__).with_suffix(".yaml")), f"model={saved_tiny_model}", f"dataset={data}",
        f"output_dir={out}", "iterations=2", "batch_size=8", "group_size=4", "minibatch_size=4",
        "micro_batch_size=2", "max_new_tokens=8", "mixed_precision=no", "lora_r=4", "save_every=1",
        "warmup_steps=0", "--eval-dataset", str(data), "--eval-questions", "4"])
    assert set(result) == {"greedy_accuracy_before", "greedy_accuracy_after", "eval_questions"}
    assert (out / "final" / "adapter_config.json").exists()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and "reward/math_answer" in metrics[0] and "reward/format_tags" in metrics[0]
    assert metrics[0]["optimizer_steps"] == 4  # 2 minibatches x 2 epochs
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"][0]["role"] == "system"
