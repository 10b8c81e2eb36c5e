"""Tiny causal LMs and character / word tokenizers built in-process, for tests, CPU recipes and benchmarks.

Nothing here downloads anything: the tokenizer is assembled from an alphabet (or a numbered word
list) with the `tokenizers` library and the model is initialised at random from a config, so
recipes and tests run offline.

    tokenizer = make_char_tokenizer("0123456789+=")
    model = make_tiny_causal_lm(tokenizer, n_layer=2, n_embd=128, n_head=4, seed=0)

    tokenizer = make_word_tokenizer(4096)       # a real vocabulary's size, words w0 ... w4091
    model = make_tiny_causal_lm(tokenizer, n_layer=3, n_embd=256, n_head=4, max_position_embeddings=256)
    suppress_eos(model, tokenizer.eos_token_id)  # every completion runs to max_new_tokens
"""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
BOS_TOKEN = "<bos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN)

# Renders a conversation as the bare concatenation of its messages, each assistant turn closed by EOS,
# so the chat prompt [{"role": "user", "content": "12+34="}] is the same text as the plain prompt
# "12+34=" and a model trained on either format works with both.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- message['content'] -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)


def make_char_tokenizer(
    alphabet: str, padding_side: str = "left", model_max_length: int = 64
) -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character of `alphabet`, plus special tokens.

    Ids 0..3 are `<pad>`, `<eos>`, `<bos>`, `<unk>` (pad differs from eos, so padding is never mistaken
    for the end of a completion); the characters of `alphabet` follow in order. Characters outside the
    alphabet encode as `<unk>`. No special token is inserted by encoding (`tokenizer("1+2=")` is just the
    characters), the convention of RL trainers that tokenize prompts with `add_special_tokens=False`.
    Decoding concatenates characters without separators. Left padding is the default because a
    decoder-only model generates after the last prompt token.
    """
    characters = list(dict.fromkeys(alphabet))  # unique, in order
    if not characters:
        raise ValueError("alphabet is empty: pass the characters the task uses, e.g. '0123456789+='")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for character in characters:
        vocab[character] = len(vocab)
    # BPE with no merges splits every word into characters: a character-level model that maps
    # unknown characters to <unk>. With no pre-tokenizer, spaces are ordinary characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side=padding_side,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_causal_lm(
    tokenizer: transformers.PreTrainedTokenizerBase,
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    max_position_embeddings: int = 64,
    seed: int = 0,
) -> transformers.LlamaForCausalLM:
    """A randomly initialised Llama-architecture causal LM sized for CPU experiments.

    Input and output embeddings are tied; the MLP is SwiGLU with hidden size `4 * n_embd`. The pad,
    bos and eos ids of `tokenizer` are written into both the model config and its generation config,
    so `model.generate` stops at EOS and pads finished rows without extra arguments. Generation is
    greedy unless the caller asks to sample. The weights depend only on `seed`; the global torch RNG
    is left as it was.
    """
    if n_embd % n_head != 0:
        raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}: pick n_head dividing it")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=n_embd,
        intermediate_size=4 * n_embd,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_head,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    model.generation_config = transformers.GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        do_sample=False,
        max_new_tokens=16,
    )
    return model


def make_word_tokenizer(vocab_size: int = 4096, model_max_length: int = 1024) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer with `vocab_size` ids: `<pad>` `<eos>` `<bos>` `<unk>`, then words w0, w1, ...

    Text is split on whitespace, each word one token (`w17` is id 21; a word outside the vocabulary
    is `<unk>`), and decoded with spaces between words. No special token is inserted by encoding;
    padding is on the left. With a vocabulary of a real model's size, the (B, T, V) log-softmax of a
    tiny model costs what it costs there (the benchmarks use V = 4096).
    """
    from tokenizers import pre_tokenizers

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} leaves no room for words after the "
                         f"{len(SPECIAL_TOKENS)} special tokens; pass at least {len(SPECIAL_TOKENS) + 1}")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for i in range(vocab_size - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, bos_token=BOS_TOKEN,
        unk_token=UNK_TOKEN, padding_side="left", model_max_length=model_max_length)


def suppress_eos(model, eos_token_id: int, bias: float = -1e4) -> None:
    """Give `model.lm_head` a frozen bias of `bias` on the EOS logit (0 elsewhere), in place.

    No sampler then draws EOS, so every completion is exactly max_new_tokens long (the benchmarks'
    fixed workload); the loss sees the same policy (the bias is part of the head), and the weight stays
    tied to the input embedding. The bias is a parameter with requires_grad=False, so it is counted
    in `model.parameters()` but never trained. The global torch RNG is left as it was.
    """
    head = model.lm_head
    # built on the meta device: no random init to draw (both parameters are replaced below)
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, device="meta")
    biased.weight = head.weight
    b = torch.zeros(head.out_features)
    b[eos_token_id] = bias
    biased.bias = torch.nn.Parameter(b, requires_grad=False)
    model.lm_head = biased
