"""Variance diagnostics against numbers worked by hand."""

import math

import pytest
import torch

from lmpg.diagnostics import GradientMoments, effective_sample_size, gradient_snr


def test_effective_sample_size_by_hand():
    # w = [1, 1, 2, 0]: (sum w)^2 / sum w^2 = 16 / 6; n = 4
    ess, frac = effective_sample_size(torch.tensor([1.0, 1.0, 2.0, 0.0]))
    assert ess == pytest.approx(16 / 6) and frac == pytest.approx(16 / 24)
    ess, frac = effective_sample_size(torch.ones(5))
    assert ess == pytest.approx(5.0) and frac == pytest.approx(1.0)
    _, frac = effective_sample_size(torch.tensor([3.0, 9.0, 9.0]), torch.tensor([True, True, False]))
    assert frac == pytest.approx(144 / 90 / 2)


def test_gradient_snr_by_hand():
    # e1 = (1, 0), e2 = (3, 0): g_bar = (2, 0), |g_bar|^2 = 4
    # tr(Sigma) = ((1-2)^2 + (3-2)^2) / (2-1) = 2; snr = 4 / (2 / 2) = 4; noise scale = 2 / 4 = 0.5
    out = gradient_snr(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    assert out["grad_snr"] == pytest.approx(4.0) and out["grad_noise_scale"] == pytest.approx(0.5)
    # opposite estimates: zero mean, all noise
    out = gradient_snr(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    assert out["grad_snr"] == pytest.approx(0.0) and math.isinf(out["grad_noise_scale"])
    assert math.isnan(gradient_snr(torch.tensor([[1.0, 2.0]]))["grad_snr"])  # one estimate: no spread


def test_streaming_moments_match_the_reference():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(3, 2))
    q = torch.nn.Parameter(torch.zeros(4))
    moments = GradientMoments([p, q])
    estimates = []
    for k in range(4):  # gradient accumulation: each backward adds one micro-batch's gradient
        gp, gq = torch.randn(3, 2), torch.randn(4)
        moments.before_backward()
        p.grad = gp.clone() if p.grad is None else p.grad + gp
        q.grad = gq.clone() if q.grad is None else q.grad + gq
        moments.after_backward(scale=2.0)
        estimates.append(2.0 * torch.cat([gp.flatten(), gq]))
    ref = gradient_snr(torch.stack(estimates))
    got = moments.result()
    assert got["grad_snr"] == pytest.approx(ref["grad_snr"], rel=1e-6)  # fp32 running sums
    assert got["grad_noise_scale"] == pytest.approx(ref["grad_noise_scale"], rel=1e-6)


def test_trainer_logs_the_snr_and_ess_of_what_its_update_saw(tmp_path, tiny_model, tokenizer, prompts_dataset,
                                                             monkeypatch):
    """grad_snr / grad_noise_scale are the module docstring's formulas, worked here in float64, on the
    first epoch's micro-batch gradients (caught by hooks on the parameters, one set per backward), each
    times its minibatch's micro-batch count (2) to estimate the minibatch gradient; ess_frac is
    (sum w)^2 / (n sum w^2) over the counted tokens of the second epoch, w = exp(logp - logp_old)
    from the log-probs the update computed."""
    import lmpg.update
    from lmpg import PGTrainer
    from conftest import count_a, small_config

    config = small_config(tmp_path, iterations=1, epochs_per_batch=2, minibatch_size=4, micro_batch_size=2)
    trainer = PGTrainer(tiny_model, [count_a], prompts_dataset, config, tokenizer=tokenizer)
    params = trainer.policy_update.params
    grads = []  # per backward: each parameter's gradient from that backward alone
    backward = trainer.accelerator.backward

    def spy_backward(loss, **kwargs):
        grads.append([torch.zeros_like(p) for p in params])
        backward(loss, **kwargs)

    for i, p in enumerate(params):
        p.register_hook(lambda g, i=i: grads[-1][i].add_(g.detach()))
    monkeypatch.setattr(trainer.accelerator, "backward", spy_backward)
    forwards = []  # (rows, logp) of each micro-batch forward of the update, in order
    row_logprobs = lmpg.update.row_logprobs

    def spy_row_logprobs(model, batch, rows, *args, **kwargs):
        logp, entropy = row_logprobs(model, batch, rows, *args, **kwargs)
        forwards.append((rows, logp.detach().clone()))
        return logp, entropy

    monkeypatch.setattr(lmpg.update, "row_logprobs", spy_row_logprobs)
    trainer.prepare_run_dir()
    result = trainer.step()

    # 2 epochs x 2 minibatches x 2 micro-batches
    assert len(grads) == len(forwards) == 8
    J = 4  # the first epoch's estimates
    e = torch.stack([2.0 * torch.cat([g.flatten() for g in per]) for per in grads[:J]]).double()  # (J, D)
    g_bar = e.mean(0)
    trace_sigma = float(((e - g_bar) ** 2).sum()) / (J - 1)
    signal = float(g_bar @ g_bar)
    assert signal > 0 and trace_sigma > 0
    assert result.metrics["grad_snr"] == pytest.approx(signal / (trace_sigma / J), rel=1e-4)
    assert result.metrics["grad_noise_scale"] == pytest.approx(trace_sigma / signal, rel=1e-4)

    batch = result.batch
    w = torch.cat([torch.exp(logp - batch.logp_old[rows])[batch.loss_mask[rows]] for rows, logp in forwards[J:]]).double()
    assert not torch.allclose(w, torch.ones_like(w))  # the policy moved: the weights are not all 1
    assert result.metrics["ess_frac"] == pytest.approx(float(w.sum() ** 2 / (w @ w)) / w.numel(), rel=1e-6)


def test_trainer_logs_snr_and_ess_only_when_they_can_be_computed(tmp_path, tiny_model, tokenizer, prompts_dataset):
    from lmpg import PGTrainer
    from conftest import count_a, small_config

    metrics = PGTrainer(tiny_model, [count_a], prompts_dataset,
                        small_config(tmp_path, epochs_per_batch=2, minibatch_size=4), tokenizer=tokenizer).train()
    assert math.isfinite(metrics[0]["grad_snr"]) and 0 < metrics[0]["ess_frac"] <= 1
    one = PGTrainer(tiny_model, [count_a], prompts_dataset, small_config(tmp_path, output_dir=str(tmp_path / "one")),
                    tokenizer=tokenizer).train()
    assert "grad_snr" not in one[0] and "ess_frac" not in one[0]  # one micro-batch, one epoch: nothing to compare
