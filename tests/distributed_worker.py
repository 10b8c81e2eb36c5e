"""Short runs under `accelerate launch` (any number of processes) for the equivalence test.

    accelerate launch --cpu --num_processes N distributed_worker.py OUTPUT_ROOT

Runs one short training per (loss_agg, micro_batch_size) case into OUTPUT_ROOT/CASE.
"""

import sys

import datasets
import torch

from lmpg import PGConfig, PGTrainer
from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm

CASES = [(agg, micro) for agg in ("token_mean", "sequence_mean", "sequence_sum", "constant") for micro in (None, 2)]


def count_a(prompts, completions, **kwargs):
    return [c.count("a") / 8 for c in completions]


def main(root: str) -> None:
    torch.set_num_threads(1)
    tokenizer = make_char_tokenizer("0123456789+=ab ")
    ds = datasets.Dataset.from_list([{"prompt": f"{i}+{i * 7}="} for i in range(16)])
    for agg, micro in CASES:
        model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
        config = PGConfig(output_dir=f"{root}/{agg}-{micro}", iterations=2, batch_size=16, group_size=2,
                          minibatch_size=8, micro_batch_size=micro, epochs_per_batch=2, max_new_tokens=6,
                          learning_rate=1e-2, loss_agg=agg, baseline="batch_mean", adv_norm="batch",
                          sample_log_every=0, progress_bar=False, seed=3)
        trainer = PGTrainer(model, [count_a], ds, config, tokenizer=tokenizer)
        assert trainer.share_prompt_forward, "one process and DDP both take the shared-prompt forward"
        trainer.train()


if __name__ == "__main__":
    main(sys.argv[1])
