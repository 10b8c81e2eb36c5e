"""The reference policy pi_ref of the KL term, moved towards the policy during training (TR-DPO).

By default pi_ref is the initial policy for the whole run. With `sync_ref_model` it follows the policy
by a soft update every `ref_model_sync_steps` optimizer steps (Gorbatovski et al. 2024, "Learn Your
Reference Model for Real Good Alignment", arXiv 2404.09656, section 3; TRL's SyncRefModelCallback):

    theta_ref <- alpha * theta + (1 - alpha) * theta_ref       after optimizer step s, when s % tau == 0,

alpha = `ref_model_mixup_alpha`, tau = `ref_model_sync_steps`, s = 1, 2, ... counting every optimizer
step of the run (TRL's `state.global_step`, checked in `on_step_end`). The KL term then keeps each
update near a recent policy instead of the initial one. pi_ref's log-probs are computed once per
iteration before the update (`PGTrainer.fill_logp_ref`), so a sync inside an iteration shows in the
next iteration's KL, as TRL's reference log-probs, computed when a batch is generated, do.

The mixed weights are the run's state (no longer a copy of anything): the trainer saves them in
every checkpoint and loads them on resume.
"""

from __future__ import annotations

import torch

from lmpg.diagnostics import UpdateObserver
from lmpg.errors import TrainingError


@torch.no_grad()
def mix_into_reference(ref_model: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """theta_ref <- alpha * theta + (1 - alpha) * theta_ref, in place, parameter by parameter (the
    module docstring's soft update). Both models must have the same parameters, whole (not FSDP /
    DeepSpeed ZeRO-3 shards)."""
    ref_params, params = dict(ref_model.named_parameters()), dict(policy.named_parameters())
    if ref_params.keys() != params.keys():
        raise TrainingError("sync_ref_model: the reference model's parameters are not the policy's; "
                            "build pi_ref as a copy of the policy")
    for name, p in params.items():
        ref = ref_params[name]
        if ref.shape != p.shape:
            raise TrainingError(f"sync_ref_model needs whole parameters, but {name} is {tuple(p.shape)} in the policy "
                                f"and {tuple(ref.shape)} in pi_ref (sharded by FSDP / DeepSpeed?); set sync_ref_model=false")
        ref.mul_(1.0 - alpha).add_(p.to(ref.dtype), alpha=alpha)


class ReferenceSync(UpdateObserver):
    """Applies `mix_into_reference` after every `every`-th optimizer step of the run (`lmpg.update`
    calls `optimizer_step` after each). `step` is the run's optimizer steps so far; the trainer sets it
    at the start of each iteration (iteration * optimizer steps per iteration), so the rule needs no
    state of its own beyond the reference weights. A step skipped for a non-finite gradient still
    counts, as TRL's global step does."""

    def __init__(self, ref_model: torch.nn.Module, policy: torch.nn.Module, *, alpha: float, every: int):
        self.ref_model, self.policy, self.alpha, self.every = ref_model, policy, alpha, every
        self.step = 0

    def optimizer_step(self, taken: bool, grad_norm: float, losses: torch.Tensor) -> None:
        self.step += 1
        if self.step % self.every == 0:
            mix_into_reference(self.ref_model, self.policy, self.alpha)
