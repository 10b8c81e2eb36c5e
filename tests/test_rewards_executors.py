"""reward_timeout and dead workers: no reward function can hang or kill a run, under any executor."""

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import pytest

from lmpg.errors import RewardError
from lmpg.rewards import RewardScorer


def fine(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def sleep_forever(prompts, completions, **kwargs):
    time.sleep(3600)


def spin_forever(prompts, completions, **kwargs):
    while True:
        pass


def exit_now(prompts, completions, **kwargs):
    os._exit(3)


def allocate_without_bound(prompts, completions, **kwargs):
    hoard = []
    while True:
        hoard.append(bytearray(64 * 2**20))


async def never_answers(prompts, completions, **kwargs):
    await asyncio.sleep(3600)


def score(scorer, completions=("a", "bb", "ccc", "dddd")):
    return scorer.score(["p"] * len(completions), list(completions), [[1] * len(c) for c in completions])


@pytest.mark.parametrize("executor", ["serial", "thread"])
@pytest.mark.parametrize("hang", [sleep_forever, never_answers])
def test_a_hung_call_is_abandoned_at_the_timeout_and_counted(executor, hang):
    with RewardScorer([hang, fine], executor=executor, max_workers=2, timeout=0.3, on_error="none") as scorer:
        scores = score(scorer)
    assert scores.values == [[None] * 4, [1.0, 2.0, 3.0, 4.0]]
    assert scores.error_counts == {hang.__name__: 4, "fine": 0}
    with RewardScorer([hang], executor=executor, timeout=0.3) as scorer:
        with pytest.raises(RewardError, match=f"'{hang.__name__}' raised TimeoutError: no result within"
                                              r" reward_timeout=0.3s"):
            score(scorer)


def test_process_workers_survive_hangs_exits_and_unbounded_allocation():
    fns = [sleep_forever, spin_forever, exit_now, allocate_without_bound, fine]
    with RewardScorer(fns, executor="process", max_workers=2, timeout=0.5, memory_mb=1024,
                      on_error="none") as scorer:
        for _ in range(2):  # the pool is usable again after each
            scores = score(scorer)
            assert scores.values[-1] == [1.0, 2.0, 3.0, 4.0]
            assert scores.error_counts == {"sleep_forever": 4, "spin_forever": 4, "exit_now": 4,
                                           "allocate_without_bound": 4, "fine": 0}
    with RewardScorer([exit_now], executor="process", max_workers=1) as scorer:
        with pytest.raises(RewardError, match=r"'exit_now' raised WorkerDied: its worker process died \(exit code 3\)"):
            score(scorer, ["a"])
    with RewardScorer([allocate_without_bound], executor="process", max_workers=1, memory_mb=1024) as scorer:
        with pytest.raises(RewardError, match="'allocate_without_bound' raised MemoryError"):
            score(scorer, ["a"])


def test_process_executor_from_a_script_without_main_guard_is_one_line(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        from lmpg.rewards import RewardScorer
        from reward_fns import exact_match
        scorer = RewardScorer([exact_match], executor="process", max_workers=1)
        scorer.score(["p"], ["a"], [[1]], columns={"answer": ["a"]})
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lmpg.errors.RewardError: reward_executor: process starts worker processes that"
                           " import train.py"), result.stderr
    assert 'if __name__ == "__main__":' in last
