"""Loading the policy and its tokenizer, and preparing them for policy-gradient training."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from lmpg.errors import ConfigError

logger = logging.getLogger("lmpg")


def load_model_and_tokenizer(model, tokenizer=None):
    """(model, tokenizer) from objects or a hub name / local path; a missing path is a ConfigError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = None
    if isinstance(model, (str, Path)):
        name = str(model)
        looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
        if looks_local and not Path(name).expanduser().exists():
            raise ConfigError(f"model path {name} does not exist; give an existing directory or a hub model name")
        try:
            model = AutoModelForCausalLM.from_pretrained(name)
        except OSError as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"cannot load model {name!r}: {first}") from None
    if tokenizer is None:
        source = name or getattr(model, "name_or_path", None)
        if not source:
            raise ConfigError("no tokenizer given and the model has no name_or_path; pass tokenizer=...")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except OSError as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"cannot load tokenizer {source!r}: {first}; pass tokenizer=...") from None
    elif isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    ensure_pad_token(tokenizer)
    return model, tokenizer


def ensure_pad_token(tokenizer) -> None:
    """Use EOS as the pad token when the tokenizer has none (with a warning): the completion mask,
    not the pad id, decides which tokens count, so sharing the id is safe."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        logger.warning("tokenizer has no pad token; using the EOS token %r as pad", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0, so that pi_old and pi_theta are the same deterministic
    function at the first step (ratio exactly 1) and log-probabilities are reproducible."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "resid_dropout", "attn_dropout"):
            value = getattr(module, attr, None)
            if isinstance(value, float):
                setattr(module, attr, 0.0)


def apply_lora(model, config, peft_config=None):
    """Wrap the model with a LoRA adapter (peft) when config.lora_r > 0 or a peft_config is given."""
    if peft_config is None and config.lora_r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    if peft_config is None:
        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                 target_modules=config.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, peft_config)


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def frozen_copy(model):
    """A frozen reference policy pi_ref: a copy of the model's current weights, eval mode."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref.eval()
    return ref
