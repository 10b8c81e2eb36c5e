"""Judge side of `reward_fns.sandbox`: run the test cases against the solution process, report verdicts.

Started by `sandbox.run_python_tests` as `python -I -S -B -u _sandbox_judge.py` with its job on stdin
(JSON: test_cases, nonce, descriptors, limits, imports). It never runs the completion's code. The
names the solution defines are `RemoteObject` proxies here: calling one (or reading an attribute,
iterating, ...) is a request to the solution process, and what comes back is plain data decoded
strictly (`_sandbox_shared.decode`: exact builtin types) or another proxy. So every assert,
comparison and computation of the tests runs in this interpreter, with its own builtins and modules,
on values the code could only produce by computing them. Steps:

1. read the job from stdin; ignore SIGINT; resource limits; import the modules the tests name;
2. if root, drop to uid JUDGE_UID (neither root nor the solution's uid, so the solution can neither
   signal nor trace this process, and files it plants cannot trick root); else make the process
   non-dumpable, so a same-uid solution cannot read its memory through ptrace or /proc;
3. wait for the solution's `confined` frame (sent before its code runs), then `ready` with the names
   its code defined, or `code_error`;
4. bind a proxy per name (never over a builtin's name) and the judge's own import for a name the
   solution imported or a standard-library module the tests use as `module.attribute`; then run
   each case in order, writing `NONCE pass I` / `NONCE fail I REASON` to the verdict descriptor. A
   case fails if it raises, or if the solution process died, hung up or broke the wire format while
   it ran (even if the test code caught the exception); every later case then fails too.
"""

import builtins
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _sandbox_shared import (  # noqa: E402
    MUTABLE_ARGUMENTS, WireError, decode, drop_root, encode, error_reason, one_line, preimport, receive, send,
    set_resource_limits,
)  # fmt: skip

JUDGE_UID = 65533


class _Probe:
    def method(self):
        pass


_FUNCTION, _METHOD = type(lambda: None), type(_Probe().method)  # types.FunctionType, MethodType
# Builtins a test may pass to the solution as a function (a key=, a mapper); the solution calls them here.
_PASSABLE_BUILTINS = {
    abs, all, any, bool, chr, dict, divmod, float, frozenset, int, len, list, max, min, ord, pow, repr,
    reversed, round, set, sorted, str, sum, tuple,
}  # fmt: skip


class SolutionGone(BaseException):
    """The solution process ended, hung up or broke the wire format. A BaseException, so that test
    code's `except Exception` does not swallow it."""


class RemoteError(Exception):
    """An exception the solution raised whose type is not a builtin one."""


def _remote_exception(payload) -> Exception:
    if type(payload) is not list or len(payload) != 2 or not all(type(part) is str for part in payload):
        raise WireError("bad raise payload")
    name, message = payload
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception) and kind is not RemoteError:
        return kind(message[:1000])
    return RemoteError(f"{name}: {message}"[:1000])


