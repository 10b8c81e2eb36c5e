"""Run untrusted Python code against test cases: the code in a confined process, the tests in another.

    result = run_python_tests("def add(a, b): return a + b", ["assert add(1, 2) == 3"])
    result.passed  # [True]

Two subprocesses per call. The solution process (`_sandbox_child.py`) confines itself, runs the code
and then only answers requests; it never sees the test cases. The judge process
(`_sandbox_judge.py`) runs every test case, with the code's names bound to proxies: calling
`add(1, 2)` there sends the call to the solution process and gets back plain data.

Why the verdict cannot be forged by the code. Everything the code can touch is its own process:
rewriting builtins, modules (sys, json, os) or the harness's functions, walking gc/frames/
sys.modules, signal handlers, atexit, threads, ctypes, writing to any descriptor it has. None of it
reaches the judge, whose interpreter the code never runs in. What arrives from the solution is
treated as a claim and decoded strictly into exact builtin types (`_sandbox_shared.decode`); a value
that is not plain data stays in the solution process as a handle whose proxy equals only itself,
has no ordering or arithmetic, and answers `len`/`bool`/`str` only with values of those exact types.
So an `__eq__` that always says True, an int or str subclass with rigged comparisons, or a float
whose `__sub__` returns 0 never takes part in a comparison: the judge compares the genuine values
(a subclass of a builtin arrives as its base value). The asserts, the expected values and
`AssertionError` are the judge's own; a stdlib module the tests use as `module.attr` (and any name
the code binds by a top-level import) is the judge's import, and the code's names never shadow a
builtin there. The verdicts go from the judge to this process on a pipe the code has no descriptor
for, tagged with a per-run nonce; the code's stdout/stderr are only output. The judge runs as its
own uid when root (JUDGE_UID; the code runs as nobody) or non-dumpable otherwise, so the code cannot
read its memory or signal it; SIGINT is ignored there. A solution process that exits, is killed,
raises SystemExit/KeyboardInterrupt, hangs up or breaks the wire format fails the case it happened
in (even if the test code catches the error) and every later case; a hang runs into the timeout.
The job reaches the judge on its stdin, never on disk.

What still gets through, by design or not yet closed:
- a completion that hard-codes the answers to the inputs it is called with (a lookup table over the
  tests' arguments), or otherwise special-cases the tests: it sees each call's arguments, as any
  function does. Only hidden or randomised tests stop that;
- expected values the tests compute with the code's own objects: a helper the tests call but do
  not define (HumanEval/32 `poly`, /38 `encode_cyclic`, /50 `encode_shift` come from the prompt,
  so the completion defines them), or a name the code bound other than by an import statement. Put
  such helpers in the tests (then the judge defines them itself);
- an `assert f(x)` that only needs truthiness passes with any true value, as it would in-process;
- the tests' files: a test that reads a file the code wrote reads what the code put there.
  Files outside the working directory that uid nobody may read (the dataset, when world-readable)
  are readable through the raw `posix` module, so tests stored there can be looked up;
- sabotage of other completions: solution processes of concurrent runs share uid nobody, so one
  can kill another (whose cases then fail: lower rewards for its group-mates, a higher advantage
  for itself). It cannot reach their judges (another uid) or their memory (non-dumpable);
- without root, the solution process has the trainer's uid: where no user namespace is available
  it may signal or ptrace the trainer (no Yama), which no Python guard stops. Run as root (it drops
  to nobody) or in a container.
What the proxies cannot express fails instead of passing: objects built from test-defined classes
passed to the code, the code's global variables read as values (`assert N == 5`: N is a
proxy), arithmetic or ordering on the code's objects, a namedtuple's field names
(it arrives as a tuple), `isinstance(x, CodeClass)`; arguments are copies, mutations of list, dict,
set and bytearray arguments are copied back after each call.

Confinement of the solution process, what holds a runaway program, and what only slows it down:

- wall clock: the parent kills both process groups (`os.killpg`, SIGKILL) at `timeout_seconds`
  and always once the judge is done; each runs in its own session (`start_new_session=True`);
- CPU, memory, file size, open files: `setrlimit` in the child (CPU and memory in the judge too);
- processes: RLIMIT_NPROC = 0 after dropping root to uid nobody (the kernel exempts root from that
  limit), plus `os.fork`/`subprocess`/`os.exec*` replaced by functions that raise;
- network: a fresh empty network namespace (`unshare(CLONE_NEWNET)`, root or unprivileged user
  namespaces), plus `socket.socket` replaced by a function that raises;
- files: a fresh temporary working directory, deleted afterwards; `open`/`io.open`/`os.open` refuse
  paths that resolve outside it; the environment is emptied (no tokens leak to the code);
- output: stdout and stderr of both are read with a cap (`max_output_bytes`); going over it kills
  the run.

The Python-level guards are defence in depth, not a jail: code can reach the raw `posix`/`_socket`/
`_io` modules or ctypes. The kernel-enforced limits (namespace, rlimits, uid) are what hold then;
`SandboxResult.confinement` reports which were in force (e.g. without root and without
unprivileged user namespaces there is no network namespace). A run can write up to its timeout's
worth of `file_size_bytes` files into its directory. For hostile workloads at scale add a container
or VM around the trainer.

The limits are set by the children themselves rather than in `preexec_fn`, which Python documents as
unsafe in a process with threads (the reward scorer runs rewards in threads).
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from reward_fns._sandbox_shared import NO_PREIMPORT, NOBODY, imported_modules

CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
JUDGE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_judge.py")
_POLL_SECONDS = 0.002


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one sandboxed run (the code plus all of its test cases)."""

    timeout_seconds: float = 5.0
    """Wall-clock time for the whole run; the process group is killed when it is up."""
    cpu_seconds: int | None = None
    """RLIMIT_CPU; None means ceil(timeout_seconds) + 1."""
    memory_bytes: int = 1 << 30
    """RLIMIT_AS, the address space of the process (1 GiB)."""
    file_size_bytes: int = 1 << 20
    """RLIMIT_FSIZE, the largest file the code may write (1 MiB); beyond it writes fail with EFBIG."""
    open_files: int = 64
    """RLIMIT_NOFILE."""
    max_output_bytes: int = 1 << 16
    """stdout + stderr kept; producing more kills the run (its test cases count as reported so far)."""
    site_packages: bool = False
    """Let the code import installed third-party packages (runs python without -S); stdlib only if False."""

    def as_child_limits(self) -> dict:
        cpu = self.cpu_seconds if self.cpu_seconds is not None else math.ceil(self.timeout_seconds) + 1
        return {
            "cpu_seconds": int(cpu),
            "memory_bytes": int(self.memory_bytes),
            "file_size_bytes": int(self.file_size_bytes),
            "open_files": int(self.open_files),
        }


