"""Code correctness: the fraction of a sample's test cases the completion's code passes.

    r_i = (1/n_i) · sum_j 1[test case j passes]      (or 1[all pass] with all_or_nothing)

The code is the last ```python block of the completion (else the last bare ``` block, else the whole
completion); it runs in a confined subprocess and its test cases in a separate judge process that
calls into it and compares plain values (`reward_fns.sandbox`: read its docstring for why the code
cannot forge a pass, what still gets through, and what the confinement does not stop). A completion
that hangs, forks, floods its output, exits or reaches for files or the network scores the cases it
passed before it was stopped.

Test cases come from the `tests` column (or MBPP's `test_list`): a list of Python snippets (usually
one `assert` each), or one string of code, split into cases by `split_test_cases`. HumanEval's `test` plus
`check(entry_point)` is one such string (one case: it has no top-level assert).
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Sequence
from typing import Any

from lmpg.errors import RewardError
from lmpg.rewards.types import RewardFn, named_reward
from reward_fns.sandbox import DEFAULT_LIMITS, SandboxLimits, run_python_tests
from reward_fns.text import completion_text, reference_column

TEST_COLUMNS = ("tests", "test_list")

_PYTHON_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_BARE_FENCE = re.compile(r"```[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The last ```python fenced block (a block cut off by the length limit runs to the end), else the
    last bare ``` block, else the whole text."""
    for fence in (_PYTHON_FENCE, _BARE_FENCE):
        blocks = fence.findall(text)
        if blocks:
            return blocks[-1]
    return text


def split_test_cases(tests: str | Sequence[str]) -> list[str]:
    """Test cases from a list of snippets (kept as they are) or from one string of code.

    A string is split at its top-level `assert` statements: each case is an assert together with the
    statements before it since the previous assert (imports, helper definitions), so a failing setup
    fails only the case it precedes. Statements after the last assert join the last case; a string
    without asserts is one case. Raises RewardError for a snippet that is not valid Python.
    """
    if isinstance(tests, str):
        try:
            statements = ast.parse(tests).body
        except SyntaxError as error:
            raise RewardError(
                f"test code does not parse ({error.msg}, line {error.lineno}); fix the tests column"
            ) from None
        lines = tests.splitlines(keepends=True)
        cases, start = [], 0
        for statement in statements:
            # Asserts sharing a line (`assert a; assert b`) stay one case.
            if isinstance(statement, ast.Assert) and statement.end_lineno > start:
                cases.append("".join(lines[start : statement.end_lineno]))
                start = statement.end_lineno
        tail = "".join(lines[start:])
        if tail.strip():
            cases = cases[:-1] + [cases[-1] + tail] if cases else [tail]
        return cases
    cases = [str(case) for case in tests]
    for index, case in enumerate(cases):
        try:
            compile(case, f"<test {index}>", "exec")
        except SyntaxError as error:
            raise RewardError(
                f"test case {index} {case!r:.80} is not valid Python ({error.msg}); fix the tests column"
            ) from None
    return cases


def _code_tests_reward(
    limits: SandboxLimits, all_or_nothing: bool, prompts: list, completions: list, /, **kwargs: Any
) -> list[float | None]:
    tests_column = reference_column(kwargs, TEST_COLUMNS, len(completions))
    if tests_column is None:
        return [None] * len(completions)
    rewards: list[float | None] = []
    for completion, tests in zip(completions, tests_column):
        cases = split_test_cases(tests) if tests is not None else []
        if not cases:
            rewards.append(None)
            continue
        result = run_python_tests(extract_code(completion_text(completion)), cases, limits)
        rewards.append(float(all(result.passed)) if all_or_nothing else result.fraction_passed)
    return rewards


def make_code_tests_reward(
    limits: SandboxLimits = DEFAULT_LIMITS, all_or_nothing: bool = False, name: str = "code_tests"
) -> RewardFn:
    """A reward running each completion's code against its test cases (module docstring).

    limits: time, memory and output limits of one run (code plus all its cases), see SandboxLimits.
    all_or_nothing: 1.0 only if every case passes, instead of the fraction passed.  name: the
    reward's name in logs. Samples without test cases get None.
    """
    doc = ("1.0 if the completion's code passes all the sample's test cases (run in a sandbox), else 0.0."
           if all_or_nothing
           else "The fraction of the sample's test cases the completion's code passes, run in a sandbox.")
    return named_reward(functools.partial(_code_tests_reward, limits, all_or_nothing), name, doc)


code_tests = make_code_tests_reward()