class Channel:
    """The judge's end of the solution process's pipes: requests out, replies (and callbacks) in."""

    def __init__(self, request_fd: int, reply_fd: int):
        self.request_fd, self.reply_fd = request_fd, reply_fd
        self.gone: str | None = None
        self.proxies: dict = {}
        self.callbacks: dict = {}

    def receive(self) -> dict:
        try:
            message = receive(self.reply_fd)
        except (OSError, WireError) as error:
            self.fail(f"the solution broke the wire format ({error})")
        if message is None:
            self.fail("the solution process ended")
        return message

    def fail(self, reason: str):
        self.gone = self.gone or reason
        raise SolutionGone(self.gone)

    def proxy(self, tag: str, payload):
        if tag == "cb":
            if type(payload) is int and payload in self.callbacks:
                return self.callbacks[payload]
            raise WireError("unknown callback")
        if type(payload) is not list or len(payload) != 2 or (payload[0], type(payload[1])) not in (
            ("g", str),
            ("h", int),
        ):
            raise WireError("bad ref")
        key = (payload[0], payload[1])
        if key not in self.proxies:
            self.proxies[key] = RemoteObject(self, key)
        return self.proxies[key]

    def encode(self, value):
        return encode(value, self._encode_other)

    def _encode_other(self, value):
        if type(value) is RemoteObject:
            return {"ref": list(object.__getattribute__(value, "_key"))}
        if (
            type(value) in (_FUNCTION, _METHOD)
            or value in _PASSABLE_BUILTINS
        ):
            index = len(self.callbacks)
            self.callbacks[index] = value
            return {"cb": index}
        raise TypeError(f"sandbox: a {type(value).__name__} cannot be passed to the solution")

    def decode(self, data):
        try:
            return decode(data, self.proxy)
        except WireError as error:
            self.fail(f"the solution sent a value that is not plain data ({error})")

    def request(self, message: dict, args: tuple = (), kwargs: dict | None = None):
        """Send a request; serve the solution's callbacks until its reply; return the value it carries."""
        if self.gone:
            raise SolutionGone(self.gone)
        try:
            send(self.request_fd, message)
        except OSError:
            self.fail("the solution process ended")
        while True:
            reply = self.receive()
            if "op" not in reply:
                break
            self._serve_callback(reply)
        if "broken" in reply:
            self.fail(f"the solution process stopped ({str(reply['broken'])[:200]})")
        self._copy_back(args, reply.get("args"))
        self._copy_back(tuple((kwargs or {}).values()), reply.get("kwargs"))
        if "raise" in reply:
            try:
                error = _remote_exception(reply["raise"])
            except WireError as bad:
                self.fail(str(bad))
            raise error
        if "value" not in reply:
            self.fail("the solution sent a reply without a value")
        return self.decode(reply["value"])

    def _copy_back(self, originals: tuple, states) -> None:
        """Arguments the solution mutated (list, dict, set, bytearray) take its new contents, as if it
        had been called in this process."""
        if states is None:
            return
        if type(states) is not list or len(states) != len(originals):
            self.fail("the solution sent arguments that do not match the call")
        for original, state in zip(originals, states):
            if state is None or type(original) not in MUTABLE_ARGUMENTS:
                continue
            new = self.decode(state)
            if type(new) is not type(original):
                self.fail("the solution sent an argument of another type")
            if new != original:
                if type(original) in (list, bytearray):
                    original[:] = new
                else:
                    original.clear()
                    original.update(new)

    def _serve_callback(self, request: dict) -> None:
        index = request.get("id")
        if request.get("op") != "cb" or type(index) is not int or index not in self.callbacks:
            self.fail("the solution sent a request other than a known callback")
        args, kwargs = request.get("args"), request.get("kwargs")
        if type(args) is not list or type(kwargs) is not dict:
            self.fail("bad callback arguments")
        args = [self.decode(arg) for arg in args]
        kwargs = {str(name): self.decode(value) for name, value in kwargs.items()}
        try:
            reply = {"value": self.encode(self.callbacks[request["id"]](*args, **kwargs))}
        except Exception as error:
            reply = {"raise": [type(error).__name__, str(error)[:1000]]}
        try:
            send(self.request_fd, reply)
        except OSError:
            self.fail("the solution process ended")


def _checked(value, kind: type, what: str):
    if type(value) is not kind:
        raise TypeError(f"sandbox: the solution's {what} gave a {type(value).__name__}, not {kind.__name__}")
    return value


