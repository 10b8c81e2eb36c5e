"""KV-cache plumbing shared by the sampler and the training forward.

The G completions of a prompt share its tokens, so its cache is the same in all G rows: run each
distinct prompt through the model once and repeat its cache rows,

    cache[B rows] = cache[b distinct prompts][inverse],  inverse: (B,) row -> its prompt,

an index_select, so under autograd the gradient of every row flows back into its prompt's single
forward (d loss / d prompt states = sum over the G rows sharing it).

What a cache allows is decided once per call by `prompt_sharing(model)`, from the cache layers the
model builds (transformers' `DynamicCache(config=model.config)`):

- attention layers (keys and values, full or sliding window) repeat their rows and are continued by
  a multi-token chunk under autograd: the sampler's shared prefill and the shared update forward;
- recurrent layers (Mamba / Mamba2 conv and SSM states, linear attention, and the hybrid layers that
  hold both) repeat their rows along the batch dimension too, so the sampler, which continues them
  one token at a time as `generate` does, still prefills once per prompt; but a multi-token chunk
  does not continue them (Mamba's chunk scan starts from a zero state, and the layers overwrite
  their states in place, which autograd rejects), so the update runs the plain forward;
- a cache of any other kind (a model's own cache class, a subclass adding state) shares nothing: the
  sampler prefills every row and the update runs the plain forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import cache_utils

# Exact classes, not isinstance: a subclass may hold state the row selection below does not know.
# Each selects along the batch dimension of everything it holds in `reorder_cache`, the method beam
# search reorders rows with.
_ATTENTION_LAYERS = (cache_utils.DynamicLayer, cache_utils.DynamicSlidingWindowLayer,
                     cache_utils.DynamicIndexedLayer, cache_utils.DummyLayer)
_RECURRENT_LAYERS = (cache_utils.LinearAttentionLayer, cache_utils.LinearAttentionAndFullAttentionLayer,
                     cache_utils.LinearAttentionAndSlidingWindowAttentionLayer)


@dataclass(frozen=True)
class PromptSharing:
    """What a model's cache lets the rows that hold one prompt share."""

    prefill: bool
    """Its rows can be repeated: the sampler prefills each distinct prompt once."""
    update: bool
    """It also continues a multi-token chunk under autograd: the update forward runs each distinct
    prompt once (`lmpg.logprobs.shared_prompt_completion_logits`)."""


def _base_model(model):
    """The transformers model under DDP / accelerate wrappers and peft."""
    base = getattr(model, "module", model)
    return base.get_base_model() if hasattr(base, "get_base_model") else base


def prompt_sharing(model) -> PromptSharing:
    """The sharing the cache `model` builds allows (see the module docstring)."""
    base = _base_model(model)
    # transformers' own list of models that build a cache class of their own (MiniMax, xLSTM, RWKV ...)
    builds_default = getattr(type(base), "_supports_default_dynamic_cache", lambda: True)()
    config = getattr(base, "config", None)
    if not builds_default or config is None:
        return PromptSharing(prefill=False, update=False)
    layers = cache_utils.DynamicCache(config=config).layers
    kinds = {type(layer) for layer in layers} or {cache_utils.DynamicLayer}  # no layers yet: built lazily as DynamicLayer
    attention = all(k in _ATTENTION_LAYERS for k in kinds)
    return PromptSharing(prefill=attention or all(k in _ATTENTION_LAYERS + _RECURRENT_LAYERS for k in kinds),
                         update=attention)


def cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: `cache` in transformers >= 5.x, else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(type(_base_model(model)).forward).parameters else "past_key_values"


def decode_step_inputs(model, token: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                       cache) -> dict:
    """The forward's inputs for one more token on `cache`, as `generate` builds them for this model.

    token, position_ids: (B, 1); attention_mask: (B, L) over the cached tokens and this one. Most
    models take all of them; the model's own `prepare_inputs_for_generation` drops what it must not
    get (Mamba / Mamba2 mask padding by multiplying their (B, 1) hidden states with the mask, so
    they take none once the prompt is cached)."""
    return _base_model(model).prepare_inputs_for_generation(
        token, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, is_first_iteration=False,
        **{cache_kwarg(model): cache})


def returned_cache(out):
    """The KV cache in a model output (`cache` or `past_key_values`), or None."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else getattr(out, "past_key_values", None)


def distinct_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, inverse) for the distinct values in `rows` (B,) or distinct rows of `rows` (B, L).

    first: (b,) the index of one row holding each distinct value; inverse: (B,) each row's distinct
    value, so rows[first][inverse] == rows.
    """
    B = rows.shape[0]
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    arange = torch.arange(B, device=rows.device)
    first = torch.full((int(inverse.max()) + 1 if B else 0,), B, dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, inverse, arange, reduce="amin")
    return first, inverse


def repeat_cache_rows(cache, inverse: torch.Tensor):
    """The cache with row i holding what row inverse[i] held, (b, ...) -> (B, ...), in place: keys and
    values, and the conv / recurrent states of recurrent layers.

    Raises TypeError for a cache whose rows it cannot repeat (see `prompt_sharing`)."""
    layers = getattr(cache, "layers", None)
    if type(cache) is not cache_utils.DynamicCache or any(
            type(layer) not in _ATTENTION_LAYERS + _RECURRENT_LAYERS for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or ()})
        raise TypeError(f"a {type(cache).__name__} cache {kinds} cannot repeat rows; "
                        "lmpg.kvcache.prompt_sharing should have turned sharing off for this model")
    cache.reorder_cache(inverse)
    return cache
