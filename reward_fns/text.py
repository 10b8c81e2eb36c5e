"""Helpers the built-in rewards share: turning a completion into text and reading reference columns.

A completion is either a string (standard format) or, as TRL's conversational datasets give it, a
list of messages `[{"role": "assistant", "content": "..."}]`; rewards score the text of the last
message (`completion_text`, lmpg's one helper, re-exported here). Reference columns (`answer`,
`solution`, ...) arrive as one value per completion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lmpg.errors import RewardError
from lmpg.rewards.types import completion_text

__all__ = ["completion_text", "reference_column"]


def reference_column(kwargs: Mapping[str, Any], names: Sequence[str], batch_size: int) -> list | None:
    """The first column among `names` present in `kwargs`, checked to hold one value per completion.

    Returns None when no such column was passed (the reward then gives None for every sample).
    """
    for name in names:
        column = kwargs.get(name)
        if column is None:
            continue
        if isinstance(column, (str, bytes)) or not isinstance(column, Sequence):
            raise RewardError(
                f"column '{name}' must be a list with one value per completion, got"
                f" {type(column).__name__}; pass the dataset column aligned to the completions"
            )
        if len(column) != batch_size:
            raise RewardError(
                f"column '{name}' has {len(column)} values for {batch_size} completions;"
                " repeat each reference once per sampled completion"
            )
        return list(column)
    return None
