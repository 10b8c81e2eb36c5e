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


# ---- min_p and repetition_penalty (issue 22): the sampler's log-probs are those of q, the distribution it drew from


@pytest.fixture
def peaked_model(tiny_model):
    """The tiny model with its logits scaled up: at initialisation its next-token distribution is
    nearly flat, where min_p would drop nothing."""
    with torch.no_grad():
        tiny_model.get_output_embeddings().weight.mul_(3.0)
    return tiny_model


def _q_by_hand(logits: torch.Tensor, seen: set[int], *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
               penalty=1.0) -> torch.Tensor:
    """log q over the vocabulary for one state, written out step by step (vLLM's order): penalty on the
    raw logits of every token seen, temperature, min_p, top-k, top-p; float64."""
    z = logits.double().clone()
    for v in seen:
        z[v] = z[v] / penalty if z[v] > 0 else z[v] * penalty
    z = z / temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if min_p:
        p = torch.softmax(z, -1)
        keep &= p >= min_p * p.max()
    if top_k:
        kth = torch.sort(z[keep], descending=True).values[min(top_k, int(keep.sum())) - 1]
        keep &= z >= kth
    if top_p < 1:
        p = torch.softmax(z.masked_fill(~keep, float("-inf")), -1)
        order = torch.argsort(p, descending=True)
        above = 0.0
        for v in order.tolist():
            if above >= top_p:
                keep[v] = False
            above += float(p[v])
    return torch.log_softmax(z.masked_fill(~keep, float("-inf")), -1)


def _logq_by_hand(model, roll, **settings) -> torch.Tensor:
    """(B, T) log q of each sampled token from one plain forward of prompt + completion."""
    out = torch.zeros(roll.completion_ids.shape, dtype=torch.float64)
    for i in range(roll.batch_size):
        prompt = roll.prompt_ids[i][roll.prompt_mask[i]].tolist()
        tokens = roll.completion_ids[i][roll.completion_mask[i]].tolist()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        for t, a in enumerate(tokens):
            out[i, t] = _q_by_hand(logits[t], set(prompt + tokens[:t]), **settings)[a]
    return out


