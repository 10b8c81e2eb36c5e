"""Is the gradient estimate any good? Variance diagnostics logged every iteration.

1. Zero-advantage fraction (lmpg.advantages, `adv_zero_frac`): samples that carry no signal, e.g.
   every sample of a prompt got the same reward. Compute spent on them is wasted.

2. Effective sample size of the importance weights w_i = pi_theta / pi_old in epochs after the first
   (Kong 1992; Owen, "Monte Carlo theory, methods and examples", ch. 9 eq. 9.13):

       ESS = (sum_i w_i)^2 / sum_i w_i^2,      ess_frac = ESS / n  in (0, 1]

   ess_frac near 1: the reused batch still looks like a fresh sample of pi_theta; near 0: a few
   samples dominate and reuse has gone too far (lower epochs_per_batch or the learning rate).

3. Gradient signal-to-noise ratio from J gradient estimates e_1..e_J (one per micro-batch of the
   first epoch, each scaled to estimate the minibatch gradient):

       g_bar = (1/J) sum_j e_j
       tr(Sigma) = 1/(J-1) sum_j ||e_j - g_bar||^2            (noise of one estimate)
       grad_snr  = ||g_bar||^2 / (tr(Sigma) / J)              (signal over noise of their mean)
       grad_noise_scale = tr(Sigma) / ||g_bar||^2             (McCandlish et al. 2018, arXiv 1812.06162
                                                               eq. 2.9, "B_simple", in micro-batches)

   grad_snr < 1 means the batch gradient is mostly noise: raise batch_size (or group_size) until
   the batch holds more than grad_noise_scale micro-batches.
"""

from __future__ import annotations

import math

import torch


def effective_sample_size(weights: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
    """(ESS, ess_frac) of importance weights over the counted entries (see module docstring)."""
    w = weights.detach().double()
    if mask is not None:
        w = w[mask.bool()]
    n = w.numel()
    if n == 0:
        return float("nan"), float("nan")
    ess = float(w.sum() ** 2 / (w * w).sum())
    return ess, ess / n


def gradient_snr_from_moments(sum_estimates: list[torch.Tensor], sum_sq_norms: float, count: int) -> dict:
    """grad_snr and grad_noise_scale from streaming moments of J = count estimates:
    sum_estimates = sum_j e_j (as a list of tensors, one per parameter), sum_sq_norms = sum_j ||e_j||^2.

    Uses sum_j ||e_j - g_bar||^2 = sum_j ||e_j||^2 - J ||g_bar||^2.
    """
    if count < 2:
        return {"grad_snr": float("nan"), "grad_noise_scale": float("nan")}
    mean_sq = sum(float((s.double() / count).pow(2).sum()) for s in sum_estimates)  # ||g_bar||^2
    deviation = max(sum_sq_norms - count * mean_sq, 0.0)
    trace_sigma = deviation / (count - 1)
    if trace_sigma == 0.0:
        return {"grad_snr": math.inf if mean_sq > 0 else float("nan"), "grad_noise_scale": 0.0}
    return {"grad_snr": mean_sq / (trace_sigma / count),
            "grad_noise_scale": trace_sigma / mean_sq if mean_sq > 0 else math.inf}


def gradient_snr(estimates: torch.Tensor) -> dict:
    """Reference form on a (J, D) matrix of flattened estimates (equations in the module docstring)."""
    J = estimates.shape[0]
    e = estimates.double()
    return gradient_snr_from_moments([e.sum(0)], float((e * e).sum()), J)


class GradientMoments:
    """Streams sum_j e_j and sum_j ||e_j||^2 over micro-batch gradients, costing two copies of the
    trainable parameters' gradients (one running sum, one snapshot to take differences)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.sum = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.sum_sq = 0.0
        self.count = 0
        self._before = None

    def before_backward(self) -> None:
        """Snapshot the gradient accumulated so far (None for parameters without one yet)."""
        self._before = [None if p.grad is None else p.grad.detach().float().clone() for p in self.params]

    def after_backward(self, scale: float) -> None:
        """Record e = scale * (grad now - grad before) as one estimate."""
        sq = 0.0
        for s, p, before in zip(self.sum, self.params, self._before):
            if p.grad is None:
                continue
            e = p.grad.detach().float() if before is None else p.grad.detach().float() - before
            e = e * scale
            s += e
            sq += float(torch.dot(e.flatten(), e.flatten()))
        self.sum_sq += sq
        self.count += 1
        self._before = None

    def result(self) -> dict:
        return gradient_snr_from_moments(self.sum, self.sum_sq, self.count)
