"""What the two processes of `reward_fns.sandbox` share: the wire format and process setup (stdlib only).

Wire: a frame is a 4-byte big-endian length then that many bytes of ASCII JSON holding one object: a
request (it has an "op") or the reply to the last request. Values travel as plain data only:

    None, bool, float, str, int (beyond 64 bits: {"int": hex})      as themselves
    list, tuple, set, frozenset, dict                               {"list": [...]}, ..., {"dict": [[k, v], ...]}
    bytes, bytearray, complex                                       {"bytes": hex}, {"bytearray": hex}, {"complex": [re, im]}
    an object of the solution process (a function, an instance)     {"ref": ["g", global name] | ["h", handle]}
    a function of the judge passed to the solution (a key=...)      {"cb": id}

`decode` is strict: it builds exact builtin types and nothing else, so whatever the solution sends,
the judge only ever holds plain values and its own proxies. The judge reads frames with a size cap.
"""

import json
import os
import resource
import sys

MAX_FRAME_BYTES = 1 << 24
NOBODY = 65534
"""The uid and gid the solution process drops to when started as root (the parent gives it the run's
directory)."""
MUTABLE_ARGUMENTS = (list, dict, set, bytearray)
"""Argument types whose mutation by a call of the solution is copied back to the judge's object."""
_TAGS = ("list", "tuple", "set", "frozenset", "dict", "bytes", "bytearray", "complex", "int", "ref", "cb")
_INT64 = 1 << 63


class WireError(Exception):
    """A frame or value that breaks the format: the peer is treated as gone."""


def send(fd: int, message: dict) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    data = memoryview(len(body).to_bytes(4, "big") + body)
    while data:
        data = data[os.write(fd, data) :]


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(fd: int, max_bytes: int = MAX_FRAME_BYTES) -> dict | None:
    """The next frame's object, or None at end of file. Raises WireError for a malformed frame."""
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    size = int.from_bytes(header, "big")
    if size > max_bytes:
        raise WireError(f"frame of {size} bytes exceeds {max_bytes}")
    body = _read_exactly(fd, size)
    if body is None:
        return None
    try:
        message = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise WireError(f"frame is not JSON ({error})") from None
    if type(message) is not dict:
        raise WireError("frame is not a JSON object")
    return message


def encode(value, other):
    """Plain data for `value`; `other(value)` encodes anything that is not an exact builtin value type."""
    kind = type(value)
    if value is None or kind is bool or kind is float or kind is str:
        return value
    if kind is int:
        return value if -_INT64 < value < _INT64 else {"int": format(value, "x")}
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        return {kind.__name__: [encode(item, other) for item in value]}
    if kind is dict:
        return {"dict": [[encode(key, other), encode(item, other)] for key, item in value.items()]}
    if kind is bytes or kind is bytearray:
        return {kind.__name__: value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    return other(value)


def decode(data, proxy):
    """The value `data` encodes, built from exact builtin types; `proxy(tag, payload)` makes refs and
    callbacks. Raises WireError for anything else (an unknown tag, an unhashable set member, ...)."""
    kind = type(data)
    if data is None or kind is bool or kind is int or kind is float or kind is str:
        return data
    if kind is not dict or len(data) != 1:
        raise WireError(f"not an encoded value: {kind.__name__}")
    ((tag, payload),) = data.items()
    try:
        if tag in ("list", "tuple", "set", "frozenset") and type(payload) is list:
            items = [decode(item, proxy) for item in payload]
            return items if tag == "list" else {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
        if tag == "dict" and type(payload) is list:
            pairs = [(decode(pair[0], proxy), decode(pair[1], proxy)) for pair in payload if _is_pair(pair)]
            if len(pairs) != len(payload):
                raise WireError("dict items must be [key, value] pairs")
            return dict(pairs)
        if tag in ("bytes", "bytearray") and type(payload) is str:
            return (bytes if tag == "bytes" else bytearray).fromhex(payload)
        if tag == "complex" and type(payload) is list and len(payload) == 2:
            real, imag = payload
            if type(real) is float and type(imag) is float:
                return complex(real, imag)
        if tag == "int" and type(payload) is str:
            return int(payload, 16)
        if tag in ("ref", "cb"):
            return proxy(tag, payload)
    except (TypeError, ValueError, RecursionError) as error:
        raise WireError(f"bad {tag} value ({error})") from None
    raise WireError(f"bad value tag {tag!r}" if tag not in _TAGS else f"bad {tag} payload")


def _is_pair(pair) -> bool:
    return type(pair) is list and len(pair) == 2


# Standard-library modules whose import has side effects (opens a browser, prints); never pre-imported.
NO_PREIMPORT = {"antigravity", "this", "__hello__", "__phello__", "idlelib", "tkinter", "turtle", "turtledemo"}


def imported_modules(sources: list) -> set:
    """The modules (and `module.name` candidates of `from module import name`) the sources import."""
    import ast  # here: the judge does not need it, and its import is slow

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


def preimport(names, stdlib_only: bool) -> None:
    """Import the modules while the interpreter's files are still readable (pyenv-style installs under
    /root are not readable once root is dropped)."""
    import importlib

    for name in sorted(names):
        top = name.split(".")[0]
        if top in NO_PREIMPORT or (stdlib_only and top not in sys.stdlib_module_names):
            continue
        try:
            importlib.import_module(name)
        except BaseException:
            pass  # not a module (`from math import sqrt` tries `math.sqrt`), or broken: the code will see


def error_reason(error: BaseException) -> str:
    """`Type: message` on one line, cut to 200 characters: how a failure travels in a verdict line."""
    return one_line(f"{type(error).__name__}: {error}")


def one_line(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


def set_resource_limits(limits: dict, *, files: bool) -> None:
    """setrlimit from a job's limits: CPU seconds, address space and no core dumps, and with `files`
    the largest file and the number of open files too (the judge writes no files)."""
    cpu = limits["cpu_seconds"]
    settings = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU at the soft limit, SIGKILL at the hard one
        (resource.RLIMIT_AS, (limits["memory_bytes"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    if files:
        settings += [
            (resource.RLIMIT_FSIZE, (limits["file_size_bytes"],) * 2),
            (resource.RLIMIT_NOFILE, (limits["open_files"],) * 2),
        ]
    for limit, value in settings:
        resource.setrlimit(limit, value)


def drop_root(uid: int) -> bool:
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        return True
    except OSError:
        return False
