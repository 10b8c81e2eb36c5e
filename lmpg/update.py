"""The update: `epochs_per_batch` passes over a sampled batch in minibatches, one optimizer step each.

    for epoch in 1..epochs_per_batch:
        for each minibatch (sampling order in epoch 1, a seeded shuffle after):
            for each micro-batch:  loss = surrogate(logp, logp_old, adv) [+ kl_coef * KL] [- c * H];  backward
            clip the gradient; skip the step if the loss or gradient is not finite; optimizer step

Micro-batches accumulate gradients so that their sum is the whole minibatch's gradient: every loss
is divided by the whole minibatch's token / sequence counts over all processes (`lmpg.losses`), and
each process's loss is scaled by the number of processes because DDP averages gradients.

The rule for pi_old's log-probs (`first_minibatch_fills_logp_old`): the first minibatch of the first
epoch reads logp_old off its own forward, since theta == theta_old there (logp_old = logp.detach(),
the first ratio exactly 1); the trainer fills every other row before the update
(`logp_old_rows_before_update`).

Diagnostics are observers (`lmpg.diagnostics`) fed by the loop; `PolicyUpdate.__call__` returns their
figures with the mean loss terms and the step counts. The entropy bonus's coefficient is one too
(`EntropyCoefficient`), kept across iterations: with adaptive_entropy it moves after every step.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path

import torch

from lmpg.batch import TrajectoryBatch
from lmpg.choices import KlEstimator, KlIn, LossAgg, RatioLevel
from lmpg.config import PGConfig
from lmpg.diagnostics import EntropyRecorder, GradientSNR, ImportanceWeightESS, RatioTally, UpdateObserver
from lmpg.entropy import adaptive_entropy_coef, applied_entropy_coef, entropy_bonus, high_entropy_mask, \
    high_entropy_threshold
from lmpg.errors import TrainingError
from lmpg.forward import micro_batches, row_logprobs
from lmpg.kl import kl_estimate
from lmpg.losses import aggregate, importance_ratio, off_policy_sequence_mask, policy_gradient_loss
from lmpg.sampler import row_seed

logger = logging.getLogger("lmpg")


def first_minibatch_fills_logp_old(config: PGConfig) -> bool:
    """Whether the update reads the first minibatch's logp_old off its own first forward (theta ==
    theta_old there). Not with kl_in=reward: the KL penalty needs every row's logp_old before the
    advantages, so the trainer computes them all; nor with an inference engine's samples, whose
    mismatch weights pi_old / q (`lmpg.mismatch`) need every row's logp_old before the update."""
    return not (config.kl_coef > 0 and config.kl_in == "reward") and not config.measures_sampler_mismatch


def logp_old_rows_before_update(batch_size: int, minibatch_size: int, config: PGConfig) -> torch.Tensor:
    """The rows whose logp_old the trainer fills before the update (none when the update takes a
    single step: its own forward gives them all)."""
    start = minibatch_size if first_minibatch_fills_logp_old(config) else 0
    return torch.arange(min(start, batch_size), batch_size)


def minibatch_order(n_minibatches: int, epoch: int, seed: int, iteration: int) -> list[int]:
    """Epoch 0 in sampling order (pi_old's no-grad pass used the same micro-batches); later epochs in
    a seeded random order, the same on every process (membership stays: the batch is already a random
    draw, and rows cannot move between processes)."""
    if epoch == 0:
        return list(range(n_minibatches))
    generator = torch.Generator().manual_seed(row_seed(seed, iteration, -1, epoch))
    return torch.randperm(n_minibatches, generator=generator).tolist()


