"""One run with sampler=vllm, for tests/test_vllm_sampler.py: `python vllm_worker.py OUT [RESUME ITERATIONS]`
(one process; a checkpoint every iteration) or under `accelerate launch --num_processes 2` (an engine in
each process, each sampling its own prompts)."""

import sys

import datasets

from lmpg import PGConfig, PGTrainer
from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm

PROMPTS = ["12+34=", "5+6=", "a", "bb+1=", "7=", "ab", "3+3=", "b"]


def count_a(prompts, completions, **kwargs):
    return [c.count("a") / 8 for c in completions]


if __name__ == "__main__":
    tokenizer = make_char_tokenizer("0123456789+=ab")
    model = make_tiny_causal_lm(tokenizer, n_layer=2, n_embd=128, n_head=4, max_position_embeddings=64, seed=0)
    resume, iterations = (sys.argv[2], int(sys.argv[3])) if len(sys.argv) > 3 else ("never", 2)
    config = PGConfig(output_dir=sys.argv[1], iterations=iterations, batch_size=16, group_size=4, max_new_tokens=8,
                      sampler="vllm", learning_rate=1e-3, seed=5, sample_groups_per_iteration=None,
                      progress_bar=False, sample_log_every=0, save_every=1, keep_last=2, resume=resume)
    PGTrainer(model, [count_a], datasets.Dataset.from_dict({"prompt": PROMPTS}), config, tokenizer=tokenizer).train()
