"""DAPO's dynamic sampling (lmpg.dynamic_sampling): the choice worked by hand, a batch filled with
groups with spread only through the trainer's own steps (lmpg's sampler, an engine, episodes), the
bound and what trains when it is hit, a bitwise resume after SIGKILL, and 1 process = 2 processes."""

import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmpg
from conftest import small_config
from dynamic_sampling_worker import a_unless_one
from lmpg import PGConfig, PGTrainer
from lmpg.batch import TrajectoryBatch
from lmpg.data import PromptOrder
from lmpg.dynamic_sampling import choose_groups, concat_batches, group_spread, select_rows, trim_padding
from lmpg.errors import ConfigError
from lmpg.generation import SampledTurn
from lmpg.metrics import read_jsonl
from sigkill import sigkill_after_checkpoint

WORKER = Path(__file__).with_name("dynamic_sampling_worker.py")
# the workers import the lmpg under test (this checkout's), whatever the environment has installed
WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1",
              "PYTHONPATH": os.pathsep.join([str(WORKER.parent), str(Path(lmpg.__file__).parents[1])])}
DOCS = Path(__file__).parents[1] / "docs"


def _batch(rewards, scored, lengths=None, width=3):
    """A scored batch of single-turn rows with one reward each, on the last of `lengths` tokens."""
    B = len(rewards)
    lengths = lengths or [width] * B
    mask = torch.tensor([[t < n for t in range(width)] for n in lengths])
    token_rewards = torch.zeros(B, width)
    for i, (r, n) in enumerate(zip(rewards, lengths)):
        token_rewards[i, n - 1] = r
    return TrajectoryBatch(prompt_ids=torch.ones(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.bool),
                           completion_ids=torch.where(mask, 5, 0), completion_mask=mask, action_mask=mask.clone(),
                           truncated=torch.zeros(B, dtype=torch.bool), group=torch.arange(B) // 2,
                           policy_version=torch.zeros(B, dtype=torch.long), completions=[str(i) for i in range(B)],
                           token_rewards=token_rewards, scored=torch.tensor(scored))


def test_spread_needs_two_scored_samples_whose_returns_differ():
    batch = _batch([1.0, 0.0, 0.5, 0.5, 1.0, 0.0, 0.2, 0.3], [True, True, True, True, True, False, False, False])
    assert group_spread(batch, group_size=2, gamma=1.0).tolist() == [True, False, False, False]
    # the same reward at different lengths: the discounted returns differ, so the baseline does not cancel them
    late = _batch([1.0, 1.0], [True, True], lengths=[1, 3])
    assert group_spread(late, group_size=2, gamma=1.0).tolist() == [False]
    assert group_spread(late, group_size=2, gamma=0.9).tolist() == [True]


def test_choice_keeps_the_first_spread_groups_in_sampling_order_then_completes_with_flat_ones():
    spread = torch.tensor([False, True, False, True, True, False])
    assert choose_groups(spread, 2) == ([1, 3], 0)
    assert choose_groups(spread, 3) == ([1, 3, 4], 0)
    assert choose_groups(spread, 5) == ([0, 1, 2, 3, 4], 2)  # 3 with spread, then the first 2 without
    assert choose_groups(torch.zeros(4, dtype=torch.bool), 2) == ([0, 1], 2)


def test_rows_of_several_rounds_join_pad_and_trim_as_one_sample():
    one, two = _batch([1.0, 0.0], [True, True], lengths=[1, 2], width=2), _batch([1.0, 0.0], [True, True], width=3)
    two.prompt_ids, two.prompt_mask = torch.tensor([[0, 7, 7], [7, 7, 7]]), torch.tensor([[False, True, True]] + [[True] * 3])
    joined = concat_batches([one, two], pad_id=9)
    assert joined.completion_ids.tolist()[:2] == [[5, 0, 9], [5, 5, 9]] and joined.completions == ["0", "1", "0", "1"]
    assert joined.prompt_ids.tolist()[:2] == [[9, 1, 1], [9, 1, 1]]  # prompts padded on the left
    assert joined.completion_mask.sum(1).tolist() == [1, 2, 3, 3]
    kept = trim_padding(select_rows(joined, [1, 0]))  # neither row uses the third token or the first prompt column
    assert kept.completion_ids.tolist() == [[5, 5], [5, 0]] and kept.prompt_ids.tolist() == [[1, 1], [1, 1]]
    assert kept.token_rewards.tolist() == [[0.0, 0.0], [1.0, 0.0]] and kept.completions == ["1", "0"]
    alone = trim_padding(select_rows(joined, [2]))
    assert alone.prompt_ids.tolist() == [[7, 7]] and alone.completion_ids.shape == (1, 3)


