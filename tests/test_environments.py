"""Environment adapters and tools: TRL's documented environment runs unchanged; bad calls never crash."""

import asyncio
import logging
import random
import threading
import time

import pytest

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
    assert out.done and out.ended == "env_truncated" and out.reward == 1.0
    f = tmp_path / "envs.py"
    f.write_text("class E:\n    def reset(self, **row):\n        return None\n")
    assert load_environment(f"{f}:E")().reset() is None
    assert load_environment("test_environments:Gym") is Gym


class IncrementFromData:  # TRL 1.16 docs, "Providing an external dataset": the row's columns reach reset
    def reset(self, target, **kwargs) -> None:  # the row's `target` column arrives as a keyword argument
        self.counter = 0
        self.target = target

    def get_reward(self) -> float:
        return float(self.counter == self.target)

    def increment(self, step: int) -> int:  # the docs elide this docstring ("see the full docstring above")
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self.counter += step
        return self.counter


class AsyncJudged(IncrementFromData):
    async def get_reward(self) -> float:  # TRL: get_reward may be async (an LLM judge)
        return float(self.target)


class Recorder:
    """A step-API environment that records the actions it was sent."""

    def reset(self, **row):
        self.actions = []
        return None

    def step(self, action):
        self.actions.append(action)
        return "b", None, len(self.actions) == 2


def trainer_step(tmp_path, environment, data, reward_fns=None, **overrides):
    """One PGTrainer iteration over episodes of `environment` on a tiny model; (trainer, StepResult)."""
    import datasets

    from conftest import small_config
    from lmpg import PGTrainer
    from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm

    tok = make_char_tokenizer("0123456789abcdefghijklmnopqrstuvwxyzI .=+")
    model = make_tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2, seed=0)
    config = small_config(tmp_path, environment=environment, iterations=1, batch_size=8, group_size=2,
                          max_new_tokens=4, max_turns=2, **overrides)
    trainer = PGTrainer(model, reward_fns, datasets.Dataset.from_list(data), config, tokenizer=tok)
    trainer.prepare_run_dir()
    return trainer, trainer.step()


def test_trl_documented_environments_run_unchanged_in_a_trainer(tmp_path):
    """IncrementEnv as TRL's docs write it: the environment self-samples its task, reset's text
    joins the (empty) chat prompt, get_reward scores each episode from the environment's state."""
    chat = [{"role": "user", "content": ""}]  # what TRL 1.16 uses when the environment owns the data
    trainer, result = trainer_step(tmp_path / "self", "test_environments:IncrementEnv", [{"prompt": chat}] * 4)
    batch = result.batch
    for i, ep in enumerate(batch.episodes):
        env = ep.environment
        assert type(env).__name__ == "IncrementEnv" and 1 <= env.target <= 6
        prompt = trainer.tokenizer.decode(batch.prompt_ids[i][batch.prompt_mask[i]])
        assert prompt == f"Increment the counter by {env.target}."  # reset's text is the user message
        assert float(batch.token_rewards[i].sum()) == float(env.counter == env.target)
    assert len({id(ep.environment) for ep in batch.episodes}) == len(batch.episodes)  # one instance per episode
    # the docs' dataset variant: reset(target, **kwargs) gets the row's columns; target 0 is reached at once
    data = [{"prompt": [{"role": "user", "content": f"Increment the counter to {t}."}], "target": t} for t in range(4)]
    _, result = trainer_step(tmp_path / "data", "test_environments:IncrementFromData", data)
    rewards = result.batch.token_rewards.sum(1).tolist()
    targets = [ep.environment.target for ep in result.batch.episodes]
    assert sorted(set(targets)) == [0, 1, 2, 3]
    assert rewards == [float(ep.environment.counter == t) for ep, t in zip(result.batch.episodes, targets)]
    assert rewards.count(1.0) >= 2  # the target-0 group scores without a tool call
    assert result.metrics["reward_mean"] == sum(rewards) / len(rewards)
    # the environment's own reward under its class name, as TRL logs it (rewards/IncrementFromData/mean)
    assert result.metrics["reward/IncrementFromData"] == sum(rewards) / len(rewards)


