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

Calls into the environment's code (`EnvironmentCalls`) run for all live episodes at once, each in a
thread of its own (`async def` methods awaited together on one event loop, as TRL awaits
get_reward), each abandoned past a timeout, and none can stop the run with a traceback: an
exception, a stall or an unusable value becomes the call's `failure`, one line. Resets run one at
a time (the global RNGs they are seeded with are process-wide); a step or tool that draws from the
global RNGs draws in no fixed order across threads, so such an environment keeps runs reproducible
only with one worker (`env_workers: 1`) or a `random.Random` of its own seeded in reset.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import importlib.util
import inspect
import logging
import math
import queue
import random
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lmpg.errors import ConfigError
from lmpg.rewards.executors import in_daemon_thread
from lmpg.rewards.specs import one_line
from lmpg.tools import call_tool, environment_tools, other_format, parse_tool_calls, tool_schemas

logger = logging.getLogger("lmpg")
_GLOBAL_RNG_LOCK = threading.Lock()
"""Held while a reset runs with the process-wide RNGs seeded (`_seeded_global_rngs`)."""


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


class Unusable(ValueError):
    """An environment method returned something lmpg cannot use; the message says what."""


class EpisodeEnv:
    """One episode's environment instance, behind one interface whatever its shape.

    tool_format: how tool calls are written (`lmpg.tools.TOOL_FORMATS`); tool_timeout: seconds a
    tool call may run. `awaiter` runs the coroutine of an `async def` method to its value
    (`EnvironmentCalls.await_coroutine` while a batch runs; by default in an event loop of its own).
    """

    def __init__(self, instance, tool_format: str = "hermes", tool_timeout: float | None = 10.0):
        self.instance = instance
        self.kind = environment_kind(instance)
        self.tool_format = tool_format
        self.tool_timeout = tool_timeout
        self.tools = environment_tools(instance) if self.kind == "tools" else {}
        self.schemas = tool_schemas(self.tools)
        self._schema_by_name = {s["function"]["name"]: s for s in self.schemas}
        self.awaiter: Callable[[Any], Any] = lambda coroutine: in_daemon_thread(asyncio.run, coroutine).result()

    @property
    def name(self) -> str:
        return type(self.instance).__name__

    @property
    def step_name(self) -> str:
        """What `step` runs of the environment's code, for messages: its step(), or its tools."""
        return "step" if self.kind == "step" else "tool calls"

    @property
    def observation_role(self) -> str:
        """The chat role of what the environment writes: tool results, or a user / game message."""
        return "tool" if self.kind == "tools" else "user"

    def _value(self, out):
        """A method's return value, awaited when the method is `async def`."""
        return self.awaiter(out) if inspect.iscoroutine(out) else out

    def reset(self, row: dict, seed: int) -> str | None:
        """Start the episode from a dataset row; returns the first observation (or None)."""
        reset = self.instance.reset
        with _GLOBAL_RNG_LOCK, _seeded_global_rngs(seed):  # one reset at a time: the seeding is process-wide
            if _takes(reset, "options") and _takes(reset, "seed"):  # gymnasium
                out = self._value(reset(seed=seed, options=dict(row)))
            elif _takes(reset, "seed"):
                out = self._value(reset(seed=seed, **row))
            else:
                out = self._value(reset(**row))
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
            out = self._value(self.instance.step(action_text))
            if not isinstance(out, tuple) or len(out) not in (3, 5):
                raise Unusable(f"returned {one_line(repr(out), 80)}, not (observation, reward, done) or gymnasium's "
                               "(observation, reward, terminated, truncated, info)")
            observation, reward = out[0], _reward(out[1], "step")
            done, truncated = bool(out[2]), bool(out[3]) if len(out) == 5 else False
            return TurnResult(None if observation is None else str(observation), reward, done or truncated,
                              "env_truncated" if truncated else "done")
        calls = parse_tool_calls(action_text, self.tool_format, self._schema_by_name)
        if not calls:  # TRL's rule: a turn without a tool call is the final answer
            other = other_format(action_text, self.tool_format, self._schema_by_name)
            if other is not None:
                _warn_other_format(self.tool_format, other, one_line(action_text, 80))
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
        As in TRL, get_reward may be async (an LLM judge)."""
        get_reward = getattr(self.instance, "get_reward", None)
        if not callable(get_reward):
            return None
        return _reward(self._value(get_reward()), "get_reward")

    def close(self) -> None:
        close = getattr(self.instance, "close", None)
        if callable(close):
            close()


def _reward(value, method: str) -> float | None:
    """An environment's reward as a float: None stays None (no reward), and so does NaN (as TRL
    reads it); a bool counts as 1.0 / 0.0; anything else not a finite number is Unusable."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise Unusable(f"returned reward {one_line(repr(value), 60)} ({type(value).__name__}), not a number")
    number = float(value)
    if math.isnan(number):
        return None
    if math.isinf(number):
        raise Unusable(f"returned reward {number}, not a finite number")
    return number


