"""Environments: what answers the policy between the turns of an episode (`lmpg.episodes`).

Two shapes, one per-episode adapter (`EpisodeEnv`):

1. TRL-shaped, as TRL's `GRPOTrainer(environment_factory=...)` takes it: a class with
   `reset(**row) -> str | None` (the first observation, appended to the prompt, or None) whose public
   methods are tools (schemas from their type hints and docstrings, `lmpg.tools`), and optionally
   `get_reward() -> float` (sync or async), scored once the episode ends. After each turn the
   model's tool calls are parsed and run; their results are the observation; a turn without a tool
   call ends the episode.
2. A step API for games and simulated users: `step(action_text)` returning
   `(observation, reward, done)`, or gymnasium's `(observation, reward, terminated, truncated, info)`;
   `reset(**row)` as above, or gymnasium's `reset(seed=None, options=None) -> (observation, info)`
   (the row then comes as `options`). A reward may come with any turn.

One instance per episode, from the factory (a class or any zero-argument callable). Each episode has
a seed; the G episodes of a group share it, so they start from the same state. `reset` receives it
as `seed=` when it takes that argument; otherwise it runs with Python's `random` and numpy's global
RNG seeded from it (and their states restored after), so an environment that draws its task with
`random.randint`, as TRL's documentation writes one, reproduces and resumes exactly too.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmpg.errors import ConfigError
from lmpg.rewards.executors import in_daemon_thread
from lmpg.tools import call_tool, environment_tools, parse_tool_calls, tool_schemas


@dataclass
class TurnResult:
    """What the environment did with one turn of the policy."""

    observation: str | None
    """Text the environment writes before the next turn (None: nothing)."""
    reward: float | None = None
    """Reward for this turn (placed on its last token), or None."""
    done: bool = False
    """The episode ended."""
    ended: str = "done"
    """Why, when done: 'done', 'env_truncated' (gymnasium's truncated) or 'max_turns' (the last
    allowed turn called tools, which are not run)."""
    tool_calls: int = 0
    tool_errors: int = 0
    calls: list | None = None
    """The turn's tool calls as TRL writes them in an assistant message's "tool_calls"."""


def load_environment(spec) -> Callable:
    """The factory a spec names: 'package.module:Class' or 'path/to/file.py:Class' (or a callable)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"environment={spec!r} must be 'package.module:Class' or 'path/file.py:Class'")
    target, _, name = spec.strip().rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"environment '{spec}': file not found: {path}")
        module_name = f"lmpg_env_{path.stem}_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"environment '{spec}': running {path} raised {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"environment '{spec}': cannot import '{target}' ({e}); install it or give a file") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"environment '{spec}': '{target}' has no class or callable '{name}'")
    return factory


def environment_kind(instance) -> str:
    """'step' (a step API) or 'tools' (TRL-shaped); ConfigError for anything without reset."""
    if not callable(getattr(instance, "reset", None)):
        raise ConfigError(f"environment {type(instance).__name__} has no reset method; define "
                          "reset(**row) -> str | None (TRL) or gymnasium's reset(seed=None, options=None)")
    return "step" if callable(getattr(instance, "step", None)) else "tools"


def rewards_itself(instance) -> bool:
    """The environment gives rewards of its own: a step API (a reward with each turn) or get_reward()."""
    return environment_kind(instance) == "step" or callable(getattr(instance, "get_reward", None))


def require_reward_source(spec) -> None:
    """ConfigError (one line) for a run whose only reward source would be an environment that gives
    none: every episode would be unscored and the run would train on nothing (`reward nan`)."""
    instance = load_environment(spec)()
    if not rewards_itself(instance):
        name = type(instance).__name__
        raise ConfigError(f"nothing rewards the episodes: environment {name} has no get_reward() and no step(), and "
                          f"no reward function is given; define {name}.get_reward() or pass reward_fns=[...] "
                          "(rewards: in the config)")


