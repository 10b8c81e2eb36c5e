"""PGTrainer: the policy-gradient loop, one iteration per `step()`.

Each iteration (CS224R lecture 3, "REINFORCE" with the options of lmpg.advantages / lmpg.losses):

1. `next_prompts`: the next prompts (each process its share; a prompt's G samples stay on it);
2. `sample`: G completions per prompt from the current policy pi_old -> a TrajectoryBatch;
3. `score`: every reward function on every completion -> per-token rewards r_{i,t};
   with dynamic_sampling (DAPO), more rounds of 1.-3. until the batch holds only groups whose rewards
   differ (lmpg.dynamic_sampling);
4. `fill_logp_old`, `fill_logp_ref`: log pi_old and log pi_ref of the actions (no grad; the
   first minibatch's logp_old comes from the update's own forward, `lmpg.update`), and with
   kl_in=reward the KL penalty in the rewards;
5. `compute_advantages`: returns ret_{i,t}, A_{i,t} = ret_{i,t} - b_i, and / std_i if adv_norm asks;
6. `update`: `lmpg.update.PolicyUpdate`, epochs of minibatch steps on the surrogate loss;
7. `log`: metrics.jsonl (deterministic figures), timings.jsonl (wall clock), samples.jsonl (the
   first `sample_groups_per_iteration` groups).

Elsewhere: run directory and resume policy (lmpg.run_dir), checkpoints and weights
(lmpg.checkpoint), processes (lmpg.distributed), the optimizer (lmpg.optim), the forwards
(lmpg.forward), the update (lmpg.update).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmpg import distributed, run_dir
from lmpg.advantages import WEIGHTED_BASELINES, advantage_stats, normalise, returns, subtract_baseline
from lmpg.batch import TrajectoryBatch
from lmpg.checkpoint import load_state, load_weights, quiet_hf_progress, rng_state, save_checkpoint, \
    save_weights, set_rng_state
from lmpg.config import PGConfig
from lmpg.data import PromptOrder, load_prompt_dataset, render_prompt
from lmpg.dynamic_sampling import DynamicSampling, SampledGroups
from lmpg.environments import require_reward_source
from lmpg.episodes import EpisodeSampler, episode_counts, episode_metrics, score_episodes
from lmpg.errors import ConfigError, TrainingError
from lmpg.forward import batch_logprobs
from lmpg.generation import engine_sampler
from lmpg.kl import kl_penalised_rewards
from lmpg.masked import masked_mean
from lmpg.mismatch import correction_weights, mismatch_stats
from lmpg.metrics import JsonlWriter, clean, format_metrics_line
from lmpg.modeling import apply_lora, cast_lm_head_to_fp32, disable_dropout, frozen_copy, is_peft_model, \
    load_model_and_tokenizer
from lmpg.optim import make_adamw, make_scheduler
from lmpg.reference import ReferenceSync
from lmpg.rewards import RewardScorer
from lmpg.rewards.scorer import metric_means, pool_metric_values
from lmpg.rollout import eos_token_ids, reward_inputs, sample_completions
from lmpg.sampler import row_seed
from lmpg.samples import logged_records, print_samples, sample_records
from lmpg.update import NonFiniteGuard, PolicyUpdate, logp_old_rows_before_update

logger = logging.getLogger("lmpg")

REF_MODEL_DIR = "ref_model"
"""A checkpoint's directory of pi_ref's weights (sync_ref_model only)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def mean_std(name: str, values: torch.Tensor) -> dict:
    """{name}_mean and {name}_std (population) of the 1-D `values`, NaN when there are none."""
    if not values.numel():
        return {f"{name}_mean": float("nan"), f"{name}_std": float("nan")}
    return {f"{name}_mean": float(values.mean()), f"{name}_std": float(values.std(unbiased=False))}


@dataclass
class Prompts:
    """This process's prompts of one iteration."""

    positions: list[int]
    """Each prompt's position in the iteration's global batch (seeds its samples' random streams); with
    dynamic sampling, an extra round's prompts follow those of the earlier rounds."""
    rows: dict
    """The dataset rows, as columns."""
    prompts: list
    """The prompt column (strings or chat messages)."""
    texts: list[str]
    """The rendered prompt texts."""
    add_special_tokens: bool

    def global_rows(self, group_size: int) -> torch.Tensor:
        """(B,) each sampled row's position in the iteration's whole batch (prompt position * G + j)."""
        return torch.tensor([p * group_size + j for p in self.positions for j in range(group_size)])


