"""GSM8K with a small instruct model, a LoRA adapter and verifiable rewards, on one GPU or more.

    accelerate launch recipes/gsm8k_lora.py recipes/gsm8k_lora.yaml [key=value ...]

1. read the config (YAML + overrides);
2. load GSM8K (hub, or a local jsonl with question/answer columns) and turn each row into a chat
   prompt plus the reference answer (the number after '####');
3. train the LoRA adapter with lmpg: math answer correctness + format reward, group baseline,
   several epochs per batch;
4. evaluate greedy accuracy on held-out questions before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmpg import PGConfig, PGTrainer
from lmpg.data import load_prompt_dataset
from reward_fns import format_tags, math_answer

SYSTEM_PROMPT = ("Solve the problem. Think step by step inside <think> </think>, then give only the final "
                 "number inside <answer> </answer>.")


def to_chat_prompt(row: dict) -> dict:
    """{question, answer: '... #### 42'} -> {prompt: chat messages, answer: '42'}."""
    return {"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["question"]}],
            "answer": row["answer"].split("####")[-1].strip().replace(",", "")}


def load_gsm8k(source: str, split: str):
    import datasets

    if Path(source).suffix in (".jsonl", ".json", ".csv", ".parquet"):
        ds = load_prompt_dataset(source, prompt_column="question")
    else:
        ds = datasets.load_dataset(source, "main", split=split)
    return ds.map(to_chat_prompt, remove_columns=ds.column_names)


def greedy_accuracy(trainer: PGTrainer, dataset, n: int) -> float:
    """Fraction of the first n questions answered exactly, greedy decoding."""
    from lmpg.evaluate import evaluate

    rows = dataset.select(range(min(n, len(dataset))))
    policy = trainer.accelerator.unwrap_model(trainer.model)
    result = evaluate(policy, trainer.tokenizer, rows, [math_answer], greedy=True,
                      max_new_tokens=trainer.config.max_new_tokens)
    return result["accuracy"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (recipes/gsm8k_lora.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--eval-questions", type=int, default=200, help="held-out questions for accuracy")
    parser.add_argument("--eval-dataset", default=None, help="held-out set (default: the dataset's test split)")
    args = parser.parse_args(argv)

    config = PGConfig.from_yaml(args.config, args.overrides)  # 1.
    train = load_gsm8k(config.dataset, config.dataset_split)  # 2.
    held_out = load_gsm8k(args.eval_dataset or config.dataset, "test")
    trainer = PGTrainer(config.model, [math_answer, format_tags], train, config)  # 3.
    before = greedy_accuracy(trainer, held_out, args.eval_questions)
    trainer.train()
    after = greedy_accuracy(trainer, held_out, args.eval_questions)  # 4.
    result = {"greedy_accuracy_before": before, "greedy_accuracy_after": after,
              "eval_questions": min(args.eval_questions, len(held_out))}
    if trainer.accelerator.is_main_process:
        (Path(config.output_dir) / "eval.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
