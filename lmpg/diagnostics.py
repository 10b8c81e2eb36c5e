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


def importance_weight_sums(weights: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(sum_i w_i, sum_i w_i^2, n) over the entries where `mask` is True (all when None), float64 (3,):
    what ESS needs, additive over micro-batches and processes."""
    w = weights.detach()
    if mask is not None:
        w = w[mask.bool()]
    w = w.double()
    return torch.stack([w.sum(), (w * w).sum(), w.new_tensor(float(w.numel()))]).cpu()  # w may be on a GPU


def ess_from_sums(sums: torch.Tensor) -> tuple[float, float]:
    """(ESS, ess_frac) from `importance_weight_sums`: ESS = (sum w)^2 / sum w^2, ess_frac = ESS / n."""
    if float(sums[2]) == 0:
        return float("nan"), float("nan")
    ess = float(sums[0] ** 2 / sums[1])
    return ess, ess / float(sums[2])


def effective_sample_size(weights: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
    """(ESS, ess_frac) of importance weights over the counted entries (see module docstring)."""
    return ess_from_sums(importance_weight_sums(weights, mask))


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


# ---------------------------------------------------------------------------- observers of the update
# The update loop (lmpg.update) feeds each observer what it sees: every micro-batch's forward and loss
# statistics, each backward, each optimizer step (taken or skipped). An observer keeps its own tallies
# over this process's rows; `result(gather)` combines them over processes into logged figures.


class UpdateObserver:
    """No-op hooks; an observer overrides the ones it needs."""

    def micro_batch(self, epoch: int, rows: torch.Tensor, logp: torch.Tensor, entropy: torch.Tensor | None,
                    logp_old: torch.Tensor, loss_mask: torch.Tensor, stats: dict) -> None:
        pass

    def before_backward(self, epoch: int) -> None:
        pass

    def after_backward(self, epoch: int, micro_batches: int) -> None:
        pass

    def optimizer_step(self, taken: bool, grad_norm: float, losses: torch.Tensor) -> None:
        pass

    def result(self, gather) -> dict:
        return {}


class RatioTally(UpdateObserver):
    """ratio_mean, clip_frac (token-weighted over the counted tokens), ratio_min, ratio_max of the
    optimizer steps taken (a skipped step's micro-batches are dropped)."""

    def __init__(self):
        self.pending = []  # (stats, counted tokens) of the current minibatch
        self.ratio_sum = self.clip_sum = self.counted = 0.0
        self.ratio_min, self.ratio_max, self.steps = math.inf, -math.inf, 0

    def micro_batch(self, epoch, rows, logp, entropy, logp_old, loss_mask, stats):
        self.pending.append((stats, float(loss_mask.sum())))

    def optimizer_step(self, taken, grad_norm, losses):
        pending, self.pending = self.pending, []
        if not taken:
            return
        self.steps += 1
        self.ratio_sum += sum(s["ratio_mean"] * n for s, n in pending)
        self.clip_sum += sum(s["clip_frac"] * n for s, n in pending)
        self.counted += sum(n for _, n in pending)
        self.ratio_min = min([self.ratio_min] + [s["ratio_min"] for s, _ in pending])
        self.ratio_max = max([self.ratio_max] + [s["ratio_max"] for s, _ in pending])

    def result(self, gather):
        tallies = gather(torch.tensor([self.ratio_sum, self.clip_sum, self.counted, -self.ratio_min,
                                       self.ratio_max], dtype=torch.float64)).view(-1, 5)
        ratio_sum, clip_sum, counted = (float(v) for v in tallies[:, :3].sum(0))
        ratio_min, ratio_max = -float(tallies[:, 3].max()), float(tallies[:, 4].max())
        return {"ratio_mean": ratio_sum / counted if counted else float("nan"),
                "clip_frac": clip_sum / counted if counted else float("nan"),
                "ratio_min": ratio_min if self.steps else float("nan"),
                "ratio_max": ratio_max if self.steps else float("nan")}


class ImportanceWeightESS(UpdateObserver):
    """ess_frac of w = pi_theta / pi_old over the counted tokens of the epochs after the first
    (`importance_weight_sums` / `ess_from_sums`, the parts of `effective_sample_size`)."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.sums = torch.zeros(3, dtype=torch.float64)

    def micro_batch(self, epoch, rows, logp, entropy, logp_old, loss_mask, stats):
        if epoch > 0:
            self.sums += importance_weight_sums(torch.exp(logp.detach() - logp_old), loss_mask)

    def result(self, gather):
        sums = gather(self.sums).view(-1, 3).sum(0)
        if self.epochs > 1 and sums[2] > 0:
            return {"ess_frac": ess_from_sums(sums)[1]}
        return {}


class EntropyRecorder(UpdateObserver):
    """The policy's per-token entropy at the first epoch's forwards (theta == theta_old), (B, T)."""

    def __init__(self, shape, device):
        self.entropy = torch.zeros(shape, device=device)

    def micro_batch(self, epoch, rows, logp, entropy, logp_old, loss_mask, stats):
        if epoch == 0:
            self.entropy[rows] = entropy


class GradientSNR(UpdateObserver):
    """grad_snr and grad_noise_scale from the first epoch's micro-batch gradients (`GradientMoments`),
    each scaled to estimate its minibatch's gradient."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.moments = GradientMoments(params)

    def before_backward(self, epoch):
        if epoch == 0:
            self.moments.before_backward()

    def after_backward(self, epoch, micro_batches):
        if epoch == 0:
            self.moments.after_backward(scale=float(micro_batches))

    def result(self, gather):
        return self.moments.result()