_WARNED_FORMATS: set = set()
"""(tool_format, other format) pairs already warned about: the warning is once per process, as
transformers' `logger.warning_once`."""


def _warn_other_format(tool_format: str, other: str, example: str) -> None:
    """Once: the policy writes calls that the configured format does not parse, so no tool runs and
    every such turn ends its episode."""
    if (tool_format, other) in _WARNED_FORMATS:
        return
    _WARNED_FORMATS.add((tool_format, other))
    logger.warning("turns look like tool calls in the %s format (e.g. %r) but tool_format=%s finds none in them, so "
                   "no tool runs and each such turn ends its episode; set tool_format: %s if that is how the model "
                   "calls tools", other, example, tool_format, other)


@dataclass
class EnvCall:
    """What one call into an environment's code gave: its value, or why it has none."""

    value: Any = None
    failure: str | None = None
    """One line, after the method's name: 'raised KeyError: ...', 'returned ...', 'did not return within ...'."""
    timed_out: bool = False


class EnvironmentCalls:
    """Calls into environment code for the live episodes of a batch, run together.

    Each call runs in a daemon thread of its own (at most `workers` at once; None: all at once) and
    is abandoned after `timeout` seconds (None: no limit): Python cannot kill a thread, so a call
    that never returns keeps its thread, but the batch goes on. The coroutines of `async def`
    methods are awaited on one event loop of this object's, all of them together. Any exception
    becomes the call's `failure`; none escapes.
    """

    def __init__(self, timeout: float | None, workers: int | None = None):
        self.timeout, self.workers = timeout, workers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, daemon=True, name="lmpg-env-loop").start()
                self._loop = loop
            return self._loop

    def await_coroutine(self, coroutine):
        """The coroutine's value, awaited on the shared loop (from a worker thread); cancelled at the timeout."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._event_loop())
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError from None

    def run(self, calls: list[Callable[[], Any]]) -> list[EnvCall]:
        """Each call's outcome, in order."""
        outcomes: list[EnvCall | None] = [None] * len(calls)
        waiting, running = deque(range(len(calls))), {}  # running: index -> start time
        finished: queue.Queue = queue.Queue()
        limit = self.workers or max(len(calls), 1)
        while waiting or running:
            while waiting and len(running) < limit:
                i = waiting.popleft()
                running[i] = time.perf_counter()
                in_daemon_thread(calls[i]).add_done_callback(lambda f, i=i: finished.put((i, f)))
            oldest = min(running.values())
            wait = None if self.timeout is None else max(0.0, oldest + self.timeout - time.perf_counter())
            try:
                i, future = finished.get(timeout=wait)
            except queue.Empty:
                now = time.perf_counter()
                for i, began in list(running.items()):
                    if now - began >= self.timeout:
                        outcomes[i] = EnvCall(failure=f"did not return within {self.timeout:g} s (env_timeout)",
                                              timed_out=True)
                        del running[i]
                continue
            if i not in running:  # the late result of an abandoned call
                continue
            del running[i]
            error = future.exception()
            if error is None:
                outcomes[i] = EnvCall(value=future.result())
            elif isinstance(error, TimeoutError):  # an awaited coroutine past the timeout
                outcomes[i] = EnvCall(failure=f"did not return within {self.timeout:g} s (env_timeout)", timed_out=True)
            elif isinstance(error, Unusable):
                outcomes[i] = EnvCall(failure=one_line(error))
            else:
                outcomes[i] = EnvCall(failure=f"raised {type(error).__name__}: {one_line(error)}")
        return outcomes

    def close(self) -> None:
        """Stop the event loop (coroutines still running on it are cancelled)."""
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            def stop():
                for task in asyncio.all_tasks(loop):
                    task.cancel()
                loop.stop()
            loop.call_soon_threadsafe(stop)