def surrogate_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, loss_mask: torch.Tensor, *,
                   logp_ref: torch.Tensor | None = None, ratio_level: RatioLevel = "token",
                   clip_eps_low: float | None = None, clip_eps_high: float | None = None,
                   loss_agg: LossAgg = "token_mean", loss_constant: float | None = None, kl_coef: float = 0.0,
                   kl_estimator: KlEstimator = "k3", kl_in: KlIn = "loss", kl_ratio_weighted: bool = False,
                   num_tokens: float | None = None, num_sequences: float | None = None,
                   logp_sampler: torch.Tensor | None = None, off_policy_mask_threshold: float | None = None,
                   entropy: torch.Tensor | None = None, entropy_threshold: float | None = None,
                   entropy_coef: float = 0.0, entropy_tokens: float | None = None,
                   **objective) -> tuple[torch.Tensor, dict]:
    """The loss of a micro-batch whose gradient is its share of the minibatch's policy gradient:

        L = L_pg(logp, logp_old, adv; keep)  +  kl_coef * agg_{i,t} [ w_{i,t} KL_{i,t}(pi_theta || pi_ref) ]
              - entropy_coef * H_bar

    L_pg is `lmpg.losses.policy_gradient_loss` (ratio_level, clip_eps_low / _high, loss_agg,
    loss_constant, and the `objective` keywords: pg_objective, sequence_loss_weight, clip_delta and the
    objective's numbers). keep (its policy_token_mask) is, where asked, the off-policy sequence mask
    (`lmpg.losses.off_policy_sequence_mask` with `off_policy_mask_threshold`, against `logp_sampler`,
    the log-probs of the policy that sampled: pi_old's, or an inference engine's) and the high-entropy
    tokens (`lmpg.entropy.high_entropy_mask`, H_t >= `entropy_threshold`).

    KL_{i,t} is `lmpg.kl.kl_estimate(logp, logp_ref, kl_estimator)`, aggregated over `loss_mask` as the
    policy loss is; w = 1, or with kl_ratio_weighted the importance ratio pi_theta / pi_old at
    `ratio_level` (with grad; a sequence level's ratio for every token of the sequence; lmpg.kl's
    docstring says what it estimates). The KL term joins the loss only with kl_in=loss (with
    kl_in=reward the penalty is already in the rewards).

    H_bar is `lmpg.entropy.entropy_bonus` of `entropy` (with its gradient) over the counted tokens
    (those of keep's high-entropy part when entropy_threshold is given), divided by `entropy_tokens`.
    num_tokens / num_sequences: the whole minibatch's totals (`lmpg.losses.aggregate`). Per-token inputs
    are (B, T); logp_ref is needed when kl_coef > 0.
    stats: those of policy_gradient_loss, kl (the KL term, also logged with kl_in=reward), and where
    asked off_policy_masked_frac, high_entropy_frac, entropy_sum / entropy_count (the bonus's tokens)."""
    loss_mask = loss_mask.bool()
    keep, stats = None, {}
    if off_policy_mask_threshold is not None:
        keep, masked = off_policy_sequence_mask(logp, logp_sampler, adv, loss_mask, threshold=off_policy_mask_threshold)
        stats.update(masked)
    bonus_mask = loss_mask
    if entropy_threshold is not None:
        bonus_mask, high = high_entropy_mask(entropy, loss_mask, threshold=entropy_threshold)
        keep = bonus_mask if keep is None else keep & bonus_mask
        stats.update(high)
    loss, pg_stats = policy_gradient_loss(
        logp, logp_old, adv, loss_mask, ratio_level=ratio_level, clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high, loss_agg=loss_agg, loss_constant=loss_constant,
        num_tokens=num_tokens, num_sequences=num_sequences, policy_token_mask=keep, **objective)
    stats = {**pg_stats, **stats, "kl": 0.0}
    if kl_coef > 0:
        kl_tok = kl_estimate(logp, logp_ref, kl_estimator)
        if kl_ratio_weighted:
            ratio = importance_ratio(logp, logp_old.detach(), loss_mask, ratio_level)
            kl_tok = kl_tok * (ratio if ratio.dim() == 2 else ratio.unsqueeze(1))
        kl_term = aggregate(kl_tok, loss_mask, loss_agg, loss_constant, num_tokens, num_sequences)
        stats["kl"] = float(kl_term.detach())
        if kl_in == "loss":
            loss = loss + kl_coef * kl_term
    if entropy is not None:
        mean_entropy, entropy_stats = entropy_bonus(entropy, bonus_mask, num_tokens=entropy_tokens)
        stats.update(entropy_stats)
        if entropy_coef != 0:
            loss = loss - entropy_coef * mean_entropy
    return loss, stats


