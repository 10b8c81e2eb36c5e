"""TRL's own reward functions (trl.rewards) run unchanged in lmpg, called as TRL 1.16's GRPOTrainer
calls them, and a reward model named by path in the reward list scores as RewardModelReward does."""

import json
import math

import datasets
import pytest
import torch
# trl is a test dependency (pyproject [test], TRL 1.16): missing, this module fails, never skips
import trl.rewards as trl_rewards

from lmpg import PGConfig, PGTrainer
from lmpg.rewards import RewardScorer
from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm

ALPHABET = "0123456789+=<>/thinkboxed{}\\ "
SEEN = []


def spy(prompts, completions, completion_ids, solution, trainer_state, log_extra, log_metric, **kwargs):
    """Records what a TRL-style function is given; logs a column and a metric as TRL's may."""
    SEEN.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, solution=solution,
                     global_step=trainer_state.global_step, max_steps=trainer_state.max_steps))
    log_extra("spy_len", [len(ids) for ids in completion_ids])
    log_metric("spy_metric", 0.5)
    return [True] * len(completions)  # TRL accepts bools


def digit_reward(completions, **kwargs):
    """The issue's newcomer function: TRL's keyword signature, one positional-looking parameter."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / 8 for t in texts]


def trl_functions(conversational: bool) -> list:
    fns = [trl_rewards.get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0),
           trl_rewards.get_soft_overlong_punishment(max_completion_len=6, soft_punish_cache=3)]
    if conversational:  # TRL's text rewards read completion[0]["content"]: chat completions only
        fns += [trl_rewards.accuracy_reward, trl_rewards.reasoning_accuracy_reward,
                trl_rewards.get_cosine_scaled_reward(max_len=6), trl_rewards.think_format_reward]
    return fns


def call_as_trl(fn, seen, extra, metrics):
    """TRL 1.16 `_calculate_rewards`: every argument a keyword, None -> NaN."""
    output = fn(prompts=seen["prompts"], completions=seen["completions"], completion_ids=seen["completion_ids"],
                solution=seen["solution"], trainer_state=None, log_extra=lambda c, v: extra.setdefault(c, v),
                log_metric=lambda n, v: metrics.setdefault(n, v))
    return [math.nan if r is None else float(r) for r in output]


@pytest.mark.parametrize("conversational", [False, True])
def test_trl_reward_functions_run_unchanged_and_lmpg_logs_what_they_return(tmp_path, conversational):
    SEEN.clear()
    tokenizer = make_char_tokenizer(ALPHABET)
    model = make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0)
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i}="}] if conversational else f"{i}+{i}=",
             "solution": f"${2 * i}$"} for i in range(4)]
    fns = trl_functions(conversational) + [digit_reward, spy]
    config = PGConfig(output_dir=str(tmp_path / "run"), iterations=2, batch_size=8, group_size=4,
                      max_new_tokens=6, learning_rate=1e-3, sample_log_every=0, progress_bar=False)
    trainer = PGTrainer(model, fns, datasets.Dataset.from_list(rows), config, tokenizer=tokenizer)
    trainer.train()
    names = trainer.scorer.names
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["global_step"] for s in SEEN] == [0, 1] and SEEN[0]["max_steps"] == 2
    assert all(isinstance(c, list) == conversational for c in SEEN[0]["completions"])
    assert [m["spy_metric"] for m in metrics] == [0.5, 0.5]
    for iteration, seen in enumerate(SEEN, start=1):
        logged = [s for s in samples if s["iteration"] == iteration]
        assert [s["spy_len"] for s in logged] == [len(ids) for ids in seen["completion_ids"]]
        assert [s["reward/spy"] for s in logged] == [1.0] * 8
        extras = {}
        for fn, name in zip(fns[:-1], names):
            extra = {}
            expected = call_as_trl(fn, seen, extra, {})
            got = [math.nan if s[f"reward/{name}"] is None else s[f"reward/{name}"] for s in logged]
            assert got == pytest.approx(expected, nan_ok=True), name
            extras.update(extra)  # a column two functions log keeps the later one's values
        for column, values in extras.items():  # accuracy_reward's log_extra columns reach samples.jsonl
            assert [s[column] for s in logged] == values
        assert conversational == ("gold_parsed" in extras)


def tiny_reward_model(path):
    import transformers

    tokenizer = make_char_tokenizer("0123456789+= ")
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def test_reward_model_named_by_path_scores_as_the_model_does(tmp_path):
    path = tmp_path / "rm"
    model, tokenizer = tiny_reward_model(path)
    prompts, completions = ["1+1=", "2+2="], ["2", "44 4"]
    with RewardScorer([str(path)]) as scorer:
        scores = scorer.score(prompts, completions, [[5], [8, 8, 3, 8]])
    assert scorer.names == ["rm"]
    with torch.no_grad():
        expected = [float(model(**tokenizer(p + c, return_tensors="pt")).logits[0, 0])
                    for p, c in zip(prompts, completions)]
    assert scores.values[0] == pytest.approx(expected, abs=1e-5)
