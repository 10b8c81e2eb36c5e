"""Short runs with dynamic sampling in their own process, for the resume and distributed tests.

    python dynamic_sampling_worker.py OUTPUT_DIR RESUME ITERATIONS [CASE ...]
    accelerate launch --num_processes 2 dynamic_sampling_worker.py OUTPUT_ROOT never ITERATIONS CASE ...

One CASE (single, episodes) writes OUTPUT_DIR; several write OUTPUT_ROOT/CASE each.
"""

import random
import sys
from pathlib import Path

import datasets
import torch

from lmpg import PGConfig, PGTrainer
from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm


def a_unless_one(prompts, completions, **kwargs):
    """The 'a's among 8, except that a prompt starting with 1 always gets 0.5: its groups never have spread."""
    return [0.5 if p.startswith("1") else c.count("a") / 8 for p, c in zip(prompts, completions)]


class Guess:
    """reset draws a target from Python's random (seeded per prompt, shared by the group); one turn."""

    def reset(self, **row):
        self.target = random.randint(0, 2)
        return f"{self.target}="

    def step(self, action):
        return "", 0.0, True


def guessed(completions, environments, **kwargs):
    """1 when the episode's turn holds as many 'a's as its environment's target (truncated ones too)."""
    return [float(c.count("a") == env.target) for c, env in zip(completions, environments)]


CASES = {
    "single": dict(reward_fns=[a_unless_one], epochs_per_batch=2, minibatch_size=8,
                   dynamic_sampling_max_extra_rounds=3, dynamic_sampling_round_prompts=2),
    "episodes": dict(reward_fns=[guessed], environment="dynamic_sampling_worker:Guess", max_turns=1,
                     baseline="leave_one_out", dynamic_sampling_max_extra_rounds=4),
}


def run(output_dir: str, resume: str, iterations: int, case: str) -> None:
    tokenizer = make_char_tokenizer("0123456789+=ab ")
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
    ds = datasets.Dataset.from_list([{"prompt": f"{i}+{i}="} for i in range(20)])
    settings = dict(CASES[case])
    reward_fns = settings.pop("reward_fns")
    config = PGConfig(output_dir=output_dir, iterations=iterations, batch_size=16, group_size=4, max_new_tokens=6,
                      learning_rate=3e-3, save_every=1, keep_last=2, resume=resume, sample_log_every=0,
                      progress_bar=False, sample_groups_per_iteration=None, dynamic_sampling=True, seed=1,
                      grad_snr=False, **settings)
    PGTrainer(model, reward_fns, ds, config, tokenizer=tokenizer).train()


def main(output: str, resume: str, iterations: int, cases: list[str]) -> None:
    torch.set_num_threads(1)
    for case in cases:
        run(output if len(cases) == 1 else str(Path(output) / case), resume, iterations, case)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:] or ["single"])
