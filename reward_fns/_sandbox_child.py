"""Child side of `reward_fns.sandbox`: confine this process, run untrusted code, report each test case.

Started by `sandbox.run_python_tests` as `python -I -S -B _sandbox_child.py JOB_FILE` in a fresh
temporary working directory, in its own session. Uses the standard library only. Steps, in order:

1. read and delete JOB_FILE (JSON: code, test_cases, nonce, limits, results_fd);
2. network: unshare(CLONE_NEWNET) puts the process in an empty network namespace (only a loopback
   that is down), so even a raw `_socket` cannot reach anything; as a non-root user it tries
   CLONE_NEWUSER|CLONE_NEWNET; best effort, the outcome is reported;
3. resource limits (CPU seconds, address space, file size, open files, no core dumps);
4. if root: import the modules the code names (found with `ast`; standard library only unless
   site-packages are allowed) while the interpreter's files are still readable (pyenv-style
   installs under /root are not readable by others), then drop to uid/gid nobody; then RLIMIT_NPROC = 0. The kernel ignores RLIMIT_NPROC for
   root, so the drop is what makes the fork limit real; a non-root user is bound by it directly;
5. Python-level guards (defence in depth, not a jail): process creation, sockets, and `open` of paths
   outside the working directory raise PermissionError;
6. exec the code as module `solution` (so an `if __name__ == "__main__":` block does not run), then
   each test case in the same namespace, writing `NONCE pass I` / `NONCE fail I REASON` to the results
   descriptor as each one finishes, so cases passed before a hang or crash still count.
"""

import ast
import builtins
import io
import json
import os
import resource
import socket
import subprocess
import sys

NOBODY = 65534
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
# Standard-library modules whose import has side effects (opens a browser, prints); never pre-imported.
_NO_PREIMPORT = {
    "antigravity",
    "this",
    "__hello__",
    "__phello__",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
}


def _unshare_network() -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
        return libc.unshare(flags) == 0
    except Exception:
        return False


def _set_limits(limits: dict) -> None:
    cpu = limits["cpu_seconds"]
    for limit, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU at the soft limit, SIGKILL at the hard one
        (resource.RLIMIT_AS, (limits["memory_bytes"],) * 2),
        (resource.RLIMIT_FSIZE, (limits["file_size_bytes"],) * 2),
        (resource.RLIMIT_NOFILE, (limits["open_files"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(limit, value)


def _imported_modules(sources: list) -> set:
    names = set()
    for source in sources:
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _preimport(sources: list, stdlib_only: bool) -> None:
    import importlib

    stdlib = getattr(sys, "stdlib_module_names", None)
    for name in sorted(_imported_modules(sources)):
        top = name.split(".")[0]
        if top in _NO_PREIMPORT or (stdlib_only and stdlib is not None and top not in stdlib):
            continue
        try:
            importlib.import_module(name)
        except BaseException:
            pass  # not a module (`from math import sqrt` tries `math.sqrt`), or broken: the code will see


def _drop_root() -> bool:
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        return True
    except OSError:
        return False


def _install_guards(workdir: str) -> None:
    # builtins, io, socket and subprocess are imported at the top, while the interpreter's files are
    # still readable.
    def refuse_process(*args, **kwargs):
        raise PermissionError("sandbox: creating processes is not allowed")

    def refuse_network(*args, **kwargs):
        raise PermissionError("sandbox: network access is not allowed")

    for name in dir(os):
        if name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "kill", "killpg"):
            setattr(os, name, refuse_process)
        elif name.startswith(("exec", "spawn")):
            setattr(os, name, refuse_process)
    subprocess.Popen = refuse_process
    for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
        setattr(socket, name, refuse_network)

    def inside_workdir(path) -> bool:
        if isinstance(path, int):
            return True
        path = os.fsdecode(os.fspath(path))
        resolved = os.path.realpath(os.path.join(workdir, path))
        return resolved == workdir or resolved.startswith(workdir + os.sep)

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, *args, **kwargs):
        if not inside_workdir(file):
            raise PermissionError(f"sandbox: cannot open {file!r} outside the working directory")
        return real_open(file, *args, **kwargs)

    def guarded_os_open(path, *args, **kwargs):
        if not inside_workdir(path):
            raise PermissionError(f"sandbox: cannot open {path!r} outside the working directory")
        return real_os_open(path, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open


def _reason(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:200]


def main() -> None:
    job_path = sys.argv[1]
    with open(job_path) as job_file:
        job = json.load(job_file)
    os.unlink(job_path)
    nonce, results_fd = job["nonce"], job["results_fd"]
    write, exit_now = os.write, os._exit  # captured before the code can replace them

    def report(line: str) -> None:
        try:
            write(results_fd, f"{nonce} {line}\n".encode())
        except OSError:
            pass

    network = _unshare_network()
    _set_limits(job["limits"])
    dropped = False
    if os.geteuid() == 0:
        _preimport([job["code"], *job["test_cases"]], stdlib_only=not job["site_packages"])
        dropped = _drop_root()
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    workdir = os.path.realpath(os.getcwd())
    _install_guards(workdir)
    # RLIMIT_NPROC binds every real uid but root's.
    report(f"confined network={int(network)} nproc={int(os.getuid() != 0)} dropped_root={int(dropped)}")

    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(job["code"], "<solution>", "exec"), namespace)
    except BaseException as error:
        report(f"code_error {_reason(error)}")
    else:
        for index, case in enumerate(job["test_cases"]):
            try:
                exec(compile(case, f"<test {index}>", "exec"), namespace)
            except BaseException as error:
                report(f"fail {index} {_reason(error)}")
            else:
                report(f"pass {index}")
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    exit_now(0)  # skip atexit handlers the code may have registered


if __name__ == "__main__":
    main()
