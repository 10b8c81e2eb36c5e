"""lmpg.sft: the imitation warm start's masks, loss and training loop."""

import math

import pytest
import torch

from lmpg.sft import imitation_loss, imitation_warm_start, tokenize_demonstrations
from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm


@pytest.fixture
def tokenizer():
    return make_char_tokenizer("0123456789+=")


def test_tokenize_demonstrations_masks_by_hand(tokenizer):
    input_ids, attention_mask, target_mask = tokenize_demonstrations(tokenizer, ["1+2=", "10+20="], ["3", "03"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert tokenizer.decode(input_ids[0, :5]) == "1+2=3" and input_ids[0, 5] == eos
    assert input_ids[0, 6:].tolist() == [pad] * 3
    assert tokenizer.decode(input_ids[1, :8]) == "10+20=03" and input_ids[1, 8] == eos
    assert attention_mask.tolist() == [[1] * 6 + [0] * 3, [1] * 9]
    assert target_mask.int().tolist() == [[0, 0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1]]


def test_uniform_logits_give_log_vocabulary_size():
    V = 7
    logits = torch.zeros(2, 5, V)  # B, L, V
    input_ids = torch.randint(V, (2, 5))
    target_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    loss, stats = imitation_loss(logits, input_ids, target_mask)
    assert loss.item() == pytest.approx(math.log(V))
    assert stats["n_tokens"] == 6


def test_loss_by_hand_on_one_completion_token():
    logits = torch.zeros(1, 3, 2)
    logits[0, 1] = torch.tensor([math.log(3.0), 0.0])  # p(token 0) = 3/4 at the position predicting token 2
    input_ids = torch.tensor([[1, 1, 0]])
    loss, _ = imitation_loss(logits, input_ids, torch.tensor([[False, False, True]]))
    assert loss.item() == pytest.approx(-math.log(0.75))


def test_gradient_ignores_prompt_and_padding_targets(tokenizer):
    input_ids, _, target_mask = tokenize_demonstrations(tokenizer, ["1+2=", "10+20="], ["3", "03"])
    logits = torch.randn(*input_ids.shape, len(tokenizer), requires_grad=True)  # B, L, V
    loss, _ = imitation_loss(logits, input_ids, target_mask)
    (grad,) = torch.autograd.grad(loss, logits)
    predicts_target = target_mask[:, 1:]  # logits at t predict token t+1
    assert grad[:, :-1][~predicts_target].abs().max() == 0
    assert grad[:, -1].abs().max() == 0
    assert grad[:, :-1][predicts_target].abs().sum(-1).min() > 0
    scrambled = torch.where(target_mask, input_ids, torch.randint_like(input_ids, len(tokenizer)))
    assert imitation_loss(logits, scrambled, target_mask)[0].item() == pytest.approx(loss.item())


def test_padding_does_not_change_a_rows_loss(tokenizer):
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
    prompts, completions = ["1+2=", "10+20="], ["3", "03"]
    input_ids, attention_mask, target_mask = tokenize_demonstrations(tokenizer, prompts, completions)
    with torch.no_grad():
        padded_logits = model(input_ids=input_ids, attention_mask=attention_mask.long()).logits
        alone = tokenize_demonstrations(tokenizer, prompts[:1], completions[:1])
        alone_logits = model(input_ids=alone[0], attention_mask=alone[1].long()).logits
    padded_loss, _ = imitation_loss(padded_logits[:1], input_ids[:1], target_mask[:1])
    alone_loss, _ = imitation_loss(alone_logits, alone[0], alone[2])
    assert padded_loss.item() == pytest.approx(alone_loss.item(), abs=1e-5)


def test_warm_start_lowers_the_loss_and_learns_the_demonstrations(tokenizer):
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
    prompts, completions = ["1+2=", "2+2=", "3+4=", "10+20="], ["3", "4", "7", "03"]
    stats = imitation_warm_start(model, tokenizer, prompts, completions, steps=60, batch_size=4, lr=1e-2, seed=0)
    assert len(stats["losses"]) == 60 and stats["steps"] == 60
    assert stats["loss_last"] < 0.1 < stats["loss_first"]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = model.eval().generate(**batch, max_new_tokens=3)
    assert tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True) == completions


def test_warm_start_is_seeded_and_restores_the_mode(tokenizer):
    runs = []
    for _ in range(2):
        model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=16, n_head=2, seed=0).eval()
        runs.append(imitation_warm_start(model, tokenizer, ["1+2=", "3+4="], ["3", "7"], steps=5, batch_size=1,
                                         lr=1e-3, seed=0)["losses"])
        assert not model.training
    assert runs[0] == runs[1]


def test_mismatched_lengths_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="one each"):
        tokenize_demonstrations(tokenizer, ["1+2="], ["3", "4"])
