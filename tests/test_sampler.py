"""lmpg's sampler: draws from softmax(z / tau), per-sample streams independent of the batch, its
log-probs equal the forward pass's, top-k / top-p filtering, and the trimmed forward."""

import math

import pytest
import torch

from lmpg.logprobs import sequence_logprobs
from lmpg.rollout import sample_completions
from lmpg.sampler import filter_logits, gumbel_noise, row_seed


def test_gumbel_max_draws_from_the_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    tau = 0.7
    n = 40_000
    gens = [torch.Generator().manual_seed(row_seed(0, 0, i, 0)) for i in range(n)]
    draws = torch.argmax(logits / tau + gumbel_noise(gens, 4, "cpu"), dim=-1)
    freq = torch.bincount(draws, minlength=4).double() / n
    p = torch.softmax(logits.double() / tau, -1)
    # 5 standard errors of a binomial proportion
    assert torch.all((freq - p).abs() < 5 * torch.sqrt(p * (1 - p) / n)), (freq, p)


def test_filter_logits_top_k_and_top_p():
    z = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isinf(filter_logits(z, top_k=2)).tolist() == [[False, False, True, True, True]]
    # nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is kept too; 0.1 and 0.05 are dropped
    assert torch.isinf(filter_logits(z, top_p=0.8)).tolist() == [[False, False, False, True, True]]
    assert torch.isinf(filter_logits(z, top_p=0.5)).tolist() == [[False, True, True, True, True]]
    assert torch.equal(filter_logits(z), z)


def test_row_seeds_differ():
    seeds = {row_seed(s, it, p, j) for s in range(2) for it in range(3) for p in range(4) for j in range(4)}
    assert len(seeds) == 2 * 3 * 4 * 4 and all(0 <= s < 2**63 for s in seeds)


def test_a_sample_does_not_depend_on_its_batch(tiny_model, tokenizer):
    """Same seed -> same completion, alone or beside other prompts (what makes N processes sample
    what one process samples)."""
    alone = sample_completions(tiny_model, tokenizer, ["12+34="], 2, max_new_tokens=6, seeds=[11, 12])
    batch = sample_completions(tiny_model, tokenizer, ["1+1=", "12+34=", "999+1="], 2, max_new_tokens=6,
                               seeds=[1, 2, 11, 12, 3, 4])
    assert batch.completions[2:4] == alone.completions
    other = sample_completions(tiny_model, tokenizer, ["12+34="], 2, max_new_tokens=6, seeds=[13, 14])
    assert other.completions != alone.completions


def test_sampler_logprobs_match_the_forward_pass(tiny_model, tokenizer):
    roll = sample_completions(tiny_model, tokenizer, ["1+1=", "123+456="], 3, max_new_tokens=6,
                              temperature=0.8, seeds=list(range(6)))
    logp, _ = sequence_logprobs(tiny_model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids,
                                roll.completion_mask, temperature=0.8)
    m = roll.completion_mask
    torch.testing.assert_close(roll.sampler_logp[m], logp[m], atol=1e-5, rtol=0)
    assert torch.all(roll.sampler_logp[~m] == 0)


def test_generate_sampler_still_works(tiny_model, tokenizer):
    torch.manual_seed(0)
    roll = sample_completions(tiny_model, tokenizer, ["1+1="], 2, max_new_tokens=5, sampler="generate")
    assert roll.completion_ids.shape[0] == 2 and len(roll.completions) == 2


def test_trimmed_forward_equals_full_forward(tmp_path, tiny_model, tokenizer, prompts_dataset):
    from lmpg import PGConfig, PGTrainer
    from lmpg.forward import row_logprobs
    from conftest import count_a

    trainer = PGTrainer(tiny_model, [count_a], prompts_dataset,
                        PGConfig(output_dir=str(tmp_path / "r"), batch_size=8, group_size=2, max_new_tokens=8),
                        tokenizer=tokenizer)
    roll = sample_completions(trainer.model, tokenizer, ["1+1=", "11+11=", "111+111=", "5="], 2, max_new_tokens=8,
                              seeds=list(range(8)))
    idx = torch.tensor([0, 3, 6])  # rows with different prompt and completion lengths
    trimmed, _ = row_logprobs(trainer.model, roll, idx, 1.0, False)
    full, _ = sequence_logprobs(trainer.model, roll.prompt_ids[idx], roll.prompt_mask[idx],
                                roll.completion_ids[idx], roll.completion_mask[idx])
    m = roll.completion_mask[idx]
    torch.testing.assert_close(trimmed[m], full[m], atol=1e-5, rtol=0)
    assert torch.all(trimmed[~m] == 0)