@dataclass
class StepResult:
    """What one iteration produced."""

    metrics: dict
    """The deterministic figures written to metrics.jsonl."""
    timings: dict
    """Wall-clock figures written to timings.jsonl: time_sample, time_score, time_logp (pi_old and
    pi_ref forwards, advantages), time_update, time_sync (loading the updated policy into an inference
    engine; 0 without one), time_total (s), tokens_per_s, sample_tokens_per_s."""
    batch: TrajectoryBatch
    """This process's batch with every field filled."""


def policy_turn_endings(batch: TrajectoryBatch, eos_ids: list[int], max_turns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Why each row stopped, as two (B,) bool masks with one meaning each:
    cut: the policy's last turn has no EOS (it reached max_new_tokens, or an episode's token
    budget, mid-turn); single-turn, this is `batch.truncated`.
    out_of_turns: an episode that was truncated after a whole turn (EOS) with max_turns turns
    taken: the environment was not done when the turns ran out. Always False single-turn."""
    if batch.episodes is None:
        return batch.truncated.bool(), torch.zeros_like(batch.truncated, dtype=torch.bool)
    actions = batch.action_mask
    T = actions.shape[1]
    positions = torch.arange(T, device=actions.device).expand_as(actions)
    last = torch.where(actions, positions, -1).max(1).values  # (B,) the last action token, -1 if none
    last_token = batch.completion_ids.gather(1, last.clamp(min=0).unsqueeze(1)).squeeze(1)
    ends_on_eos = (last >= 0) & torch.isin(last_token, torch.tensor(eos_ids, device=actions.device))
    turns = torch.tensor([e.turns for e in batch.episodes], device=actions.device)
    out_of_turns = batch.truncated.bool() & ends_on_eos & (turns >= max_turns)
    return ~ends_on_eos, out_of_turns


class PGTrainer:
    """Fine-tune a causal LM with the policy gradient.

    model: a transformers causal LM or a hub name / local path.
    reward_fns: callables `fn(prompts, completions, **kwargs) -> list[float | None]` (or per-token
        lists), spec strings ('pkg.mod:fn', 'file.py:fn', built-in names), or one of them.
    train_dataset: a datasets.Dataset (or file path / hub name) with a `prompt` column.
    """

    def __init__(self, model, reward_fns, train_dataset, config: PGConfig | None = None, tokenizer=None,
                 reward_weights=None, peft_config=None):
        from accelerate import Accelerator

        self.config = c = config if config is not None else PGConfig()
        if not isinstance(c, PGConfig):
            raise ConfigError(f"config must be a PGConfig, not {type(c).__name__}; build one with PGConfig(...)")
        # config.yaml names the model, data and rewards given here, so that `lmpg train` can rerun it
        c, self.config_notes = run_dir.described_config(c, model, train_dataset, reward_fns, reward_weights, peft_config)
        self.config = c
        distributed.allow_new_mixed_precision(c.mixed_precision)
        self.accelerator = acc = Accelerator(mixed_precision=c.mixed_precision, cpu=distributed.no_accelerator(),
                                             log_with=c.report_to or None, project_dir=c.output_dir)
        n_proc = acc.num_processes
        c.check_processes(n_proc)
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
        model, tokenizer = load_model_and_tokenizer(model, tokenizer, model_init_kwargs=c.model_init_kwargs,
                                                    trust_remote_code=c.trust_remote_code)
        self.tokenizer = tokenizer
        disable_dropout(model)
        model = apply_lora(model, c, peft_config)
        if c.cast_lm_head_to_fp32:
            cast_lm_head_to_fp32(model)
        if c.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ref_model = None
        if c.kl_coef > 0 and not is_peft_model(model):
            self.ref_model = frozen_copy(model).to(acc.device)  # with LoRA: the adapter disabled is pi_ref
        if c.sync_ref_model and self.ref_model is None:
            raise ConfigError("sync_ref_model=true with a peft model: pi_ref is its base with the adapter disabled, "
                              "which no step may change; set sync_ref_model=false or train without LoRA")

        weights = reward_weights if reward_weights is not None else c.reward_weights
        fns = reward_fns if reward_fns is not None else c.rewards
        fns = [fns] if callable(fns) or isinstance(fns, str) else list(fns)
        if not fns and not c.environment:
            raise ConfigError("no reward function given; pass reward_fns=[...] or set rewards in the config")
        if not fns:  # an environment that rewards the episodes itself, or nothing would
            require_reward_source(c.environment)
        self.scorer = RewardScorer(fns, weights, on_error=c.reward_on_error, executor=c.reward_executor,
                                   max_workers=c.reward_workers, timeout=c.reward_timeout,
                                   memory_mb=c.reward_memory_mb, max_steps=c.iterations) if fns else None

        params = [p for p in model.parameters() if p.requires_grad]
        self.model, self.optimizer = acc.prepare(model, make_adamw(params, c))
        # not under gradient checkpointing: the shared-prompt forward needs the prompt's KV cache
        self.share_prompt_forward = (c.shared_prompt_forward and not c.gradient_checkpointing
                                     and distributed.supports_shared_prompt_forward(acc))
        self.logits_chunk_size = c.logits_chunk_size if distributed.supports_chunked_logprobs(acc) else 0
        if c.logits_chunk_size and not self.logits_chunk_size:
            logger.info("logits_chunk_size=%d: full logits under %s (its shards are not whole after the forward)",
                        c.logits_chunk_size, acc.distributed_type)
        self.scheduler = make_scheduler(self.optimizer, c)
        self.eos_ids = eos_token_ids(tokenizer, acc.unwrap_model(self.model))
        # multi-turn episodes (lmpg.episodes) instead of single completions
        self.episodes = EpisodeSampler(c, tokenizer, self.eos_ids) if c.environment else None
        # an inference engine built from the policy (sampler: vllm), synced after every update; None: lmpg's
        # own samplers, which read the policy directly
        self.turn_sampler = engine_sampler(c, acc.unwrap_model(self.model), tokenizer, self.eos_ids,
                                           max_sequences=c.batch_size // n_proc,
                                           max_model_len=self.sequence_limit(), workdir=tempfile.mkdtemp(prefix="lmpg-engine-"))
        self.prompt_order = PromptOrder(len(self.train_dataset), c.seed, shuffle=c.shuffle_dataset)
        # DAPO's dynamic sampling: more rounds of prompts until every group has reward spread
        self.dynamic_sampling = None if not c.dynamic_sampling else DynamicSampling(
            acc, prompts_per_iteration=c.prompts_per_iteration, prompts_per_minibatch=c.prompts_per_minibatch,
            round_prompts=c.resolved_round_prompts, group_size=c.group_size, gamma=c.gamma,
            max_extra_rounds=c.dynamic_sampling_max_extra_rounds, pad_id=tokenizer.pad_token_id)
        self.iteration = 0
        self.output_dir = Path(c.output_dir)
        self.guard = NonFiniteGuard(c.max_consecutive_skips, self.output_dir / "checkpoints")
        self.policy_update = PolicyUpdate(self.model, self.optimizer, self.scheduler, acc, c, local_mb,
                                          self.micro_batch_size, self.share_prompt_forward, self.guard, self.gather,
                                          chunk_size=self.logits_chunk_size)
        # TR-DPO's reference sync (lmpg.reference), after the optimizer steps it falls on
        self.ref_sync = ReferenceSync(self.ref_model, acc.unwrap_model(self.model), alpha=c.ref_model_mixup_alpha,
                                      every=c.ref_model_sync_steps) if c.sync_ref_model else None
        if self.ref_sync is not None:
            self.policy_update.step_observers.append(self.ref_sync)
        self.metrics_log = JsonlWriter(self.output_dir / "metrics.jsonl")
        self.timings_log = JsonlWriter(self.output_dir / "timings.jsonl")
        self.samples_log = JsonlWriter(self.output_dir / "samples.jsonl")
        self._run_dir_ready = False

    # ------------------------------------------------------------------ public API
    def train(self) -> list[dict]:
        """Run `config.iterations` iterations (continuing from a checkpoint if `resume` says so);
        returns the metrics of the iterations this call ran (as written to metrics.jsonl)."""
        c = self.config
        self.prepare_run_dir()
        bar = self._progress_bar()
        history = []
        try:
            while self.iteration < c.iterations:
                result = self.step()
                history.append(clean(result.metrics))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{result.metrics['reward_mean']:.3f}",
                                    kl=f"{result.metrics.get('kl', 0.0):.3g}",
                                    tok_s=f"{result.timings['tokens_per_s']:.0f}")
                elif self.accelerator.is_main_process and (self.iteration % c.log_every == 0 or self.iteration == c.iterations):
                    print(format_metrics_line({**result.metrics, **result.timings}), flush=True)
                if c.save_every and self.iteration % c.save_every == 0 and self.iteration < c.iterations:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if self.scorer is not None:
                self.scorer.close()
        self.save_checkpoint()
        self.save_model(self.output_dir / "final")
        if self.accelerator.is_main_process:
            run_dir.write_marker(self.output_dir, self.iteration, c.iterations, finished=True)
        for tracker in self.accelerator.trackers:  # not end_training(): it would tear down the process group
            tracker.finish()
        return history

    def save_model(self, path) -> None:
        """save_pretrained of the policy (only the adapter for a LoRA policy) and its tokenizer."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            unwrapped = acc.unwrap_model(self.model)
            with quiet_hf_progress():
                unwrapped.save_pretrained(str(path), state_dict=acc.get_state_dict(self.model), safe_serialization=True)
            self.tokenizer.save_pretrained(str(path))
        acc.wait_for_everyone()

    # ------------------------------------------------------------------ one iteration
    def step(self) -> StepResult:
        """One iteration: prompts, sample, score, logp_old / logp_ref, advantages, update, log."""
        c = self.config
        clock = [time.perf_counter()]

        def lap():
            clock.append(time.perf_counter())
            return clock[-1] - clock[-2]

        prompts = self.next_prompts()                                    # 1.
        batch = self.sample(prompts)                                     # 2.
        time_sample = lap()
        scores = self.score(batch, prompts)                              # 3.
        time_score = lap()
        sampling_stats = {}
        if self.dynamic_sampling is not None:  # 3b. only groups with reward spread (lmpg.dynamic_sampling)
            filled = self.dynamic_sampling(SampledGroups(prompts, batch, scores), next_prompts=self.next_prompts,
                                           sample=self.sample, score=self.score, iteration=self.iteration)
            prompts, batch, scores = filled.groups.prompts, filled.groups.batch, filled.groups.scores
            sampling_stats = filled.stats
            time_sample += filled.time_sample
            time_score += lap() - filled.time_sample  # the extra rounds' scoring and the choice
        self.fill_logp_old(batch)                                        # 4.
        self.fill_logp_ref(batch)
        if c.kl_coef > 0 and c.kl_in == "reward":
            batch.kl_penalised_rewards = kl_penalised_rewards(batch.token_rewards, batch.logp_old, batch.logp_ref,
                                                              batch.action_mask, c.kl_coef, c.kl_estimator)
        adv_stats = self.compute_advantages(batch)                       # 5.
        mismatch = self.correct_sampler_mismatch(batch)
        time_logp = lap()
        update_stats, entropy = self.update(batch)                       # 6.
        time_update = lap()
        self.sync_sampler()
        time_sync = lap()
        self.iteration += 1
        metrics = self.iteration_metrics(batch, prompts, scores, {**adv_stats, **mismatch}, update_stats, entropy)  # 7.
        metrics.update(sampling_stats)
        timings = self.iteration_timings(batch, time_sample, time_score, time_logp, time_update, time_sync)
        self.log(metrics, timings, batch, prompts, scores)
        return StepResult(metrics, timings, batch)

    def next_prompts(self, count: int | None = None, first_position: int = 0) -> Prompts:
        """The global batch of prompts in a seeded order; this process's share of every minibatch.
        count: dynamic sampling's extra round of `count` prompts instead, each process a contiguous
        block of them, at positions from first_position on (after the earlier rounds')."""
        c, acc = self.config, self.accelerator
        count, per_minibatch = (c.prompts_per_iteration, c.prompts_per_minibatch) if count is None else (count, count)
        positions = distributed.prompt_positions(count, per_minibatch, acc.num_processes, acc.process_index)
        indices = self.prompt_order.next_indices(count)
        rows = self.train_dataset[[indices[p] for p in positions]]  # dict of columns
        prompts = rows[c.prompt_column]
        rendered = [render_prompt(self.tokenizer, p, c.chat_template_kwargs) for p in prompts]
        return Prompts([first_position + p for p in positions], rows, prompts, [t for t, _ in rendered], rendered[0][1])

    def sample(self, prompts: Prompts) -> TrajectoryBatch:
        """G completions per prompt from pi_old, each from its own random stream."""
        c = self.config
        seeds = [row_seed(c.seed, self.iteration, p, j) for p in prompts.positions for j in range(c.group_size)]
        policy = self.accelerator.unwrap_model(self.model)
        if self.episodes is not None:
            rows = [{k: v[i] for k, v in prompts.rows.items()} for i in range(len(prompts.prompts))]
            return self.episodes.sample(policy, prompts.prompts, rows, prompts.positions, self.iteration, seeds,
                                        turn_sampler=self.turn_sampler or self.episodes.turn_sampler(policy))
        return sample_completions(policy, self.tokenizer, prompts.texts, c.group_size,
                                  max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                  top_k=c.top_k, min_p=c.min_p, repetition_penalty=c.repetition_penalty,
                                  max_prompt_length=c.max_prompt_length,
                                  add_special_tokens=prompts.add_special_tokens, eos_ids=self.eos_ids, seeds=seeds,
                                  sampler=c.sampler, policy_version=self.iteration,
                                  with_grad_sq_norm=c.baseline in WEIGHTED_BASELINES, turn_sampler=self.turn_sampler)

    def score(self, batch: TrajectoryBatch, prompts: Prompts):
        """Fills batch.token_rewards (weighted sum over the reward functions) and batch.scored;
        returns the RewardScores (per-function values, errors)."""
        c = self.config
        if self.episodes is not None:  # the environment's per-turn rewards plus the reward functions'
            batch.token_rewards, batch.scored, scores = score_episodes(self.scorer, batch, prompts.prompts, prompts.rows,
                                                                       c.prompt_column, self.iteration)
            return scores
        prompts_rep, completions, completion_ids = reward_inputs(batch, prompts.prompts)
        columns = {k: [v[i] for i in batch.prompt_index] for k, v in prompts.rows.items() if k != c.prompt_column}
        scores = self.scorer.score(prompts_rep, completions, completion_ids, step=self.iteration, columns=columns)
        token_rewards, scored = scores.to_token_rewards(batch.completion_mask.cpu())
        device = batch.completion_mask.device
        batch.token_rewards, batch.scored = token_rewards.to(device), scored.to(device)
        if c.reward_aggregation == "normalize_then_sum":  # GDPO: each function normalised in its group, then summed
            normalised, _ = scores.group_normalised(c.group_size, c.adv_eps).to_token_rewards(batch.completion_mask.cpu())
            batch.normalised_rewards = normalised.to(device)
        return scores

    def fill_logp_old(self, batch: TrajectoryBatch) -> None:
        """batch.logp_old on the rows the update does not fill itself (`lmpg.update`), from a no-grad
        forward (logp_old_source=forward, exact) or the sampler's own log-probs (sampler: no extra
        forward; equal up to float rounding of the incremental KV-cache pass)."""
        c = self.config
        B, T = batch.completion_ids.shape
        batch.logp_old = torch.zeros(B, T, device=batch.completion_ids.device)
        rows = logp_old_rows_before_update(B, self.local_minibatch_size, c)
        if len(rows) == 0:
            return
        if c.logp_old_source == "sampler" and batch.sampler_logp is not None:
            batch.logp_old[rows] = batch.sampler_logp[rows].to(batch.logp_old.dtype)
        else:
            batch.logp_old[rows] = batch_logprobs(self.model, batch, rows, self.micro_batch_size, c.temperature,
                                                  self.share_prompt_forward, chunk_size=self.logits_chunk_size)

    def fill_logp_ref(self, batch: TrajectoryBatch) -> None:
        """batch.logp_ref under pi_ref (the frozen copy, or the LoRA policy with its adapter off)."""
        c = self.config
        if c.kl_coef == 0:
            return
        rows = torch.arange(batch.batch_size)
        if self.ref_model is not None:
            batch.logp_ref = batch_logprobs(self.ref_model, batch, rows, self.micro_batch_size, c.temperature,
                                            self.share_prompt_forward, chunk_size=self.logits_chunk_size)
            return
        with self.accelerator.unwrap_model(self.model).disable_adapter():
            batch.logp_ref = batch_logprobs(self.model, batch, rows, self.micro_batch_size, c.temperature,
                                            self.share_prompt_forward, chunk_size=self.logits_chunk_size)

    def compute_advantages(self, batch: TrajectoryBatch) -> dict:
        """Fills batch.adv in the three steps of `lmpg.advantages`, the baseline and the std over the
        whole batch of all processes; returns their stats."""
        c, rank = self.config, self.accelerator.process_index
        if c.mask_truncated_completions:  # DAPO's overlong filtering: a cut sample's reward says little
            batch.excluded = policy_turn_endings(batch, self.eos_ids, c.max_turns)[0]
        ret = returns(batch.rewards_for_returns, batch.action_mask, reward_to_go=c.reward_to_go, gamma=c.gamma,
                      turn_ids=batch.turn_ids)  # (B, T)
        adv, stats = subtract_baseline(ret, batch.action_mask, group_size=c.group_size, kind=c.baseline,
                                       sample_mask=batch.sample_mask, grad_sq_norm=batch.grad_sq_norm,
                                       gather=self.gather, process_index=rank)  # (B, T)
        if c.adv_norm != "none":
            adv = normalise(adv, group_size=c.group_size, scope=c.adv_norm, sample_mask=batch.sample_mask,
                            eps=c.adv_eps, gather=self.gather, process_index=rank)
            stats.update(advantage_stats(adv, batch.loss_mask, batch.sample_mask))  # adv_* of what the loss sees
        batch.adv = adv
        return stats

    def correct_sampler_mismatch(self, batch: TrajectoryBatch) -> dict:
        """With samples from q != pi_old (an inference engine, or lmpg's sampler with truncation or a
        penalty, `lmpg.mismatch`): the mismatch figures over the whole batch, and batch.adv times the
        correction weight w(pi_old / q) of `sampler_correction`."""
        c = self.config
        if not c.measures_sampler_mismatch:
            return {}
        acc = self.accelerator
        logp_old, logp_q, mask = (distributed.gather_rows(acc, t.cpu()) for t in
                                  (batch.logp_old, batch.sampler_logp, batch.action_mask))
        stats = mismatch_stats(logp_old, logp_q, mask)
        c_min, c_max = c.sampler_correction_bounds
        weights, correction = correction_weights(batch.logp_old, batch.sampler_logp, batch.action_mask,
                                                 mode=c.resolved_sampler_correction, c_max=c_max, c_min=c_min)
        batch.adv = batch.adv * weights.to(batch.adv.dtype)
        if correction:
            _, correction = correction_weights(logp_old, logp_q, mask, mode=c.resolved_sampler_correction,
                                               c_max=c_max, c_min=c_min)  # the whole batch's fractions
        return {**stats, **correction}

    def sync_sampler(self) -> None:
        """Load the updated policy into the inference engine (nothing for lmpg's own samplers)."""
        if self.turn_sampler is not None:
            self.turn_sampler.sync_weights(self.accelerator.unwrap_model(self.model))

    def sequence_limit(self) -> int:
        """The longest sequence sampling can make, prompt included, at most the model's positions."""
        c = self.config
        after_prompt = self.episodes.limits.episode_tokens if self.episodes is not None else c.max_new_tokens
        positions = getattr(self.accelerator.unwrap_model(self.model).config, "max_position_embeddings", None)
        return min(c.max_prompt_length + after_prompt, positions or 2**31)

    def update(self, batch: TrajectoryBatch) -> tuple[dict, torch.Tensor]:
        """`lmpg.update.PolicyUpdate` on the batch: (stats, first-epoch entropy (B, T))."""
        if self.ref_sync is not None:  # the run's optimizer steps before this iteration's
            self.ref_sync.step = self.iteration * self.config.optimizer_steps_per_iteration
        return self.policy_update(batch, self.iteration)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor over processes in rank order (identity on one process)."""
        return distributed.gather(self.accelerator, t)

    # ------------------------------------------------------------------ logging
    def iteration_metrics(self, batch: TrajectoryBatch, prompts: Prompts, scores, adv_stats: dict,
                          update_stats: dict, entropy: torch.Tensor) -> dict:
        """The figures of one iteration, each over the whole batch of all processes."""
        acc, mask = self.accelerator, batch.completion_mask
        if acc.num_processes > 1:  # rows of every process, in one process's order
            rows = prompts.global_rows(self.config.group_size)
            logged = pool_metric_values(distributed.gather_objects(acc, [scores.metric_values]))  # log_metric's values
            scores = dataclasses.replace(
                scores, values=[distributed.in_global_order(acc, v, rows) for v in scores.values],
                error_counts={k: sum(d.get(k, 0) for d in distributed.gather_objects(acc, [scores.error_counts]))
                              for k in scores.error_counts},
                metrics=metric_means(logged), metric_values=logged)
            adv_stats = {**adv_stats, **advantage_stats(distributed.in_global_order(acc, batch.adv, rows),
                                                        distributed.in_global_order(acc, batch.loss_mask, rows),
                                                        distributed.in_global_order(acc, batch.sample_mask, rows))}
            entropy_mask = distributed.in_global_order(acc, batch.action_mask, rows)
            entropy = distributed.in_global_order(acc, entropy, rows)
        else:
            entropy_mask = batch.action_mask
        gather = self.gather
        seq_reward = gather(batch.token_rewards.sum(1).float().cpu())
        scored = gather(batch.scored.cpu())
        # the policy's own tokens: in an episode the environment's tokens are not the policy's length
        action_lengths = batch.action_mask.sum(1)
        lengths = gather(action_lengths.float().cpu())
        cut, out_of_turns = policy_turn_endings(batch, self.eos_ids, self.config.max_turns)
        cut = gather(cut.float().cpu())
        empty = gather((action_lengths == 1).float().cpu() * (~batch.truncated).float().cpu())
        m = {"iteration": self.iteration, **mean_std("reward", seq_reward[scored]),
             "unscored_frac": float((~scored).float().mean())}
        if batch.excluded is not None:  # mask_truncated_completions: the scored rows left out
            m["truncated_masked_frac"] = float(gather((batch.excluded & batch.scored).float().cpu()).mean())
        if batch.kl_penalised_rewards is not None:  # kl_in=reward: the task reward minus the KL penalty
            m.update(mean_std("kl_penalised_reward", gather(batch.kl_penalised_rewards.sum(1).float().cpu())[scored]))
        for name, value in scores.means().items():
            m[f"reward/{name}"] = value
        for name, count in scores.error_counts.items():
            m[f"reward_errors/{name}"] = count
        m.update({k: v for k, v in scores.metrics.items() if k not in m})  # log_metric from reward functions
        m.update(adv_stats)
        m.update({k: update_stats[k] for k in ("loss", "pg_loss", "kl", "ratio_min", "ratio_mean", "ratio_max",
                                               "clip_frac", "grad_norm", "optimizer_steps", "skipped_updates", "lr",
                                               "ess_frac", "grad_snr", "grad_noise_scale", "entropy_coef",
                                               "off_policy_masked_frac", "high_entropy_frac")
                  if k in update_stats})
        m["entropy"] = float(masked_mean(entropy.float(), entropy_mask))
        m.update({"completion_len_mean": float(lengths.mean()), "completion_len_max": float(lengths.max()),
                  "truncated_frac": float(cut.mean()), "eos_first_frac": float(empty.mean()),
                  "prompts_truncated": batch.prompts_truncated, "skipped_updates_total": self.guard.total})
        if batch.episodes is not None:
            m.update(episode_metrics(gather(episode_counts(batch.episodes))))
            episode_lengths = gather(mask.sum(1).float().cpu())  # the policy's and the environment's tokens
            m.update({"episode_len_mean": float(episode_lengths.mean()),
                      "episode_len_max": float(episode_lengths.max()),
                      "max_turns_frac": float(gather(out_of_turns.float().cpu()).mean())})
        return m

    def iteration_timings(self, batch: TrajectoryBatch, time_sample: float, time_score: float, time_logp: float,
                          time_update: float, time_sync: float) -> dict:
        timings = {"time_sample": time_sample, "time_score": time_score, "time_logp": time_logp,
                   "time_update": time_update, "time_sync": time_sync,
                   "time_total": time_sample + time_score + time_logp + time_update + time_sync}
        n_tokens = float(self.gather(torch.tensor([batch.num_tokens], dtype=torch.float32)).sum())
        timings["tokens_per_s"] = n_tokens / max(timings["time_total"], 1e-9)
        timings["sample_tokens_per_s"] = n_tokens / max(timings["time_sample"], 1e-9)
        if batch.episodes is not None:
            timings["time_env"] = sum(e.env_seconds for e in batch.episodes)  # part of time_sample
        return timings

    def log(self, metrics: dict, timings: dict, batch: TrajectoryBatch, prompts: Prompts, scores) -> None:
        c, acc = self.config, self.accelerator
        records = sample_records(batch, prompts.prompts, scores, self.iteration)
        records = distributed.in_global_order(acc, records, prompts.global_rows(c.group_size))
        if acc.is_main_process:
            self.metrics_log.write(metrics)
            self.timings_log.write({"iteration": self.iteration, **timings})
            for rec in logged_records(records, c.sample_groups_per_iteration, c.group_size):
                self.samples_log.write(rec)
            if c.sample_log_every and self.iteration % c.sample_log_every == 0 and c.num_samples_to_show:
                print_samples(records, self.iteration, c.num_samples_to_show)
            if acc.trackers:
                acc.log({k: v for k, v in {**metrics, **timings}.items() if isinstance(v, (int, float))},
                        step=self.iteration)
        snr = metrics.get("grad_snr")
        if snr is not None and snr < 1.0 and acc.is_main_process and self.iteration % max(c.log_every, 10) == 1:
            logger.warning("gradient SNR %.2f < 1 at iteration %d: the batch gradient is mostly noise; raise "
                           "batch_size (noise scale: %.1f micro-batches)", snr, self.iteration,
                           metrics.get("grad_noise_scale", float("nan")))

    def _progress_bar(self):
        c = self.config
        if not (c.progress_bar and sys.stderr.isatty() and not os.environ.get("CI") and self.accelerator.is_main_process):
            return None
        from tqdm.auto import tqdm
        return tqdm(total=c.iterations, initial=self.iteration, desc="lmpg", dynamic_ncols=True)

    # ------------------------------------------------------------------ run directory, checkpoints
    def prepare_run_dir(self) -> None:
        """Create the run directory, or resume / refuse (`lmpg.run_dir`): a run is never overwritten silently."""
        if self._run_dir_ready:
            return
        c, out, acc = self.config, self.output_dir, self.accelerator
        # every process makes the same read-only checks, then the main process writes
        resume_from = run_dir.resume_checkpoint(c, out)
        replace = run_dir.must_replace(c, out, resume_from)
        acc.wait_for_everyone()
        if acc.is_main_process:
            run_dir.create_run_dir(c, out, replace, self.config_notes)
        acc.wait_for_everyone()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        if c.report_to:
            tracker_config = {k: v for k, v in c.to_dict().items() if isinstance(v, (int, float, str, bool))}
            acc.init_trackers(out.name or "lmpg", config=tracker_config)
        if acc.is_main_process:
            run_dir.write_marker(out, self.iteration, c.iterations, finished=False)
        self._run_dir_ready = True

    def save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            state = {"iteration": self.iteration, "prompt_order": self.prompt_order.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": rng_state(), "consecutive_skips": self.guard.consecutive, "total_skips": self.guard.total,
                     "metrics_lines": self.iteration,  # metrics.jsonl holds one line per iteration
                     "entropy_coefficient": self.policy_update.entropy_coefficient.state_dict(),
                     "config": self.config.to_dict()}
            path = save_checkpoint(self.output_dir, self.iteration, self._save_weights, state, self.config.keep_last)
            self._write_plot()
        acc.wait_for_everyone()
        return path

    def _save_weights(self, path: Path) -> None:
        """The policy's weights in `path`; with sync_ref_model pi_ref's beside it (`REF_MODEL_DIR`): its
        mixed weights are the run's state, no longer a copy of the initial policy."""
        save_weights(self.accelerator.unwrap_model(self.model), path)
        if self.ref_sync is not None:
            save_weights(self.ref_model, path.parent / REF_MODEL_DIR)

    def _write_plot(self) -> None:
        """metrics.png in the run directory; a plotting failure is logged, never fatal to training."""
        from lmpg.plot import plot_run

        try:
            plot_run(self.output_dir)
        except Exception as e:  # noqa: BLE001 - a chart is not worth a lost run
            logger.warning("could not write %s: %s", self.output_dir / "metrics.png", e)

    def load_checkpoint(self, path) -> None:
        """Restore weights, optimizer, scheduler, RNG, data position and counters from a checkpoint."""
        path = Path(path)
        state = load_state(path)
        load_weights(self.accelerator.unwrap_model(self.model), path / "model")
        if self.ref_sync is not None:
            if not (path / REF_MODEL_DIR).is_dir():
                raise TrainingError(f"checkpoint {path} holds no reference model, but sync_ref_model=true; resume with "
                                    "the run's own setting (sync_ref_model=false)")
            load_weights(self.ref_model, path / REF_MODEL_DIR)
        elif (path / REF_MODEL_DIR).is_dir():
            raise TrainingError(f"checkpoint {path} holds a synced reference model, but sync_ref_model=false; resume "
                                "with the run's own setting (sync_ref_model=true)")
        self.sync_sampler()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.prompt_order.load_state_dict(state["prompt_order"])
        self.iteration = state["iteration"]
        self.guard.consecutive = state["consecutive_skips"]
        self.guard.total = state["total_skips"]
        if "entropy_coefficient" in state:  # checkpoints from before issue 22 have none
            self.policy_update.entropy_coefficient.load_state_dict(state["entropy_coefficient"])
        set_rng_state(state["rng"])
        if self.accelerator.is_main_process:
            run_dir.truncate_logs(self.output_dir, state.get("metrics_lines", state["iteration"]), state["iteration"])
        logger.info("resumed from %s at iteration %d", path, self.iteration)
