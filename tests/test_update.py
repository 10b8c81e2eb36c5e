"""lmpg/update.py: minibatch order, which rows the trainer fills with logp_old, the non-finite guard,
the surrogate loss with the KL term, and one PolicyUpdate call on a tiny model."""

import pytest
import torch

from lmpg import PGConfig
from lmpg.batch import TrajectoryBatch
from lmpg.errors import TrainingError
from lmpg.forward import batch_logprobs
from lmpg.optim import make_adamw, make_scheduler
from lmpg.rollout import sample_completions
from lmpg.update import NonFiniteGuard, PolicyUpdate, logp_old_rows_before_update, minibatch_order, surrogate_loss, \
    surrogate_loss_settings


def config(tmp_path=None, **overrides):
    base = dict(output_dir=str(tmp_path / "run") if tmp_path else "unused", batch_size=8, group_size=4,
                max_new_tokens=6, sample_log_every=0, progress_bar=False)
    base.update(overrides)
    return PGConfig(**base)


# ---------------------------------------------------------------------------------------------------
# minibatch_order


def test_first_epoch_runs_the_minibatches_in_sampling_order():
    for iteration in (0, 5):
        assert minibatch_order(6, 0, seed=3, iteration=iteration) == [0, 1, 2, 3, 4, 5]


def test_later_epochs_are_a_seeded_permutation_equal_on_every_call():
    orders = {(epoch, iteration): minibatch_order(8, epoch, seed=0, iteration=iteration)
              for epoch in (1, 2, 3) for iteration in (0, 1)}
    for (epoch, iteration), order in orders.items():
        assert sorted(order) == list(range(8))  # every minibatch once
        assert minibatch_order(8, epoch, seed=0, iteration=iteration) == order  # every process, every call
    assert len({tuple(o) for o in orders.values()}) > 1  # not one fixed order for all epochs and iterations
    assert any(minibatch_order(8, 1, seed=s, iteration=0) != orders[(1, 0)] for s in (1, 2, 3))  # seed matters


# ---------------------------------------------------------------------------------------------------
# logp_old_rows_before_update


def test_logp_old_rows_skip_the_first_minibatch_when_the_kl_is_in_the_loss():
    c = config(minibatch_size=4, epochs_per_batch=2, kl_coef=0.1, kl_in="loss")
    assert logp_old_rows_before_update(8, 4, c).tolist() == [4, 5, 6, 7]  # the update's first forward fills 0..3
    c = config(minibatch_size=4, epochs_per_batch=2, kl_coef=0.0, kl_in="reward")  # no KL: no penalty to compute
    assert logp_old_rows_before_update(8, 4, c).tolist() == [4, 5, 6, 7]


def test_logp_old_rows_are_all_rows_when_the_kl_is_in_the_reward():
    """kl_in=reward penalises the rewards with KL(pi_old || pi_ref) before the advantages, so every
    row's logp_old is needed before the update starts."""
    c = config(minibatch_size=4, epochs_per_batch=2, kl_coef=0.1, kl_in="reward")
    assert logp_old_rows_before_update(8, 4, c).tolist() == list(range(8))
    c = config(kl_coef=0.1, kl_in="reward")  # one minibatch: still all rows
    assert logp_old_rows_before_update(8, 8, c).tolist() == list(range(8))


def test_no_logp_old_rows_when_the_update_takes_one_minibatch():
    assert logp_old_rows_before_update(8, 8, config(kl_coef=0.1, kl_in="loss")).numel() == 0
    assert logp_old_rows_before_update(8, 8, config()).numel() == 0


# ---------------------------------------------------------------------------------------------------
# NonFiniteGuard