class NoReward:
    """Tools and no get_reward: nothing would score an episode without reward functions."""

    def reset(self, **row):
        return None

    def noop(self, x: int) -> int:
        """
        Nothing.

        Args:
            x: anything.
        """
        return x


def test_a_run_with_no_reward_source_is_refused_at_start(tmp_path):
    import pytest

    from lmpg.errors import ConfigError

    with pytest.raises(ConfigError, match="nothing rewards the episodes: environment NoReward has no get_reward") as e:
        trainer_step(tmp_path, "test_environments:NoReward", [{"prompt": "ab"}] * 4)
    assert "\n" not in str(e.value)
    _, result = trainer_step(tmp_path / "fns", "test_environments:NoReward", [{"prompt": "ab"}] * 4,
                             [lambda completions, **kw: [1.0] * len(completions)])
    assert result.metrics["reward_mean"] == 1.0 and not any(k.startswith("reward/NoReward") for k in result.metrics)


def test_async_get_reward_is_awaited():
    env = EpisodeEnv(AsyncJudged())
    env.reset({"target": 3}, seed=0)
    assert env.final_reward() == 3.0


def test_reward_functions_get_each_episodes_own_environment(tmp_path):
    """As TRL passes them: `environments`, one instance per completion, in the completions' order."""
    received = []

    def action_chars(completions, environments, **kwargs):
        received.append(list(environments))
        return [float(sum(len(a) for a in env.actions)) for env in environments]

    _, result = trainer_step(tmp_path, "test_environments:Recorder", [{"prompt": "ab"}, {"prompt": "ba"}],
                             [action_chars])
    batch, (environments,) = result.batch, received
    assert len(environments) == len(batch.episodes) == 8
    for env, ep in zip(environments, batch.episodes):
        assert env is ep.environment
        said = [m["content"] for m in ep.messages if m["role"] == "assistant"]
        assert env.actions == said[:len(env.actions)] and len(env.actions) >= len(said) - 1  # its own episode's turns
    values = [float(sum(len(a) for a in env.actions)) for env in environments]
    assert len(set(values)) > 1  # the episodes differ, so a mix-up would show
    assert result.metrics["reward/action_chars"] == sum(values) / len(values)
    assert result.batch.token_rewards.sum(1).tolist() == values


# --- environments that fail or stall --------------------------------------------------------------
class Broken:
    """A step-API game whose code fails where `how` says (a class attribute set per test)."""

    how = None

    def reset(self, **row):
        if Broken.how == "reset":
            raise RuntimeError("reset broke")
        if Broken.how == "column":
            return row["level"]  # the row has no level column
        return None

    def step(self, action):
        if Broken.how == "step":
            raise ZeroDivisionError("division by zero")
        if Broken.how == "reward":
            return "b", "great", False
        if Broken.how == "stall":
            threading.Event().wait()  # never returns
        return "b", 1.0, False

    def get_reward(self):
        if Broken.how == "get_reward":
            raise KeyError("score")
        return 0.0


FAILURES = [("reset", "Broken.reset raised RuntimeError: reset broke"),
            ("column", "Broken.reset raised KeyError: 'level'"),
            ("step", "Broken.step raised ZeroDivisionError: division by zero"),
            ("reward", "Broken.step returned reward 'great' (str), not a number"),
            ("get_reward", "Broken.get_reward raised KeyError: 'score'"),
            ("stall", "Broken.step did not return within 0.5 s (env_timeout)")]


@pytest.mark.parametrize("how, message", FAILURES, ids=[f[0] for f in FAILURES])
def test_failing_environment_code_stops_in_one_line_naming_class_method_and_row(tmp_path, how, message):
    from lmpg.errors import EnvError

    Broken.how = how
    with pytest.raises(EnvError) as error:
        trainer_step(tmp_path, "test_environments:Broken", [{"prompt": "ab"}] * 4, env_timeout=0.5)
    text = str(error.value)
    assert "\n" not in text and message in text and "row {'prompt': 'ab'}" in text, text
    assert "reward_on_error: none" in text


