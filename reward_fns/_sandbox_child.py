"""Solution side of `reward_fns.sandbox`: confine this process, run untrusted code, answer the judge.

Started by `sandbox.run_python_tests` as `python -I -S -B -u _sandbox_child.py JOB_FILE` in a fresh
temporary working directory, in its own session. Uses the standard library only. It never sees the
test cases: the judge process (`_sandbox_judge.py`) runs them and asks this process to call the
code's functions. Nothing here is trusted once the code has run (the code can rewrite all of it);
the judge treats every reply as the code's claim and checks it as plain data. Steps, in order:

1. read and delete JOB_FILE (JSON: code, limits, request_fd, reply_fd);
2. network: unshare(CLONE_NEWNET) puts the process in an empty network namespace (only a loopback
   that is down), so even a raw `_socket` cannot reach anything; as a non-root user it tries
   CLONE_NEWUSER|CLONE_NEWNET (the new user namespace also denies ptrace of the judge and the
   trainer); best effort, the outcome is reported;
3. resource limits (CPU seconds, address space, file size, open files, no core dumps);
4. if root: import the modules the code names (found with `ast`; standard library only unless
   site-packages are allowed) while the interpreter's files are still readable (pyenv-style
   installs under /root are not readable by others), then drop to uid/gid nobody; then
   RLIMIT_NPROC = 0. The kernel ignores RLIMIT_NPROC for
   root, so the drop is what makes the fork limit real; a non-root user is bound by it directly;
5. Python-level guards (defence in depth, not a jail): process creation, sockets, and `open` of paths
   outside the working directory raise PermissionError;
6. send `confined` to the judge, exec the code as module `solution` (so an `if __name__ ==
   "__main__":` block does not run), send `ready` with the names it defined (or `code_error`), then
   answer the judge's requests (call, getattr, iter, next, ...) until it hangs up. Results that are
   not plain data stay here and travel as handles.
"""

import builtins
import io
import json
import os
import resource
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _sandbox_shared import (  # noqa: E402
    MUTABLE_ARGUMENTS, NOBODY, decode, drop_root, encode, error_reason, imported_modules, preimport, receive,
    send, set_resource_limits,
)  # fmt: skip

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
# Subclasses of these travel as their base value (a namedtuple as a tuple, an IntEnum as an int).
_BASE_VALUE = (
    (int, int.__index__),
    (float, float.__float__),
    (str, str.__str__),
    (tuple, lambda value: tuple(tuple.__iter__(value))),
    (list, lambda value: list(list.__iter__(value))),
    (dict, lambda value: dict(dict.items(value))),
    (set, lambda value: set(set.__iter__(value))),
    (frozenset, lambda value: frozenset(frozenset.__iter__(value))),
)


def _unshare_network() -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
        return libc.unshare(flags) == 0
    except Exception:
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


def _builtin_base(error: BaseException) -> str:
    """The name of the first builtin class in the exception's type's MRO (a ValueError subclass goes as
    ValueError)."""
    for kind in type(error).__mro__:
        if getattr(builtins, kind.__name__, None) is kind:
            return kind.__name__
    return "Exception"