def test_guard_counts_skips_and_a_finite_step_resets_the_run(tmp_path):
    guard = NonFiniteGuard(max_consecutive=3, checkpoint_dir=tmp_path / "checkpoints")
    finite = torch.tensor([0.5, 0.5, 0.0])
    assert guard.allows(1.0, finite, iteration=0, epoch=0, minibatch=0)
    assert not guard.allows(float("nan"), finite, 0, 0, 1)  # a non-finite gradient
    assert not guard.allows(1.0, torch.tensor([float("inf"), 0.0, 0.0]), 0, 0, 2)  # a non-finite loss
    assert (guard.consecutive, guard.total) == (2, 2)
    assert guard.allows(2.0, finite, 1, 0, 0)
    assert (guard.consecutive, guard.total) == (0, 2)  # the run of skips ends; the total stays


def test_guard_raises_at_max_consecutive_naming_where_and_the_checkpoints(tmp_path):
    guard = NonFiniteGuard(max_consecutive=2, checkpoint_dir=tmp_path / "checkpoints")
    assert not guard.allows(float("inf"), torch.zeros(3), iteration=4, epoch=1, minibatch=0)
    with pytest.raises(TrainingError, match="2 consecutive updates") as err:
        guard.allows(float("nan"), torch.zeros(3), iteration=4, epoch=1, minibatch=3)
    message = str(err.value)
    assert "iteration 5, epoch 1, minibatch 3" in message and str(tmp_path / "checkpoints") in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------------
# surrogate_loss


def hand_batch(logp_ref):
    """One row of 3 tokens, the last one padding; logp_old = logp (ratio 1), advantage 1 everywhere."""
    logp_old = torch.tensor([[-1.0, -2.0, -0.5]])
    mask = torch.tensor([[True, True, False]])
    ids = torch.tensor([[5, 6, 0]])
    batch = TrajectoryBatch(prompt_ids=ids[:, :1], prompt_mask=mask[:, :1], completion_ids=ids, completion_mask=mask,
                            action_mask=mask, truncated=torch.tensor([False]), group=torch.tensor([0]),
                            policy_version=torch.tensor([0]), completions=["x"])
    batch.logp_old, batch.logp_ref, batch.adv = logp_old, logp_ref, torch.ones(1, 3)
    return batch, logp_old.clone().requires_grad_(), mask


@pytest.mark.parametrize("kl_in", ["loss", "reward"])
def test_surrogate_loss_adds_kl_coef_times_the_kl_only_with_kl_in_loss(kl_in):
    """ratio 1 and A = 1 on 2 counted tokens: pg_loss = -(1 + 1) / 2 = -1. k1 = logp - logp_ref =
    (0.5, 0, [0.5 on padding]); its token mean over the 2 counted tokens is 0.25. With kl_coef 0.1
    and kl_in=loss the loss is -1 + 0.1 * 0.25 = -0.975; with kl_in=reward the KL is only reported."""
    batch, logp, mask = hand_batch(logp_ref=torch.tensor([[-1.5, -2.0, -1.0]]))
    c = config(kl_coef=0.1, kl_in=kl_in, kl_estimator="k1")
    loss, stats = surrogate_loss(logp, batch.logp_old, batch.adv, mask, logp_ref=batch.logp_ref, num_tokens=2.0,
                                 num_sequences=1.0, **surrogate_loss_settings(c))
    assert stats["pg_loss"] == pytest.approx(-1.0)
    assert stats["kl"] == pytest.approx(0.25)
    assert float(loss.detach()) == pytest.approx(-0.975 if kl_in == "loss" else -1.0)
    # the KL term's gradient: d(0.1 * k1 token mean)/d logp_t = 0.1 / 2 on counted tokens
    (grad,) = torch.autograd.grad(loss, logp)
    kl_grad = torch.tensor([[0.05, 0.05, 0.0]]) if kl_in == "loss" else torch.zeros(1, 3)
    torch.testing.assert_close(grad, torch.tensor([[-0.5, -0.5, 0.0]]) + kl_grad)


