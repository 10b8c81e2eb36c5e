"""Run untrusted Python code against test cases in a confined subprocess.

    result = run_python_tests("def add(a, b): return a + b", ["assert add(1, 2) == 3"])
    result.passed  # [True]

One subprocess per call runs the code then every test case (`_sandbox_child.py` does the confining;
its docstring lists the steps). What holds a hostile completion, and what only slows it down:

- wall clock: the parent kills the whole process group (`os.killpg`, SIGKILL) at `timeout_seconds`
  and always once the run ends; the child runs in its own session (`start_new_session=True`);
- CPU, memory, file size, open files: `setrlimit` in the child;
- processes: RLIMIT_NPROC = 0 after dropping root to uid nobody (the kernel exempts root from that
  limit), plus `os.fork`/`subprocess`/`os.exec*` replaced by functions that raise;
- network: a fresh empty network namespace (`unshare(CLONE_NEWNET)`, root or unprivileged user
  namespaces), plus `socket.socket` replaced by a function that raises;
- files: a fresh temporary working directory, deleted afterwards; `open`/`io.open`/`os.open` refuse
  paths that resolve outside it; the environment is emptied (no tokens leak to the code);
- output: stdout and stderr are read with a cap (`max_output_bytes`); going over it kills the run.

The Python-level guards are defence in depth, not a jail: code can reach the raw `posix`/`_socket`/
`_io` modules or ctypes. The kernel-enforced limits (namespace, rlimits, uid) are what hold then;
`SandboxResult.confinement` reports which were in force (e.g. without root and without
unprivileged user namespaces there is no network namespace). Files outside the directory stay
readable through the raw modules when their permissions allow it, and a run can write up to its
timeout's worth of `file_size_bytes` files into its directory. Results travel on their own pipe,
tagged with a per-run random nonce, so printing fake report lines does not count; but the harness
runs in the same interpreter as the code, so a program that inspects the harness's stack frames
could forge passes. This reward suits honest-but-buggy policies; watch for reward hacking, and for
hostile workloads at scale use a container or VM sandbox.

The limits are set by the child itself rather than in `preexec_fn`, which Python documents as unsafe
in a process with threads (the reward scorer runs rewards in threads).
"""

from __future__ import annotations

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

NOBODY = 65534
CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
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
    failures: dict[int, str] = field(default_factory=dict)
    """Per failing test case index, `Type: message` of what it raised."""
    confinement: dict[str, bool] = field(default_factory=dict)
    """Which kernel-level confinements were in force: network (own namespace), nproc (RLIMIT_NPROC
    binds), dropped_root. Empty if the child died before reporting."""

    @property
    def fraction_passed(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


def _child_command(limits: SandboxLimits, job_path: str) -> list[str]:
    flags = ["-I", "-B"] if limits.site_packages else ["-I", "-S", "-B"]
    return [sys.executable, *flags, CHILD_SCRIPT, job_path]


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


def run_python_tests(
    code: str, test_cases: list[str], limits: SandboxLimits = DEFAULT_LIMITS
) -> SandboxResult:
    """Run `code`, then each test case in the same namespace, in a confined subprocess (module docstring).

    code: Python source defining what the tests use.  test_cases: Python sources (usually one
    `assert` each), run in order; a case passes if it raises nothing.  Never raises for anything the
    code does; the trainer's process is only touched through the pipes.
    """
    nonce = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="lmpg-sandbox-")
    results_read, results_write = os.pipe()
    process = None
    report, output = bytearray(), bytearray()
    timed_out = output_exceeded = False
    try:
        job_path = os.path.join(workdir, "job.json")
        job = {
            "code": code,
            "test_cases": list(test_cases),
            "nonce": nonce,
            "results_fd": results_write,
            "limits": limits.as_child_limits(),
            "site_packages": limits.site_packages,
        }
        with open(os.open(job_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as job_file:
            json.dump(job, job_file)
        if os.geteuid() == 0:
            os.chown(workdir, NOBODY, NOBODY)  # the child drops to nobody and works in this directory
        process = subprocess.Popen(
            _child_command(limits, job_path),
            cwd=workdir,
            env=_child_environment(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=(results_write,),
            start_new_session=True,
        )
        os.close(results_write)
        results_write = -1
        deadline = time.monotonic() + limits.timeout_seconds
        report_cap = 4096 + 512 * len(test_cases)
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout.fileno(), selectors.EVENT_READ, "output")
            selector.register(results_read, selectors.EVENT_READ, "report")
            while selector.get_map() and not output_exceeded:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                for key, _ in selector.select(remaining):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        selector.unregister(key.fd)
                    elif key.data == "report":
                        report += chunk[: max(0, report_cap - len(report))]
                    else:
                        room = limits.max_output_bytes - len(output)
                        output += chunk[:room]
                        output_exceeded = len(chunk) > room
        # Both pipes closed: wait for the exit itself (the code may have closed them and kept running).
        while not (timed_out or output_exceeded) and not _exited_unreaped(process.pid):
            if time.monotonic() >= deadline:
                timed_out = True
            else:
                time.sleep(_POLL_SECONDS)
    finally:
        if process is not None:
            _kill_group(process.pid)  # before reaping, so the group id cannot have been reused
            process.wait()
            process.stdout.close()
        for fd in (results_read, results_write):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
    result = _parse_report(bytes(report), nonce, len(test_cases))
    result.timed_out, result.output_exceeded = timed_out, output_exceeded
    result.output = output.decode("utf-8", "replace")
    result.returncode = process.returncode if process is not None else None
    return result


@functools.lru_cache(maxsize=1)
def probe_confinement() -> dict[str, bool]:
    """Which kernel-level confinements this machine gives a sandboxed run (see SandboxResult.confinement)."""
    return run_python_tests("", [], SandboxLimits(timeout_seconds=10.0)).confinement
