"""KV-cache plumbing shared by the sampler and the training forward.

The G completions of a prompt share its tokens, so its keys and values are the same in all G rows:
run each distinct prompt through the model once and repeat its cache rows,

    cache[B rows] = cache[b distinct prompts][inverse],  inverse: (B,) row -> its prompt,

an index_select, so under autograd the gradient of every row flows back into its prompt's single
forward (d loss / d prompt states = sum over the G rows sharing it).
"""

from __future__ import annotations

import inspect

import torch


def cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: `cache` in transformers >= 5.x, else `past_key_values`."""
    base = getattr(model, "module", model)  # DDP / accelerate wrappers
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # peft
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


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
    """The cache with row i holding what row inverse[i] held, (b, ...) -> (B, ...), in place.

    Raises TypeError for a cache that cannot select rows (legacy tuple caches)."""
    if not hasattr(cache, "batch_select_indices"):
        raise TypeError(f"a {type(cache).__name__} cache cannot repeat rows; use a transformers Cache")
    cache.batch_select_indices(inverse)
    return cache