@pytest.mark.parametrize("overrides,message", [
    (dict(group_size=1, batch_size=4, baseline="batch_mean"), "group_size >= 2"),
    (dict(baseline="batch_mean"), "group baseline"),
    (dict(baseline="none"), "group baseline"),
    (dict(dynamic_sampling_max_extra_rounds=-1), "must be >= 0"),
    (dict(dynamic_sampling_round_prompts=0), r"must be in \[1, 8\]"),
    (dict(dynamic_sampling_round_prompts=9), r"must be in \[1, 8\]"),
])
def test_refused_where_it_means_nothing(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        PGConfig(**{"dynamic_sampling": True, **overrides})
    assert "\n" not in str(error.value)


def test_extra_rounds_split_over_the_processes():
    config = PGConfig(dynamic_sampling=True, dynamic_sampling_round_prompts=3)
    config.check_processes(3)
    with pytest.raises(ConfigError, match="dynamic_sampling_round_prompts=3 does not split over 2 processes"):
        config.check_processes(2)


def _samples(run_dir):
    return read_jsonl(Path(run_dir) / "samples.jsonl")


def _groups(records, group_size):
    return [records[i:i + group_size] for i in range(0, len(records), group_size)]


def test_batch_is_filled_with_spread_groups_through_the_trainers_own_steps(tmp_path, tiny_model, tokenizer,
                                                                           prompts_dataset):
    """Prompts starting with 1 never have spread; every trained group has, the first ones are the
    plain run's spread groups (round 0 is the usual batch), and the extra rounds (of one prompt each)
    take the next prompts of the seeded order at positions after the earlier rounds'."""
    common = dict(iterations=2, sample_groups_per_iteration=None, seed=2)
    plain = PGTrainer(tiny_model, [a_unless_one], prompts_dataset, small_config(tmp_path / "plain", **common),
                      tokenizer=tokenizer)
    plain.train()
    config = small_config(tmp_path, dynamic_sampling=True, dynamic_sampling_max_extra_rounds=8,
                          dynamic_sampling_round_prompts=1, **common)
    from lmpg.tiny import make_tiny_causal_lm

    trainer = PGTrainer(make_tiny_causal_lm(tokenizer, n_layer=1, n_embd=32, n_head=2, seed=0), [a_unless_one],
                        prompts_dataset, config, tokenizer=tokenizer)
    calls, sample = [], trainer.sample
    trainer.sample = lambda prompts: calls.append((trainer.iteration, prompts.positions, prompts.prompts)) or sample(prompts)
    metrics = trainer.train()
    N, G = config.prompts_per_iteration, config.group_size
    for m in metrics:
        rounds = m["dynamic_sampling/extra_rounds"] + 1
        assert m["dynamic_sampling/short_groups"] == m["dynamic_sampling/bound_hit"] == 0
        assert m["dynamic_sampling/sampled_prompts"] == N + (rounds - 1)
        assert m["dynamic_sampling/dropped_groups"] == rounds - 1
        assert m["zero_spread_group_frac"] == 0.0 and m["adv_zero_frac"] < 1.0
    assert sum(m["dynamic_sampling/extra_rounds"] for m in metrics) >= 2  # the reward made it sample more
    records = _samples(tmp_path / "run")
    assert len(records) == len(metrics) * N * G
    for group in _groups(records, G):
        assert len({r["reward"] for r in group}) > 1 and not group[0]["prompt"].startswith("1")
        assert len({r["completion"] for r in group}) > 1
    # an iteration's rounds: positions after the earlier rounds', the prompts next in the seeded order
    order = PromptOrder(len(prompts_dataset), config.seed)
    for it in range(len(metrics)):
        rounds = [(pos, prompts) for i, pos, prompts in calls if i == it]
        assert len(rounds) == metrics[it]["dynamic_sampling/extra_rounds"] + 1
        assert [pos for positions, _ in rounds for pos in positions] == list(range(N + len(rounds) - 1))
        assert [p for _, prompts in rounds for p in prompts] == \
               [prompts_dataset[i]["prompt"] for i in order.next_indices(N + len(rounds) - 1)]
    # round 0 is the plain run's first batch: its spread groups come first, sample for sample
    first_plain = [g for g in _groups(_samples(tmp_path / "plain" / "run")[:N * G], G) if len({r["reward"] for r in g}) > 1]
    first = _groups(records[:N * G], G)
    assert first_plain, "the plain run's first batch has a group with spread"
    for a, b in zip(first_plain, first):
        assert [(r["prompt"], r["completion"], r["reward"]) for r in a] == [(r["prompt"], r["completion"], r["reward"]) for r in b]
    documented = (DOCS / "diagnostics.md").read_text()
    assert [k for k in metrics[0] if k.startswith("dynamic_sampling/") and f"`{k}`" not in documented] == []


def test_at_the_bound_it_trains_on_what_there_is_and_says_so(tmp_path, tiny_model, tokenizer, prompts_dataset, caplog):
    """No extra round allowed: the batch is the plain run's, every flat group counted as short, and
    the update is the plain run's bit for bit (flat groups have A = 0 either way)."""
    plain_model = type(tiny_model)(tiny_model.config)
    plain_model.load_state_dict(tiny_model.state_dict())
    plain = PGTrainer(plain_model, [a_unless_one], prompts_dataset, small_config(tmp_path / "plain"),
                      tokenizer=tokenizer).train()
    config = small_config(tmp_path, dynamic_sampling=True, dynamic_sampling_max_extra_rounds=0)
    with caplog.at_level(logging.WARNING, logger="lmpg"):
        metrics = PGTrainer(tiny_model, [a_unless_one], prompts_dataset, config, tokenizer=tokenizer).train()
    N = config.prompts_per_iteration
    for m, p in zip(metrics, plain):
        short = round(p["zero_spread_group_frac"] * N)
        assert m["dynamic_sampling/short_groups"] == short and m["dynamic_sampling/bound_hit"] == int(short > 0)
        assert m["dynamic_sampling/extra_rounds"] == 0 and m["dynamic_sampling/sampled_prompts"] == N
        assert {k: v for k, v in m.items() if not k.startswith("dynamic_sampling/")} == p
    assert any(m["dynamic_sampling/bound_hit"] for m in metrics), "a prompt starting with 1 was drawn"
    warnings = [r.getMessage() for r in caplog.records if "groups have reward spread" in r.getMessage()]
    assert len(warnings) == 1 and "after 0 extra rounds" in warnings[0]  # the first time, then every 10th


def test_a_reward_without_spread_stops_at_the_bound(tmp_path, tiny_model, tokenizer, prompts_dataset):
    def constant(completions, **kwargs):
        return [1.0] * len(completions)

    config = small_config(tmp_path, iterations=1, dynamic_sampling=True, dynamic_sampling_max_extra_rounds=2)
    m, = PGTrainer(tiny_model, [constant], prompts_dataset, config, tokenizer=tokenizer).train()
    N = config.prompts_per_iteration
    assert (m["dynamic_sampling/extra_rounds"], m["dynamic_sampling/sampled_prompts"], m["dynamic_sampling/short_groups"],
            m["dynamic_sampling/bound_hit"], m["dynamic_sampling/spread_frac"]) == (2, 3 * N, N, 1, 0.0)
    assert m["optimizer_steps"] == 1 and m["dynamic_sampling/sampled_reward_mean"] == 1.0


class SeededEngine:
    """A stand-in inference engine (`lmpg.generation.TurnSampler`): each row draws uniform tokens
    from its own seeded stream, ending with EOS; it records the seeds it was started with."""

    def __init__(self, vocab: list[int], eos: int):
        self.vocab, self.eos, self.starts = vocab, eos, []

    def start(self, seeds):
        self.starts.append(list(seeds))
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def sample(self, rows, histories, max_new_tokens):
        turns = []
        for row, budget in zip(rows, max_new_tokens):
            g = self.generators[row]
            n = int(torch.randint(1, budget + 1, (1,), generator=g))
            ids = [self.vocab[int(i)] for i in torch.randint(len(self.vocab), (n - 1,), generator=g)] + [self.eos]
            turns.append(SampledTurn(ids, [-math.log(len(self.vocab))] * n))
        return turns

    def finish(self):
        pass

    def sync_weights(self, policy):
        pass


def test_an_engine_sampler_gets_seeds_unique_over_the_rounds(tmp_path, tiny_model, tokenizer, prompts_dataset):
    config = small_config(tmp_path, iterations=2, batch_size=16, dynamic_sampling=True,
                          dynamic_sampling_max_extra_rounds=4, sample_groups_per_iteration=None)
    trainer = PGTrainer(tiny_model, [a_unless_one], prompts_dataset, config, tokenizer=tokenizer)
    trainer.turn_sampler = engine = SeededEngine(tokenizer.convert_tokens_to_ids(list("ab ")), tokenizer.eos_token_id)
    metrics = trainer.train()
    assert len(engine.starts) == sum(m["dynamic_sampling/extra_rounds"] + 1 for m in metrics) > 2
    seeds = [s for start in engine.starts for s in start]
    assert len(set(seeds)) == len(seeds)
    for group in _groups(_samples(tmp_path / "run"), config.group_size):
        assert len({r["reward"] for r in group}) > 1 and set("".join(r["completion"] for r in group)) <= set("ab ")


def test_episodes_fill_the_batch_with_spread_groups(tmp_path):
    """Episodes sample each round through the trainer's EpisodeSampler (the worker's one-turn game)."""
    from dynamic_sampling_worker import run

    run(str(tmp_path / "run"), "never", 2, "episodes")
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert sum(m["dynamic_sampling/extra_rounds"] for m in metrics) >= 1
    records = _samples(tmp_path / "run")
    for m in metrics:
        groups = _groups([r for r in records if r["iteration"] == m["iteration"]], 4)
        flat = sum(len({r["reward"] for r in g if r["reward"] is not None}) < 2 for g in groups)  # None: unscored
        assert flat == m["dynamic_sampling/short_groups"] == round(m["zero_spread_group_frac"] * len(groups))
        assert all(r["num_turns"] == 1 for r in records)


def _worker(args):
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=WORKER_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    iterations = 6
    reference = _worker([str(tmp_path / "ref"), "never", str(iterations)])
    killed = _worker([str(tmp_path / "killed"), "never", str(iterations)])
    sigkill_after_checkpoint(killed, tmp_path / "killed", 3, timeout=180, min_checkpoints=2)
    resumed = _worker([str(tmp_path / "killed"), "auto", str(iterations)])
    for proc in (reference, resumed):
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    ref_w, res_w = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("ref", "killed"))
    for name in ref_w:
        assert torch.equal(ref_w[name], res_w[name]), name
    for log in ("metrics.jsonl", "samples.jsonl"):
        assert (tmp_path / "ref" / log).read_text() == (tmp_path / "killed" / log).read_text()
    metrics = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    assert len(metrics) == iterations and sum(m["dynamic_sampling/extra_rounds"] for m in metrics) >= 2


