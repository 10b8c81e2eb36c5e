"""The optimizer and learning-rate schedule of a run."""

from __future__ import annotations

import torch

from lmpg.config import PGConfig


def make_adamw(params, c: PGConfig) -> torch.optim.AdamW:
    """AdamW with the config's hyperparameters, fused (one kernel for all parameters, as transformers'
    Trainer defaults to) where torch supports it for these parameters, the for-each version otherwise.
    Both take the same step up to float rounding."""
    kwargs = dict(lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_eps, weight_decay=c.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # a device or dtype the fused kernel lacks
        return torch.optim.AdamW(params, **kwargs)


def make_scheduler(optimizer, c: PGConfig):
    """The config's schedule over all optimizer steps of the run (after `warmup_steps` of warmup)."""
    from transformers import get_scheduler

    steps_per_iteration = c.epochs_per_batch * (c.batch_size // c.resolved_minibatch_size)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[c.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=c.warmup_steps,
                         num_training_steps=c.iterations * steps_per_iteration)
