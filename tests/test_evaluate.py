"""Evaluation: pass@k against hand-worked values and enumeration, metrics on deterministic rewards,
greedy decoding, seeding, and loading a saved model or a LoRA adapter."""

import itertools
import math

import datasets
import pytest
import torch

from lmpg.errors import ConfigError, LmpgError
from lmpg.evaluate import evaluate, load_policy, pass_at_k, sample_and_score, summarise


# ----------------------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 2, 0.5),          # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (4, 2, 2, 5 / 6),        # 1 - C(2,2)/C(4,2) = 1 - 1/6
    (4, 0, 2, 0.0),
    (4, 3, 2, 1.0),          # n - c < k: every pair holds a correct sample
    (5, 2, 1, 0.4),          # pass@1 = c / n
    (10, 3, 3, 1 - 35 / 120),  # 1 - C(7,3)/C(10,3)
    (1, 1, 1, 1.0),
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(6, 2, 3), (7, 1, 4), (5, 4, 2), (8, 3, 1)])
def test_pass_at_k_is_the_fraction_of_k_subsets_holding_a_correct_sample(n, c, k):
    """The estimator equals, by enumeration, the fraction of k-subsets of the n samples with >= 1 correct."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


# ----------------------------------------------------------------------------------------- summarise
def _rec(reward, length=3, truncated=False, **per_fn):
    return {"reward": reward, "length": length, "truncated": truncated, **per_fn}


def test_summarise_hand_worked():
    # prompt 0: one correct of 4 (pass@2 = 0.5); prompt 1: two correct, one unscored (pass@2 = 5/6)
    records = [_rec(1.0, **{"reward/a": 1.0}), _rec(0.0, **{"reward/a": 0.0}), _rec(0.0, **{"reward/a": 0.0}),
               _rec(0.5, truncated=True, **{"reward/a": 0.5}),
               _rec(1.0, **{"reward/a": 1.0}), _rec(2.0, length=5, **{"reward/a": 2.0}),
               _rec(None, **{"reward/a": None}), _rec(0.0, length=1, **{"reward/a": 0.0})]
    out = summarise(records, n=4, k=2, success_threshold=1.0)
    scored = [1.0, 0.0, 0.0, 0.5, 1.0, 2.0, 0.0]
    mean = sum(scored) / 7
    assert out["prompts"] == 2 and out["samples_per_prompt"] == 4
    assert out["reward_mean"] == pytest.approx(mean)
    assert out["reward_std"] == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in scored) / 7))
    assert out["accuracy"] == pytest.approx(3 / 8)  # the unscored completion counts as incorrect
    assert out["pass@2"] == pytest.approx((0.5 + 5 / 6) / 2)
    assert out["unscored_frac"] == pytest.approx(1 / 8)
    assert out["reward/a"] == pytest.approx(mean)
    assert out["completion_len_mean"] == pytest.approx((3 * 6 + 5 + 1) / 8)
    assert out["truncated_frac"] == pytest.approx(1 / 8)


def test_summarise_rejects_k_above_n():
    with pytest.raises(ConfigError, match="n >= k|1 <= k <= n"):
        summarise([_rec(1.0)] * 4, n=2, k=3)


# ----------------------------------------------------------------------------------------- evaluate
def target_reward(prompts, completions, target, **kwargs):
    """Deterministic: the reward is the row's `target` column, whatever the model wrote."""
    return list(target)


@pytest.fixture
def target_dataset():
    return datasets.Dataset.from_list([{"prompt": "1+1=", "target": 1.0}, {"prompt": "2+2=", "target": 0.0},
                                       {"prompt": "3+3=", "target": 0.5}])


def test_evaluate_metrics_on_a_deterministic_reward(tiny_model, tokenizer, target_dataset):
    out = evaluate(tiny_model, tokenizer, target_dataset, [target_reward], k=2, n=4, max_new_tokens=4,
                   batch_size=2, return_samples=True)  # batch_size 2 does not divide 3 prompts
    assert out["reward_mean"] == pytest.approx(0.5)
    assert out["accuracy"] == pytest.approx(1 / 3)
    assert out["pass@2"] == pytest.approx(1 / 3)
    assert out["reward/target_reward"] == pytest.approx(0.5)
    samples = out["samples"]
    assert [s["prompt_index"] for s in samples] == [0] * 4 + [1] * 4 + [2] * 4
    assert [s["prompt"] for s in samples[::4]] == ["1+1=", "2+2=", "3+3="]
    assert [s["reward"] for s in samples[::4]] == [1.0, 0.0, 0.5]
    lower = evaluate(tiny_model, tokenizer, target_dataset, [target_reward], k=2, n=4, max_new_tokens=4,
                     success_threshold=0.5)
    assert lower["accuracy"] == pytest.approx(2 / 3) and lower["pass@2"] == pytest.approx(2 / 3)


def test_unscored_samples_leave_the_mean_and_count_as_incorrect(tiny_model, tokenizer, target_dataset):
    def none_for_half(prompts, completions, target, **kwargs):
        return [None if t == 0.5 else t for t in target]

    out = evaluate(tiny_model, tokenizer, target_dataset, [none_for_half], k=1, n=2, max_new_tokens=3)
    assert out["reward_mean"] == pytest.approx(0.5)  # mean of 1.0 and 0.0
    assert out["unscored_frac"] == pytest.approx(1 / 3)
    assert out["accuracy"] == pytest.approx(1 / 3)