def test_two_processes_match_one(tmp_path):
    """Each process samples its share of every round, the choice is global, and the chosen groups
    are gathered where they train: the same samples and metrics as one process, single-turn and
    episodes."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cases = ["single", "episodes"]
    for cmd in ([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER), str(tmp_path / "two"), "never", "2",
                 *cases],
                [sys.executable, str(WORKER), str(tmp_path / "one"), "never", "2", *cases]):
        proc = subprocess.run(cmd, cwd=tmp_path, env=WORKER_ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for case in cases:
        one, two = (read_jsonl(tmp_path / n / case / "metrics.jsonl") for n in ("one", "two"))
        assert len(one) == len(two) == 2
        assert sum(m["dynamic_sampling/extra_rounds"] for m in one) >= 1, case
        for a, b in zip(one, two):
            exact = [k for k in a if k.startswith("dynamic_sampling/")] + ["reward_mean", "completion_len_mean",
                                                                           "zero_spread_group_frac"]
            assert {k: b[k] for k in exact} == {k: a[k] for k in exact}, case
            for key in ("loss", "pg_loss", "grad_norm", "adv_std"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (case, key)
        s1, s2 = (_samples(tmp_path / n / case) for n in ("one", "two"))
        drop = ("advantage",)
        assert [{k: v for k, v in r.items() if k not in drop} for r in s2] == \
               [{k: v for k, v in r.items() if k not in drop} for r in s1], case
        assert [r["advantage"] for r in s2] == pytest.approx([r["advantage"] for r in s1], abs=1e-6)
