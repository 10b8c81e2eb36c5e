"""lmpg's losses against TRL 1.16's own `GRPOTrainer._compute_loss`, installed and unchanged, on the
same tensors: value and gradient, for every TRL loss type at its token and sequence level and for the
loss-side options `config_from_trl` maps.

TRL's method runs unbound on a minimal trainer object: `_get_per_token_logps_and_entropies` returns
the given log-probs and entropies (the model's forward is not what is compared), the accelerator is
one process, one micro-batch per optimizer step. The lmpg side is the PGConfig that `config_from_trl`
makes of the same GRPOConfig, through `lmpg.update.surrogate_loss` with `surrogate_loss_settings`,
so the mapping is checked with the maths.

Shapes: B sequences, T completion tokens.
"""

from __future__ import annotations

import collections
import types
import warnings
from types import SimpleNamespace

import pytest
import torch
# trl is a test dependency (pyproject [test], TRL 1.16): missing, this module fails, never skips
import trl
from trl.trainer.grpo_trainer import GRPOTrainer

from lmpg.trl_compat import config_from_trl
from lmpg.update import surrogate_loss, surrogate_loss_settings

DT = torch.float64
B, T = 6, 7
TOL = dict(rtol=1e-6, atol=1e-9)  # float64; TRL builds SAPO's and VESPO's constants in float32


def grpo_config(tmp_path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.GRPOConfig(output_dir=str(tmp_path / "out"), bf16=False, report_to="none", max_steps=10,
                              num_generations=2, per_device_train_batch_size=B, max_completion_length=T + 2,
                              **kwargs)


def tensors(seed, spread=0.4):
    """logp (leaf), logp_old, logp_ref, entropy, adv (B,) of mixed signs and a completion mask of
    varied lengths with one empty row."""
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=DT) * 3).requires_grad_(True)
    logp_old = logp.detach() + spread * torch.randn(B, T, generator=g, dtype=DT)
    logp_ref = logp.detach() + 0.5 * torch.randn(B, T, generator=g, dtype=DT)
    entropy = 2 * torch.rand(B, T, generator=g, dtype=DT)
    adv = torch.randn(B, generator=g, dtype=DT)
    lengths = torch.tensor([7, 3, 5, 1, 6, 0])
    mask = torch.arange(T) < lengths.unsqueeze(1)
    return SimpleNamespace(logp=logp, logp_old=logp_old, logp_ref=logp_ref, entropy=entropy, adv=adv, mask=mask)


def trl_trainer(args):
    """The attributes of a GRPOTrainer that `_compute_loss` reads, as TRL's __init__ sets them from args."""
    accelerator = SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda t: t,
                                  reduce=lambda t, reduction: t, gather_for_metrics=lambda t: t,
                                  pad_across_processes=lambda t, dim, pad_index: t)
    trainer = SimpleNamespace(
        args=args, accelerator=accelerator, beta=args.beta, loss_type=args.loss_type,
        importance_sampling_level=args.importance_sampling_level, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
        top_entropy_quantile=args.top_entropy_quantile, off_policy_mask_threshold=args.off_policy_mask_threshold,
        entropy_coef=args.entropy_coef, use_adaptive_entropy=args.use_adaptive_entropy,
        _entropy_bonus_enabled=args.entropy_coef != 0.0 or args.use_adaptive_entropy,
        _last_world_entropy=float("inf"), _entropy_window_stats=None, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_completion_length=args.max_completion_length, aux_loss_enabled=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    trainer.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, trainer)
    trainer.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
    trainer.get_gamma_weights = GRPOTrainer.get_gamma_weights
    return trainer