DEFAULT_LIMITS = SandboxLimits()


@dataclass
class SandboxResult:
    """What one sandboxed run produced."""

    passed: list[bool]
    """Per test case, whether it ran without raising. A case not reported (hang, crash) is False."""
    code_error: str | None = None
    """`Type: message` when the code itself raised before the tests (then no case passes)."""
    timed_out: bool = False
    output_exceeded: bool = False
    output: str = ""
    """The first max_output_bytes of stdout and stderr, decoded with replacement."""
    returncode: int | None = None
    """The solution process's exit status (negative: the signal that ended it; it is killed once the
    judge is done, so usually -9)."""
    failures: dict[int, str] = field(default_factory=dict)
    """Per failing test case index, `Type: message` of what it raised."""
    confinement: dict[str, bool] = field(default_factory=dict)
    """Which kernel-level confinements were in force: network (own namespace), nproc (RLIMIT_NPROC
    binds), dropped_root. Empty if the child died before reporting."""

    @property
    def fraction_passed(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


def _python(limits: SandboxLimits, script: str, *args: str) -> list[str]:
    flags = ["-I", "-B", "-u"] if limits.site_packages else ["-I", "-S", "-B", "-u"]
    return [sys.executable, *flags, script, *args]


def _judge_imports(code: str, test_cases: list[str], stdlib_only: bool) -> list[list]:
    """[name, module, attribute or None] for each name the tests use that the judge imports itself
    instead of taking the solution's object: a name the solution binds by a top-level import, and a
    standard-library module the tests use only as `module.attribute` (tests that lean on the
    solution's `import math`). So expected values the tests compute never come from the code."""
    loaded, other_uses = set(), set()  # names the tests read; those read other than as `name.attr`
    for case in test_cases:
        nodes = list(ast.walk(ast.parse(case)))
        bases = {id(node.value) for node in nodes if isinstance(node, ast.Attribute)}
        for node in nodes:
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                loaded.add(node.id)
                if id(node) not in bases:
                    other_uses.add(node.id)
    imports = {}
    try:
        statements = ast.parse(code).body
    except (SyntaxError, ValueError):
        statements = []
    for statement in statements:
        if isinstance(statement, ast.Import):
            for alias in statement.names:
                if alias.asname:
                    imports[alias.asname] = [alias.asname, alias.name, None]
                else:
                    top = alias.name.split(".")[0]
                    imports[top] = [top, top, None]
        elif isinstance(statement, ast.ImportFrom) and statement.module and not statement.level:
            for alias in statement.names:
                if alias.name != "*":
                    name = alias.asname or alias.name
                    imports[name] = [name, statement.module, alias.name]
    for name in loaded:
        if name not in imports and name not in other_uses and name in sys.stdlib_module_names:
            imports[name] = [name, name, None]
    return [
        entry
        for name, entry in sorted(imports.items())
        if name in loaded
        and entry[1].split(".")[0] not in NO_PREIMPORT
        and (not stdlib_only or entry[1].split(".")[0] in sys.stdlib_module_names)
    ]


def _child_environment(workdir: str) -> dict[str, str]:
    # Nothing inherited (no tokens); BLAS libraries single-threaded because RLIMIT_NPROC = 0 also
    # forbids threads, and OpenBLAS aborts the import of numpy when it cannot start its pool.
    single_thread = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", **single_thread}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _exited_unreaped(pid: int) -> bool:
    """Whether the child has exited, without reaping it (so its process group id stays reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _parse_report(report: bytes, nonce: str, n_cases: int) -> SandboxResult:
    """The per-case outcome from the child's report lines (those carrying this run's nonce)."""
    result = SandboxResult(passed=[False] * n_cases)
    for line in report.decode("utf-8", "replace").splitlines():
        head, _, rest = line.partition(" ")
        if head != nonce:
            continue
        kind, _, rest = rest.partition(" ")
        if kind == "confined":
            result.confinement = {k: v == "1" for k, _, v in (item.partition("=") for item in rest.split())}
        elif kind == "code_error":
            result.code_error = rest
        elif kind in ("pass", "fail"):
            index_text, _, reason = rest.partition(" ")
            if index_text.isdigit() and int(index_text) < n_cases:
                result.passed[int(index_text)] = kind == "pass"
                if kind == "fail":
                    result.failures[int(index_text)] = reason
    return result


@dataclass
class CappedBuffer:
    """Bytes kept up to `cap`; whatever arrives beyond it is dropped and marks the buffer `overflowed`."""

    cap: int
    data: bytearray = field(default_factory=bytearray)
    overflowed: bool = False

    def append(self, chunk: bytes) -> None:
        room = max(0, self.cap - len(self.data))
        self.data += chunk[:room]
        self.overflowed = self.overflowed or len(chunk) > room


def _verdict_bytes_cap(n_cases: int) -> int:
    """Room for the `confined` and `code_error` lines and one verdict line per case (the judge cuts each
    reason to 200 characters, so a line stays well under 512 bytes)."""
    return 4096 + 512 * n_cases


@dataclass
class _Pipes:
    """The four pipes of one run. request: judge -> solution; reply: solution -> judge; verdict: judge
    -> this process; output: stdout and stderr of both -> this process."""

    request_read: int
    request_write: int
    reply_read: int
    reply_write: int
    verdict_read: int
    verdict_write: int
    output_read: int
    output_write: int
    child_ends_open: list[int] = field(default_factory=list)

    @classmethod
    def open(cls) -> _Pipes:
        pipes = cls(*os.pipe(), *os.pipe(), *os.pipe(), *os.pipe())
        pipes.child_ends_open = [
            pipes.request_read, pipes.request_write, pipes.reply_read, pipes.reply_write,
            pipes.verdict_write, pipes.output_write,
        ]  # fmt: skip
        return pipes

    def close_child_ends(self) -> None:
        """Once both processes hold their ends, so that a pipe reads as closed when they exit."""
        while self.child_ends_open:
            os.close(self.child_ends_open.pop(0))

    def close(self) -> None:
        self.close_child_ends()
        os.close(self.output_read)
        os.close(self.verdict_read)


def _write_solution_job(workdir: str, code: str, limits: SandboxLimits, pipes: _Pipes) -> str:
    """The solution process's job, in a file of the run's directory that only this uid may read (the
    child reads and deletes it before it drops root); its path."""
    job_path = os.path.join(workdir, "job.json")
    job = {
        "code": code,
        "request_fd": pipes.request_read,
        "reply_fd": pipes.reply_write,
        "limits": limits.as_child_limits(),
        "site_packages": limits.site_packages,
    }
    with open(os.open(job_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as job_file:
        json.dump(job, job_file)
    return job_path


def _open_workdir_to_children(workdir: str) -> None:
    if os.geteuid() == 0:
        os.chown(workdir, NOBODY, NOBODY)  # the solution drops to nobody and works in this directory
        os.chmod(workdir, 0o755)  # the judge (another uid) reads files the solution wrote


def _judge_job(code: str, test_cases: list[str], *, nonce: str, limits: SandboxLimits, pipes: _Pipes) -> dict:
    """The judge's job, sent on its stdin: the test cases, the nonce its verdict lines carry, its pipes
    and the modules it imports itself."""
    return {
        "test_cases": list(test_cases),
        "nonce": nonce,
        "request_fd": pipes.request_write,
        "reply_fd": pipes.reply_read,
        "verdict_fd": pipes.verdict_write,
        "limits": limits.as_child_limits(),
        "site_packages": limits.site_packages,
        "imports": _judge_imports(code, test_cases, stdlib_only=not limits.site_packages),
        "modules": sorted(imported_modules(test_cases)),
    }


def _start_python(
    command: list[str], *, workdir: str, pipes: _Pipes, stdin, pass_fds: tuple
) -> subprocess.Popen:
    """A child in the run's directory, in its own session (so its whole group can be killed), with an
    empty environment and its stdout and stderr on the output pipe."""
    return subprocess.Popen(
        command,
        stdin=stdin,
        pass_fds=pass_fds,
        cwd=workdir,
        env=_child_environment(workdir),
        stdout=pipes.output_write,
        stderr=pipes.output_write,
        start_new_session=True,
    )


def _start_judge(limits: SandboxLimits, workdir: str, pipes: _Pipes) -> subprocess.Popen:
    """The judge, waiting for its job on stdin."""
    judge_ends = (pipes.request_write, pipes.reply_read, pipes.verdict_write)
    command = _python(limits, JUDGE_SCRIPT)
    return _start_python(command, workdir=workdir, pipes=pipes, stdin=subprocess.PIPE, pass_fds=judge_ends)


def _start_solution(limits: SandboxLimits, workdir: str, pipes: _Pipes, job_path: str) -> subprocess.Popen:
    solution_ends = (pipes.request_read, pipes.reply_write)
    command = _python(limits, CHILD_SCRIPT, job_path)
    return _start_python(
        command, workdir=workdir, pipes=pipes, stdin=subprocess.DEVNULL, pass_fds=solution_ends
    )


def _send_judge_job(judge: subprocess.Popen, job: dict) -> None:
    try:
        judge.stdin.write(json.dumps(job).encode())
        judge.stdin.close()
    except OSError:
        pass  # the judge died; no verdicts, every case fails


def _read_until_verdicts(
    pipes: _Pipes, *, output: CappedBuffer, verdicts: CappedBuffer, deadline: float
) -> bool:
    """Read the output and the verdicts until the judge closes the verdict pipe, the output overflows
    or the deadline passes; then keep what was printed so far, without waiting for more. Whether the
    deadline passed."""
    timed_out = False
    with selectors.DefaultSelector() as selector:
        selector.register(pipes.output_read, selectors.EVENT_READ, output)
        selector.register(pipes.verdict_read, selectors.EVENT_READ, verdicts)
        # Done when the judge closes the verdict pipe; the solution may still be running.
        while pipes.verdict_read in selector.get_map() and not output.overflowed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                else:
                    key.data.append(chunk)
        # Keep what the processes printed so far, without waiting for more. Only the output pipe is
        # asked: after the deadline a verdict line arriving would otherwise send the read below to an
        # empty output pipe, to wait for processes that may never write again.
        if pipes.verdict_read in selector.get_map():
            selector.unregister(pipes.verdict_read)
        while pipes.output_read in selector.get_map() and not output.overflowed and selector.select(0):
            chunk = os.read(pipes.output_read, 1 << 16)
            if not chunk:
                break
            output.append(chunk)
    return timed_out


def _exits_by(judge: subprocess.Popen, deadline: float) -> bool:
    """Wait for the judge to exit, without reaping it; False if the deadline passes first."""
    while not _exited_unreaped(judge.pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_SECONDS)
    return True


def _kill_and_reap(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        _kill_group(process.pid)  # before reaping, so the group id cannot have been reused
    for process in processes:
        process.wait()


def run_python_tests(
    code: str, test_cases: list[str], limits: SandboxLimits = DEFAULT_LIMITS
) -> SandboxResult:
    """Run `code` in a confined solution process and each test case in a judge process that calls
    into it (module docstring).

    code: Python source defining what the tests use.  test_cases: Python sources (usually one
    `assert` each), run in order in one namespace; a case passes if it raises nothing and the
    solution process stayed up while it ran. Never raises for anything the code does; the trainer's
    process is only touched through the pipes.
    """
    nonce = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="lmpg-sandbox-")
    pipes = _Pipes.open()
    processes: list[subprocess.Popen] = []
    output = CappedBuffer(limits.max_output_bytes)
    verdicts = CappedBuffer(_verdict_bytes_cap(len(test_cases)))
    timed_out = False
    try:
        # 1. the jobs: the solution's in a file of the run's directory, the judge's for its stdin
        job_path = _write_solution_job(workdir, code, limits, pipes)
        _open_workdir_to_children(workdir)
        judge_job = _judge_job(code, test_cases, nonce=nonce, limits=limits, pipes=pipes)
        # 2. start the judge, then the solution; from here only they hold the pipes' child ends
        processes.append(_start_judge(limits, workdir, pipes))
        processes.append(_start_solution(limits, workdir, pipes, job_path))
        pipes.close_child_ends()
        judge = processes[0]
        _send_judge_job(judge, judge_job)
        # 3. the verdicts and the output, until the judge is done or the time is up
        deadline = time.monotonic() + limits.timeout_seconds
        timed_out = _read_until_verdicts(pipes, output=output, verdicts=verdicts, deadline=deadline)
        if not (timed_out or output.overflowed):
            # The judge closed its pipes: wait for its exit itself (it reports, then exits at once).
            timed_out = not _exits_by(judge, deadline)
    finally:
        # 4. both process groups killed (the solution may still run), the pipes and directory gone
        _kill_and_reap(processes)
        pipes.close()
        shutil.rmtree(workdir, ignore_errors=True)
    result = _parse_report(bytes(verdicts.data), nonce, len(test_cases))
    result.timed_out, result.output_exceeded = timed_out, output.overflowed
    result.output = output.data.decode("utf-8", "replace")
    result.returncode = processes[1].returncode
    return result


@functools.lru_cache(maxsize=1)
def probe_confinement() -> dict[str, bool]:
    """Which kernel-level confinements this machine gives a sandboxed run (see SandboxResult.confinement)."""
    return run_python_tests("", [], SandboxLimits(timeout_seconds=10.0)).confinement
