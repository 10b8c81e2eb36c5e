"""PGTrainer: the policy-gradient loop.

Each iteration (CS224R lecture 3, "REINFORCE" with the options of lmpg.advantages / lmpg.losses):

1. take the next prompts (each process its share; a prompt's G samples never leave its process);
2. sample G completions per prompt from the current policy pi_old (no grad, KV cache);
3. score every completion with every reward function -> per-token rewards r_{i,t};
4. log pi_old and log pi_ref of the taken tokens (a no-grad forward, skipped when the batch gets a
   single optimizer step: then pi_old is pi_theta at that step and logp_old = logp.detach());
5. advantages A_{i,t} = (ret_{i,t} - b_i) / std_i;
6. `epochs_per_batch` passes over the batch in minibatches, each an optimizer step on the surrogate
   loss (micro-batches accumulate gradients so the sum equals the whole minibatch's gradient);
7. metrics to metrics.jsonl (deterministic values) and timings.jsonl (wall-clock values).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lmpg.advantages import compute_advantages
from lmpg.checkpoint import latest_checkpoint, load_state, rng_state, save_checkpoint, set_rng_state
from lmpg.config import PGConfig
from lmpg.diagnostics import GradientMoments
from lmpg.data import PromptOrder, load_prompt_dataset, render_prompt
from lmpg.errors import ConfigError, TrainingError
from lmpg.kl import kl_estimate
from lmpg.logprobs import sequence_logprobs
from lmpg.losses import aggregate, policy_gradient_loss
from lmpg.masked import masked_mean
from lmpg.metrics import JsonlWriter, format_metrics_line, read_jsonl
from lmpg.modeling import apply_lora, disable_dropout, frozen_copy, is_peft_model, load_model_and_tokenizer
from lmpg.rewards import RewardScorer
from lmpg.rollout import Rollout, eos_token_ids, sample_completions
from lmpg.sampler import row_seed

logger = logging.getLogger("lmpg")

RUN_MARKER = "lmpg_run.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class PGTrainer:
    """Fine-tune a causal LM with the policy gradient.

    model: a transformers causal LM or a hub name / local path.
    reward_fns: callables `fn(prompts, completions, **kwargs) -> list[float | None]` (or per-token
        lists), spec strings ('pkg.mod:fn', 'file.py:fn', built-in names), or one of them.
    train_dataset: a datasets.Dataset (or file path / hub name) with a `prompt` column.
    """

    def __init__(self, model, reward_fns, train_dataset, config: PGConfig | None = None, tokenizer=None,
                 reward_weights=None, peft_config=None):
        from accelerate import Accelerator, DistributedType

        self.config = c = config if config is not None else PGConfig()
        if not isinstance(c, PGConfig):
            raise ConfigError(f"config must be a PGConfig, not {type(c).__name__}; build one with PGConfig(...)")
        _allow_new_mixed_precision(c.mixed_precision)
        self.accelerator = acc = Accelerator(mixed_precision=c.mixed_precision, cpu=_no_accelerator(),
                                             log_with=c.report_to or None, project_dir=c.output_dir)
        n_proc = acc.num_processes
        if c.prompts_per_iteration % n_proc:
            raise ConfigError(f"{c.prompts_per_iteration} prompts per iteration (batch_size/group_size) do not split "
                              f"over {n_proc} processes; make batch_size a multiple of {c.group_size * n_proc}")
        local_mb = c.resolved_minibatch_size // n_proc
        if n_proc > 1 and c.resolved_minibatch_size % (n_proc * c.group_size):
            raise ConfigError(f"minibatch_size={c.resolved_minibatch_size} does not split into whole groups over "
                              f"{n_proc} processes; make it a multiple of group_size * processes = {c.group_size * n_proc}")
        self.local_minibatch_size = local_mb
        self.micro_batch_size = min(c.micro_batch_size or local_mb, local_mb)
        if local_mb % self.micro_batch_size:
            raise ConfigError(f"micro_batch_size={self.micro_batch_size} must divide the per-process minibatch {local_mb}")
        seed_everything(c.seed)

        self.train_dataset = load_prompt_dataset(train_dataset, c.dataset_split, c.prompt_column)
        model, tokenizer = load_model_and_tokenizer(model, tokenizer)
        self.tokenizer = tokenizer
        disable_dropout(model)
        model = apply_lora(model, c, peft_config)
        if c.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ref_model = None
        if c.kl_coef > 0 and not is_peft_model(model):
            self.ref_model = frozen_copy(model).to(acc.device)  # with LoRA: the adapter disabled is pi_ref

        weights = reward_weights if reward_weights is not None else c.reward_weights
        fns = reward_fns if reward_fns is not None else c.rewards
        fns = [fns] if callable(fns) or isinstance(fns, str) else list(fns)
        if not fns:
            raise ConfigError("no reward function given; pass reward_fns=[...] or set rewards in the config")
        self.scorer = RewardScorer(fns, weights, on_error=c.reward_on_error, executor=c.reward_executor,
                                   max_workers=c.reward_workers)
        self.reward_weights = list(weights) if weights is not None else [1.0] * len(self.scorer.names)

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_adamw(params, c)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # the shared-prompt forward runs the model twice per backward and needs its KV cache: fine
        # through DDP (each weight's gradient is still ready once per backward), not through FSDP /
        # DeepSpeed, whose hooks gather and free shards per forward, nor under gradient checkpointing
        self.share_prompt_forward = (c.shared_prompt_forward and not c.gradient_checkpointing
                                     and acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                                  DistributedType.MULTI_GPU))
        self.scheduler = _make_scheduler(self.optimizer, c)
        self.eos_ids = eos_token_ids(tokenizer, acc.unwrap_model(self.model))
        self.prompt_order = PromptOrder(len(self.train_dataset), c.seed)
        self.iteration = 0
        self.consecutive_skips = 0
        self.total_skips = 0
        self.output_dir = Path(c.output_dir)
        self.metrics_log = JsonlWriter(self.output_dir / "metrics.jsonl")
        self.timings_log = JsonlWriter(self.output_dir / "timings.jsonl")
        self.samples_log = JsonlWriter(self.output_dir / "samples.jsonl")
        self._run_dir_ready = False

    # ------------------------------------------------------------------ public API
    def train(self):
        """Run `config.iterations` iterations (continuing from a checkpoint if `resume` says so)."""
        c = self.config
        self._prepare_run_dir()
        bar = self._progress_bar()
        try:
            while self.iteration < c.iterations:
                metrics = self.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics.get('kl', 0.0):.3g}",
                                    tok_s=f"{metrics['_timing']['tokens_per_s']:.0f}")
                elif self.accelerator.is_main_process and (self.iteration % c.log_every == 0 or self.iteration == c.iterations):
                    print(format_metrics_line({**metrics, **metrics["_timing"]}), flush=True)
                if c.save_every and self.iteration % c.save_every == 0 and self.iteration < c.iterations:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            self.scorer.close()
        self.save_checkpoint()
        self.save_model(self.output_dir / "final")
        self._write_marker(finished=True)
        for tracker in self.accelerator.trackers:  # not end_training(): it would tear down the process group
            tracker.finish()
        return read_jsonl(self.output_dir / "metrics.jsonl")

    def save_model(self, path) -> None:
        """save_pretrained of the policy (only the adapter for a LoRA policy) and its tokenizer."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            unwrapped = acc.unwrap_model(self.model)
            with _quiet_hf_progress():
                unwrapped.save_pretrained(str(path), state_dict=acc.get_state_dict(self.model), safe_serialization=True)
            self.tokenizer.save_pretrained(str(path))
        acc.wait_for_everyone()

    # ------------------------------------------------------------------ one iteration
    def step(self) -> dict:
        c, acc = self.config, self.accelerator
        t_start = time.perf_counter()

        # 1. prompts: the global batch in a seeded order, this process's share of every minibatch
        positions = self._local_prompt_positions()
        indices = self.prompt_order.next_indices(c.prompts_per_iteration)
        indices = [indices[p] for p in positions]
        rows = self.train_dataset[indices]  # dict of columns
        prompts = rows[c.prompt_column]
        rendered = [render_prompt(self.tokenizer, p) for p in prompts]

        # 2. sample G completions per prompt from pi_old, each from its own random stream
        seeds = [row_seed(c.seed, self.iteration, p, j) for p in positions for j in range(c.group_size)]
        rollout = self._sample([t for t, _ in rendered], rendered[0][1], seeds)
        t_sampled = time.perf_counter()

        # 3. score
        token_rewards, has_reward, scores = self._score(rollout, prompts, rows)
        t_scored = time.perf_counter()

        # 4. log pi_old (no grad) where the update cannot read it off its own first forward, and log pi_ref
        logp_old = self._old_logprobs(rollout)
        logp_ref = self._reference_logprobs(rollout) if c.kl_coef > 0 else None
        if c.kl_coef > 0 and c.kl_in == "reward":
            kl_tok = kl_estimate(logp_old, logp_ref, c.kl_estimator)
            token_rewards = token_rewards - c.kl_coef * torch.where(rollout.completion_mask, kl_tok, 0.0)

        # 5. advantages
        adv, adv_stats = compute_advantages(
            token_rewards, rollout.completion_mask, c.group_size, c.baseline, c.adv_norm, c.reward_to_go,
            c.gamma, sample_mask=has_reward, eps=c.adv_eps, gather=self._gather,
            process_index=acc.process_index)
        loss_mask = rollout.completion_mask & has_reward.unsqueeze(1)

        # 6. update
        update_stats, entropy = self._update(rollout, loss_mask, adv, logp_old, logp_ref)
        t_updated = time.perf_counter()

        # 7. metrics
        self.iteration += 1
        metrics = self._metrics(rollout, token_rewards, has_reward, scores, adv_stats, update_stats, entropy)
        timing = {"time_sample": t_sampled - t_start, "time_score": t_scored - t_sampled,
                  "time_update": t_updated - t_scored, "time_total": t_updated - t_start}
        n_tokens = float(self._gather(torch.tensor([rollout.num_tokens], dtype=torch.float32)).sum())
        timing["tokens_per_s"] = n_tokens / max(timing["time_total"], 1e-9)
        timing["sample_tokens_per_s"] = n_tokens / max(timing["time_sample"], 1e-9)
        if acc.is_main_process:
            self.metrics_log.write(metrics)
            self.timings_log.write({"iteration": self.iteration, **timing})
            self._write_samples(rollout, prompts, scores, token_rewards, has_reward, adv)
            if acc.trackers:
                acc.log({k: v for k, v in {**metrics, **timing}.items() if isinstance(v, (int, float))},
                        step=self.iteration)
        snr = metrics.get("grad_snr")
        if snr is not None and snr < 1.0 and acc.is_main_process and self.iteration % max(c.log_every, 10) == 1:
            logger.warning("gradient SNR %.2f < 1 at iteration %d: the batch gradient is mostly noise; raise "
                           "batch_size (noise scale: %.1f micro-batches)", snr, self.iteration,
                           metrics.get("grad_noise_scale", float("nan")))
        metrics["_timing"] = timing
        return metrics

    def _local_prompt_positions(self) -> list[int]:
        """Positions (in the global batch of prompts) this process samples and trains on.

        Each minibatch is a contiguous block of the global batch, split evenly over the processes,
        so process r holds sub-block r of every minibatch: N processes then take, step for step,
        the optimizer steps one process takes on the whole batch.
        """
        c, acc = self.config, self.accelerator
        n_proc, rank = acc.num_processes, acc.process_index
        per_mb = max(c.resolved_minibatch_size // c.group_size, 1)  # prompts per minibatch
        share = per_mb // n_proc
        return [block + rank * share + i for block in range(0, c.prompts_per_iteration, per_mb)
                for i in range(share)]

    def _sample(self, prompt_texts, add_special_tokens, seeds=None) -> Rollout:
        c = self.config
        policy = self.accelerator.unwrap_model(self.model)
        return sample_completions(policy, self.tokenizer, prompt_texts, c.group_size,
                                  max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                  top_k=c.top_k, max_prompt_length=c.max_prompt_length,
                                  add_special_tokens=add_special_tokens, eos_ids=self.eos_ids, seeds=seeds,
                                  sampler=c.sampler)

    def _score(self, rollout: Rollout, prompts, rows):
        c = self.config
        prompts_rep, completions, completion_ids = rollout.reward_inputs(prompts)
        columns = {k: [v[i] for i in rollout.prompt_index] for k, v in rows.items() if k != c.prompt_column}
        scores = self.scorer.score(prompts_rep, completions, completion_ids, step=self.iteration, columns=columns)
        token_rewards, has_reward = scores.to_token_rewards(self.reward_weights, rollout.completion_mask.cpu())
        device = rollout.completion_mask.device
        return token_rewards.to(device), has_reward.to(device), scores

    def _micro_batches(self, order: torch.Tensor):
        for s in range(0, len(order), self.micro_batch_size):
            yield order[s:s + self.micro_batch_size]

    def _forward(self, model, rollout: Rollout, idx, with_entropy: bool):
        """(logp (b, T), entropy (b, T) or None) of rows `idx`, padding trimmed: the columns of
        left padding every row shares and the completion columns past the longest row are dropped
        before the forward, and the outputs padded back with zeros to the batch's T."""
        prompt_mask, completion_mask = rollout.prompt_mask[idx], rollout.completion_mask[idx]
        P, T = prompt_mask.shape[1], completion_mask.shape[1]
        p_start = P - int(prompt_mask.sum(1).max()) if P else 0
        t_end = int(completion_mask.sum(1).max()) if T else 0
        group = None
        if self.share_prompt_forward:
            group = torch.as_tensor(rollout.prompt_index)[idx.cpu()].to(rollout.prompt_ids.device)
        logp, ent = sequence_logprobs(model, rollout.prompt_ids[idx][:, p_start:], prompt_mask[:, p_start:],
                                      rollout.completion_ids[idx][:, :t_end], completion_mask[:, :t_end],
                                      self.config.temperature, with_entropy, group=group,
                                      chunk_size=self.config.logits_chunk_size)
        if t_end < T:
            pad = (0, T - t_end)
            logp = torch.nn.functional.pad(logp, pad)
            ent = torch.nn.functional.pad(ent, pad) if ent is not None else None
        return logp, ent

    @torch.no_grad()
    def _logprobs_no_grad(self, model, rollout: Rollout, with_entropy: bool = False):
        """Log-probs of the whole batch in the same micro-batches the first epoch uses (so the first
        update step recomputes them bit for bit and its ratio is exactly 1)."""
        B = rollout.completion_ids.shape[0]
        logps, ents = [], []
        for idx in self._micro_batches(torch.arange(B)):
            logp, ent = self._forward(model, rollout, idx, with_entropy)
            logps.append(logp)
            ents.append(ent)
        return torch.cat(logps), (torch.cat(ents) if with_entropy else None)

    def _old_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """log pi_old of the taken tokens, (B, T), for every row the update cannot fill itself.

        Rows of the first minibatch are filled by the update's first forward (theta == theta_old
        there, so logp_old = logp.detach() and the first step's ratio is exactly 1); with one
        minibatch per epoch no extra forward is needed at all. The other rows come from a no-grad
        forward (logp_old_source=forward) or from the sampler's own log-probs (sampler: no extra
        forward; equal to the forward's up to float rounding of the incremental KV-cache pass).
        With kl_in=reward every row is needed before the update and comes from the forward.
        """
        c = self.config
        B, T = rollout.completion_ids.shape
        logp_old = torch.zeros(B, T, device=rollout.completion_ids.device)
        need = torch.arange(self.local_minibatch_size, B)
        if c.kl_coef > 0 and c.kl_in == "reward":
            need = torch.arange(B)
        if len(need) == 0:
            return logp_old
        if c.logp_old_source == "sampler" and "sampler_logp" in rollout.extras:
            logp_old[need] = rollout.extras["sampler_logp"][need].to(logp_old.dtype)
        else:
            with torch.no_grad():
                for idx in self._micro_batches(need):
                    logp_old[idx] = self._forward(self.model, rollout, idx, False)[0]
        return logp_old

    def _reference_logprobs(self, rollout: Rollout):
        if self.ref_model is not None:
            return self._logprobs_no_grad(self.ref_model, rollout)[0]
        with self.accelerator.unwrap_model(self.model).disable_adapter():  # LoRA: pi_ref = base model
            return self._logprobs_no_grad(self.model, rollout)[0]

    def _update(self, rollout: Rollout, loss_mask, adv, logp_old, logp_ref):
        c, acc = self.config, self.accelerator
        B = rollout.completion_ids.shape[0]  # local sequences
        n_proc = acc.num_processes
        n_minibatches = B // self.local_minibatch_size
        sums = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "grad_norm": 0.0}
        # token-weighted tallies of this process, gathered over processes at the end
        ratio_sum = clip_sum = counted = 0.0
        ratio_min, ratio_max, steps, skipped = math.inf, -math.inf, 0, 0
        entropy_parts = []
        ess_sums = torch.zeros(3, dtype=torch.float64)  # sum w, sum w^2, n over epochs after the first
        params = [p for p in self.model.parameters() if p.requires_grad]
        # the SNR needs >= 2 gradient estimates in the first epoch; with fewer it would only cost time
        first_epoch_micro = n_minibatches * -(-self.local_minibatch_size // self.micro_batch_size)
        moments = GradientMoments(params) if c.grad_snr and acc.num_processes == 1 and first_epoch_micro >= 2 else None
        self.model.train()
        for epoch in range(c.epochs_per_batch):
            # epoch 0 in sampling order (the pi_old pass used the same micro-batches); later epochs take
            # the minibatches in a seeded random order, the same on every process (their membership
            # stays: the batch is already a random draw, and rows cannot move between processes)
            mb_order = list(range(n_minibatches)) if epoch == 0 else torch.randperm(
                n_minibatches, generator=torch.Generator().manual_seed(row_seed(c.seed, self.iteration, -1, epoch))).tolist()
            for mb in mb_order:
                mb_idx = torch.arange(mb * self.local_minibatch_size, (mb + 1) * self.local_minibatch_size)
                totals = self._gather(torch.tensor([float(loss_mask[mb_idx].sum()), float(len(mb_idx))])).view(-1, 2).sum(0)
                num_tokens, num_sequences = float(totals[0]), float(totals[1])
                micro = list(self._micro_batches(mb_idx))
                mb_loss = mb_pg = mb_kl = 0.0
                stat_list = []
                for k, idx in enumerate(micro):
                    logp, ent = self._forward(self.model, rollout, idx, with_entropy=epoch == 0)
                    if epoch == 0 and mb == 0:
                        logp_old[idx] = logp.detach()  # theta == theta_old: ratio exactly 1
                    old = logp_old[idx]
                    mask = loss_mask[idx]
                    if epoch == 0:
                        entropy_parts.append((idx, ent))
                    else:
                        w = torch.exp(logp.detach() - old)[mask].double()
                        ess_sums += torch.stack([w.sum(), (w * w).sum(), torch.tensor(float(w.numel()), dtype=torch.float64)])
                    loss, st = policy_gradient_loss(
                        logp, old, adv[idx], mask, ratio_level=c.ratio_level, clip_eps_low=c.clip_eps_low,
                        clip_eps_high=c.clip_eps_high, loss_agg=c.loss_agg, loss_constant=c.resolved_loss_constant,
                        num_tokens=num_tokens, num_sequences=num_sequences)
                    pg = float(loss.detach())
                    if c.kl_coef > 0:
                        kl_tok = kl_estimate(logp, logp_ref[idx], c.kl_estimator)
                        kl_term = aggregate(kl_tok, mask, c.loss_agg, c.resolved_loss_constant, num_tokens, num_sequences)
                        mb_kl += float(kl_term.detach())
                        if c.kl_in == "loss":
                            loss = loss + c.kl_coef * kl_term
                    mb_loss += float(loss.detach())
                    mb_pg += pg
                    stat_list.append((st, float(mask.sum())))
                    # DDP averages gradients over processes; each process holds a share of the global sum
                    ctx = acc.no_sync(self.model) if k < len(micro) - 1 else _nullcontext()
                    if moments is not None and epoch == 0:
                        moments.before_backward()
                    with ctx:
                        acc.backward(loss * n_proc)
                    if moments is not None and epoch == 0:
                        moments.after_backward(scale=float(len(micro)))  # each micro-batch estimates the minibatch gradient
                grad_norm = self._grad_norm()
                losses = self._gather(torch.tensor([mb_loss, mb_pg, mb_kl])).view(-1, 3).sum(0)
                finite = math.isfinite(grad_norm) and bool(torch.isfinite(losses).all())
                if not finite:
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    self.consecutive_skips += 1
                    self.total_skips += 1
                    logger.warning("non-finite loss or gradient at iteration %d epoch %d minibatch %d; update skipped",
                                   self.iteration + 1, epoch, mb)
                    if self.consecutive_skips >= c.max_consecutive_skips:
                        raise TrainingError(
                            f"{self.consecutive_skips} consecutive updates had a non-finite loss or gradient "
                            f"(last at iteration {self.iteration + 1}, epoch {epoch}, minibatch {mb}); "
                            f"the last good checkpoint is in {self.output_dir / 'checkpoints'}; lower learning_rate "
                            f"or check the rewards")
                    continue
                self.consecutive_skips = 0
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                steps += 1
                sums["loss"] += float(losses[0])
                sums["pg_loss"] += float(losses[1])
                sums["kl"] += float(losses[2])
                sums["grad_norm"] += grad_norm
                ratio_sum += sum(s["ratio_mean"] * n for s, n in stat_list)
                clip_sum += sum(s["clip_frac"] * n for s, n in stat_list)
                counted += sum(n for _, n in stat_list)
                ratio_min = min([ratio_min] + [s["ratio_min"] for s, _ in stat_list])
                ratio_max = max([ratio_max] + [s["ratio_max"] for s, _ in stat_list])
        entropy = torch.zeros_like(logp_old)
        for idx, ent in entropy_parts:
            entropy[idx] = ent
        n = max(steps, 1)
        stats = {k: v / n for k, v in sums.items()}
        if c.kl_coef == 0:
            stats.pop("kl")
        tallies = self._gather(torch.tensor([ratio_sum, clip_sum, counted, -ratio_min, ratio_max],
                                            dtype=torch.float64)).view(-1, 5)
        ratio_sum, clip_sum, counted = (float(v) for v in tallies[:, :3].sum(0))
        ratio_min, ratio_max = -float(tallies[:, 3].max()), float(tallies[:, 4].max())
        stats["ratio_mean"] = ratio_sum / counted if counted else float("nan")
        stats["clip_frac"] = clip_sum / counted if counted else float("nan")
        ess = self._gather(ess_sums).view(-1, 3).sum(0)
        if c.epochs_per_batch > 1 and ess[2] > 0:
            stats["ess_frac"] = float(ess[0] ** 2 / ess[1] / ess[2])
        if moments is not None:
            stats.update(moments.result())
        stats.update(ratio_min=ratio_min if steps else float("nan"), ratio_max=ratio_max if steps else float("nan"),
                     optimizer_steps=steps, skipped_updates=skipped, lr=self.scheduler.get_last_lr()[0])
        return stats, entropy

    def _grad_norm(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.config.max_grad_norm is not None:
            norm = self.accelerator.clip_grad_norm_(params, self.config.max_grad_norm)
        else:
            grads = [p.grad.detach().norm(2) for p in params if p.grad is not None]
            norm = torch.stack(grads).norm(2) if grads else torch.zeros(())
        return float(norm)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor over processes in rank order (identity on one process)."""
        if self.accelerator.num_processes == 1:
            return t
        return self.accelerator.gather(t.to(self.accelerator.device)).cpu() if t.device.type == "cpu" \
            else self.accelerator.gather(t)

    # ------------------------------------------------------------------ metrics
    def _metrics(self, rollout, token_rewards, has_reward, scores, adv_stats, update_stats, entropy) -> dict:
        mask = rollout.completion_mask
        seq_reward = self._gather(token_rewards.sum(1).float().cpu())
        scored = self._gather(has_reward.cpu())
        lengths = self._gather(mask.sum(1).float().cpu())
        truncated = self._gather(rollout.truncated.float().cpu())
        empty = self._gather((mask.sum(1) == 1).float().cpu() * (~rollout.truncated).float().cpu())
        r = seq_reward[scored]
        m = {"iteration": self.iteration,
             "reward_mean": float(r.mean()) if r.numel() else float("nan"),
             "reward_std": float(r.std(unbiased=False)) if r.numel() else float("nan"),
             "unscored_frac": float((~scored).float().mean())}
        for name, value in scores.means().items():
            m[f"reward/{name}"] = value
        for name, count in scores.error_counts.items():
            m[f"reward_errors/{name}"] = count
        m.update(adv_stats)
        m.update({k: update_stats[k] for k in ("loss", "pg_loss", "kl", "ratio_min", "ratio_mean", "ratio_max",
                                               "clip_frac", "grad_norm", "optimizer_steps", "skipped_updates", "lr",
                                               "ess_frac", "grad_snr", "grad_noise_scale")
                  if k in update_stats})
        if entropy is not None:
            m["entropy"] = float(masked_mean(entropy.float(), mask))
        m.update({"completion_len_mean": float(lengths.mean()), "completion_len_max": float(lengths.max()),
                  "truncated_frac": float(truncated.mean()), "eos_first_frac": float(empty.mean()),
                  "prompts_truncated": rollout.prompts_truncated, "skipped_updates_total": self.total_skips})
        return m

    def _write_samples(self, rollout, prompts, scores, token_rewards, has_reward, adv):
        c = self.config
        records = []
        for i, text in enumerate(rollout.completions):
            rec = {"iteration": self.iteration, "prompt": prompts[rollout.prompt_index[i]], "completion": text,
                   "reward": float(token_rewards[i].sum()) if bool(has_reward[i]) else None,
                   "advantage": float(adv[i][rollout.completion_mask[i]][0]) if bool(rollout.completion_mask[i].any()) else 0.0,
                   "truncated": bool(rollout.truncated[i])}
            for name, values in zip(scores.names, scores.values):
                v = values[i]
                rec[f"reward/{name}"] = float(sum(v)) if isinstance(v, list) else v
            records.append(rec)
            self.samples_log.write(rec)
        if c.sample_log_every and self.iteration % c.sample_log_every == 0 and c.num_samples_to_show:
            for rec in records[:c.num_samples_to_show]:
                prompt = rec["prompt"] if isinstance(rec["prompt"], str) else rec["prompt"][-1]["content"]
                print(f"  [sample it {self.iteration}] {prompt!r} -> {rec['completion']!r} "
                      f"reward={rec['reward']} adv={rec['advantage']:.3f}", flush=True)

    def _progress_bar(self):
        c = self.config
        if not (c.progress_bar and sys.stderr.isatty() and not os.environ.get("CI") and self.accelerator.is_main_process):
            return None
        from tqdm.auto import tqdm
        return tqdm(total=c.iterations, initial=self.iteration, desc="lmpg", dynamic_ncols=True)

    # ------------------------------------------------------------------ run directory, checkpoints
    def _prepare_run_dir(self):
        """Create the run directory, or resume / refuse: a run is never overwritten silently."""
        if self._run_dir_ready:
            return
        c, out = self.config, self.output_dir
        resume_from = None
        if c.resume == "auto":
            resume_from = latest_checkpoint(out)
        elif c.resume not in ("never", "auto"):
            resume_from = Path(c.resume)
            if not resume_from.is_dir():
                raise ConfigError(f"resume={c.resume} is not a checkpoint directory; use resume=auto or a path "
                                  f"under {out / 'checkpoints'}")
        # every process makes the same read-only checks, then the main process writes
        if resume_from is None and out.exists() and any(out.iterdir()):
            marker = out / RUN_MARKER
            what = "a run" if marker.exists() else "files that are not an lmpg run"
            # resume=auto on a run that died before its first checkpoint: nothing to keep, start again
            restart = c.resume == "auto" and marker.exists()
            if not (c.overwrite_output_dir or restart) or not marker.exists():
                hint = ("set resume=auto to continue it, overwrite_output_dir=true to replace it, or choose another "
                        "output_dir") if marker.exists() else "choose an empty or new output_dir"
                raise ConfigError(f"output_dir {out} already holds {what}; {hint}")
            overwrite = True
        else:
            overwrite = False
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if overwrite:
                for name in ("metrics.jsonl", "timings.jsonl", "samples.jsonl"):
                    (out / name).unlink(missing_ok=True)
            try:
                out.mkdir(parents=True, exist_ok=True)
                probe = out / ".write_test"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                raise ConfigError(f"output_dir {out} is not writable ({e.strerror}); choose a writable directory") from None
            self.config.save_yaml(out / "config.yaml")
        self.accelerator.wait_for_everyone()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        if c.report_to:
            tracker_config = {k: v for k, v in c.to_dict().items() if isinstance(v, (int, float, str, bool))}
            self.accelerator.init_trackers(out.name or "lmpg", config=tracker_config)
        self._write_marker(finished=False)
        self._run_dir_ready = True

    def _write_marker(self, finished: bool):
        if self.accelerator.is_main_process:
            (self.output_dir / RUN_MARKER).write_text(json.dumps(
                {"iteration": self.iteration, "iterations": self.config.iterations, "finished": finished}))

    def save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            state = {"iteration": self.iteration, "prompt_order": self.prompt_order.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": rng_state(), "consecutive_skips": self.consecutive_skips, "total_skips": self.total_skips,
                     "metrics_lines": len(read_jsonl(self.output_dir / "metrics.jsonl")),
                     "config": self.config.to_dict()}
            path = save_checkpoint(self.output_dir, self.iteration, self._save_weights, state, self.config.keep_last)
            self._write_plot()
        acc.wait_for_everyone()
        return path

    def _write_plot(self) -> None:
        """metrics.png in the run directory; a plotting failure is logged, never fatal to training."""
        from lmpg.plot import plot_run

        try:
            plot_run(self.output_dir)
        except Exception as e:  # noqa: BLE001 - a chart is not worth a lost run
            logger.warning("could not write %s: %s", self.output_dir / "metrics.png", e)

    def _save_weights(self, path: Path):
        unwrapped = self.accelerator.unwrap_model(self.model)
        with _quiet_hf_progress():
            unwrapped.save_pretrained(str(path), safe_serialization=True)

    def load_checkpoint(self, path) -> None:
        """Restore weights, optimizer, scheduler, RNG, data position and counters from a checkpoint."""
        from safetensors.torch import load_file

        path = Path(path)
        state = load_state(path)
        unwrapped = self.accelerator.unwrap_model(self.model)
        weights_dir = path / "model"
        if is_peft_model(unwrapped):
            from peft import set_peft_model_state_dict
            set_peft_model_state_dict(unwrapped, load_file(str(weights_dir / "adapter_model.safetensors")))
        else:
            weights = {}
            for f in sorted(weights_dir.glob("*.safetensors")):
                weights.update(load_file(str(f)))
            missing, unexpected = unwrapped.load_state_dict(weights, strict=False)
            tied = set(getattr(unwrapped, "_tied_weights_keys", None) or [])
            missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
            if missing or unexpected:
                raise TrainingError(f"checkpoint {path} does not match the model (missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}); resume with the same model")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.prompt_order.load_state_dict(state["prompt_order"])
        self.iteration = state["iteration"]
        self.consecutive_skips = state["consecutive_skips"]
        self.total_skips = state["total_skips"]
        set_rng_state(state["rng"])
        if self.accelerator.is_main_process:
            self.metrics_log.truncate_to(state["metrics_lines"])
            self.timings_log.truncate_to(state["iteration"])
            kept = [r for r in read_jsonl(self.samples_log.path) if r["iteration"] <= state["iteration"]]
            self.samples_log.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        logger.info("resumed from %s at iteration %d", path, self.iteration)


def _allow_new_mixed_precision(mixed_precision: str) -> None:
    """accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    mixed precision. In a single process (a notebook, a test session) a later trainer may ask for
    another one: drop the old state, keeping the process group."""
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision) and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=False)


def _no_accelerator() -> bool:
    """True on a machine with no GPU: Accelerator(cpu=True) then runs N launched processes as a
    MULTI_CPU (gloo) group instead of N independent single-process runs."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available())
                or (xpu is not None and xpu.is_available()))


@contextlib.contextmanager
def _quiet_hf_progress():
    """Hide transformers' 'Writing model shards' bars for the duration of a save, then restore."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def make_adamw(params, c: PGConfig) -> torch.optim.AdamW:
    """AdamW with the config's hyperparameters, fused (one kernel for all parameters, as transformers'
    Trainer defaults to) where torch supports it for these parameters, the for-each version otherwise.
    Both take the same step up to float rounding."""
    kwargs = dict(lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_eps, weight_decay=c.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # a device or dtype the fused kernel lacks
        return torch.optim.AdamW(params, **kwargs)


def _make_scheduler(optimizer, c: PGConfig):
    from transformers import get_scheduler

    steps_per_iteration = c.epochs_per_batch * (c.batch_size // c.resolved_minibatch_size)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[c.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=c.warmup_steps,
                         num_training_steps=c.iterations * steps_per_iteration)
