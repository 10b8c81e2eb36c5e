"""Sample records: one JSON object per completion (samples.jsonl) and the console lines showing a few."""

from __future__ import annotations

from lmpg.batch import TrajectoryBatch


def sample_records(batch: TrajectoryBatch, prompts: list, scores, iteration: int) -> list[dict]:
    """One record per row: iteration, prompt, completion, reward (None when unscored), advantage (at
    the first action token), truncated, turns (an episode's messages, multi-turn only), and
    reward/NAME per reward function."""
    records = []
    for i, text in enumerate(batch.completions):
        actions = batch.action_mask[i]
        rec = {"iteration": iteration, "prompt": prompts[batch.prompt_index[i]], "completion": text,
               "reward": float(batch.token_rewards[i].sum()) if bool(batch.scored[i]) else None,
               "advantage": float(batch.adv[i][actions][0]) if bool(actions.any()) else 0.0,
               "truncated": bool(batch.truncated[i])}
        if batch.episodes is not None:  # a multi-turn episode, turn by turn
            rec["turns"] = batch.episodes[i].messages
        for name, values in zip(scores.names, scores.values):
            v = values[i]
            rec[f"reward/{name}"] = float(sum(v)) if isinstance(v, list) else v
        rec.update({k: v[i] for k, v in scores.extras.items() if k not in rec})  # log_extra from reward functions
        records.append(rec)
    return records


def print_samples(records: list[dict], iteration: int, n: int) -> None:
    for rec in records[:n]:
        prompt = rec["prompt"] if isinstance(rec["prompt"], str) else rec["prompt"][-1]["content"]
        print(f"  [sample it {iteration}] {prompt!r} -> {rec['completion']!r} "
              f"reward={rec['reward']} adv={rec['advantage']:.3f}", flush=True)