class Server:
    """Answers the judge's requests on the code's namespace; keeps non-plain results as handles."""

    def __init__(self, namespace: dict, request_fd: int, reply_fd: int):
        self.namespace, self.request_fd, self.reply_fd = namespace, request_fd, reply_fd
        self.handles: list = []
        self.handle_of: dict = {}

    def send(self, message: dict) -> None:
        send(self.reply_fd, message)

    def receive(self) -> dict:
        message = receive(self.request_fd)
        if message is None:  # the judge is done (or gone)
            _exit()
        return message

    def encode(self, value):
        try:
            return encode(value, self._other)
        except RecursionError:  # a self-referential container
            return self._handle(value)

    def _other(self, value):
        if type(value) is Callback:
            return {"cb": value.index}
        for base, base_value in _BASE_VALUE:
            if isinstance(value, base) and not isinstance(value, bool):
                return encode(base_value(value), self._other)
        return self._handle(value)

    def _handle(self, value):
        index = self.handle_of.get(id(value))
        if index is None:
            index = self.handle_of[id(value)] = len(self.handles)
            self.handles.append(value)  # kept alive, so its id stays its own
        return {"ref": ["h", index]}

    def _mutable_state(self, argument):
        """What a call left in a mutable argument, for the judge to copy back; None for the others."""
        return self.encode(argument) if type(argument) in MUTABLE_ARGUMENTS else None

    def decode(self, data):
        return decode(data, self._resolve)

    def _resolve(self, tag: str, payload):
        if tag == "cb":
            return Callback(self, payload)
        kind, key = payload
        if kind == "g":
            if key not in self.namespace:
                raise NameError(f"name {key!r} is not defined")
            return self.namespace[key]
        return self.handles[key]

    def serve(self, request: dict) -> None:
        op = request["op"]
        try:
            target = self._resolve("ref", request["target"])
            reply = {"value": None}
            if op == "call":
                args = [self.decode(arg) for arg in request["args"]]
                kwargs = {name: self.decode(value) for name, value in request["kwargs"].items()}
                reply["value"] = self.encode(target(*args, **kwargs))
                reply["args"] = [self._mutable_state(arg) for arg in args]
                reply["kwargs"] = [self._mutable_state(value) for value in kwargs.values()]
            elif op == "getattr":
                reply["value"] = self.encode(getattr(target, request["name"]))
            elif op == "setattr":
                setattr(target, request["name"], self.decode(request["value"]))
            elif op == "getitem":
                reply["value"] = self.encode(target[self.decode(request["key"])])
            elif op == "setitem":
                target[self.decode(request["key"])] = self.decode(request["value"])
            elif op == "contains":
                reply["value"] = self.decode(request["key"]) in target
            else:
                unary = {"iter": iter, "next": next, "len": len, "bool": bool, "str": str, "repr": repr}[op]
                reply["value"] = self.encode(unary(target))
        except Exception as error:
            reply = {"raise": [_builtin_base(error), str(error)[:1000]]}
        except BaseException as error:  # SystemExit, KeyboardInterrupt: the code ended its own run
            self.send({"broken": error_reason(error)})
            _exit()
        self.send(reply)

    def serve_until_reply(self) -> dict:
        while True:
            message = self.receive()
            if "op" not in message:
                return message
            self.serve(message)


class Callback:
    """A function of the judge's tests passed to the code: calling it asks the judge to run it."""

    def __init__(self, server: Server, index: int):
        self.server, self.index = server, index

    def __call__(self, *args, **kwargs):
        server = self.server
        server.send(
            {
                "op": "cb",
                "id": self.index,
                "args": [server.encode(arg) for arg in args],
                "kwargs": {name: server.encode(value) for name, value in kwargs.items()},
            }
        )
        reply = server.serve_until_reply()
        if "raise" in reply:
            name, message = reply["raise"]
            kind = getattr(builtins, name, None)
            raise (kind if isinstance(kind, type) and issubclass(kind, Exception) else RuntimeError)(message)
        return server.decode(reply["value"])


def _exit() -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(0)  # skip atexit handlers the code may have registered


def main() -> None:
    job_path = sys.argv[1]
    with open(job_path) as job_file:
        job = json.load(job_file)
    os.unlink(job_path)
    request_fd, reply_fd = job["request_fd"], job["reply_fd"]
    network = _unshare_network()
    set_resource_limits(job["limits"], files=True)
    dropped = False
    if os.geteuid() == 0:
        preimport(imported_modules([job["code"]]), stdlib_only=not job["site_packages"])
        dropped = drop_root(NOBODY)
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    workdir = os.path.realpath(os.getcwd())
    _install_guards(workdir)
    # RLIMIT_NPROC binds every real uid but root's. Sent before the code runs, so it is this harness's word.
    send(reply_fd, {"confined": {"network": network, "nproc": os.getuid() != 0, "dropped_root": dropped}})

    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(job["code"], "<solution>", "exec"), namespace)
    except BaseException as error:
        send(reply_fd, {"code_error": error_reason(error)})
        _exit()
    names = [name for name in namespace if type(name) is str and name.isidentifier()]
    names = [name for name in names if not name.startswith("__")]
    send(reply_fd, {"ready": names[:10_000]})
    server = Server(namespace, request_fd, reply_fd)
    while True:
        server.serve(server.receive())


if __name__ == "__main__":
    main()
