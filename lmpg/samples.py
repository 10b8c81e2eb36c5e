"""Sample records: one JSON object per completion, the same keys in training's samples.jsonl and in
`lmpg eval`'s samples, and the console lines showing a few.

`completion_records` builds the record both write. Its keys, each with one meaning:

    prompt        the dataset's prompt (a string or chat messages)
    completion    the text after the prompt, decoded from the sampled ids (an episode: the text of
                  the policy's last turn, its final answer; the whole episode is in `turns`)
    reward        sum_t r_t of the row's per-token rewards (the weighted reward functions, plus an
                  environment's own rewards; in training with kl_in=reward, after the KL penalty);
                  None when no function scored it
    length        tokens after the prompt (EOS and an episode's environment tokens included)
    truncated     the completion hit max_new_tokens (an episode: a length or turn limit) unfinished
    reward/NAME   what reward function NAME gave (a per-token list counts as its sum), unweighted;
                  for an episode, the environment's own reward under its class name
    ...           the columns the reward functions gave `log_extra`

A multi-turn episode (`lmpg.episodes`) adds, so that it reads turn by turn:

    reset         the text the environment's reset() returned (appended to the prompt), or None
    turns         every message after the prompt in order: {"role": "assistant", "content": the
                  policy's turn, "reward": the environment's reward for it (get_reward's on the
                  last turn), "tool_calls": ...}, then {"role": "tool" | "user", "content": the
                  observation}, the last observation included even when the policy never read it
    ended         why it ended (`lmpg.episodes.ENDINGS`: done, env_truncated, max_turns,
                  max_new_tokens, max_episode_tokens, error, timeout)
    error         what failed in the environment's code (ended error or timeout), else None
    num_turns, tool_calls, tool_errors     the policy's turns, its tool calls and the failed ones

Training adds `iteration` and `advantage` (A at the row's first action token); `lmpg eval` adds
`prompt_index` (the prompt's row in the evaluated dataset).
"""

from __future__ import annotations

from lmpg.batch import TrajectoryBatch
from lmpg.rewards.types import completion_text


def completion_records(batch: TrajectoryBatch, prompts: list, scores=None, **columns: list) -> list[dict]:
    """One record per row of a scored `batch` (module docstring). `prompts` are the batch's prompts
    (row i's is prompts[batch.prompt_index[i]]); `scores` the reward functions' RewardScores (None:
    no functions); `columns` (name -> one value per row) come first in each record."""
    lengths = batch.completion_mask.sum(1).tolist()
    rewards = batch.token_rewards.sum(1).tolist() if batch.token_rewards is not None else [None] * batch.batch_size
    scored = batch.scored.tolist() if batch.scored is not None else [False] * batch.batch_size
    records = []
    for i, p in enumerate(batch.prompt_index):
        rec = {name: values[i] for name, values in columns.items()}
        rec.update({"prompt": prompts[p], "completion": batch.completions[i],
                    "reward": float(rewards[i]) if scored[i] else None, "length": int(lengths[i]),
                    "truncated": bool(batch.truncated[i])})
        if batch.episodes is not None:  # a multi-turn episode, turn by turn
            ep = batch.episodes[i]
            rec.update({"reset": ep.first_observation, "turns": ep.transcript, "ended": ep.ended, "error": ep.error,
                        "num_turns": ep.turns, "tool_calls": ep.tool_calls, "tool_errors": ep.tool_errors})
        if scores is not None:
            for name, values in zip(scores.names, scores.values):
                v = values[i]
                rec[f"reward/{name}"] = float(sum(v)) if isinstance(v, (list, tuple)) else v
            rec.update({k: v[i] for k, v in scores.extras.items() if k not in rec})  # log_extra columns
        records.append(rec)
    return records


def sample_records(batch: TrajectoryBatch, prompts: list, scores, iteration: int) -> list[dict]:
    """Training's samples.jsonl records: `completion_records` with the iteration and the advantage
    at each row's first action token (0.0 for a row without one)."""
    advantage = [float(adv[actions][0]) if bool(actions.any()) else 0.0
                 for adv, actions in zip(batch.adv, batch.action_mask)]
    return completion_records(batch, prompts, scores, iteration=[iteration] * batch.batch_size, advantage=advantage)


def logged_records(records: list[dict], groups: int | None, group_size: int) -> list[dict]:
    """The records samples.jsonl keeps of one iteration's, given in global order (the G samples of a
    prompt contiguous): the first `groups` prompts' G completions, whole groups; all when None."""
    return records if groups is None else records[:groups * group_size]


def print_samples(records: list[dict], iteration: int, n: int) -> None:
    for rec in records[:n]:
        print(f"  [sample it {iteration}] {completion_text(rec['prompt'])!r} -> {rec['completion']!r} "
              f"reward={rec['reward']} adv={rec['advantage']:.3f}", flush=True)
