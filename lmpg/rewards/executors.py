"""Where reward calls run, each limited to `timeout` seconds (None: no limit).

- serial: one after another in this thread; with a timeout each call runs in a daemon thread that is
  abandoned (left to finish on its own, its result dropped) when it overruns.
- thread: up to max_workers daemon threads at once; an overrunning thread is abandoned and another
  takes its place.
- process: a pool of max_workers processes (forkserver), kept across batches. An overrunning call is
  interrupted inside its worker by SIGALRM (Python code and sleeps stop there); one that ignores the
  signal is killed with its pool at 2·timeout + 60 s. A worker that dies (os._exit, a segfault, the
  OOM killer) is replaced: the calls that shared the pool with it rerun one at a time, so only the
  call that killed it counts as an error. memory_mb caps each worker's data memory (RLIMIT_DATA),
  so an allocation without bound raises MemoryError inside the call instead of taking the machine.
- async: every async function's call awaited concurrently in one event loop on a daemon thread,
  each under asyncio.wait_for(timeout).

Threads cannot be killed: a thread or serial call that never returns keeps its thread (and CPU)
until the process ends; give CPU-bound rewards that may hang to the process executor.
A call that timed out comes back as raised, so it counts as an error of its function.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import contextlib
import functools
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, get_args

from lmpg.choices import RewardExecutor
from lmpg.errors import RewardError
from lmpg.rewards.calling import CallPlan, RewardLog, call_reward_fn
from lmpg.rewards.checks import CallResult
from lmpg.rewards.specs import load_reward_fn, one_line

EXECUTORS = get_args(RewardExecutor)


class RewardTask(NamedTuple):
    """One call of one function on samples [start, stop)."""

    target: Callable | str
    """The function, or its spec string (loaded in the worker, so functions from files work there)."""
    plan: CallPlan
    start: int
    stop: int
    kwargs: dict
    alarm: float | None = None
    """Seconds after which SIGALRM interrupts the call (process workers only)."""


def _timed_out(task: RewardTask, began: float, seconds: float) -> CallResult:
    message = f"no result within reward_timeout={seconds:g}s; the call was abandoned"
    return CallResult(task.start, task.stop, began, time.perf_counter(), True, ("TimeoutError", message), {}, {})


def _failed(task: RewardTask, kind: str, message: str) -> CallResult:
    now = time.perf_counter()
    return CallResult(task.start, task.stop, now, now, True, (kind, message), {}, {})


class _Alarm(TimeoutError):
    pass


def _raise_alarm(signum: int, frame: Any) -> None:
    raise _Alarm("interrupted by SIGALRM")


@contextlib.contextmanager
def _alarm(seconds: float | None):
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _raise_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@functools.lru_cache(maxsize=64)
def _load_in_worker(spec: str) -> Callable:
    return load_reward_fn(spec)


def run_call(task: RewardTask) -> CallResult:
    """Call the task's function, timing it and catching what it raises (what every executor runs)."""
    began, log = time.perf_counter(), RewardLog()
    try:
        fn = _load_in_worker(task.target) if isinstance(task.target, str) else task.target
        with _alarm(task.alarm):
            output, raised = call_reward_fn(fn, task.plan, task.kwargs, log), False
    except _Alarm:
        return _timed_out(task, began, task.alarm)
    except Exception as error:  # MemoryError included: the call failed, the worker lives on
        output, raised = (type(error).__name__, one_line(error)), True
    return CallResult(task.start, task.stop, began, time.perf_counter(), raised, output, log.extras, log.metrics)


