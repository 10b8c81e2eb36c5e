"""lmpg.tiny: the in-process character tokenizer and tiny causal LM."""

import torch

from lmpg.tiny import CHAT_TEMPLATE, make_char_tokenizer, make_tiny_causal_lm


def test_tokenizer_is_one_token_per_character_and_round_trips():
    tokenizer = make_char_tokenizer("0123456789+= ")
    text = "123+459= 285"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # no special token added, one id per character
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(ids[:4]) == ["1", "2", "3", "+"]


def test_special_tokens_are_distinct_and_skipped_when_decoding():
    tokenizer = make_char_tokenizer("ab")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert len(tokenizer) == 6
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    assert tokenizer.decode([a, b, tokenizer.eos_token_id, tokenizer.pad_token_id], skip_special_tokens=True) == "ab"
    assert tokenizer("a<eos>")["input_ids"] == [a, tokenizer.eos_token_id]


def test_unknown_characters_become_unk():
    tokenizer = make_char_tokenizer("ab")
    assert tokenizer("axb")["input_ids"] == [4, tokenizer.unk_token_id, 5]


def test_padding_is_on_the_left_for_generation():
    tokenizer = make_char_tokenizer("0123456789+=")
    batch = tokenizer(["1+2=", "11+22="], padding=True)
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1]


def test_chat_template_renders_the_plain_prompt_and_closes_assistant_turns():
    tokenizer = make_char_tokenizer("0123456789+=")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    user = [{"role": "user", "content": "1+2="}]
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == "1+2="
    dialogue = user + [{"role": "assistant", "content": "3"}]
    assert tokenizer.apply_chat_template(dialogue, tokenize=False) == "1+2=3<eos>"


def test_model_config_carries_the_special_ids_and_ties_embeddings():
    tokenizer = make_char_tokenizer("0123456789+=")
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2)
    for config in (model.config, model.generation_config):
        assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (0, 1, 2)
    assert model.config.vocab_size == len(tokenizer)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_weights_depend_only_on_the_seed_and_leave_the_global_rng_alone():
    tokenizer = make_char_tokenizer("ab")
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=16, n_head=2, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    second = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=16, n_head=2, seed=7)
    other = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=16, n_head=2, seed=8)
    assert torch.equal(first.lm_head.weight, second.lm_head.weight)
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_generate_with_kv_cache_matches_generate_without_and_pads_after_eos():
    tokenizer = make_char_tokenizer("0123456789+=")
    model = make_tiny_causal_lm(tokenizer, n_layer=2, n_embd=32, n_head=2, seed=0).eval()
    batch = tokenizer(["1+2=", "11+22="], padding=True, return_tensors="pt")
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=12, use_cache=True)
        uncached = model.generate(**batch, max_new_tokens=12, use_cache=False)
    assert torch.equal(cached, uncached)
    new_tokens = cached[:, batch["input_ids"].shape[1]:]  # B, T
    for row in new_tokens.tolist():
        if tokenizer.eos_token_id in row:
            after_eos = row[row.index(tokenizer.eos_token_id) + 1:]
            assert set(after_eos) <= {tokenizer.pad_token_id}


def test_sampling_generate_runs_and_is_seeded():
    tokenizer = make_char_tokenizer("0123456789+=")
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0).eval()
    batch = tokenizer(["1+2="] * 4, return_tensors="pt")
    outputs = []
    for _ in range(2):
        torch.manual_seed(0)
        outputs.append(model.generate(**batch, do_sample=True, top_k=0, max_new_tokens=6))
    assert torch.equal(outputs[0], outputs[1])
