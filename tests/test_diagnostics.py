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


def test_trainer_logs_snr_and_ess_only_when_they_can_be_computed(tmp_path, tiny_model, tokenizer, prompts_dataset):
    from lmpg import PGTrainer
    from conftest import count_a, small_config

    metrics = PGTrainer(tiny_model, [count_a], prompts_dataset,
                        small_config(tmp_path, epochs_per_batch=2, minibatch_size=4), tokenizer=tokenizer).train()
    assert metrics[0]["grad_snr"] >= 0 and 0 < metrics[0]["ess_frac"] <= 1
    one = PGTrainer(tiny_model, [count_a], prompts_dataset, small_config(tmp_path, output_dir=str(tmp_path / "one")),
                    tokenizer=tokenizer).train()
    assert "grad_snr" not in one[0] and "ess_frac" not in one[0]  # one micro-batch, one epoch: nothing to compare
