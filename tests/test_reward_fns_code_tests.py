"""Code correctness reward (reward_fns/code_tests.py), on literal completions."""

from __future__ import annotations

import pytest

from lmpg.errors import RewardError
from reward_fns.code_tests import code_tests, extract_code, make_code_tests_reward, split_test_cases
from reward_fns.sandbox import SandboxLimits, probe_confinement

# Signalling other processes is only harmless where the code runs as nobody: with the trainer's uid
# (no root) it would reach the test runner itself, which is what the docstring of sandbox.py warns of.
SIGNALS_ARE_SAFE = bool(probe_confinement().get("dropped_root"))

TESTS = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(2, 2) == 4"]


@pytest.mark.parametrize(
    "text, code",
    [
        (
            "Try:\n```python\ndef f():\n    return 1\n```\nBetter:\n```python\ndef f():\n    return 2\n```\n",
            "def f():\n    return 2\n",
        ),
        ("```py\nx = 1\n```", "x = 1\n"),
        ("```\nx = 2\n```", "x = 2\n"),
        ("```python\ndef f():\n    return 3", "def f():\n    return 3"),  # cut off by the length limit
        ("def f():\n    return 4", "def f():\n    return 4"),
    ],
)
def test_extract_code(text, code):
    assert extract_code(text) == code


def test_split_test_cases_from_a_string():
    tests = "import math\ndef h(x):\n    return x\nassert h(1) == 1\nassert (\n    h(2) == 2)\nassert h(3) == 3; assert h(4) == 4\n"
    assert split_test_cases(tests) == [
        "import math\ndef h(x):\n    return x\nassert h(1) == 1\n",
        "assert (\n    h(2) == 2)\n",
        "assert h(3) == 3; assert h(4) == 4\n",
    ]
    assert split_test_cases("check(f)\n") == ["check(f)\n"]
    assert split_test_cases(TESTS) == TESTS


def test_invalid_tests_are_a_data_error():
    with pytest.raises(RewardError, match="test case 1 .* is not valid Python"):
        split_test_cases(["assert True", "assert ("])
    with pytest.raises(RewardError, match="test code does not parse"):
        split_test_cases("assert (")


def test_fraction_passed_and_none_without_tests():
    completions = [
        "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```",
        "def add(a, b):\n    return a * b",  # passes add(0, 0) and add(2, 2)
        "def add(a, b):\n    return a + b",
        "no code",
    ]
    tests = [TESTS, TESTS, "assert add(1, 2) == 3\nassert add(1, 1) == 3\n", None]
    assert code_tests(None, completions, tests=tests) == [1.0, 2 / 3, 0.5, None]
    assert code_tests(None, completions[:1], test_list=[TESTS]) == [1.0]
    assert code_tests(None, completions[:1]) == [None]


def test_all_or_nothing():
    reward = make_code_tests_reward(all_or_nothing=True, name="code_all")
    assert reward.__name__ == "code_all"
    assert reward(
        None, ["def add(a, b):\n    return a * b", "def add(a, b):\n    return a + b"], tests=[TESTS, TESTS]
    ) == [0.0, 1.0]


def test_hostile_completions_score_zero_or_what_passed_before():
    reward = make_code_tests_reward(SandboxLimits(timeout_seconds=1.0, max_output_bytes=10_000))
    hang_after_two = (
        "def add(a, b):\n    if a == 2:\n        while True:\n            pass\n    return a + b\n"
    )
    completions = [
        hang_after_two,
        "import os\nwhile True:\n    os.fork()\n",
        "def add(a, b):\n    return len(open('/etc/passwd').read()) and a + b\n",
        "import socket\ndef add(a, b):\n    socket.create_connection(('example.com', 80))\n    return a + b\n",
        "while True:\n    print('spam' * 1000)\n",
    ]
    assert reward(None, completions, tests=[TESTS] * 5) == [2 / 3, 0.0, 0.0, 0.0, 0.0]