@pytest.mark.parametrize("how, message", FAILURES, ids=[f[0] for f in FAILURES])
def test_failing_environment_code_with_on_error_none_leaves_the_episode_unscored_and_counted(tmp_path, how, message):
    Broken.how = how
    _, result = trainer_step(tmp_path, "test_environments:Broken", [{"prompt": "ab"}] * 4, env_timeout=0.5,
                             reward_on_error="none")
    why = "timeout" if how == "stall" else "error"
    assert result.metrics[f"episodes_ended/{why}"] == 8 and result.metrics["unscored_frac"] == 1.0
    assert all(ep.ended == why and message in ep.error for ep in result.batch.episodes)
    assert not bool(result.batch.scored.any()) and not bool(result.batch.loss_mask.any())


class Gathering:
    """Each episode's step waits until every episode of the batch is in its own step (a barrier):
    run one after another, the first would wait forever (broken at 30 s: an error, not a hang)."""

    barrier = None

    def reset(self, **row):
        return None

    def step(self, action):
        Gathering.barrier.wait(timeout=30)
        return "b", 1.0, True


class AsyncGathering:
    """The same for `async def` step and get_reward: every coroutine must be in flight at once."""

    in_flight = 0

    def reset(self, **row):
        self.turn = 0
        return None

    async def _together(self, n):
        AsyncGathering.in_flight += 1
        await asyncio.wait_for(self._until(n), 30)

    async def _until(self, n):
        while AsyncGathering.in_flight % n:
            await asyncio.sleep(0.01)

    async def step(self, action):
        await self._together(8)
        return "b", 1.0, True

    async def get_reward(self):
        await self._together(8)
        return 2.0


def test_live_episodes_environment_calls_run_together(tmp_path):
    Gathering.barrier = threading.Barrier(8)
    _, result = trainer_step(tmp_path / "threads", "test_environments:Gathering", [{"prompt": "ab"}] * 4)
    stepped = ("done", "max_new_tokens")  # a turn cut at max_new_tokens is stepped too
    assert all(ep.ended in stepped for ep in result.batch.episodes) and result.metrics["reward_mean"] == 1.0
    AsyncGathering.in_flight = 0
    _, result = trainer_step(tmp_path / "async", "test_environments:AsyncGathering", [{"prompt": "ab"}] * 4)
    assert all(ep.ended in stepped for ep in result.batch.episodes) and result.metrics["reward_mean"] == 3.0
    assert result.metrics["reward/AsyncGathering"] == 3.0


def test_calls_in_the_other_tool_format_warn_once(caplog):
    from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm
    from lmpg.episodes import EpisodeLimits, sample_episodes
    from test_episodes import ScriptedSampler

    tok = make_char_tokenizer("increment(1)abc")
    model = make_tiny_causal_lm(tok, n_layer=1, n_embd=16, n_head=2)
    turn = tok.encode("increment(1)", add_special_tokens=False) + [tok.eos_token_id]
    with caplog.at_level(logging.WARNING, logger="lmpg"):
        for _ in range(2):
            batch = sample_episodes(model, tok, ["a", "b"], [{}] * 2, lambda: EpisodeEnv(IncrementEnv(), "hermes"), 2,
                                    seeds=[0, 1, 2, 3], env_seeds=[0, 1], limits=EpisodeLimits(2, 16),
                                    eos_ids=[tok.eos_token_id], turn_sampler=ScriptedSampler([turn, turn]))
    assert all(ep.tool_calls == 0 and ep.ended == "done" for ep in batch.episodes)
    warnings = [r for r in caplog.records if "look like tool calls in the simple format" in r.getMessage()]
    assert len(warnings) == 1 and "tool_format: simple" in warnings[0].getMessage()