def in_daemon_thread(fn: Callable, *args: Any) -> concurrent.futures.Future:
    """Run fn(*args) in a fresh daemon thread (one that never holds up the interpreter's exit)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def target() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # handed to whoever waits on the future
            future.set_exception(error)

    threading.Thread(target=target, daemon=True, name="lmpg-reward").start()
    return future


def run_in_threads(tasks: Sequence[RewardTask], max_workers: int, timeout: float | None) -> list[CallResult]:
    """The tasks' results in order, at most max_workers running at once, each abandoned at timeout."""
    results: list[CallResult | None] = [None] * len(tasks)
    waiting, running = deque(range(len(tasks))), {}  # running: index -> start time
    finished: queue.Queue = queue.Queue()
    while waiting or running:
        while waiting and len(running) < max_workers:
            i = waiting.popleft()
            running[i] = time.perf_counter()
            in_daemon_thread(run_call, tasks[i]).add_done_callback(lambda f, i=i: finished.put((i, f)))
        wait = None if timeout is None else max(0.0, min(running.values()) + timeout - time.perf_counter())
        try:
            i, future = finished.get(timeout=wait)
        except queue.Empty:
            now = time.perf_counter()
            for i, began in list(running.items()):
                if now - began >= timeout:
                    results[i] = _timed_out(tasks[i], began, timeout)
                    del running[i]
            continue
        if i in running:  # else: the late result of an abandoned call
            del running[i]
            results[i] = future.result()
    return results


def run_serial(tasks: Sequence[RewardTask], timeout: float | None) -> list[CallResult]:
    if timeout is None:
        return [run_call(task) for task in tasks]
    return run_in_threads(tasks, 1, timeout)


def run_async(tasks: Sequence[RewardTask], timeout: float | None) -> list[CallResult]:
    """Await the async functions' calls concurrently in one event loop on a daemon thread."""

    async def one(task: RewardTask) -> CallResult:
        began, log = time.perf_counter(), RewardLog()
        try:
            call = call_reward_fn(task.target, task.plan, task.kwargs, log)
            output, raised = await (call if timeout is None else asyncio.wait_for(call, timeout)), False
        except TimeoutError:
            return _timed_out(task, began, timeout)
        except Exception as error:
            output, raised = (type(error).__name__, one_line(error)), True
        return CallResult(task.start, task.stop, began, time.perf_counter(), raised, output, log.extras, log.metrics)

    async def gather() -> list[CallResult]:
        return await asyncio.gather(*(one(task) for task in tasks))

    began = time.perf_counter()
    future = in_daemon_thread(asyncio.run, gather())
    try:  # past the backstop the loop itself is blocked (a coroutine that never awaits)
        return future.result(timeout=None if timeout is None else timeout + 10.0)
    except concurrent.futures.TimeoutError:
        return [_timed_out(task, began, timeout) for task in tasks]