# Answers no constant fits, so a completion scores only what it really computes.
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 5) == 7", "assert add(-4, 1) == -3"]
CORRECT_ADD = "def add(a, b):\n    return a + b\n"
WRONG_ADD = "def add(a, b):\n    return None\n"
HOSTILE = {
    # rewrite what a harness uses after the code: builtins, modules, the harness's own functions
    "patched_builtins": WRONG_ADD
    + "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n"
    "builtins.isinstance = lambda *a: True\nbuiltins.repr = lambda x: '3'\nbuiltins.__import__ = None\n",
    "patched_modules": WRONG_ADD
    + "import json, os, sys\njson.dumps = lambda *a, **k: '{\"value\": 3}'\n"
    "json.loads = lambda *a, **k: {'value': 3}\nos.write = lambda fd, data: len(data)\n"
    "sys.modules['json'] = None\n",
    "patched_harness": WRONG_ADD
    + "import sys, _sandbox_shared as wire\nmain = sys.modules['__main__']\n"
    "main.Server.serve = lambda self, request: wire.send(self.reply_fd, {'value': True})\n"
    "wire.decode = lambda data, proxy: True\nmain._reason = lambda error: 'pass'\n",
    # reach the harness's state through introspection
    "introspection": WRONG_ADD
    + "import gc, sys, inspect\nfor o in gc.get_objects():\n"
    "    if isinstance(o, dict) and 'request_fd' in o:\n        o['code'] = ''\n"
    "frame = sys._getframe()\nwhile frame:\n    frame.f_globals['report'] = print\n    frame = frame.f_back\n"
    "for f in inspect.stack():\n    f.frame.f_locals.clear()\n",
    # objects that claim to equal anything
    "always_equal": "class Anything:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
    "def add(a, b):\n    return Anything()\n",
    "int_subclass": "class Int(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
    "def add(a, b):\n    return Int(99)\n",
    "str_subclass": "class Str(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n"
    "def add(a, b):\n    return Str('x')\n",
    # exit before (or during) the tests
    "sys_exit": "import sys\nsys.exit(0)\n",
    "os_exit": "import os\nos._exit(0)\n",
    "exit_in_call": "def add(a, b):\n    import os\n    os._exit(0)\n",
    "system_exit_in_call": "def add(a, b):\n    raise SystemExit(0)\n",
    "keyboard_interrupt": "def add(a, b):\n    raise KeyboardInterrupt\n",
    "kill_parent": WRONG_ADD + "import posix, signal\nposix.kill(posix.getppid(), signal.SIGKILL)\n",
    # write a forged verdict to stdout, stderr or any descriptor
    "forged_output": WRONG_ADD
    + "import os\nfor i in range(3):\n    print(f'pass {i}')\n    os.write(2, b'pass %d\\n' % i)\n"
    "for fd in range(3, 64):\n    try:\n        os.write(fd, b'\\x00\\x00\\x00\\x0e{\"value\": 3}\\n' * 3)\n"
    "    except OSError:\n        pass\n",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_completion_scores_zero_beside_a_correct_one(kind):
    if kind == "kill_parent" and not SIGNALS_ARE_SAFE:
        pytest.skip("the code would run with this process's uid and could kill it")
    reward = make_code_tests_reward(SandboxLimits(timeout_seconds=2.0))
    assert reward(None, [CORRECT_ADD, HOSTILE[kind]], tests=[ADD_TESTS] * 2) == [1.0, 0.0]


MORE_HOSTILE = [
    # a later assert helper, or the comparison, redefined by the code
    "def add(a, b):\n    return 0\ndef check(candidate):\n    pass\nimport operator\noperator.eq = lambda a, b: True\n",
    # shadowing the builtins the tests compute expected values with
    "def add(a, b):\n    return 0\ndef abs(x):\n    return 0\ndef sorted(x):\n    return 0\n",
    # the solution's own `math` replaced: the tests' `math.` is the judge's import
    "import math\nmath = type('M', (), {'isclose': staticmethod(lambda *a, **k: True)})\n"
    "def area(r):\n    return 0.0\n",
    # ctypes, signal handlers, atexit, threads, fork, faulthandler
    "import ctypes, signal, atexit, faulthandler, os\nctypes.CDLL(None).write(1, b'pass 0\\n', 7)\n"
    "signal.signal(signal.SIGTERM, lambda *a: None)\natexit.register(lambda: print('pass 0'))\n"
    "faulthandler.enable()\ndef area(r):\n    return 0.0\n",
    "import threading\ndef area(r):\n    threading.Thread(target=print, args=('pass 0',)).start()\n    return 0.0\n",
    "import posix\nposix.fork()\ndef area(r):\n    return 0.0\n",
    # reading the tests or a nonce from files and /proc
    "import posix\nSEEN = [posix.listdir('.'), posix.listdir('/proc/self/fd')]\n"
    "for pid in range(2, 4000):\n    try:\n        posix.close(posix.open(f'/proc/{pid}/mem', posix.O_RDONLY))\n        print('opened', pid)\n"
    "    except OSError:\n        pass\ndef area(r):\n    return 0.0\n",
    # a value that is not plain data, a NaN, a huge reply, a mutated argument
    "def area(r):\n    return float('nan')\n",
    "def area(r):\n    return 'x' * (20 << 20)\n",
    "class Weird(float):\n    def __sub__(self, other):\n        return 0.0\n    def __eq__(self, other):\n        return True\n"
    "    __hash__ = float.__hash__\ndef area(r):\n    return Weird(-1.0)\n",
]
if SIGNALS_ARE_SAFE:  # SIGINT at the judges and the parent (not every pid: other runs share the machine)
    MORE_HOSTILE.append(
        "import posix, signal\ndef area(r):\n    for pid in [posix.getppid()] + [int(p) for p in posix.listdir('/proc') if p.isdigit()]:\n"
        "        try:\n            fd = posix.open(f'/proc/{pid}/cmdline', posix.O_RDONLY)\n"
        "            if pid == posix.getppid() or b'_sandbox_judge' in posix.read(fd, 4096):\n"
        "                posix.kill(pid, signal.SIGINT)\n        except OSError:\n            pass\n    return 0.0\n"
    )
AREA_TESTS = [
    "assert abs(area(1.0) - 3.141592653589793) < 1e-9",
    "assert math.isclose(area(2.0), 12.566370614359172)",
    "assert area(3.0) == sorted([28.274333882308138])[0]",
]


def test_more_hostile_completions_score_zero():
    reward = make_code_tests_reward(SandboxLimits(timeout_seconds=2.0))
    correct = "import math\ndef area(r):\n    return math.pi * r * r\n"
    completions = [correct, *MORE_HOSTILE]
    tests = [AREA_TESTS] * (1 + len(MORE_HOSTILE))
    tests[1] = ["assert add(1, 2) == 3", "assert add(2, 5) == 7\nassert check(None) is None"]
    tests[2] = ["assert add(1, 2) == abs(-3)", "assert add(3, 4) == sorted([7])[0]"]
    assert reward(None, completions, tests=tests) == [1.0] + [0.0] * len(MORE_HOSTILE)


# HumanEval format: a `check(candidate)` then `check(entry_point)`, one case per problem.
HUMANEVAL = [
    (
        "def check(candidate):\n    assert candidate([1.0, 2.0, 3.0], 0.5) == False\n"
        "    assert candidate([1.0, 2.8, 3.0, 4.0], 0.3) == True\n    assert candidate([], 1.0) is False\n\n"
        "check(has_close_elements)\n",
        "from itertools import combinations\n\ndef has_close_elements(numbers, threshold):\n"
        "    return any(abs(a - b) < threshold for a, b in combinations(numbers, 2))\n",
        "def has_close_elements(numbers, threshold):\n    return len(numbers) > 2\n",
    ),
    (
        'METADATA = {"author": "lmpg", "dataset": "test"}\n\n\ndef check(candidate):\n    import math\n'
        "    for n in range(8):\n        assert candidate(n) == math.factorial(n)\n"
        "    assert candidate(25) == 15511210043330985984000000\n\ncheck(factorial)\n",
        "def factorial(n):\n    out = 1\n    for k in range(2, n + 1):\n        out *= k\n    return out\n",
        "def factorial(n):\n    return n\n",
    ),
    (
        "def check(candidate):\n    assert sorted(candidate('hello world')) == ['hello', 'world']\n"
        "    assert candidate('') == []\n    words = ['b', 'a']\n    candidate.__name__\n\ncheck(split_words)\n",
        "def split_words(text):\n    return text.split()\n",
        "def split_words(text):\n    return ['hello', 'world']\n",
    ),
]


def test_humaneval_problems_pass_fail_and_resist_hostile_solutions():
    reward = make_code_tests_reward(SandboxLimits(timeout_seconds=3.0))
    hostile = [
        "class Anything(list):\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
        "def ENTRY(*args):\n    return Anything()\n",
        "import builtins\nbuiltins.AssertionError = KeyError\ndef ENTRY(*args):\n    return None\n"
        "def check(candidate):\n    pass\n",
        "def ENTRY(*args):\n    raise SystemExit(0)\n",
    ]
    for test, correct, wrong in HUMANEVAL:
        assert split_test_cases(test) == [test]  # no top-level assert: one case
        entry = test.rsplit("check(", 1)[1].split(")")[0]
        completions = [f"```python\n{correct}```", wrong] + [code.replace("ENTRY", entry) for code in hostile]
        assert reward(None, completions, tests=[test] * len(completions)) == [1.0, 0.0, 0.0, 0.0, 0.0]
