"""Reward-model reward (reward_fns/reward_model.py) on a tiny random Llama built in-process."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

from lmpg.errors import RewardError
from lmpg.rewards import RewardScorer
from reward_fns.reward_model import RewardModelReward

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 +=?.!"


def char_tokenizer(with_pad: bool = True) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(ALPHABET)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>" if with_pad else None
    )


@pytest.fixture(scope="module")
def tiny_reward_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(ALPHABET) + 2,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config).eval(), char_tokenizer()


def manual_score(model, tokenizer, text: str) -> float:
    input_ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=input_ids).logits[0, 0].item()


def test_char_tokenizer_is_one_token_per_character():
    assert char_tokenizer()("ab 1")["input_ids"] == [2, 3, 38, 29]  # a, b, space (index 36 + 2), 1 (27 + 2)


def test_scores_match_a_manual_forward_pass(tiny_reward_model):
    model, tokenizer = tiny_reward_model
    reward = RewardModelReward(model, tokenizer, batch_size=2)
    prompts, completions = ["what is 2+2? ", "hi ", "say a long sentence: "], ["4", "hello there!", "no."]
    scores = reward(prompts, completions)
    expected = [manual_score(model, tokenizer, p + c) for p, c in zip(prompts, completions)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(scores)) == 3  # the model is not constant, so the comparison means something


def test_padding_does_not_change_a_score(tiny_reward_model):
    model, tokenizer = tiny_reward_model
    alone = RewardModelReward(model, tokenizer)(["q "], ["a"])
    batched = RewardModelReward(model, tokenizer)(
        ["q ", "a much longer prompt to force padding "], ["a", "and answer"]
    )
    assert batched[0] == pytest.approx(alone[0], abs=1e-5)


def test_through_the_scorer_it_runs_whole(tiny_reward_model):
    model, tokenizer = tiny_reward_model
    reward = RewardModelReward(model, tokenizer)
    with RewardScorer([reward], executor="thread", max_workers=2) as scorer:
        scores = scorer.score(["q ", "q "], ["a", "b"], [[1], [1]])
    assert scores.names == ["RewardModelReward"]
    assert scores.values[0] == pytest.approx(reward(["q ", "q "], ["a", "b"]), abs=1e-6)


def test_configuration_errors(tiny_reward_model):
    model, _ = tiny_reward_model
    with pytest.raises(RewardError, match="no tokenizer; pass tokenizer="):
        RewardModelReward(model)
    with pytest.raises(RewardError, match="tokenizer has no pad token"):
        RewardModelReward(model, char_tokenizer(with_pad=False))