def trl_loss(trainer, x, logp=None, logp_old=None):
    """TRL's `_compute_loss` on the tensors of `x`: (loss, d loss / d logp)."""
    logp = x.logp if logp is None else logp
    trainer._get_per_token_logps_and_entropies = lambda model, *a, **k: (logp, x.entropy, None)
    inputs = dict(prompt_ids=torch.zeros(B, 0, dtype=torch.long), prompt_mask=torch.zeros(B, 0, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=x.mask.long(),
                  advantages=x.adv, old_per_token_logps=x.logp_old if logp_old is None else logp_old,
                  ref_per_token_logps=x.logp_ref, num_items_in_batch=x.mask.sum().to(DT))
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad


def lmpg_loss(config, x, **extra):
    """lmpg's micro-batch loss under `config` on the same tensors: (loss, d loss / d logp, stats)."""
    loss, stats = surrogate_loss(x.logp, x.logp_old, x.adv.unsqueeze(1).expand(B, T), x.mask,
                                 logp_ref=x.logp_ref, **surrogate_loss_settings(config), **extra)
    (grad,) = torch.autograd.grad(loss, x.logp)
    return loss.detach(), grad, stats


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_trl_loss_type_equals_trls_code(tmp_path, loss_type, level):
    """Value and gradient of TRL's loss for each loss_type and importance_sampling_level, off-policy
    (ratios spread around 1, clipping active), beta 0; config_from_trl's PGConfig on the same tensors."""
    kw = dict(epsilon_high=1.2) if loss_type == "cispo" else dict(epsilon=0.2, epsilon_high=0.28)
    args = grpo_config(tmp_path, loss_type=loss_type, importance_sampling_level=level, beta=0.0, **kw)
    config = config_from_trl(args)
    for seed in range(3):
        x = tensors(seed)
        want, want_grad = trl_loss(trl_trainer(args), x)
        got, got_grad, stats = lmpg_loss(config, x)
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(got_grad, want_grad, **TOL)
        assert want_grad.abs().sum() > 0
    if loss_type in ("cispo", "grpo", "dapo"):  # the cap or the clip is active on some tokens, or sequences
        assert 0 < stats["clip_frac"] < 1


def test_the_sequence_level_maps_to_lmpgs_sequence_loss_weights(tmp_path):
    """TRL's grpo and sapo average the sequence losses over sequences; its other loss types sum each
    sequence's loss over its tokens (the length weighting TRL warns about); luspo is GSPO's ratio
    with sequence_sum. vespo's loss does not see the level (its weight is the trajectory ratio)."""
    def mapped(loss_type):
        c = config_from_trl(grpo_config(tmp_path, loss_type=loss_type, importance_sampling_level="sequence"))
        return c.pg_objective, c.ratio_level, c.sequence_loss_weight, c.loss_agg

    assert mapped("grpo") == ("ppo_clip", "sequence_mean", "one", "sequence_mean")
    assert mapped("sapo") == ("sapo", "sequence_mean", "one", "sequence_mean")
    assert mapped("dapo") == ("ppo_clip", "sequence_mean", "length", "token_mean")
    assert mapped("dr_grpo") == ("ppo_clip", "sequence_mean", "length", "constant")
    assert mapped("cispo") == ("cispo", "sequence_mean", "length", "token_mean")
    assert mapped("luspo") == ("ppo_clip", "sequence_mean", "length", "sequence_sum")
    assert mapped("vespo") == ("vespo", "token", "one", "token_mean")


@pytest.mark.parametrize("use_bias_correction_kl", [True, False])
@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "token"), ("grpo", "sequence"),
                                             ("dr_grpo", "sequence")])
def test_kl_with_and_without_trls_bias_correction_equals_trls_code(tmp_path, loss_type, level, use_bias_correction_kl):
    """beta 0.04, off-policy (the ratio away from 1, as in every epoch after the first): TRL's default
    multiplies k3 by pi_theta / pi_old (use_bias_correction_kl), which changes value and gradient;
    config_from_trl maps it to kl_ratio_weighted."""
    args = grpo_config(tmp_path, loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                       use_bias_correction_kl=use_bias_correction_kl)
    config = config_from_trl(args)
    assert config.kl_ratio_weighted is use_bias_correction_kl
    for seed in range(2):
        x = tensors(seed)
        want, want_grad = trl_loss(trl_trainer(args), x)
        got, got_grad, stats = lmpg_loss(config, x)
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(got_grad, want_grad, **TOL)
    other = config_from_trl(args, kl_ratio_weighted=not use_bias_correction_kl)
    other_loss, other_grad, _ = lmpg_loss(other, x)  # the correction is not a no-op here
    assert abs(float(other_loss - got)) > 1e-4 and float((other_grad - got_grad).abs().max()) > 1e-4


