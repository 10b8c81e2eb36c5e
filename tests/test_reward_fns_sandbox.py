"""The code sandbox (reward_fns/sandbox.py): what a hostile or runaway program gets, and what it cannot do."""

from __future__ import annotations

import os
import socket
import time

import pytest

from reward_fns.sandbox import SandboxLimits, probe_confinement, run_python_tests

FAST = SandboxLimits(timeout_seconds=2.0)  # only a hanging program waits it out
ADD = "def add(a, b):\n    return a + b\n"


def test_passing_and_failing_cases_are_reported_per_case():
    result = run_python_tests(
        ADD, ["assert add(1, 2) == 3", "assert add(1, 1) == 3", "assert add(-1, 1) == 0"], FAST
    )
    assert result.passed == [True, False, True]
    assert result.failures == {1: "AssertionError:"}
    assert result.fraction_passed == 2 / 3
    assert (result.timed_out, result.output_exceeded, result.code_error) == (False, False, None)


def test_code_that_raises_passes_nothing():
    result = run_python_tests("def add(a, b) return a", ["assert True"], FAST)
    assert result.passed == [False]
    assert result.code_error.startswith("SyntaxError:")


def test_infinite_loop_is_killed_at_the_timeout_and_earlier_cases_count():
    limits = SandboxLimits(timeout_seconds=1.0)
    began = time.monotonic()
    result = run_python_tests(ADD, ["assert add(1, 2) == 3", "while True:\n    pass", "assert True"], limits)
    assert time.monotonic() - began >= 1.0  # not killed before its timeout (an upper bound would time the machine)
    assert result.timed_out
    assert result.passed == [True, False, False]


def test_fork_through_os_and_subprocess_is_refused():
    result = run_python_tests("import os\nwhile True:\n    os.fork()\n", ["assert True"], FAST)
    assert result.code_error == "PermissionError: sandbox: creating processes is not allowed"
    result = run_python_tests("import subprocess\nsubprocess.run(['echo', 'hi'])\n", ["assert True"], FAST)
    assert result.code_error == "PermissionError: sandbox: creating processes is not allowed"


@pytest.mark.skipif(
    not probe_confinement().get("nproc"),
    reason="RLIMIT_NPROC cannot bind here (root without a uid to drop to)",
)
def test_fork_bomb_through_raw_posix_hits_the_kernel_process_limit():
    # posix.fork bypasses the Python-level guard; RLIMIT_NPROC = 0 (after dropping root) stops it.
    result = run_python_tests("import posix\nwhile True:\n    posix.fork()\n", ["assert True"], FAST)
    assert result.code_error.startswith("BlockingIOError:")
    assert not result.timed_out


def test_huge_output_is_capped_and_stops_the_run():
    limits = SandboxLimits(timeout_seconds=5.0, max_output_bytes=1000)
    result = run_python_tests("while True:\n    print('x' * 100)\n", ["assert True"], limits)
    assert result.output_exceeded and not result.timed_out  # stopped by the cap, not by the timeout
    assert result.output == ("x" * 100 + "\n") * 9 + "x" * 91


def test_reading_outside_the_working_directory_is_refused():
    result = run_python_tests(
        "def read():\n    return open('/etc/passwd').read()\n", ["assert 'root' in read()"], FAST
    )
    assert result.passed == [False]
    assert (
        result.failures[0]
        == "PermissionError: sandbox: cannot open '/etc/passwd' outside the working directory"
    )
    result = run_python_tests(
        "def read():\n    return open('../../etc/passwd').read()\n", ["assert read()"], FAST
    )
    assert result.passed == [False]


def test_files_inside_the_working_directory_work_and_the_directory_is_deleted():
    code = "import os\nwith open('notes.txt', 'w') as f:\n    f.write('hi')\nprint(os.getcwd())\n"
    result = run_python_tests(code, ["assert open('notes.txt').read() == 'hi'"], FAST)
    assert result.passed == [True]
    workdir = result.output.strip()
    assert os.path.basename(workdir).startswith("lmpg-sandbox-")
    assert not os.path.exists(workdir)


def test_socket_is_refused():
    result = run_python_tests("import socket\nsocket.socket()\n", ["assert True"], FAST)
    assert result.code_error == "PermissionError: sandbox: network access is not allowed"


@pytest.mark.skipif(not probe_confinement().get("network"), reason="no network namespace available here")
def test_raw_socket_cannot_reach_a_server_on_this_machine():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = f"import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.connect(('127.0.0.1', {port}))\n"
        result = run_python_tests(code, ["assert True"], FAST)
    assert result.passed == [False]
    assert result.code_error.startswith("OSError:")  # the sandbox's own loopback is down


def test_memory_and_file_size_limits():
    result = run_python_tests("x = bytearray(2 * 1024**3)\n", ["assert True"], FAST)
    assert result.code_error == "MemoryError:"
    result = run_python_tests(
        "with open('big', 'w') as f:\n    f.write('x' * 2 * 1024**2)\n", ["assert True"], FAST
    )
    assert result.code_error == "OSError: [Errno 27] File too large"


