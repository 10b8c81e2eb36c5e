"""sync_ref_model (TR-DPO, lmpg.reference): the soft update and its step rule equal TRL 1.16's
SyncRefModelCallback on the same models, the trainer applies it after the optimizer steps it falls on,
and a resumed run keeps the mixed reference weights."""

import copy
import dataclasses
import types

import pytest
import torch

from lmpg import PGConfig, PGTrainer
from lmpg.errors import ConfigError, TrainingError
from lmpg.reference import mix_into_reference

from conftest import count_a, small_config


def _perturbed(model, seed):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return other


def test_the_soft_update_and_the_step_rule_are_trls(tiny_model):
    """TRL's SyncRefModelCallback (installed, unchanged) on_step_end: at global steps that are multiples
    of ref_model_sync_steps, ref <- alpha * policy + (1 - alpha) * ref; lmpg's mix on a copy of the same
    models gives the same weights, and its ReferenceSync syncs at the same steps."""
    from accelerate import Accelerator
    from trl.trainer.callbacks import SyncRefModelCallback

    from lmpg.reference import ReferenceSync

    Accelerator(cpu=True)  # TRL's callback reads the accelerate state (for DeepSpeed), as a trainer sets it up

    alpha, every = 0.3, 3
    trl_ref, lmpg_ref = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    callback = SyncRefModelCallback(ref_model=trl_ref, accelerator=None)
    sync = ReferenceSync(lmpg_ref, None, alpha=alpha, every=every)
    args = types.SimpleNamespace(ref_model_sync_steps=every, ref_model_mixup_alpha=alpha)
    for step in range(1, 8):
        policy = _perturbed(tiny_model, step)  # the policy after optimizer step `step`
        callback.on_step_end(args, types.SimpleNamespace(global_step=step), None, model=policy)
        sync.policy = policy
        sync.optimizer_step(True, 0.0, torch.zeros(3))
        for (name, a), b in zip(trl_ref.named_parameters(), lmpg_ref.parameters()):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"step {step} {name}")
    assert not torch.equal(next(trl_ref.parameters()), next(tiny_model.parameters()))  # steps 3 and 6 mixed


def test_mix_into_reference_by_hand(tiny_model):
    policy = _perturbed(tiny_model, 0)
    ref = copy.deepcopy(tiny_model)
    mix_into_reference(ref, policy, 0.25)
    for (name, r), p, p0 in zip(ref.named_parameters(), policy.parameters(), tiny_model.parameters()):
        torch.testing.assert_close(r, 0.25 * p + 0.75 * p0, msg=name)


def test_the_trainer_syncs_after_every_tau_th_optimizer_step(tmp_path, tiny_model, tokenizer, prompts_dataset):
    """Two optimizer steps per iteration (two minibatches), tau = 3, three iterations: pi_ref is mixed
    after the run's steps 3 and 6, with the policy's weights of those steps (recorded as they happen)."""
    config = small_config(tmp_path, iterations=3, minibatch_size=4, kl_coef=0.1, sync_ref_model=True,
                          ref_model_mixup_alpha=0.4, ref_model_sync_steps=3)
    assert config.optimizer_steps_per_iteration == 2
    trainer = PGTrainer(tiny_model, [count_a], prompts_dataset, config, tokenizer=tokenizer)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    expected = {k: v.clone() for k, v in trainer.ref_model.named_parameters()}
    steps = []

    class Record:  # runs before ReferenceSync: the policy's weights after each step
        def __getattr__(self, name):
            return lambda *args: {} if name == "result" else None

        def optimizer_step(self, taken, grad_norm, losses):
            steps.append({k: v.detach().clone() for k, v in policy.named_parameters()})

    trainer.policy_update.step_observers.insert(0, Record())
    trainer.train()
    assert len(steps) == 6
    for s in (3, 6):
        expected = {k: 0.4 * steps[s - 1][k] + 0.6 * v for k, v in expected.items()}
    for name, p in trainer.ref_model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_a_resumed_run_keeps_the_mixed_reference(tmp_path, tokenizer, prompts_dataset):
    """The reference weights are in the checkpoint: a run resumed after iteration 1 ends with the same
    pi_ref (and policy) as the uninterrupted run; resuming with sync_ref_model off is refused."""
    from lmpg.tiny import make_tiny_causal_lm

    def run(out, **overrides):
        config = small_config(out, iterations=2, kl_coef=0.1, sync_ref_model=True, ref_model_mixup_alpha=0.5,
                              ref_model_sync_steps=1, save_every=1, **overrides)
        model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
        trainer = PGTrainer(model, [count_a], prompts_dataset, config, tokenizer=tokenizer)
        trainer.train()
        return trainer

    whole = run(tmp_path / "whole")
    first = tmp_path / "whole" / "run" / "checkpoints" / "checkpoint-000001"
    assert (first / "ref_model").is_dir()
    resumed = run(tmp_path / "resumed", resume=str(first))
    initial = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
    for (name, a), b, p0 in zip(whole.ref_model.named_parameters(), resumed.ref_model.parameters(),
                                initial.parameters()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, p0) for a, p0 in zip(whole.ref_model.parameters(), initial.parameters()))
    config = PGConfig(**{**whole.config.to_dict(), "sync_ref_model": False, "resume": str(first),
                         "output_dir": str(tmp_path / "off")})
    trainer = PGTrainer(make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0), [count_a],
                        prompts_dataset, config, tokenizer=tokenizer)
    with pytest.raises(TrainingError, match="holds a synced reference model, but sync_ref_model=false") as err:
        trainer.prepare_run_dir()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("values,match", [
    (dict(sync_ref_model=True), "sync_ref_model=true with kl_coef=0"),
    (dict(sync_ref_model=True, kl_coef=0.1, lora_r=4), "sync_ref_model=true with LoRA"),
    (dict(ref_model_mixup_alpha=1.5), r"ref_model_mixup_alpha=1.5 must be in \[0, 1\]"),
    (dict(ref_model_sync_steps=0), "ref_model_sync_steps=0 must be >= 1"),
])
def test_what_sync_ref_model_cannot_mean_is_refused_in_one_line(values, match):
    with pytest.raises(ConfigError, match=match) as err:
        PGConfig(**values)
    assert "\n" not in str(err.value)


def test_a_peft_policy_is_refused_in_one_line(tmp_path, tiny_model, tokenizer, prompts_dataset):
    from peft import LoraConfig

    config = small_config(tmp_path, kl_coef=0.1, sync_ref_model=True)
    with pytest.raises(ConfigError, match="sync_ref_model=true with a peft model") as err:
        PGTrainer(tiny_model, [count_a], prompts_dataset, config, tokenizer=tokenizer,
                  peft_config=LoraConfig(r=2, target_modules=["q_proj"]))
    assert "\n" not in str(err.value)