def test_weights_and_per_function_means(tiny_model, tokenizer, target_dataset):
    def one(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    out = evaluate(tiny_model, tokenizer, target_dataset, [target_reward, one], n=2, max_new_tokens=3,
                   reward_weights=[2.0, -1.0])
    assert out["reward/target_reward"] == pytest.approx(0.5) and out["reward/one"] == pytest.approx(1.0)
    assert out["reward_mean"] == pytest.approx(2.0 * 0.5 - 1.0)


def test_greedy_matches_argmax_generation(tiny_model, tokenizer):
    records = sample_and_score(tiny_model, tokenizer, ["1+1=", "12+3="], n=1, greedy=True, max_new_tokens=6)
    for rec, prompt in zip(records, ["1+1=", "12+3="]):
        ids = tokenizer(prompt, return_tensors="pt")
        out = tiny_model.generate(**ids, do_sample=False, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
        assert rec["completion"] == tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_sampling_is_seeded_batch_independent_and_leaves_the_global_rng_alone(tiny_model, tokenizer):
    prompts = ["1+1=", "12+34=", "5+6="]
    state = torch.get_rng_state()
    a = sample_and_score(tiny_model, tokenizer, prompts, n=4, max_new_tokens=6, seed=3, batch_size=3)
    assert torch.equal(state, torch.get_rng_state())
    b = sample_and_score(tiny_model, tokenizer, prompts, n=4, max_new_tokens=6, seed=3, batch_size=1)
    c = sample_and_score(tiny_model, tokenizer, prompts, n=4, max_new_tokens=6, seed=4, batch_size=3)
    assert [r["completion"] for r in a] == [r["completion"] for r in b]
    assert [r["completion"] for r in a] != [r["completion"] for r in c]
    assert len({r["completion"] for r in a[:4]}) > 1  # the n samples of a prompt differ
    assert all(r["reward"] is None for r in a)  # no reward function: completions only


def test_chat_prompts_give_chat_completions_to_the_reward(tiny_model, tokenizer):
    seen = []

    def is_chat(prompts, completions, **kwargs):
        seen.extend(completions)
        return [1.0 if isinstance(c, list) and c[0]["role"] == "assistant" else 0.0 for c in completions]

    ds = [{"prompt": [{"role": "user", "content": "1+1="}]}]
    out = evaluate(tiny_model, tokenizer, ds, [is_chat], n=2, max_new_tokens=3)
    assert out["accuracy"] == 1.0 and len(seen) == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=3, n=2), "n >= 3"),
    (dict(k=1, n=2, greedy=True), "greedy"),
    (dict(k=0), "k=0"),
])
def test_evaluate_rejects_bad_arguments(tiny_model, tokenizer, target_dataset, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        evaluate(tiny_model, tokenizer, target_dataset, [target_reward], **kwargs)


def test_evaluate_needs_a_reward(tiny_model, tokenizer, target_dataset):
    with pytest.raises(ConfigError, match="no reward function"):
        evaluate(tiny_model, tokenizer, target_dataset, [])


# ----------------------------------------------------------------------------------------- loading
def test_load_policy_full_model_and_lora_adapter(tmp_path, tiny_model, tokenizer):
    from peft import LoraConfig, PeftModel, get_peft_model

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model, tok = load_policy(base_dir, device="cpu")
    ids = torch.tensor([tokenizer("1+1=")["input_ids"]])
    torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits)
    assert tok("1+1=")["input_ids"] == tokenizer("1+1=")["input_ids"]

    base, _ = load_policy(base_dir, device="cpu")  # name_or_path = base_dir, written into the adapter config
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    with torch.no_grad():  # LoRA B starts at 0; make the adapter change the output
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    loaded, _ = load_policy(adapter_dir, device="cpu")
    assert isinstance(loaded, PeftModel)
    expected = peft_model(ids).logits
    torch.testing.assert_close(loaded(ids).logits, expected)
    assert not torch.allclose(expected, tiny_model(ids).logits)


def test_load_policy_missing_path(tmp_path):
    with pytest.raises(LmpgError, match="does not exist"):
        load_policy(tmp_path / "nothing")


def test_evaluate_empty_dataset(tiny_model, tokenizer):
    with pytest.raises(LmpgError, match="dataset is empty"):
        evaluate(tiny_model, tokenizer, datasets.Dataset.from_dict({"prompt": []}), [target_reward])


def test_eval_records_are_the_training_sample_records(tiny_model, tokenizer, target_dataset):
    """`lmpg eval` and training's samples.jsonl write one record (lmpg.samples.completion_records):
    the same keys, eval adding prompt_index; a reward's log_extra columns reach both."""
    def noted(prompts, completions, target, log_extra=None, **kwargs):
        log_extra("note", [f"t={t}" for t in target])
        return list(target)

    out = evaluate(tiny_model, tokenizer, target_dataset, [noted], n=2, max_new_tokens=3, return_samples=True)
    first = out["samples"][0]
    assert list(first) == ["prompt_index", "prompt", "completion", "reward", "length", "truncated",
                           "reward/noted", "note"]
    assert [s["note"] for s in out["samples"]] == ["t=1.0"] * 2 + ["t=0.0"] * 2 + ["t=0.5"] * 2