class RemoteObject:
    """An object of the solution process. Its equality is identity (so an object that claims to equal
    anything equals nothing here); it has no arithmetic or ordering; what it does support is a request
    whose answer arrives as plain data."""

    __slots__ = ("_channel", "_key")

    def __init__(self, channel: Channel, key: tuple):
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_key", key)

    def _ask(self, op: str, **fields):
        channel = object.__getattribute__(self, "_channel")
        key = object.__getattribute__(self, "_key")
        return channel.request({"op": op, "target": list(key), **fields})

    def __call__(self, *args, **kwargs):
        channel = object.__getattribute__(self, "_channel")
        key = object.__getattribute__(self, "_key")
        message = {
            "op": "call",
            "target": list(key),
            "args": [channel.encode(arg) for arg in args],
            "kwargs": {name: channel.encode(value) for name, value in kwargs.items()},
        }
        return channel.request(message, args, kwargs)

    def __getattr__(self, name: str):
        return self._ask("getattr", name=name)

    def __setattr__(self, name: str, value) -> None:
        channel = object.__getattribute__(self, "_channel")
        self._ask("setattr", name=name, value=channel.encode(value))

    def __getitem__(self, item):
        return self._ask("getitem", key=object.__getattribute__(self, "_channel").encode(item))

    def __setitem__(self, item, value) -> None:
        channel = object.__getattribute__(self, "_channel")
        self._ask("setitem", key=channel.encode(item), value=channel.encode(value))

    def __contains__(self, item) -> bool:
        key = object.__getattribute__(self, "_channel").encode(item)
        return _checked(self._ask("contains", key=key), bool, "__contains__")

    def __iter__(self):
        return self._ask("iter")

    def __next__(self):
        return self._ask("next")

    def __len__(self) -> int:
        return _checked(self._ask("len"), int, "__len__")

    def __bool__(self) -> bool:
        return _checked(self._ask("bool"), bool, "__bool__")

    def __str__(self) -> str:
        return _checked(self._ask("str"), str, "__str__")

    def __repr__(self) -> str:
        return _checked(self._ask("repr"), str, "__repr__")

    def __eq__(self, other) -> bool:
        key = object.__getattribute__(self, "_key")
        return type(other) is RemoteObject and object.__getattribute__(other, "_key") == key

    def __ne__(self, other) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(object.__getattribute__(self, "_key"))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def _bind(namespace: dict, names, imports: list, channel: Channel) -> None:
    if type(names) is not list:
        channel.fail("bad ready frame")
    for name in names[:10_000]:
        if type(name) is str and name.isidentifier() and not name.startswith("__"):
            if hasattr(builtins, name):
                continue  # the tests' builtins stay the judge's own
            namespace[name] = channel.proxy("ref", ["g", name])
    import importlib

    for name, module, attribute in imports:
        try:
            value = importlib.import_module(module)
            if attribute is not None:
                try:
                    value = getattr(value, attribute)
                except AttributeError:
                    value = importlib.import_module(f"{module}.{attribute}")
        except BaseException:
            continue  # the solution's name stays a proxy
        namespace[name] = value


def _protect(job: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a same-uid solution could raise KeyboardInterrupt here
    set_resource_limits(job["limits"], files=False)
    modules = [module for _, module, _ in job["imports"]]
    preimport(modules + [f"{m}.{a}" for _, m, a in job["imports"] if a], not job["site_packages"])
    preimport(job["modules"], not job["site_packages"])
    if os.geteuid() == 0:
        drop_root(JUDGE_UID)
    else:
        try:
            import ctypes

            ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
        except Exception:
            pass


def main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    _protect(job)
    nonce, verdict_fd = job["nonce"], job["verdict_fd"]
    channel = Channel(job["request_fd"], job["reply_fd"])

    def report(line: str) -> None:
        try:
            os.write(verdict_fd, f"{nonce} {line}\n".encode())
        except OSError:
            pass

    cases = job["test_cases"]
    namespace = {"__name__": "tests", "__builtins__": builtins}
    try:
        hello = channel.receive()
        confined = hello.get("confined")
        if type(confined) is dict:
            flags = " ".join(f"{k}={int(v is True)}" for k, v in confined.items() if str(k).isidentifier())
            report(f"confined {flags}")
        ready = channel.receive()
        if "code_error" in ready:
            report(f"code_error {one_line(str(ready['code_error']))}")
            cases = []
        else:
            _bind(namespace, ready.get("ready"), job["imports"], channel)
    except SolutionGone as gone:
        report(f"code_error SolutionGone: {gone} before the tests")
        cases = []
    for index, case in enumerate(cases):
        if channel.gone:
            report(f"fail {index} SolutionGone: {channel.gone}")
            continue
        try:
            exec(compile(case, f"<test {index}>", "exec"), namespace)
        except BaseException as error:
            report(f"fail {index} {error_reason(error)}")
        else:
            report(f"fail {index} SolutionGone: {channel.gone}" if channel.gone else f"pass {index}")
    os._exit(0)


if __name__ == "__main__":
    main()
