"""LoRA through peft: only the adapter trains and saves, it loads back and merges, and the policy with
its adapter disabled is the reference policy."""

import pytest
import torch

from lmpg import PGConfig, PGTrainer
from lmpg.forward import batch_logprobs

from conftest import count_a


def lora_config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), iterations=3, batch_size=8, group_size=4, max_new_tokens=6,
                learning_rate=1e-2, lora_r=4, lora_alpha=8, sample_log_every=0, progress_bar=False)
    base.update(kw)
    return PGConfig(**base)


def test_only_adapter_parameters_change(tmp_path, tiny_model, tokenizer, prompts_dataset):
    before = {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}
    trainer = PGTrainer(tiny_model, [count_a], prompts_dataset, lora_config(tmp_path), tokenizer=tokenizer)
    trainer.train()
    policy = trainer.accelerator.unwrap_model(trainer.model)
    changed, unchanged = [], []
    for name, value in policy.state_dict().items():
        base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" in name:
            changed.append(name)
            continue
        assert torch.equal(value, before[base_name]), f"base weight {name} changed"
        unchanged.append(name)
    assert unchanged and changed
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in policy.named_parameters() if "lora_B" in n)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_saved_adapter_loads_back_and_merges(tmp_path, tiny_model, tokenizer, prompts_dataset):
    from peft import PeftModel

    trainer = PGTrainer(tiny_model, [count_a], prompts_dataset, lora_config(tmp_path), tokenizer=tokenizer)
    trainer.train()
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    assert not (final / "model.safetensors").exists()  # only the adapter is saved
    policy = trainer.accelerator.unwrap_model(trainer.model)
    ids = torch.tensor([tokenizer("1+1=aab")["input_ids"]])
    with torch.no_grad():
        expected = policy(input_ids=ids).logits

    from lmpg.tiny import make_tiny_causal_lm
    base = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
    loaded = PeftModel.from_pretrained(base, str(final))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_disabled_adapter_is_the_base_model(tmp_path, tiny_model, tokenizer, prompts_dataset):
    from lmpg.tiny import make_tiny_causal_lm

    trainer = PGTrainer(tiny_model, [count_a], prompts_dataset, lora_config(tmp_path, kl_coef=0.1),
                        tokenizer=tokenizer)
    metrics = trainer.train()
    assert trainer.ref_model is None  # no second copy of the model
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-7) and metrics[-1]["kl"] > 0
    batch = trainer.sample(trainer.next_prompts())
    trainer.fill_logp_ref(batch)
    base = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
    rows = torch.arange(batch.batch_size)
    base_logp = batch_logprobs(base, batch, rows, trainer.micro_batch_size, 1.0)
    torch.testing.assert_close(batch.logp_ref, base_logp)
    policy_logp = batch_logprobs(trainer.model, batch, rows, trainer.micro_batch_size, 1.0)
    assert not torch.allclose(policy_logp, base_logp)
