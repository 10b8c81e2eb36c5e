"""Evaluating a policy: mean reward, accuracy and pass@k on a prompt dataset.

For each prompt, n completions are sampled (or one greedy completion) and scored with the reward
functions. A completion is correct when its reward is at least `success_threshold`. With c correct
completions among the n of a prompt, the unbiased estimator of pass@k (Chen et al. 2021,
arXiv 2107.03374, eq. 1) is

    pass@k = E_prompts [ 1 - C(n - c, k) / C(n, k) ]          (n >= k)

the probability that at least one of k completions drawn without replacement from the n is correct.
Drawing n > k samples and using this estimator has lower variance than drawing exactly k.

    policy, tokenizer = load_policy("runs/lmpg/final")
    result = evaluate(policy, tokenizer, "heldout.jsonl", ["exact_match"], k=4, n=8)
    result["pass@4"], result["accuracy"], result["reward_mean"]
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lmpg.data import load_prompt_dataset, render_prompt
from lmpg.errors import ConfigError
from lmpg.modeling import ensure_pad_token, load_model_and_tokenizer
from lmpg.rollout import eos_token_ids, reward_inputs, sample_completions
from lmpg.sampler import row_seed
from lmpg.samples import completion_records


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of n samples, c of them correct, hold a correct one.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), the numerically stable form of Chen et al. 2021
    (fig. 3), equal to the ratio of binomials without forming them.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_policy(path: str | Path, device: str | torch.device | None = None):
    """(model, tokenizer) from a saved model directory, a hub name, or a peft adapter directory.

    A directory holding adapter_config.json is a LoRA adapter (what `lmpg train` saves with
    lora_r > 0): the base model named in it is loaded and the adapter applied
    (`peft.AutoPeftModelForCausalLM`); the tokenizer comes from the same directory.
    """
    from transformers import AutoTokenizer

    spec, path = str(path), Path(str(path)).expanduser()
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        try:
            model = AutoPeftModelForCausalLM.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot load the adapter in {path} or its base model: {first}; check "
                              f"base_model_name_or_path in {path / 'adapter_config.json'}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except OSError as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"cannot load the tokenizer from adapter directory {path}: {first}; "
                              "save the tokenizer next to the adapter") from None
        ensure_pad_token(tokenizer)
    else:
        model, tokenizer = load_model_and_tokenizer(spec)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    return model, tokenizer


def sample_and_score(model, tokenizer, prompts: list, reward_fns=(), n: int = 1, *, columns: dict | None = None,
                     temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64,
                     greedy: bool = False, batch_size: int = 8, max_prompt_length: int = 512,
                     reward_weights: list | None = None, on_error: str = "raise", seed: int = 0,
                     environment=None, tool_format: str = "hermes", max_turns: int = 4,
                     tool_timeout: float = 10.0) -> list[dict]:
    """n completions per prompt, each scored: one record per completion, the n of a prompt contiguous.

    A record (`lmpg.samples.completion_records`, the keys of training's samples.jsonl) holds
    prompt_index, prompt, completion, reward (weighted sum over reward functions, None when no
    function scored it), length (tokens, EOS included), truncated, reward/NAME per function and the
    functions' log_extra columns. `columns` are extra dataset columns (one value per prompt) passed
    to the reward functions as keyword arguments, e.g. `answer`. `greedy` takes the argmax token at every step
    (n must then be 1). Sample j of prompt i draws from its own random stream
    `row_seed(seed, 0, i, j)`: the same completions whatever the batch size, global RNG untouched.
    environment: an environment spec or factory (`lmpg.environments`): each sample is then a
    multi-turn episode (max_new_tokens per turn, at most max_turns turns), scored by the reward
    functions and the environment's own rewards; its record holds `turns` (the messages after the
    prompt), `num_turns`, `tool_calls` and `tool_errors`; a tool call running past tool_timeout
    seconds becomes an error observation.
    """
    from lmpg.rewards import RewardScorer

    if greedy and n != 1:
        raise ConfigError(f"greedy decoding gives one completion per prompt, not n={n}; set n=1 or sample")
    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ConfigError(f"n={n}, batch_size={batch_size} and max_new_tokens={max_new_tokens} must all be >= 1")
    if not greedy and temperature <= 0:
        raise ConfigError(f"temperature={temperature} must be > 0; use greedy decoding for the argmax")
    if environment is not None and max_turns < 1:
        raise ConfigError(f"max_turns={max_turns} must be >= 1 (policy turns per episode)")
    if environment is not None and not tool_timeout > 0:
        raise ConfigError(f"tool_timeout={tool_timeout} must be > 0 (seconds a tool call may run)")
    fns = [reward_fns] if callable(reward_fns) or isinstance(reward_fns, str) else list(reward_fns or [])
    scorer = RewardScorer(fns, reward_weights, on_error=on_error) if fns else None
    if environment is not None:
        return _episode_records(model, tokenizer, prompts, scorer, n, columns or {}, seed, environment, tool_format,
                                max_turns, tool_timeout, dict(temperature=1.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                                                top_k=1 if greedy else 0, max_new_tokens=max_new_tokens,
                                                max_prompt_length=max_prompt_length, batch_size=batch_size))
    columns = columns or {}
    eos_ids = eos_token_ids(tokenizer, model)
    records = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            rendered = [render_prompt(tokenizer, p) for p in batch]
            # one random stream per (prompt, sample): a prompt's samples do not depend on batch_size
            seeds = [row_seed(seed, 0, start + i, j) for i in range(len(batch)) for j in range(n)]
            # top_k=1 keeps only the most likely token: sampling from it is greedy decoding
            rollout = sample_completions(model, tokenizer, [t for t, _ in rendered], n,
                                         max_new_tokens=max_new_tokens, temperature=1.0 if greedy else temperature,
                                         top_p=1.0 if greedy else top_p, top_k=1 if greedy else 0,
                                         max_prompt_length=max_prompt_length, add_special_tokens=rendered[0][1],
                                         eos_ids=eos_ids, seeds=seeds)
            records += _score_rollout(rollout, batch, start, columns, scorer)
    finally:
        if scorer is not None:
            scorer.close()
    return records


def _episode_records(model, tokenizer, prompts, scorer, n, columns, seed, environment, tool_format, max_turns,
                     tool_timeout, gen) -> list[dict]:
    """`sample_and_score` over multi-turn episodes (lmpg.episodes)."""
    from types import SimpleNamespace

    from lmpg.episodes import EpisodeSampler, score_episodes

    config = SimpleNamespace(environment=environment, max_turns=max_turns, max_new_tokens=gen["max_new_tokens"],
                             max_episode_tokens=None, tool_format=tool_format, tool_timeout=tool_timeout, seed=seed,
                             group_size=n, temperature=gen["temperature"], top_k=gen["top_k"], top_p=gen["top_p"],
                             min_p=0.0, repetition_penalty=1.0, chat_template_kwargs={},
                             max_prompt_length=gen["max_prompt_length"], cache_across_turns=True, env_timeout=60.0,
                             env_workers=None, reward_on_error=scorer.on_error if scorer is not None else "raise")
    sampler = EpisodeSampler(config, tokenizer, eos_token_ids(tokenizer, model))
    records = []
    try:
        for start in range(0, len(prompts), gen["batch_size"]):
            batch = prompts[start:start + gen["batch_size"]]
            positions = list(range(start, start + len(batch)))
            rows = [{k: v[p] for k, v in columns.items()} for p in positions]
            seeds = [row_seed(seed, 0, p, j) for p in positions for j in range(n)]
            episodes = sampler.sample(model, batch, rows, positions, 0, seeds, greedy=gen["top_k"] == 1)
            cols = {k: [v[p] for p in positions] for k, v in columns.items()}
            episodes.token_rewards, episodes.scored, scores = score_episodes(scorer, episodes, batch, cols, None, 0)
            records += completion_records(episodes, batch, scores,
                                          prompt_index=[start + p for p in episodes.prompt_index])
    finally:
        if scorer is not None:
            scorer.close()
    return records


def _score_rollout(rollout, batch_prompts, start, columns, scorer) -> list[dict]:
    """One record per completion of a rollout over `batch_prompts` (dataset rows start, start+1, ...)."""
    prompt_index = [start + i for i in rollout.prompt_index]
    scores = None
    if scorer is not None:
        prompts_rep, completions, completion_ids = reward_inputs(rollout, batch_prompts)
        cols = {name: [values[row] for row in prompt_index] for name, values in columns.items()}
        scores = scorer.score(prompts_rep, completions, completion_ids, step=0, columns=cols)
        rollout.token_rewards, rollout.scored = scores.to_token_rewards(rollout.completion_mask.cpu())  # (B, T), (B,)
    return completion_records(rollout, batch_prompts, scores, prompt_index=prompt_index)


def summarise(records: list[dict], n: int, k: int = 1, success_threshold: float = 1.0) -> dict:
    """Aggregate scored records (n consecutive per prompt) into the evaluation metrics.

    reward_mean / reward_std: over scored completions. accuracy: fraction of all completions with
    reward >= success_threshold (an unscored completion counts as incorrect). pass@k: the unbiased
    estimator averaged over prompts. reward/NAME: each function's mean over the completions it scored.
    """
    if not records or len(records) % n:
        raise ValueError(f"{len(records)} records are not a whole number of groups of n={n}")
    if not 1 <= k <= n:
        raise ConfigError(f"pass@k needs 1 <= k <= n; got k={k}, n={n}; raise n (samples per prompt) or lower k")
    rewards = [r["reward"] for r in records]
    scored = [r for r in rewards if r is not None]
    correct = [r is not None and r >= success_threshold for r in rewards]
    n_prompts = len(records) // n
    per_prompt_c = [sum(correct[p * n:(p + 1) * n]) for p in range(n_prompts)]
    mean = sum(scored) / len(scored) if scored else float("nan")
    out = {
        "prompts": n_prompts,
        "samples_per_prompt": n,
        "reward_mean": mean,
        "reward_std": math.sqrt(sum((r - mean) ** 2 for r in scored) / len(scored)) if scored else float("nan"),
        "accuracy": sum(correct) / len(correct),
        f"pass@{k}": sum(pass_at_k(n, c, k) for c in per_prompt_c) / n_prompts,
        "success_threshold": success_threshold,
        "unscored_frac": 1.0 - len(scored) / len(rewards),
        "completion_len_mean": sum(r["length"] for r in records) / len(records),
        "truncated_frac": sum(r["truncated"] for r in records) / len(records),
    }
    if "num_turns" in records[0]:  # episodes
        out["turns_mean"] = sum(r["num_turns"] for r in records) / len(records)
        out["tool_calls_per_episode"] = sum(r["tool_calls"] for r in records) / len(records)
        out["tool_errors_per_episode"] = sum(r["tool_errors"] for r in records) / len(records)
    names = [key for key in records[0] if key.startswith("reward/")]
    for name in names:
        values = [r[name] for r in records if r.get(name) is not None]
        out[name] = sum(values) / len(values) if values else float("nan")
    return out


def evaluate(model, tokenizer, dataset, reward_fns, k: int = 1, n: int | None = None, *,
             temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64, batch_size: int = 8,
             greedy: bool = False, success_threshold: float = 1.0, prompt_column: str = "prompt",
             split: str = "train", max_prompt_length: int = 512, reward_weights: list | None = None,
             on_error: str = "raise", limit: int | None = None, seed: int = 0,
             return_samples: bool = False, environment=None, tool_format: str = "hermes",
             max_turns: int = 4, tool_timeout: float = 10.0) -> dict:
    """Sample n completions per prompt (default n = k), score them, and summarise (see `summarise`).

    dataset: a datasets.Dataset, a list of rows, or a local .jsonl/.json/.csv/.parquet file with a
        prompt column; its other columns (e.g. `answer`) go to the reward functions.
    k: the k of pass@k; n >= k samples per prompt. greedy: one argmax completion per prompt (n = k = 1).
    batch_size: prompts per `generate` call (each call holds batch_size * n sequences).
    limit: evaluate only the first `limit` prompts.
    Returns a dict of floats (plus `samples`, the per-completion records, if return_samples).
    """
    n = k if n is None else n
    if k < 1:
        raise ConfigError(f"k={k} must be >= 1")
    if greedy and (n != 1 or k != 1):
        raise ConfigError(f"greedy decoding gives one completion per prompt, so n={n} and k={k} must be 1; "
                          "drop greedy to estimate pass@k from samples")
    if n < k:
        raise ConfigError(f"n={n} samples per prompt cannot estimate pass@{k}; set n >= {k}")
    fns = [reward_fns] if callable(reward_fns) or isinstance(reward_fns, str) else list(reward_fns or [])
    if not fns and environment is None:
        raise ConfigError("no reward function given; pass at least one (e.g. --reward exact_match)")
    ds = load_prompt_dataset(dataset, split, prompt_column)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    prompts = ds[prompt_column]
    columns = {name: ds[name] for name in ds.column_names if name != prompt_column}
    records = sample_and_score(model, tokenizer, prompts, fns, n, columns=columns, temperature=temperature,
                               top_p=top_p, max_new_tokens=max_new_tokens, greedy=greedy, batch_size=batch_size,
                               max_prompt_length=max_prompt_length, reward_weights=reward_weights,
                               on_error=on_error, seed=seed, environment=environment, tool_format=tool_format,
                               max_turns=max_turns, tool_timeout=tool_timeout)
    out = summarise(records, n, k, success_threshold)
    out.update(k=k, temperature=None if greedy else temperature, greedy=greedy)
    if return_samples:
        out["samples"] = records
    return out