def test_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("LMPG_TEST_SECRET", "hunter2")
    result = run_python_tests("import os\n", ["assert 'LMPG_TEST_SECRET' not in os.environ"], FAST)
    assert result.passed == [True]


def test_printed_report_lines_cannot_forge_a_pass():
    result = run_python_tests("print('pass 0')\nprint('0 pass 0')\n", ["assert False"], FAST)
    assert result.passed == [False]


def test_main_block_does_not_run():
    code = "def f():\n    return 1\nif __name__ == '__main__':\n    input()\n"
    assert run_python_tests(code, ["assert f() == 1"], FAST).passed == [True]


def test_the_solution_process_never_sees_the_tests():
    code = (
        "import posix\nfd = posix.open('/proc/self/cmdline', posix.O_RDONLY)\n"
        "SEEN = str(posix.listdir('.')) + str(posix.read(fd, 4096))\ndef seen():\n    return SEEN\n"
    )
    result = run_python_tests(code, ["SECRET = 'expected-7431'\nassert 'expected-7431' not in seen()"], FAST)
    assert result.passed == [True]


def test_calls_carry_plain_values_handles_callbacks_and_mutations():
    code = (
        "from collections import namedtuple, OrderedDict\nimport enum\n"
        "class Color(enum.IntEnum):\n    RED = 1\n"
        "class Stack:\n    def __init__(self):\n        self.items = []\n"
        "    def push(self, v):\n        self.items.append(v)\n    def __len__(self):\n        return len(self.items)\n"
        "    def __str__(self):\n        return f'Stack{self.items}'\n"
        "def values():\n    return (1, 2**70, -0.5, 'é', None, True, b'x', bytearray(b'y'), 1j, [1], {2: {3}}, frozenset(), OrderedDict(a=1), Color.RED)\n"
        "def sort_in_place(xs):\n    xs.sort()\n"
        "def apply(f, xs):\n    return [f(x) for x in xs]\n"
        "def count(n):\n    yield from range(n)\n"
        "def divide(a, b):\n    return a / b\n"
    )
    cases = [
        "assert values() == (1, 2**70, -0.5, 'é', None, True, b'x', bytearray(b'y'), 1j, [1], {2: {3}}, frozenset(), {'a': 1}, 1)",
        "assert type(values()[13]) is int and type(values()[12]) is dict",
        "xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]",
        "assert apply(lambda v: v * 2, [1, 2]) == [2, 4] and apply(len, ['ab']) == [2]",
        "assert list(count(3)) == [0, 1, 2]",
        "s = Stack()\ns.push(1)\nassert len(s) == 1 and str(s) == 'Stack[1]' and s == s and s != Stack()",
        "try:\n    divide(1, 0)\nexcept ZeroDivisionError:\n    pass\nelse:\n    raise AssertionError('no error')",
        "assert missing_name()",
    ]
    result = run_python_tests(code, cases, FAST)
    assert result.passed == [True] * 7 + [False]
    assert result.failures == {7: "NameError: name 'missing_name' is not defined"}


def test_a_solution_that_stops_fails_its_case_even_if_the_test_catches_it():
    code = "def f(x):\n    if x:\n        raise SystemExit(0)\n    return 0\n"
    cases = ["assert f(0) == 0", "try:\n    f(1)\nexcept BaseException:\n    pass", "assert True"]
    result = run_python_tests(code, cases, FAST)
    assert result.passed == [True, False, False]
    assert result.failures[1] == "SolutionGone: the solution process stopped (SystemExit: 0)"


def test_replies_that_are_not_plain_data_end_the_solution():
    code = (
        "import sys, _sandbox_shared as wire\nmain = sys.modules['__main__']\n"
        "main.Server.serve = lambda self, request: wire.send(self.reply_fd, {'value': {'eval': 'x'}})\n"
        "def f():\n    return 1\n"
    )
    result = run_python_tests(code, ["assert f() == 1", "assert f() == 1"], FAST)
    assert result.passed == [False, False]
    assert result.failures[0].startswith("SolutionGone: the solution sent a value that is not plain data")


@pytest.mark.skipif(not probe_confinement().get("dropped_root"), reason="the code runs as nobody only under root")
def test_the_code_cannot_open_the_judges_or_the_parents_memory_or_descriptors():
    code = (
        "import posix\nopened, denied = [], 0\nfor p in [q for q in posix.listdir('/proc') if q.isdigit()]:\n"
        "    try:\n        fd = posix.open(f'/proc/{p}/cmdline', posix.O_RDONLY)\n        cmd = posix.read(fd, 4096)\n"
        "        posix.close(fd)\n    except OSError:\n        continue\n"
        "    if b'_sandbox_judge' in cmd or int(p) == posix.getppid():\n"
        "        for what in ('environ', 'mem', 'maps', 'fd/0', 'fd/3', 'fd/4', 'fd/5'):\n"
        "            try:\n                posix.close(posix.open(f'/proc/{p}/{what}', posix.O_RDONLY))\n"
        "                opened.append(what)\n            except OSError:\n                denied += 1\n"
        "def report():\n    return opened, denied\n"
    )
    result = run_python_tests(code, ["opened, denied = report()\nassert opened == [] and denied >= 14"], FAST)
    assert result.passed == [True]