def surrogate_loss_settings(config: PGConfig) -> dict:
    """The config's numbers that `surrogate_loss` takes, as its keyword arguments."""
    c = config
    return dict(ratio_level=c.ratio_level, clip_eps_low=c.clip_eps_low, clip_eps_high=c.clip_eps_high,
                loss_agg=c.loss_agg, loss_constant=c.resolved_loss_constant, kl_coef=c.kl_coef,
                kl_estimator=c.kl_estimator, kl_in=c.kl_in, kl_ratio_weighted=c.kl_ratio_weighted,
                pg_objective=c.pg_objective, clip_delta=c.clip_delta, off_policy_mask_threshold=c.off_policy_mask_threshold,
                sequence_loss_weight=c.sequence_loss_weight, cispo_weight_max=c.cispo_weight_max,
                sapo_temperature_pos=c.sapo_temperature_pos, sapo_temperature_neg=c.sapo_temperature_neg,
                vespo_k_pos=c.vespo_k_pos, vespo_lambda_pos=c.vespo_lambda_pos, vespo_k_neg=c.vespo_k_neg,
                vespo_lambda_neg=c.vespo_lambda_neg)


class NonFiniteGuard:
    """Skips an optimizer step whose loss or gradient is not finite; stops the run after
    `max_consecutive` skips in a row. Its counters are part of a checkpoint."""

    def __init__(self, max_consecutive: int, checkpoint_dir: Path):
        self.max_consecutive = max_consecutive
        self.checkpoint_dir = checkpoint_dir
        self.consecutive = 0
        self.total = 0

    def allows(self, grad_norm: float, losses: torch.Tensor, iteration: int, epoch: int, minibatch: int) -> bool:
        """True when the step may be taken; counts (and warns about) a skipped one."""
        if math.isfinite(grad_norm) and bool(torch.isfinite(losses).all()):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        where = f"iteration {iteration + 1}, epoch {epoch}, minibatch {minibatch}"
        logger.warning("non-finite loss or gradient at %s; update skipped", where.replace(",", ""))
        if self.consecutive >= self.max_consecutive:
            raise TrainingError(f"{self.consecutive} consecutive updates had a non-finite loss or gradient (last at "
                                f"{where}); the last good checkpoint is in {self.checkpoint_dir}; lower learning_rate "
                                "or check the rewards")
        return False


class StepMeans(UpdateObserver):
    """loss, pg_loss, kl (over all processes) and grad_norm averaged over the optimizer steps taken."""

    def __init__(self, with_kl: bool):
        self.with_kl = with_kl
        self.sums = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "grad_norm": 0.0}
        self.steps = self.skipped = 0

    def optimizer_step(self, taken, grad_norm, losses):
        if not taken:
            self.skipped += 1
            return
        self.steps += 1
        for key, value in zip(("loss", "pg_loss", "kl"), losses):
            self.sums[key] += float(value)
        self.sums["grad_norm"] += grad_norm

    def result(self, gather):
        out = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        if not self.with_kl:
            out.pop("kl")
        return {**out, "optimizer_steps": self.steps, "skipped_updates": self.skipped}


class MicroBatchMeans(UpdateObserver):
    """The mean over micro-batches (every process, every epoch) of the named figures the loss reports
    where its options ask for them: off_policy_masked_frac, high_entropy_frac."""

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys
        self.sums = torch.zeros(len(keys) + 1, dtype=torch.float64)

    def micro_batch(self, epoch, rows, logp, entropy, logp_old, loss_mask, stats):
        self.sums += torch.tensor([stats[k] for k in self.keys] + [1.0], dtype=torch.float64)

    def result(self, gather):
        sums = gather(self.sums).view(-1, len(self.keys) + 1).sum(0)
        return {k: float(sums[i] / sums[-1]) for i, k in enumerate(self.keys)} if sums[-1] else {}


class EntropyCoefficient(UpdateObserver):
    """The entropy bonus's coefficient c across iterations (`lmpg.entropy`): entropy_coef, or with
    adaptive_entropy updated after every optimizer step taken from that step's mean entropy over the
    bonus's tokens on every process (a skipped step leaves it). Its state is part of a checkpoint."""

    def __init__(self, config: PGConfig, gather):
        self.config, self.gather = config, gather
        self.coef = config.entropy_coef
        self.last_entropy = math.inf  # no measurement yet: the adaptive bonus starts off
        self.window = torch.zeros(2, dtype=torch.float64)  # entropy sum, token count of the current step

    @property
    def applied(self) -> float:
        """The coefficient the current optimizer step's micro-batches apply."""
        c = self.config
        if not c.adaptive_entropy:
            return self.coef
        return applied_entropy_coef(self.coef, self.last_entropy, target=c.entropy_target)

    def micro_batch(self, epoch, rows, logp, entropy, logp_old, loss_mask, stats):
        self.window += torch.tensor([stats["entropy_sum"], stats["entropy_count"]], dtype=torch.float64)

    def optimizer_step(self, taken, grad_norm, losses):
        c = self.config
        window, self.window = self.window, torch.zeros(2, dtype=torch.float64)
        if not c.adaptive_entropy:
            return
        total = self.gather(window).view(-1, 2).sum(0)
        mean = float(total[0] / max(float(total[1]), 1.0))
        if taken and math.isfinite(mean):
            self.coef = adaptive_entropy_coef(self.coef, mean, target=c.entropy_target, delta=c.entropy_coef_delta,
                                              coef_min=c.entropy_coef_min, coef_max=c.entropy_coef_max)
            self.last_entropy = mean

    def result(self, gather):
        return {"entropy_coef": self.coef}

    def state_dict(self) -> dict:
        return {"coef": self.coef, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: dict) -> None:
        self.coef, self.last_entropy = state["coef"], state["last_entropy"]


