"""Environment adapters and tools: TRL's documented environment runs unchanged; bad calls never crash."""

import random
import time

from lmpg.environments import EpisodeEnv, load_environment
from lmpg.tools import parse_tool_calls


class IncrementEnv:  # exactly as TRL's GRPOTrainer documentation writes it
    # Reserved methods
    def reset(self, **kwargs) -> str | None:  # required; called at the start of each rollout
        self.counter = 0
        self.target = random.randint(1, 6)  # self-sample the task
        return f"Increment the counter by {self.target}."  # returned string becomes the prompt

    def get_reward(self) -> float:  # optional: the environment scores itself from its own state
        return float(self.counter == self.target)

    # Public methods (exposed as tools)
    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self.counter += step
        return self.counter


class Flaky:
    def reset(self, **row):
        return None

    def boom(self, x: int) -> int:
        """
        Raise.

        Args:
            x: anything.
        """
        raise RuntimeError("tool broke")

    def slow(self, x: int) -> int:
        """
        Sleep.

        Args:
            x: seconds.
        """
        time.sleep(x)
        return x


def test_trl_documented_environment_runs_unchanged():
    env = EpisodeEnv(IncrementEnv(), "hermes")
    assert [s["function"]["name"] for s in env.schemas] == ["increment"]
    first = env.reset({"prompt": "x"}, seed=3)
    assert first == EpisodeEnv(IncrementEnv(), "hermes").reset({}, seed=3)  # seeded: same start
    target = env.instance.target
    out = env.step(f'<tool_call>{{"name": "increment", "arguments": {{"step": {target}}}}}</tool_call>')
    assert (out.observation, out.done, out.tool_calls, out.tool_errors) == (str(target), False, 1, 0)
    final = env.step("Done.")
    assert final.done and env.final_reward() == 1.0


def test_bad_calls_become_error_observations():
    env = EpisodeEnv(Flaky(), "hermes", tool_timeout=0.2)
    env.reset({}, 0)
    for text, expected in [("<tool_call>{not json</tool_call>", "not valid JSON"),
                           ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', "unknown tool"),
                           ('<tool_call>{"name": "boom", "arguments": {"x": 1}}</tool_call>', "tool broke"),
                           ('<tool_call>{"name": "boom", "arguments": {"y": 1}}</tool_call>', "TypeError"),
                           ('<tool_call>{"name": "slow", "arguments": {"x": 5}}</tool_call>', "timed out")]:
        out = env.step(text)
        assert not out.done and out.tool_errors == 1 and expected in out.observation, (text, out)


def test_simple_format():
    schemas = {"increment": EpisodeEnv(IncrementEnv()).schemas[0]}
    assert parse_tool_calls("increment(3)", "simple", schemas)[0].arguments == {"step": 3}
    assert parse_tool_calls("increment(3,4)", "simple", schemas)[0].error.startswith("increment takes 1")
    assert parse_tool_calls("42", "simple", schemas) == []


class Gym:
    def reset(self, seed=None, options=None):
        self.seed = seed
        return f"start {options['level']}", {}

    def step(self, action):
        return "obs", 1.0, False, True, {}


def test_gymnasium_signatures_and_spec_loading(tmp_path):
    env = EpisodeEnv(Gym())
    assert env.reset({"level": 2}, seed=9) == "start 2" and env.instance.seed == 9
    out = env.step("a")
    assert out.done and out.truncated and out.reward == 1.0
    f = tmp_path / "envs.py"
    f.write_text("class E:\n    def reset(self, **row):\n        return None\n")
    assert load_environment(f"{f}:E")().reset() is None
    assert load_environment("test_environments:Gym") is Gym
