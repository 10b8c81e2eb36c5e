"""A tiny training run over multi-turn episodes in its own process, for the resume and distributed tests.

    python episodes_worker.py OUTPUT_DIR RESUME ITERATIONS
    accelerate launch --num_processes 2 episodes_worker.py OUTPUT_DIR never ITERATIONS
"""

import random
import sys

import datasets
import torch

from lmpg import PGConfig, PGTrainer
from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm


class Game:
    """reset draws a target from Python's random; each turn is told whether it had more 'a's."""

    def reset(self, **row):
        self.target = random.randint(0, 3)
        self.turn = 0
        return f"{self.target}="

    def step(self, action):
        self.turn += 1
        hit = action.count("a") == self.target
        return ("a" if hit else "b"), float(hit), hit or self.turn == 3


def env_steps(completions, environments, log_metric, **kwargs):
    """Reads each episode's own environment (TRL's `environments`) and logs its steps, one value per
    episode, so that the logged mean covers the batch only if every process's values are pooled."""
    for env in environments:
        log_metric("env_steps", env.turn)
    return [0.0] * len(completions)


def main(output_dir: str, resume: str, iterations: int) -> None:
    torch.set_num_threads(1)
    tokenizer = make_char_tokenizer("0123456789+=ab ")
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
    ds = datasets.Dataset.from_list([{"prompt": f"{i}+{i}="} for i in range(8)])
    config = PGConfig(output_dir=output_dir, iterations=iterations, batch_size=8, group_size=2, max_new_tokens=4,
                      learning_rate=3e-3, epochs_per_batch=2, minibatch_size=4, save_every=1, keep_last=2,
                      resume=resume, sample_log_every=0, progress_bar=False, environment="episodes_worker:Game",
                      max_turns=3, reward_to_go=True, gamma=0.9, baseline="batch_mean", seed=5, grad_snr=False)
    PGTrainer(model, [env_steps], ds, config, tokenizer=tokenizer).train()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