def gather_values(gather, values: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor whose length differs between processes, concatenated over processes in rank order
    (each padded with NaN to the longest for `gather`, the padding dropped after)."""
    width = int(gather(torch.tensor([values.numel()])).max())
    padded = torch.full((width,), float("nan"), dtype=values.dtype, device=values.device)
    padded[:values.numel()] = values
    gathered = gather(padded)
    return gathered[~torch.isnan(gathered)]


def clip_grad_norm(accelerator, params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The gradient's global norm (before clipping), clipped to max_norm when given."""
    if max_norm is not None:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().norm(2) for p in params if p.grad is not None]
    return float(torch.stack(grads).norm(2) if grads else torch.zeros(()))


class PolicyUpdate:
    """The update step of an iteration: `update(batch, iteration) -> stats`.

    batch: a TrajectoryBatch with logp_old (rows `logp_old_rows_before_update`), logp_ref (with
    KL) and adv filled; the loss counts `batch.loss_mask` (action tokens of scored rows), so a
    multi-turn episode's environment tokens never enter it. Rows are this process's share; every
    minibatch is the same number of rows on every process.
    """

    def __init__(self, model, optimizer, scheduler, accelerator, config: PGConfig, minibatch_size: int,
                 micro_batch_size: int, share_prompt: bool, guard: NonFiniteGuard, gather,
                 chunk_size: int | None = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accelerator, self.config = accelerator, config
        self.minibatch_size, self.micro_batch_size = minibatch_size, micro_batch_size
        self.share_prompt, self.guard, self.gather = share_prompt, guard, gather
        # tokens per output-layer chunk of the log-probs (0: full logits); the trainer resolves it
        self.chunk_size = config.logits_chunk_size if chunk_size is None else chunk_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loss_settings = surrogate_loss_settings(config)
        self.entropy_coefficient = EntropyCoefficient(config, gather)  # lives across iterations
        self.step_observers: list[UpdateObserver] = []  # the trainer's own (lmpg.reference.ReferenceSync)

    def observers(self, batch: TrajectoryBatch) -> list[UpdateObserver]:
        c = self.config
        n_minibatches = batch.batch_size // self.minibatch_size
        observers = [StepMeans(c.kl_coef > 0), RatioTally(), ImportanceWeightESS(c.epochs_per_batch),
                     EntropyRecorder(batch.completion_ids.shape, batch.completion_ids.device)]
        # the SNR needs >= 2 gradient estimates in the first epoch; with fewer it would only cost time
        first_epoch_micro = n_minibatches * -(-self.minibatch_size // self.micro_batch_size)
        if c.grad_snr_on(self.accelerator.num_processes) and first_epoch_micro >= 2:
            observers.append(GradientSNR(self.params))
        if c.entropy_bonus_on:
            observers.append(self.entropy_coefficient)
        masked = (("off_policy_masked_frac",) if c.off_policy_mask_threshold is not None else ()) + \
            (("high_entropy_frac",) if c.top_entropy_quantile < 1 else ())
        if masked:
            observers.append(MicroBatchMeans(masked))
        return observers + self.step_observers

    def entropy_terms(self, entropy: torch.Tensor | None, loss_mask: torch.Tensor, num_tokens: float,
                      micro_batches: int) -> dict:
        """surrogate_loss's entropy keywords for one micro-batch: the bonus's coefficient and
        normaliser (the minibatch's counted tokens), and with top_entropy_quantile the threshold over
        this micro-batch's counted tokens on every process, whose kept count (times the micro-batches)
        is then the normaliser (lmpg.entropy's docstring)."""
        c = self.config
        if not (c.top_entropy_quantile < 1 or c.entropy_bonus_on):
            return {}
        terms = {"entropy": entropy, "entropy_coef": self.entropy_coefficient.applied, "entropy_tokens": num_tokens}
        if c.top_entropy_quantile < 1:
            counted = gather_values(self.gather, entropy.detach()[loss_mask].float().cpu())
            threshold, kept = high_entropy_threshold(counted, c.top_entropy_quantile)
            terms.update(entropy_threshold=threshold, entropy_tokens=float(kept * micro_batches))
        return terms

    def __call__(self, batch: TrajectoryBatch, iteration: int) -> tuple[dict, torch.Tensor]:
        """Returns (stats, entropy (B, T) of the first epoch's forwards)."""
        c, acc, model = self.config, self.accelerator, self.model
        observers = self.observers(batch)
        loss_mask = batch.loss_mask
        fill_logp_old = first_minibatch_fills_logp_old(c)
        every_entropy = c.top_entropy_quantile < 1 or c.entropy_bonus_on  # else the first epoch's, for the metric
        # the off-policy mask compares pi_theta with the policy that sampled: an engine's q, or pi_old
        sampling_logp = batch.sampler_logp if c.measures_sampler_mismatch else batch.logp_old
        model.train()
        for epoch in range(c.epochs_per_batch):
            for mb in minibatch_order(batch.batch_size // self.minibatch_size, epoch, c.seed, iteration):
                rows = torch.arange(mb * self.minibatch_size, (mb + 1) * self.minibatch_size)
                counts = torch.tensor([float(loss_mask[rows].sum()), float(len(rows))])
                num_tokens, num_sequences = (float(v) for v in self.gather(counts).view(-1, 2).sum(0))
                micro = micro_batches(rows, self.micro_batch_size)
                mb_losses = [0.0, 0.0, 0.0]  # loss, pg_loss, kl of this process's share
                for k, idx in enumerate(micro):
                    logp, ent = row_logprobs(model, batch, idx, c.temperature, epoch == 0 or every_entropy,
                                             self.share_prompt, self.chunk_size, entropy_grad=c.entropy_bonus_on)
                    if epoch == 0 and mb == 0 and fill_logp_old:
                        batch.logp_old[idx] = logp.detach()  # theta == theta_old: ratio exactly 1
                    micro_loss_mask = loss_mask[idx]
                    logp_ref = None if batch.logp_ref is None else batch.logp_ref[idx]
                    logp_sampler = None if c.off_policy_mask_threshold is None else sampling_logp[idx]
                    loss, stats = surrogate_loss(logp, batch.logp_old[idx], batch.adv[idx], micro_loss_mask,
                                                 logp_ref=logp_ref, num_tokens=num_tokens,
                                                 num_sequences=num_sequences, logp_sampler=logp_sampler,
                                                 **self.entropy_terms(ent, micro_loss_mask, num_tokens, len(micro)),
                                                 **self.loss_settings)
                    for i, v in enumerate((float(loss.detach()), stats["pg_loss"], stats["kl"])):
                        mb_losses[i] += v
                    ent = None if ent is None else ent.detach()
                    for o in observers:
                        o.micro_batch(epoch, idx, logp, ent, batch.logp_old[idx], micro_loss_mask, stats)
                        o.before_backward(epoch)
                    # DDP averages gradients over processes; each process holds a share of the global sum
                    with acc.no_sync(model) if k < len(micro) - 1 else nullcontext():
                        acc.backward(loss * acc.num_processes)
                    for o in observers:
                        o.after_backward(epoch, len(micro))
                grad_norm = clip_grad_norm(acc, self.params, c.max_grad_norm)
                losses = self.gather(torch.tensor(mb_losses)).view(-1, 3).sum(0)
                taken = self.guard.allows(grad_norm, losses, iteration, epoch, mb)
                if taken:
                    self.optimizer.step()
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                for o in observers:
                    o.optimizer_step(taken, grad_norm, losses)
        stats = {"lr": self.scheduler.get_last_lr()[0]}
        for o in observers:
            stats.update(o.result(self.gather))
        entropy = next(o.entropy for o in observers if isinstance(o, EntropyRecorder))
        return stats, entropy
