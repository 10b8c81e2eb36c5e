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


def docs_block(marker: str) -> str:
    """The python block of docs/rewards.md that starts with `marker`."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "rewards.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    return next(b for b in blocks if b.startswith(marker))


@pytest.fixture
def judge_server():
    """A judge on 127.0.0.1: score = len(completion) / 10; the first request for each completion
    fails with 503; records how many requests were open at once."""
    import http.server
    import json
    import threading

    state = {"open": 0, "max_open": 0, "seen": set(), "lock": threading.Lock()}

    class Judge(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state["lock"]:
                state["open"] += 1
                state["max_open"] = max(state["max_open"], state["open"])
                first = payload["completion"] not in state["seen"]
                state["seen"].add(payload["completion"])
            time.sleep(0.05)
            body = json.dumps({"score": len(payload["completion"]) / 10}).encode()
            self.send_response(503 if first else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            with state["lock"]:
                state["open"] -= 1

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score", state
    server.shutdown()
    server.server_close()


def test_docs_async_llm_judge_limits_concurrency_and_retries(judge_server, monkeypatch):
    url, state = judge_server
    monkeypatch.setenv("JUDGE_URL", url)
    namespace = {}
    exec(compile(docs_block("# llm_judge.py"), "llm_judge.py", "exec"), namespace)
    namespace["MAX_CONCURRENT"] = 3  # read by the function at call time
    completions = [f"{'x' * i}" for i in range(1, 11)]
    with RewardScorer([namespace["llm_judge"]], timeout=30) as scorer:
        scores = score(scorer, completions)
    assert scores.values == [[i / 10 for i in range(1, 11)]]  # each after one failed attempt
    assert 2 <= state["max_open"] <= 3  # concurrent, never past the limit
