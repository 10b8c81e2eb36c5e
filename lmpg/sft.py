"""Imitation warm start: supervised fine-tuning on demonstrations before policy-gradient training.

RL can only reinforce answers the policy already samples, so a randomly initialised model is first
taught to imitate a demonstrator, minimising the next-token negative log-likelihood of the
demonstrated completions given their prompts:

    L(theta) = - sum_{b,t} m_{b,t} log pi_theta(y_{b,t} | x_b, y_{b,<t}) / sum_{b,t} m_{b,t}

where `m` is the `target_mask` (True on completion tokens and the closing EOS; False on prompt
tokens and padding, which are never targets).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


def tokenize_demonstrations(
    tokenizer, prompts: list[str], completions: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt+completion+EOS token ids, right-padded, with the masks that say which tokens count.

    Returns `(input_ids, attention_mask, target_mask)`, each `(B, L)`: `attention_mask` is True
    on real tokens, `target_mask` is True where token `t` is a target of the loss (a completion
    token or the EOS that ends it). Prompt and completion are tokenized separately, without special
    tokens, so the boundary between them is exact.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: pass one each")
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    rows = [p + c + [tokenizer.eos_token_id] for p, c in zip(prompt_ids, completion_ids)]
    L = max(len(row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, L), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.bool)
    target_mask = torch.zeros((B, L), dtype=torch.bool)
    for b, (row, prompt) in enumerate(zip(rows, prompt_ids)):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = True
        target_mask[b, len(prompt) : len(row)] = True
    return input_ids, attention_mask, target_mask


def imitation_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token negative log-likelihood over the tokens where `target_mask` is True.

    `logits` is `(B, L, V)` from the model run on `input_ids` `(B, L)`; the logits at position t
    predict token t+1. Returns `(loss, stats)` with stats `nll` (the loss) and `n_tokens`.
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # B, L-1, V
    targets = input_ids[:, 1:]  # B, L-1
    mask = target_mask[:, 1:]  # B, L-1: the first token has no prediction, and is a prompt token
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # B, L-1
    n_tokens = mask.sum().clamp(min=1)
    loss = (nll * mask).sum() / n_tokens
    return loss, {"nll": loss.item(), "n_tokens": int(n_tokens)}


def imitation_warm_start(
    model,
    tokenizer,
    prompts: list[str],
    completions: list[str],
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    weight_decay: float = 0.0,
    warmup_steps: int | None = None,
    max_grad_norm: float = 1.0,
    log_every: int = 0,
) -> dict:
    """Train `model` in place to imitate `completions` given `prompts`; return training stats.

    Each step draws `batch_size` demonstrations (a fresh seeded shuffle each epoch) and takes one
    AdamW step on `imitation_loss`. The learning rate warms up linearly over `warmup_steps`
    (default 5% of `steps`) and then decays to zero on a cosine (Loshchilov & Hutter 2017, SGDR).
    The tokenizer's EOS is appended to every completion so the model learns where answers end.

    Returns stats: `loss_first` and `loss_last` (mean over the first and last tenth of the steps),
    `losses` (one per step), `steps`, `seconds`.
    """
    input_ids, attention_mask, target_mask = tokenize_demonstrations(tokenizer, prompts, completions)
    return imitate_tokens(model, input_ids, attention_mask, target_mask, steps=steps, batch_size=batch_size,
                          lr=lr, seed=seed, weight_decay=weight_decay, warmup_steps=warmup_steps,
                          max_grad_norm=max_grad_norm, log_every=log_every)


def imitate_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                   steps: int = 1000, batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
                   weight_decay: float = 0.0, warmup_steps: int | None = None, max_grad_norm: float = 1.0,
                   log_every: int = 0) -> dict:
    """`imitation_warm_start` on token ids already laid out: (B, L) right-padded `input_ids`,
    `attention_mask` and `target_mask` (True where a token is a target). Multi-turn demonstrations
    use it with the environment's tokens in the input but not in the targets (`lmpg.episodes`)."""
    N = input_ids.shape[0]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup_steps = max(1, steps // 20) if warmup_steps is None else warmup_steps

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    was_training = model.training
    model.train()
    order = torch.randperm(N, generator=generator)
    cursor = 0
    losses: list[float] = []
    start_time = time.perf_counter()
    for step in range(steps):
        if cursor + batch_size > N:
            order, cursor = torch.randperm(N, generator=generator), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        L = int(attention_mask[index].sum(dim=1).max())  # trim padding shared by the whole batch
        batch_ids = input_ids[index, :L]  # B, L
        logits = model(input_ids=batch_ids, attention_mask=attention_mask[index, :L].long()).logits
        loss, _ = imitation_loss(logits, batch_ids, target_mask[index, :L])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"sft step {step + 1}/{steps} nll {sum(losses[-log_every:]) / log_every:.4f}")
    model.train(was_training)
    tenth = max(1, steps // 10)
    return {
        "loss_first": sum(losses[:tenth]) / len(losses[:tenth]),
        "loss_last": sum(losses[-tenth:]) / len(losses[-tenth:]),
        "losses": losses,
        "steps": steps,
        "seconds": time.perf_counter() - start_time,
    }
