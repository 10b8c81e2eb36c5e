"""KV-cache plumbing shared by the sampler and the training forward.

The G completions of a prompt share its tokens, so its cache is the same in all G rows: run each
distinct prompt through the model once and repeat its cache rows,

    cache[B rows] = cache[b distinct prompts][inverse],  inverse: (B,) row -> its prompt,

an index_select, so under autograd the gradient of every row flows back into its prompt's single
forward (d loss / d prompt states = sum over the G rows sharing it).

What a cache allows is decided once per call by `cache_support(model)`, from the cache layers the
model builds (transformers' `DynamicCache(config=model.config)`):

- attention layers (keys and values, full or sliding window) repeat their rows and are continued by
  a multi-token chunk under autograd: the sampler's shared prefill and the shared update forward;
- recurrent layers (Mamba / Mamba2 conv and SSM states, linear attention, and the hybrid layers that
  hold both) repeat their rows along the batch dimension too, so the sampler, which continues them
  one token at a time as `generate` does, still prefills once per prompt. Not all of them continue
  a multi-token chunk (in transformers 5.24 Mamba's mask does not fit one, Jamba's chunk differs
  from the plain forward by 7e-5, Qwen3-Next's in-place state update breaks the backward) and the
  layer class does not tell which, so the update runs the plain forward for all of them;
- a cache of any other kind (a model's own cache class, a subclass adding state) shares nothing: the
  sampler prefills every row and the update runs the plain forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import cache_utils


def _classes(*names: str) -> tuple[type, ...]:
    """The cache_utils classes of these names that this transformers version has."""
    return tuple(c for c in (getattr(cache_utils, n, None) for n in names) if c is not None)


# Exact classes, not isinstance: a subclass may hold state the row selection does not know. Each
# selects along the batch dimension of everything it holds in `reorder_cache`, the method beam
# search reorders rows with.
_ATTENTION_LAYERS = _classes("DynamicLayer", "DynamicSlidingWindowLayer", "DynamicIndexedLayer", "DummyLayer")
_RECURRENT_LAYERS = _classes("LinearAttentionLayer", "LinearAttentionAndFullAttentionLayer",
                             "LinearAttentionAndSlidingWindowAttentionLayer")
_MASKLESS_LAYERS = _classes("LinearAttentionLayer")  # states only: no attention to mask


@dataclass(frozen=True)
class CacheSupport:
    """What the cache a model builds supports besides one-token decoding (`cache_support`)."""

    repeat_rows: bool
    """Its rows can be repeated: the sampler prefills each distinct prompt once."""
    continue_chunk: bool
    """A multi-token chunk continues it under autograd: the update forward runs each distinct prompt
    once (`lmpg.logprobs.shared_prompt_completion_logits`)."""
    step_mask: bool
    """A decoding step takes the attention mask. False where no layer attends (Mamba, Mamba2): the
    states already carry the prompt's padding, and these models multiply their (B, 1) hidden states
    by the mask, so `generate` gives them none after the prefill either."""


def _base_model(model):
    """The transformers model under DDP / accelerate wrappers and peft."""
    base = getattr(model, "module", model)
    return base.get_base_model() if hasattr(base, "get_base_model") else base


def cache_support(model) -> CacheSupport:
    """What the cache `model` builds supports (see the module docstring), from its layer classes."""
    base = _base_model(model)
    config = getattr(base, "config", None)
    # transformers' own list of models that build a cache class of their own (MiniMax, xLSTM, RWKV ...)
    if config is None or not getattr(type(base), "_supports_default_dynamic_cache", lambda: True)():
        return CacheSupport(repeat_rows=False, continue_chunk=False, step_mask=True)
    try:
        kinds = {type(layer) for layer in cache_utils.DynamicCache(config=config).layers}
    except (TypeError, AttributeError):  # transformers before per-layer caches: keys and values only
        kinds = set()
    if not kinds:  # no layer types in the config: attention layers, made as they fill
        return CacheSupport(repeat_rows=True, continue_chunk=True, step_mask=True)
    return CacheSupport(repeat_rows=kinds <= set(_ATTENTION_LAYERS + _RECURRENT_LAYERS),
                        continue_chunk=kinds <= set(_ATTENTION_LAYERS),
                        step_mask=not kinds <= set(_MASKLESS_LAYERS))


CACHE_ARGUMENTS = ("cache", "past_key_values", "cache_params")
"""The names a forward takes its cache under and an output returns it under: `cache` (transformers >=
5.2x), `past_key_values` (before), `cache_params` (Mamba / Mamba2 before 5.2x, a DynamicCache all the same)."""


def cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache (`CACHE_ARGUMENTS`; default past_key_values)."""
    parameters = inspect.signature(type(_base_model(model)).forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in parameters), "past_key_values")


def returned_cache(out):
    """The KV cache in a model output (under any of `CACHE_ARGUMENTS`), or None."""
    for name in CACHE_ARGUMENTS:
        cache = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if cache is not None:
            return cache
    return None


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

    Raises TypeError for a cache whose rows it cannot repeat (see `cache_support`)."""
    layers = getattr(cache, "layers", ())  # none: transformers before per-layer caches, keys and values only
    if type(cache) is not cache_utils.DynamicCache or any(
            type(layer) not in _ATTENTION_LAYERS + _RECURRENT_LAYERS for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise TypeError(f"a {type(cache).__name__} cache {kinds} cannot repeat rows; "
                        "lmpg.kvcache.cache_support should have turned sharing off for this model")
    cache.reorder_cache(inverse)
    return cache
