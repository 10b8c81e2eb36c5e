"""Code correctness reward (reward_fns/code_tests.py), on literal completions."""

from __future__ import annotations

import pytest

from lmpg.errors import RewardError
from reward_fns.code_tests import code_tests, extract_code, make_code_tests_reward, split_test_cases
from reward_fns.sandbox import SandboxLimits

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