SETTINGS = [dict(min_p=0.2), dict(penalty=1.6), dict(penalty=0.7, temperature=0.8),
            dict(min_p=0.05, penalty=1.3, top_k=5, top_p=0.9, temperature=1.3)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_sampler_logp_is_the_processed_distribution_by_hand(peaked_model, tokenizer, settings):
    """sampler_logp = log q(a_t | s_t), q the penalised, tempered, min_p / top-k / top-p truncated
    distribution written out by hand from a plain forward (prompt tokens penalised too); not the
    tempered policy's log-prob."""
    kwargs = {("repetition_penalty" if k == "penalty" else k): v for k, v in settings.items()}
    roll = sample_completions(peaked_model, tokenizer, ["1+1=", "123+456=", "aab"], 3, max_new_tokens=8,
                              seeds=list(range(9)), **kwargs)
    m = roll.completion_mask
    want = _logq_by_hand(peaked_model, roll, **settings)
    torch.testing.assert_close(roll.sampler_logp[m].double(), want[m], atol=2e-5, rtol=0)
    policy, _ = sequence_logprobs(peaked_model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, m,
                                  temperature=settings.get("temperature", 1.0))
    assert float((roll.sampler_logp[m] - policy[m].detach()).abs().max()) > 1e-3  # q is not pi_old here


def test_no_token_outside_the_min_p_set_is_ever_sampled(peaked_model, tokenizer):
    """Every sampled token has pi >= min_p * max pi at its state (the same seeds without min_p draw
    tokens outside that set, so the check can fail)."""
    prompts, seeds = ["1+1=", "99+", "ab"], list(range(48))

    def outside(roll, min_p):
        bad = 0
        for i in range(roll.batch_size):
            prompt = roll.prompt_ids[i][roll.prompt_mask[i]].tolist()
            tokens = roll.completion_ids[i][roll.completion_mask[i]].tolist()
            with torch.no_grad():
                logits = peaked_model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
            p = torch.softmax(logits.double(), -1)
            bad += sum(int(p[t, a] < min_p * p[t].max()) for t, a in enumerate(tokens))
        return bad

    with_min_p = sample_completions(peaked_model, tokenizer, prompts, 16, max_new_tokens=8, seeds=seeds, min_p=0.3)
    without = sample_completions(peaked_model, tokenizer, prompts, 16, max_new_tokens=8, seeds=seeds)
    assert outside(with_min_p, 0.3) == 0
    assert outside(without, 0.3) > 0


def test_gumbel_max_on_the_processed_logits_draws_from_q():
    """The draw argmax(y + g) with y = sampling_logits(...) is distributed as q = softmax(y)."""
    from lmpg.sampler import sampling_logits

    logits = torch.tensor([[2.0, 1.5, 0.3, -0.5, -1.0, 0.9]])
    seen = torch.tensor([[True, False, False, True, False, True]])
    y = sampling_logits(logits, temperature=0.9, min_p=0.1, repetition_penalty=1.5, seen=seen)[0]
    n = 40_000
    gens = [torch.Generator().manual_seed(row_seed(1, 0, i, 0)) for i in range(n)]
    draws = torch.argmax(y + gumbel_noise(gens, 6, "cpu"), dim=-1)
    freq = torch.bincount(draws, minlength=6).double() / n
    q = torch.softmax(y.double(), -1)
    assert q[4] == 0 and freq[4] == 0  # below min_p after the penalty
    assert torch.all((freq - q).abs() <= 5 * torch.sqrt(q * (1 - q) / n) + 1e-12), (freq, q)


def test_repetition_penalty_is_transformers_own_rule_prompt_tokens_included():
    """lmpg's penalty on the tokens a row holds equals transformers' RepetitionPenaltyLogitsProcessor
    given the whole sequence (prompt and sampled tokens) as input_ids."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from lmpg.sampler import penalise_repetition, seen_tokens

    scores = torch.randn(2, 11, generator=torch.Generator().manual_seed(0))
    scores[0, 3] = 0.0
    rows = [[3, 5, 5, 9], [0, 10]]  # prompt + completion so far, per row
    for penalty in (1.7, 0.6):
        want = torch.cat([RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([r]), scores[i:i + 1].clone())
                          for i, r in enumerate(rows)])
        got = penalise_repetition(scores, seen_tokens(rows, 11, "cpu"), penalty)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert torch.equal(penalise_repetition(scores, seen_tokens(rows, 11, "cpu"), 1.0), scores)


def test_filter_logits_min_p_by_hand():
    z = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    # min_p 0.25: keep p >= 0.125
    assert torch.isinf(filter_logits(z, min_p=0.25)).tolist() == [[False, False, False, True, True]]
    # min_p first, then top-p on what remains: 0.5 / 0.85 = 0.59 >= 0.55, so only the first stays
    assert torch.isinf(filter_logits(z, min_p=0.25, top_p=0.55)).tolist() == [[False, True, True, True, True]]


def test_turn_sampler_logp_is_q_over_the_whole_history(peaked_model, tokenizer):
    """LmpgTurnSampler (episodes) with min_p and a repetition penalty: each turn's log-probs are q's,
    the penalty counting every token of the row's history (its earlier turns and the environment's
    tokens included), with the cache carried across turns."""
    from lmpg.generation import LmpgTurnSampler

    sampler = LmpgTurnSampler(peaked_model, pad_id=tokenizer.pad_token_id, eos_ids=[tokenizer.eos_token_id],
                              min_p=0.05, repetition_penalty=1.8, temperature=0.9)
    histories = [tokenizer("12+3=")["input_ids"], tokenizer("a")["input_ids"]]
    sampler.start([5, 6])
    try:
        for turn in range(2):
            turns = sampler.sample([0, 1], histories, [5, 5])
            for h, t in zip(histories, turns):
                with torch.no_grad():
                    logits = peaked_model(input_ids=torch.tensor([h + t.token_ids])).logits[0, len(h) - 1:-1]
                want = [float(_q_by_hand(logits[k], set(h + t.token_ids[:k]), temperature=0.9, min_p=0.05,
                                         penalty=1.8)[a]) for k, a in enumerate(t.token_ids)]
                assert t.logp == pytest.approx(want, abs=2e-5)
            histories = [h + t.token_ids + tokenizer("b=")["input_ids"] for h, t in zip(histories, turns)]
    finally:
        sampler.finish()


def test_the_engine_sampler_gets_the_configs_sampling_settings(monkeypatch):
    """engine_sampler hands min_p, repetition_penalty and trust_remote_code to the vLLM sampler, which
    passes them to SamplingParams (tests/test_vllm_sampler.py checks what the engine does with them)."""
    import lmpg.vllm_sampler
    from lmpg import PGConfig
    from lmpg.generation import engine_sampler

    got = {}
    monkeypatch.setattr(lmpg.vllm_sampler, "VllmSampler", lambda policy, tokenizer, **kw: got.update(kw) or "engine")
    config = PGConfig(sampler="vllm", min_p=0.05, repetition_penalty=1.3, top_k=7, top_p=0.9, temperature=0.7,
                      trust_remote_code=True)
    assert engine_sampler(config, None, None, [0], max_sequences=4, max_model_len=32, workdir="w") == "engine"
    assert {k: got[k] for k in ("min_p", "repetition_penalty", "top_k", "top_p", "temperature")} == \
        dict(min_p=0.05, repetition_penalty=1.3, top_k=7, top_p=0.9, temperature=0.7)
    assert got["trust_remote_code"] is True