def check_main_guard() -> None:
    """RewardError if the running script has no `if __name__ == "__main__":` guard: the worker
    processes import it, so its top-level code (a training run) would run again in each of them."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not path.endswith(".py") or not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return
    for node in tree.body:
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
            return
    raise RewardError(
        f"reward_executor: process starts worker processes that import {os.path.basename(path)}, so its"
        ' top-level code would run again in each; put it under `if __name__ == "__main__":` (or use'
        " reward_executor: thread)"
    )


def _limit_memory(memory_mb: int | None) -> None:
    if memory_mb is not None:
        import resource

        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


class ProcessRunner:
    """A forkserver process pool that survives its workers (module docstring)."""

    def __init__(self, max_workers: int, memory_mb: int | None = None):
        self.max_workers, self.memory_mb = max_workers, memory_mb
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _get_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            check_main_guard()
            context = multiprocessing.get_context("forkserver")  # fork is unsafe once torch runs threads
            # the server imports lmpg (and torch) once; each worker, a fork of it, starts in milliseconds
            context.set_forkserver_preload(["__main__", __name__])
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.max_workers, mp_context=context, initializer=_limit_memory, initargs=(self.memory_mb,)
            )
        return self._pool

    def _discard_pool(self) -> int | None:
        """Kill the pool's workers (a hung one cannot be stopped otherwise) and drop the pool; the exit
        code of the worker that died on its own, None if none did.

        A forkserver worker's exit code is read off a pipe once, and the pool's manager thread polls its
        workers too: two threads polling at once leave one with EOF, which multiprocessing takes as exit
        code 255. So this thread reads no exit code until the manager thread has ended. A broken pool's
        manager sends its live workers SIGTERM and joins them all, so that is waited for (bounded), and a
        worker it could not end is then killed; a pool that is not broken (a call past the backstop) has
        its workers killed first, and then ends.
        """
        pool, self._pool = self._pool, None
        if pool is None:
            return None
        # no public handles on 3.11; read before shutdown(), which drops them
        processes = list((getattr(pool, "_processes", None) or {}).values())
        manager = getattr(pool, "_executor_manager_thread", None)
        broken = bool(getattr(pool, "_broken", False))
        pool.shutdown(wait=False, cancel_futures=True)
        if broken and manager is not None:
            manager.join(timeout=5.0)
        for process in processes:  # select on the sentinel reads nothing, so it cannot race the manager
            if not multiprocessing.connection.wait([process.sentinel], timeout=0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
        if manager is not None:
            manager.join(timeout=10.0)
        if not broken or (manager is not None and manager.is_alive()):
            return None
        codes = [p.exitcode for p in processes]  # cached by the manager's joins: nothing left to race
        stopped = (-signal.SIGTERM, -signal.SIGKILL)  # what the manager and this method send
        return next((c for c in codes if c is not None and c != 0 and c not in stopped),
                    next((c for c in codes if c in stopped), None))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def run(self, tasks: Sequence[RewardTask], timeout: float | None) -> list[CallResult]:
        """The tasks' results in order. At most max_workers are in flight, so each starts when
        submitted and its backstop deadline counts from then."""
        tasks = [task._replace(alarm=timeout) for task in tasks]
        backstop = None if timeout is None else 2 * timeout + 60.0
        results: list[CallResult | None] = [None] * len(tasks)
        waiting, in_flight = deque(range(len(tasks))), {}  # in_flight: future -> (index, submit time)
        suspects: set[int] = set()  # lost with a dead worker: rerun one at a time, to find the one that kills it
        while waiting or in_flight:
            while waiting and len(in_flight) < (1 if suspects else self.max_workers):
                i = waiting.popleft()
                in_flight[self._get_pool().submit(run_call, tasks[i])] = (i, time.perf_counter())
            wait = None
            if backstop is not None:
                wait = max(0.0, min(t for _, t in in_flight.values()) + backstop - time.perf_counter())
            done, _ = concurrent.futures.wait(in_flight, timeout=wait, return_when="FIRST_COMPLETED")
            lost = []
            for future in done:
                i, _ = in_flight.pop(future)
                suspects.discard(i)
                try:
                    results[i] = future.result()
                except concurrent.futures.process.BrokenProcessPool:
                    lost.append(i)
                except Exception as error:  # e.g. the function's output did not pickle
                    results[i] = _failed(tasks[i], type(error).__name__, one_line(error))
            if lost:  # a worker died: every call still in flight died with the pool
                lost += [i for i, _ in in_flight.values()]
                in_flight.clear()
                code = self._discard_pool()
                suspects.difference_update(lost)
                if len(lost) == 1:
                    how = "" if code is None else f" (exit code {code})"
                    results[lost[0]] = _failed(tasks[lost[0]], "WorkerDied",
                                               f"its worker process died{how} and was replaced")
                else:
                    waiting.extendleft(sorted(lost, reverse=True))
                    suspects.update(lost)
                continue
            if backstop is not None and not done:  # the oldest call ignored SIGALRM
                now = time.perf_counter()
                for future, (i, submitted) in list(in_flight.items()):
                    if now - submitted >= backstop:
                        results[i] = _timed_out(tasks[i], submitted, timeout)
                        del in_flight[future]
                waiting.extendleft(sorted((i for i, _ in in_flight.values()), reverse=True))
                in_flight.clear()
                self._discard_pool()
        return results