def _takes(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params


class _seeded_global_rngs:
    """Python's `random` and numpy's global RNG seeded for a block, their states restored after."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.py_state = random.getstate()
        random.seed(self.seed)
        try:
            import numpy as np

            self.np_state = np.random.get_state()
            np.random.seed(self.seed % 2**32)
        except ImportError:
            self.np_state = None

    def __exit__(self, *exc):
        random.setstate(self.py_state)
        if self.np_state is not None:
            import numpy as np

            np.random.set_state(self.np_state)
        return False


class EpisodeEnv:
    """One episode's environment instance, behind one interface whatever its shape.

    tool_format: how tool calls are written (`lmpg.tools.TOOL_FORMATS`); tool_timeout: seconds a
    tool call may run.
    """

    def __init__(self, instance, tool_format: str = "hermes", tool_timeout: float | None = 10.0):
        self.instance = instance
        self.kind = environment_kind(instance)
        self.tool_format = tool_format
        self.tool_timeout = tool_timeout
        self.tools = environment_tools(instance) if self.kind == "tools" else {}
        self.schemas = tool_schemas(self.tools)
        self._schema_by_name = {s["function"]["name"]: s for s in self.schemas}

    @property
    def observation_role(self) -> str:
        """The chat role of what the environment writes: tool results, or a user / game message."""
        return "tool" if self.kind == "tools" else "user"

    def reset(self, row: dict, seed: int) -> str | None:
        """Start the episode from a dataset row; returns the first observation (or None)."""
        reset = self.instance.reset
        with _seeded_global_rngs(seed):
            if _takes(reset, "options") and _takes(reset, "seed"):  # gymnasium
                out = reset(seed=seed, options=dict(row))
            elif _takes(reset, "seed"):
                out = reset(seed=seed, **row)
            else:
                out = reset(**row)
        if isinstance(out, tuple):  # gymnasium: (observation, info)
            out = out[0]
        return None if out is None else str(out)

    def step(self, action_text: str, last_turn: bool = False) -> TurnResult:
        """The environment's answer to one turn of the policy (its text, special tokens skipped but
        the call markers kept, `lmpg.tools.decode_turn`).

        last_turn: no turn follows. A step API still steps (its reward counts); the tool calls of a
        TRL-shaped environment are not run, as TRL's `max_tool_calling_iterations` stops after its
        N rounds of calls: the episode ends (`ended` max_turns) when the turn called a tool."""
        if self.kind == "step":
            out = self.instance.step(action_text)
            if not isinstance(out, tuple) or len(out) not in (3, 5):
                raise ConfigError(f"{type(self.instance).__name__}.step must return (observation, reward, done) or "
                                  f"gymnasium's (observation, reward, terminated, truncated, info), got {out!r}")
            observation, reward = out[0], out[1]
            done, truncated = bool(out[2]), bool(out[3]) if len(out) == 5 else False
            return TurnResult(None if observation is None else str(observation),
                              None if reward is None else float(reward), done or truncated,
                              "env_truncated" if truncated else "done")
        calls = parse_tool_calls(action_text, self.tool_format, self._schema_by_name)
        if not calls:  # TRL's rule: a turn without a tool call is the final answer
            return TurnResult(None, None, done=True)
        as_trl = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                  for c in calls if c.error is None]
        if last_turn:
            return TurnResult(None, None, done=True, ended="max_turns", calls=as_trl)
        results = [call_tool(self.tools, call, self.tool_timeout) for call in calls]
        return TurnResult("\n".join(r.content for r in results), None, done=False, tool_calls=len(results),
                          tool_errors=sum(r.error for r in results), calls=as_trl)

    def final_reward(self) -> float | None:
        """get_reward() of an environment that scores itself, once the episode ended; else None.
        As in TRL, get_reward may be async (an LLM judge): it is then run to completion in an event
        loop of its own thread (so that it works under a running loop too, as in a notebook)."""
        get_reward = getattr(self.instance, "get_reward", None)
        if not callable(get_reward):
            return None
        value = get_reward()
        if inspect.iscoroutine(value):
            value = in_daemon_thread(asyncio.run, value).result()
        return None if value is None else float(value)

    def close(self) -> None:
        close = getattr(self.instance, "close", None)
        if callable(close):
            close()
