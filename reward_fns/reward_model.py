"""A learned reward: the scalar head of a sequence-classification model scoring prompt + completion.

    r_i = RM(prompt_i ⊕ completion_i)[0]      (the logit of the single label at the last real token)

The model is any transformers `AutoModelForSequenceClassification` with `num_labels=1` (Bradley-Terry
reward models such as Skywork-Reward or the ones TRL's RewardTrainer writes). Batches are right-padded
with an attention mask, so a sample's score does not depend on what it is batched with (left padding
would shift its position ids).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lmpg.errors import RewardError
from reward_fns.text import completion_text


def _is_conversation(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(m, Mapping) for m in value)
    )


class RewardModelReward:
    """Scores each prompt + completion with a sequence-classification reward model.

    model_or_path: a loaded model (then `tokenizer` is required) or a local path / hub id loaded with
    `AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)` and `AutoTokenizer`.
    tokenizer: the reward model's tokenizer; it needs a pad token.  batch_size: sequences per forward
    pass.  device: where to run (default: where the model is).  max_length: truncate longer
    sequences (from the right) to this many tokens; None keeps them whole.

    The model is put in eval mode. Conversational samples (lists of messages) are rendered with the
    tokenizer's chat template; string samples are concatenated. Not split across worker threads or
    processes by RewardScorer (`split_batch = False`): it batches itself.
    """

    split_batch = False

    def __init__(
        self,
        model_or_path: Any,
        tokenizer: Any = None,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        max_length: int | None = None,
    ):
        if isinstance(model_or_path, str):
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            model = AutoModelForSequenceClassification.from_pretrained(model_or_path, num_labels=1)
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model_or_path)
            self.__name__ = model_or_path.rstrip("/").split("/")[-1]  # logged as TRL names it
        else:
            model = model_or_path
        if tokenizer is None:
            raise RewardError("RewardModelReward got a model object but no tokenizer; pass tokenizer=...")
        if tokenizer.pad_token_id is None:
            raise RewardError(
                "the reward model's tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos_token)"
            )
        if getattr(model.config, "num_labels", 1) != 1:
            raise RewardError(
                f"reward model has num_labels={model.config.num_labels}; a scalar reward model needs num_labels=1"
            )
        if batch_size < 1:
            raise RewardError(f"batch_size must be >= 1, got {batch_size}")
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = (
                tokenizer.pad_token_id
            )  # sequence classifiers pool at the last non-pad
        self.model = model.to(device) if device is not None else model
        self.model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def texts(self, prompts: list, completions: list) -> list[str]:
        """prompt ⊕ completion as one string per sample (chat template for conversations)."""
        texts = []
        for prompt, completion in zip(prompts, completions):
            if _is_conversation(prompt) and _is_conversation(completion):
                texts.append(
                    self.tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
                )
            else:
                prompt_text = completion_text(prompt) if prompt is not None else ""
                texts.append(prompt_text + completion_text(completion))
        return texts

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        if prompts is None:
            prompts = [None] * len(completions)
        texts = self.texts(prompts, completions)
        templated = _is_conversation(completions[0]) if completions else False
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="right",
                truncation=self.max_length is not None,
                max_length=self.max_length,
                add_special_tokens=not templated,  # a chat template writes its own special tokens
            ).to(self.device)
            logits = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits  # (B, 1)
            scores.extend(logits[:, 0].float().tolist())
        return scores
