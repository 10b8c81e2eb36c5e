"""lmpg.samples: the one sample record that training's samples.jsonl and `lmpg eval` write, and how
many of an iteration's records samples.jsonl keeps."""

import pytest
import torch

from lmpg.batch import TrajectoryBatch
from lmpg.episodes import Episode
from lmpg.rewards.scorer import RewardScores
from lmpg.samples import completion_records, logged_records, print_samples, sample_records

COMMON = ["prompt", "completion", "reward", "length", "truncated"]


def scored_batch(episodes=None):
    """Two prompts x G=2 rows, T=3. Row 2 is unscored; row 3 is truncated (no EOS in 3 tokens)."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    action = mask.clone()
    action[0, 0] = False  # an environment token first: the advantage is read at the first action
    return TrajectoryBatch(
        prompt_ids=torch.zeros(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1, dtype=torch.bool),
        completion_ids=torch.zeros(4, 3, dtype=torch.long), completion_mask=mask, action_mask=action,
        truncated=torch.tensor([False, False, False, True]), group=torch.tensor([0, 0, 1, 1]),
        policy_version=torch.zeros(4, dtype=torch.long), completions=["ab", "a", "bb", "abc"],
        episodes=episodes,
        token_rewards=torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.25, 0.0, 0.5]]),
        scored=torch.tensor([True, True, False, True]),
        adv=torch.tensor([[9.0, 0.5, 0.0], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]))


SCORES = RewardScores(names=["count", "per_token"], values=[[1.0, 0.5, None, 0.75], [[0.0, 2.0], [1.0], None,
                                                                                    [0.5, 0.5, 0.5]]],
                      weights=[1.0, 1.0], extras={"parsed": ["x", "y", "z", "w"], "reward": [7, 7, 7, 7]})


def test_completion_records_hand_worked():
    records = completion_records(scored_batch(), ["1+1=", "2+2="], SCORES, prompt_index=[5, 5, 6, 6])
    assert records[0] == {"prompt_index": 5, "prompt": "1+1=", "completion": "ab", "reward": 1.0, "length": 2,
                          "truncated": False, "reward/count": 1.0, "reward/per_token": 2.0, "parsed": "x"}
    assert [r["prompt"] for r in records] == ["1+1=", "1+1=", "2+2=", "2+2="]
    assert [r["reward"] for r in records] == [1.0, 0.5, None, 0.75]  # unscored: None, not 0
    assert [r["length"] for r in records] == [2, 1, 2, 3]
    assert [r["truncated"] for r in records] == [False, False, False, True]
    assert [r["reward/per_token"] for r in records] == [2.0, 1.0, None, 1.5]  # a per-token list: its sum
    assert all(r["reward"] != 7 for r in records)  # a log_extra column never replaces a key


def test_completion_records_without_scores_or_rewards():
    batch = scored_batch()
    batch.token_rewards = batch.scored = None
    records = completion_records(batch, ["1+1=", "2+2="])
    assert [list(r) for r in records] == [COMMON] * 4
    assert all(r["reward"] is None for r in records)


def test_episode_records_carry_the_turns():
    episodes = [Episode(transcript=[{"role": "assistant", "content": f"t{i}", "reward": 1.0}], turns=1 + i % 2,
                        tool_calls=i, tool_errors=i // 3, first_observation="go", ended="done") for i in range(4)]
    records = completion_records(scored_batch(episodes), ["1+1=", "2+2="], SCORES)
    assert records[3]["turns"] == [{"role": "assistant", "content": "t3", "reward": 1.0}]
    assert (records[3]["reset"], records[3]["ended"], records[3]["error"]) == ("go", "done", None)
    assert [(r["num_turns"], r["tool_calls"], r["tool_errors"]) for r in records] == \
        [(1, 0, 0), (2, 1, 0), (1, 2, 0), (2, 3, 1)]


def test_training_records_are_the_shared_record_with_iteration_and_advantage():
    batch, prompts = scored_batch(), ["1+1=", "2+2="]
    training = sample_records(batch, prompts, SCORES, iteration=3)
    shared = completion_records(batch, prompts, SCORES)
    assert [r["iteration"] for r in training] == [3] * 4
    assert [r["advantage"] for r in training] == [0.5, -0.5, 0.0, 2.0]  # at the first action token
    assert [{k: v for k, v in r.items() if k not in ("iteration", "advantage")} for r in training] == shared


@pytest.mark.parametrize("groups, want", [(None, 12), (0, 0), (1, 3), (2, 6), (4, 12), (9, 12)])
def test_logged_records_keep_whole_groups_from_the_first(groups, want):
    records = [{"row": i} for i in range(12)]  # 4 prompts x G=3 in global order
    kept = logged_records(records, groups, group_size=3)
    assert kept == records[:want]


def test_two_processes_keep_what_one_process_keeps():
    """The records are put in global order before they are cut, so which groups are kept does not
    depend on how the prompts were split: here process 0 holds prompts 0, 1, 4, 5 and process 1
    holds 2, 3, 6, 7 (lmpg.distributed.prompt_positions with minibatches of 4 prompts)."""
    from lmpg.distributed import prompt_positions

    G = 2
    one = [{"row": p * G + j} for p in range(8) for j in range(G)]
    shares = [[{"row": p * G + j} for p in prompt_positions(8, 4, 2, rank) for j in range(G)] for rank in (0, 1)]
    gathered = sorted(shares[0] + shares[1], key=lambda r: r["row"])  # lmpg.distributed.in_global_order
    assert logged_records(gathered, 3, G) == logged_records(one, 3, G) == one[:6]
    assert {r["row"] // G for r in logged_records(gathered, 3, G)} == {0, 1, 2}  # from both processes


def test_print_samples_shows_the_text_of_chat_prompts(capsys):
    records = sample_records(scored_batch(), [[{"role": "user", "content": "1+1="}], "2+2="], SCORES, 1)
    print_samples(records, 1, 3)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "  [sample it 1] '1+1=' -> 'ab' reward=1.0 adv=0.500"
    assert len(lines) == 3 and "'2+2=' -> 'bb' reward=None" in lines[2]
