"""Loading the policy and its tokenizer, and preparing them for policy-gradient training."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from lmpg.errors import ConfigError

logger = logging.getLogger("lmpg")


def load_model_and_tokenizer(model, tokenizer=None, *, model_init_kwargs: dict | None = None,
                             trust_remote_code: bool = False):
    """(model, tokenizer) from objects or a hub name / local path; a missing path is a ConfigError.

    model_init_kwargs: keyword arguments to from_pretrained for a model given by name (a dtype may be
    a string, 'bfloat16'); its revision also loads the tokenizer. trust_remote_code: passed to both
    from_pretrained calls (as TRL does; model_init_kwargs' own value wins). A model given as an object
    is used as it is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    init_kwargs = dict(model_init_kwargs or {})
    init_kwargs.setdefault("trust_remote_code", trust_remote_code)
    if isinstance(init_kwargs.get("dtype"), str) and init_kwargs["dtype"] != "auto":
        init_kwargs["dtype"] = _torch_dtype(init_kwargs["dtype"])
    tokenizer_kwargs = {"trust_remote_code": init_kwargs["trust_remote_code"]}
    if init_kwargs.get("revision") is not None:
        tokenizer_kwargs["revision"] = init_kwargs["revision"]
    name = None
    if isinstance(model, (str, Path)):
        name = str(model)
        looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
        if looks_local and not Path(name).expanduser().exists():
            raise ConfigError(f"model path {name} does not exist; give an existing directory or a hub model name")
        try:
            model = AutoModelForCausalLM.from_pretrained(name, **init_kwargs)
        except OSError as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"cannot load model {name!r}: {first}") from None
    elif model_init_kwargs:
        logger.info("model_init_kwargs apply to a model loaded by name; the model given is used as it is")
    if tokenizer is None:
        source = name or getattr(model, "name_or_path", None)
        if not source:
            raise ConfigError("no tokenizer given and the model has no name_or_path; pass tokenizer=...")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
        except OSError as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"cannot load tokenizer {source!r}: {first}; pass tokenizer=...") from None
    elif isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), **tokenizer_kwargs)
    ensure_pad_token(tokenizer)
    return model, tokenizer


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"model_init_kwargs dtype={name!r} is not a torch dtype; use bfloat16, float16, float32 or auto")
    return dtype


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


class Float32Linear(torch.nn.Linear):
    """An output layer computed in fp32: fp32 weights, fp32 hidden states, outside autocast, so the
    logits (and every log-prob and KL from them) are fp32 whatever the model's dtype or mixed precision.
    A class of its own, so that `lmpg.chunked_logprobs` takes its general path (its hand-written
    backward assumes one dtype)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return torch.nn.functional.linear(hidden.float(), self.weight.float(), bias)


def cast_lm_head_to_fp32(model) -> None:
    """The model's output layer as `Float32Linear`, in place (TRL's cast_lm_head_to_fp32, ScaleRL
    arXiv 2510.13786): its weights cast to fp32 and its matmul run in fp32. With tied word embeddings the
    shared weight becomes fp32 too, so the input embedding's output is cast back to the model's dtype
    (as TRL does) for the layers after it. An output layer carrying a LoRA adapter is refused."""
    base = model.get_base_model() if is_peft_model(model) else model
    head = base.get_output_embeddings()
    if type(head) is Float32Linear:
        return
    if type(head) is not torch.nn.Linear:
        raise ConfigError(f"cast_lm_head_to_fp32 needs a plain nn.Linear output layer, not {type(head).__name__} "
                          "(LoRA on lm_head? leave it out of lora_target_modules), or set cast_lm_head_to_fp32=false")
    dtype = head.weight.dtype
    head.float()
    head.__class__ = Float32Linear
    embedding = base.get_input_embeddings()
    if dtype != torch.float32 and embedding is not None and embedding.weight is head.weight:
        embedding.register_forward_hook(lambda module, args, output: output.to(dtype))

