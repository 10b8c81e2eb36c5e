"""A tiny training run in its own process, for the kill-and-resume test.

    python resume_worker.py OUTPUT_DIR RESUME ITERATIONS
"""

import sys

import datasets
import torch

from lmpg import PGConfig, PGTrainer
from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm


def count_a(prompts, completions, **kwargs):
    return [c.count("a") / 8 for c in completions]


def main(output_dir: str, resume: str, iterations: int) -> None:
    torch.set_num_threads(1)
    tokenizer = make_char_tokenizer("0123456789+=ab ")
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
    ds = datasets.Dataset.from_list([{"prompt": f"{i}+{i}="} for i in range(7)])
    config = PGConfig(output_dir=output_dir, iterations=iterations, batch_size=8, group_size=4, max_new_tokens=6,
                      learning_rate=3e-3, epochs_per_batch=2, minibatch_size=4, save_every=1, keep_last=2,
                      resume=resume, sample_log_every=0, progress_bar=False)
    PGTrainer(model, [count_a], ds, config, tokenizer=tokenizer).train()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