def test_the_bias_corrected_kl_changes_the_gradient_at_ratio_one(tmp_path):
    """theta == theta_old: the ratio's value is 1, so the loss is the same with and without the
    correction, but the ratio carries a gradient: d(r k3)/d logp = k3 + d k3 / d logp (TRL's docs)."""
    x = tensors(0)
    x.logp_old = x.logp.detach().clone()
    grads = {}
    for corrected in (True, False):
        args = grpo_config(tmp_path, loss_type="grpo", beta=0.04, use_bias_correction_kl=corrected)
        want, want_grad = trl_loss(trl_trainer(args), x)
        got, got_grad, _ = lmpg_loss(config_from_trl(args), x)
        torch.testing.assert_close(got_grad, want_grad, **TOL)
        torch.testing.assert_close(got, want, **TOL)
        grads[corrected] = (got, got_grad)
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=0, atol=1e-12)
    k3 = torch.exp(x.logp_ref - x.logp.detach()) - (x.logp_ref - x.logp.detach()) - 1
    lengths = x.mask.sum(1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(grads[True][1] - grads[False][1], torch.where(x.mask, 0.04 * k3 / lengths / B, 0.0),
                               rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# loss-side options
# ---------------------------------------------------------------------------------------------

def option_terms(config, x, entropy=None, coefficient=None):
    """The entropy keywords lmpg's update passes to surrogate_loss for this one-micro-batch minibatch
    on one process (`PolicyUpdate.entropy_terms`), and the off-policy mask's sampling log-probs."""
    from lmpg.update import EntropyCoefficient, PolicyUpdate

    gather = lambda t: t  # noqa: E731 - one process
    update = SimpleNamespace(config=config, gather=gather,
                             entropy_coefficient=coefficient or EntropyCoefficient(config, gather))
    terms = PolicyUpdate.entropy_terms(update, x.entropy if entropy is None else entropy, x.mask,
                                       float(x.mask.sum()), 1)
    if config.off_policy_mask_threshold is not None:
        terms["logp_sampler"] = x.logp_old  # TRL without vLLM: old_per_token_logps
    return terms


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("options", [
    dict(loss_type="dapo", delta=1.3),
    dict(loss_type="grpo", delta=1.3, epsilon_high=0.28),
    dict(loss_type="dapo", off_policy_mask_threshold=0.05),
    dict(loss_type="grpo", off_policy_mask_threshold=0.05, beta=0.04),
    dict(loss_type="dapo", top_entropy_quantile=0.4),
    dict(loss_type="grpo", top_entropy_quantile=0.2, beta=0.04),
    dict(loss_type="luspo", top_entropy_quantile=0.5, off_policy_mask_threshold=0.05, delta=1.5),
    dict(loss_type="sapo", top_entropy_quantile=0.5, off_policy_mask_threshold=0.05),
    dict(loss_type="cispo", epsilon_high=1.2, off_policy_mask_threshold=0.05, top_entropy_quantile=0.6),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_delta_off_policy_mask_and_top_entropy_quantile_equal_trls_code(tmp_path, options, level):
    """delta (two-sided clipping), off_policy_mask_threshold (DeepSeek-V3.2's sequence mask, against
    pi_old's log-probs as TRL takes them without vLLM) and top_entropy_quantile (the micro-batch's
    high-entropy tokens), alone and together, at both levels: TRL's value and gradient. The ratios
    spread widely, so each option acts on some tokens."""
    args = grpo_config(tmp_path, importance_sampling_level=level, **options)
    config = config_from_trl(args)
    acted = collections.Counter()
    for seed in range(3):
        x = tensors(seed, spread=0.8)
        want, want_grad = trl_loss(trl_trainer(args), x)
        got, got_grad, stats = lmpg_loss(config, x, **option_terms(config, x))
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(got_grad, want_grad, **TOL)
        acted["masked"] += stats.get("off_policy_masked_frac", 0) > 0
        acted["entropy"] += 0 < stats.get("high_entropy_frac", 0) < 1
        acted["clipped"] += stats["clip_frac"] > 0
    if config.off_policy_mask_threshold is not None:
        assert acted["masked"], "no sequence was masked: the case checks nothing"
    if config.top_entropy_quantile < 1:
        assert acted["entropy"] == 3
    if config.clip_delta is not None:
        assert acted["clipped"]


def test_delta_caps_negative_advantages_by_hand():
    """r = 2 past d = 1.5 with A = -1: PPO's min(r A, clip(r) A) = -2 keeps a gradient; with d the
    objective is min(1.5 A, 1.2 A) = -1.5 and the gradient is 0 (INTELLECT-2's two-sided clip)."""
    from lmpg.losses import policy_gradient_loss

    one = torch.ones(1, 1, dtype=torch.bool)
    for delta, value, slope in ((None, 2.0, 2.0), (1.5, 1.5, 0.0)):
        logp = torch.tensor([[torch.log(torch.tensor(2.0))]], dtype=DT, requires_grad=True)
        loss, stats = policy_gradient_loss(logp, torch.zeros(1, 1, dtype=DT), -torch.ones(1, 1, dtype=DT), one,
                                           clip_eps_low=0.2, clip_eps_high=0.2, clip_delta=delta,
                                           loss_agg="sequence_sum")
        (grad,) = torch.autograd.grad(loss, logp)
        assert (float(loss), float(grad), stats["clip_frac"]) == pytest.approx((value, slope, float(delta is not None)))


@pytest.mark.parametrize("options", [dict(loss_type="dapo", entropy_coef=0.05),
                                     dict(loss_type="grpo", entropy_coef=0.1, beta=0.04),
                                     dict(loss_type="dapo", entropy_coef=0.05, top_entropy_quantile=0.3)],
                         ids=["dapo", "grpo-kl", "dapo-top-entropy"])
def test_entropy_bonus_equals_trls_code(tmp_path, options):
    """L - c H_bar, H_bar the mean entropy over the tokens the policy term acts on, with the entropy's
    own gradient: TRL's value, and its gradient with respect to the log-probs and the entropies."""
    args = grpo_config(tmp_path, **options)
    config = config_from_trl(args)
    assert config.entropy_bonus_on
    for seed in range(2):
        x = tensors(seed, spread=0.8)
        grads = []
        for side in ("trl", "lmpg"):
            entropy = x.entropy.clone().requires_grad_(True)
            if side == "trl":
                trainer = trl_trainer(args)
                trainer._get_per_token_logps_and_entropies = lambda model, *a, **k: (x.logp, entropy, None)
                loss = trl_loss_keep_graph(trainer, x)
            else:
                loss, _ = surrogate_loss(x.logp, x.logp_old, x.adv.unsqueeze(1).expand(B, T), x.mask,
                                         logp_ref=x.logp_ref, **surrogate_loss_settings(config),
                                         **option_terms(config, x, entropy=entropy))
            grads.append((loss.detach(), *torch.autograd.grad(loss, (x.logp, entropy))))
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want, **TOL)
        assert grads[0][2].abs().sum() > 0  # the bonus reaches the entropies


def trl_loss_keep_graph(trainer, x):
    """TRL's `_compute_loss` on x (the trainer's forward stub already set), the loss with its graph."""
    inputs = dict(prompt_ids=torch.zeros(B, 0, dtype=torch.long), prompt_mask=torch.zeros(B, 0, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=x.mask.long(),
                  advantages=x.adv, old_per_token_logps=x.logp_old, ref_per_token_logps=x.logp_ref,
                  num_items_in_batch=x.mask.sum().to(DT))
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def test_adaptive_entropy_coefficient_follows_trls_rule_step_by_step(tmp_path):
    """use_adaptive_entropy over six optimizer steps whose entropies are below, then above, then below
    the target: the coefficient each step applies, the coefficient after it and the loss equal TRL's
    (its trainer object carried from step to step, as lmpg's EntropyCoefficient is)."""
    from lmpg.update import EntropyCoefficient

    args = grpo_config(tmp_path, loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.02, entropy_target=0.5,
                       entropy_coef_delta=0.01, entropy_coef_max=0.035, entropy_coef_min=0.005)
    config = config_from_trl(args)
    trainer, coefficient = trl_trainer(args), EntropyCoefficient(config, lambda t: t)
    coefs = []
    for step, scale in enumerate((0.3, 0.3, 0.3, 2.0, 2.0, 0.3)):  # mean entropy ~ scale / 2 ... 1
        x = tensors(step)
        x.entropy = x.entropy * scale
        want, want_grad = trl_loss(trainer, x)
        terms = option_terms(config, x, coefficient=coefficient)
        got, got_grad, stats = lmpg_loss(config, x, **terms)
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(got_grad, want_grad, **TOL)
        coefficient.micro_batch(0, None, None, None, None, x.mask, stats)
        coefficient.optimizer_step(True, 0.0, None)
        assert coefficient.coef == pytest.approx(trainer.entropy_coef, abs=1e-15)
        assert coefficient.last_entropy == pytest.approx(trainer._last_world_entropy, rel=1e-12)
        coefs += [terms["entropy_coef"], coefficient.coef]  # applied in the step, after it
    # off before any measurement; up to the cap while below target; down above it (and off); up again
    assert coefs == pytest.approx([0.0, 0.03, 0.03, 0.035, 0.035, 0.035, 0.035, 0.025, 0.0, 0.015, 0.0, 0.025])