def test_surrogate_loss_settings_are_the_numbers_of_the_config():
    c = config(kl_coef=0.1, kl_in="reward", kl_estimator="k2", loss_agg="constant", loss_constant=5,
               clip_eps_low=0.1, clip_eps_high=0.3)
    assert surrogate_loss_settings(c) == dict(ratio_level="token", clip_eps_low=0.1, clip_eps_high=0.3,
                                              loss_agg="constant", loss_constant=5.0, kl_coef=0.1,
                                              kl_estimator="k2", kl_in="reward", kl_ratio_weighted=False,
                                              pg_objective="ppo_clip", clip_delta=None, off_policy_mask_threshold=None,
                                              sequence_loss_weight="one", cispo_weight_max=5.0,
                                              sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
                                              vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0)
    c = config(pg_objective="sapo", sapo_temperature_neg=2.0, ratio_level="sequence_mean",
               sequence_loss_weight="length", loss_agg="sequence_sum")
    settings = surrogate_loss_settings(c)
    assert (settings["pg_objective"], settings["sapo_temperature_neg"], settings["sequence_loss_weight"]) == \
        ("sapo", 2.0, "length")
    c = config(ratio_level="sequence_mean", loss_agg="sequence_mean")  # loss_constant: max_new_tokens
    assert surrogate_loss_settings(c)["ratio_level"] == "sequence_mean"
    assert surrogate_loss_settings(c)["loss_constant"] == float(c.max_new_tokens) == 6.0


def test_surrogate_loss_without_kl_reports_zero_kl():
    batch, logp, mask = hand_batch(logp_ref=None)
    loss, stats = surrogate_loss(logp, batch.logp_old, batch.adv, mask, num_tokens=2.0, num_sequences=1.0)
    assert float(loss.detach()) == pytest.approx(-1.0) and stats["kl"] == 0.0


# ---------------------------------------------------------------------------------------------------
# PolicyUpdate


def test_one_update_on_a_tiny_model_starts_at_ratio_exactly_one(tmp_path, tiny_model, tokenizer):
    """One epoch, one minibatch of two micro-batches: the update reads logp_old off its own forward
    (theta == theta_old), so every ratio is exactly 1, nothing is clipped, the pg_loss is minus the
    token mean of the advantages, and the one optimizer step moves the weights."""
    from accelerate import Accelerator

    c = config(tmp_path, micro_batch_size=4, learning_rate=1e-2, grad_snr=False)
    acc = Accelerator(cpu=True)
    model, optimizer = acc.prepare(tiny_model, make_adamw([p for p in tiny_model.parameters()], c))
    before = [p.detach().clone() for p in model.parameters()]
    update = PolicyUpdate(model, optimizer, make_scheduler(optimizer, c), acc, c, minibatch_size=8,
                          micro_batch_size=4, share_prompt=True, guard=NonFiniteGuard(3, tmp_path), gather=lambda t: t)
    batch = sample_completions(model, tokenizer, ["1+1=", "22+3="], 4, max_new_tokens=6, seeds=list(range(8)))
    B, T = batch.completion_ids.shape
    batch.logp_old = torch.zeros(B, T)
    batch.adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -2.0, 1.0]).unsqueeze(1).expand(B, T).clone()
    with torch.no_grad():
        logp_theta_old = batch_logprobs(model, batch, torch.arange(B), 4, 1.0, True)

    stats, entropy = update(batch, iteration=0)

    assert stats["ratio_min"] == stats["ratio_max"] == stats["ratio_mean"] == 1.0
    assert stats["clip_frac"] == 0.0
    assert (stats["optimizer_steps"], stats["skipped_updates"]) == (1, 0)
    m = batch.loss_mask
    assert stats["pg_loss"] == pytest.approx(-float(batch.adv[m].sum() / m.sum()), abs=1e-6)
    torch.testing.assert_close(batch.logp_old[m], logp_theta_old[m], atol=1e-5, rtol=0)  # filled by the update
    assert entropy.shape == (B, T) and bool((entropy[m] > 0).all())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