def test_sampler_grad_sq_norm_is_the_squared_logit_gradient(tiny_model, tokenizer):
    """The sampler's optional per-token output equals ||d log pi(a_t | s_t) / d z_t||^2 by autograd on
    the logits of a full forward, (1 - 2 pi(a_t) + sum_v pi_v^2) / tau^2, and is 0 after EOS."""
    from lmpg.logprobs import completion_logits, selective_log_softmax

    tau = 0.8
    roll = sample_completions(tiny_model, tokenizer, ["1+1=", "123+456="], 3, max_new_tokens=6, temperature=tau,
                              seeds=list(range(6)), with_grad_sq_norm=True)
    w = roll.grad_sq_norm
    m = roll.completion_mask
    with torch.no_grad():
        z = completion_logits(tiny_model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, m)
    z = z.double().requires_grad_(True)  # (B, T, V)
    logp = selective_log_softmax(z, roll.completion_ids, tau)
    (grad,) = torch.autograd.grad(logp[m].sum(), z)  # each token's logp depends on its own z_t only
    torch.testing.assert_close(w[m].double(), (grad ** 2).sum(-1)[m], atol=1e-5, rtol=1e-5)
    pi = torch.softmax(z.detach() / tau, -1)
    by_hand = (1 - 2 * pi.gather(-1, roll.completion_ids.unsqueeze(-1)).squeeze(-1) + (pi ** 2).sum(-1)) / tau ** 2
    torch.testing.assert_close(w[m].double(), by_hand[m], atol=1e-5, rtol=1e-5)
    assert torch.all(w[~m] == 0) and bool((w[m] > 0).all())
    plain = sample_completions(tiny_model, tokenizer, ["1+1=", "123+456="], 3, max_new_tokens=6, temperature=tau,
                               seeds=list(range(6)))
    assert torch.equal(plain.completion_ids, roll.completion_ids) and plain.grad_sq_norm is None


# ------------------------------------------------------------------------------------ empty prompt
def test_an_empty_prompt_starts_from_bos(tiny_model, tokenizer):
    """"" samples what the prompt holding only BOS samples (lmpg.tiny's tokenizer inserts no BOS itself)."""
    assert tokenizer("")["input_ids"] == [] and tokenizer.bos_token_id is not None
    roll = sample_completions(tiny_model, tokenizer, ["", "12+34="], 2, max_new_tokens=6, seeds=[1, 2, 3, 4])
    assert roll.prompt_ids[0][roll.prompt_mask[0]].tolist() == [tokenizer.bos_token_id]
    from_bos = sample_completions(tiny_model, tokenizer, [tokenizer.bos_token], 2, max_new_tokens=6, seeds=[1, 2])
    assert torch.equal(roll.completion_ids[:2, :from_bos.completion_ids.shape[1]], from_bos.completion_ids)
    assert roll.completions[:2] == from_bos.completions and bool(roll.completion_mask[:2].any())


def test_an_empty_prompt_without_bos_is_refused_in_one_line(tiny_model, tokenizer):
    from lmpg.errors import ConfigError

    tokenizer.bos_token = None
    assert tokenizer.bos_token_id is None
    with pytest.raises(ConfigError, match=r"prompt 1 of the batch \(''\) encodes to no tokens and the tokenizer "
                                          "has no BOS token") as err:
        sample_completions(tiny_model, tokenizer, ["1+1=", ""], 2, max_new_tokens=4, seeds=[1, 2, 3, 4])
    assert "\n" not in str(err.value)


def test_the_sampler_refuses_a_row_with_no_prompt_token(tiny_model):
    from lmpg.sampler import sample_tokens

    ids = torch.tensor([[0, 0], [5, 6]])
    mask = torch.tensor([[False, False], [True, True]])
    with pytest.raises(ValueError, match="every row needs at least one prompt token"):
        sample_tokens(tiny_model, ids, mask, [1, 2], max_new_tokens=3, eos_ids=[1], pad_id=0)
