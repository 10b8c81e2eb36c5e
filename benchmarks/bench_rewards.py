"""Reward scoring throughput: completions per second for the math and code rewards, per executor.

    python benchmarks/bench_rewards.py                   # 1,000 completions each, serial/thread/process
    python benchmarks/bench_rewards.py --n 200 --executors serial,thread

The completions are synthetic but shaped like real ones. Math: GSM8K-style `#### 72` endings,
`\\boxed{}` answers (integers, fractions, thousands separators, polynomials), `<answer>` tags and
bare numbers; about a quarter wrong; references are GSM8K solutions or bare answers. Code: small
functions in ```python blocks, each with 3 asserts; about a quarter wrong, a few raising, and
`--hangs` infinite loops that run into the timeout; each code completion starts two processes
(the confined solution and the judge that runs its tests, reward_fns/sandbox.py). Each
configuration scores the same batch through `RewardScorer.score` once, on a batch of its own (same distribution, another seed); the pool is
started (and timed, "warm-up") by a 2-completion call before the measured one.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmpg.rewards import RewardScorer  # noqa: E402
from reward_fns import make_code_tests_reward, math_answer  # noqa: E402
from reward_fns.sandbox import SandboxLimits  # noqa: E402

# (solution body, 3 test cases, a wrong body)
CODE_TASKS = [
    (
        "def add(a, b):\n    return a + b",
        ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(5, 5) == 10"],
        "def add(a, b):\n    return a - b",
    ),
    (
        "def reverse(s):\n    return s[::-1]",
        ["assert reverse('abc') == 'cba'", "assert reverse('') == ''", "assert reverse('ab') == 'ba'"],
        "def reverse(s):\n    return s",
    ),
    (
        "def factorial(n):\n    out = 1\n    for k in range(2, n + 1):\n        out *= k\n    return out",
        ["assert factorial(0) == 1", "assert factorial(5) == 120", "assert factorial(3) == 6"],
        "def factorial(n):\n    return n * factorial(n - 1)",
    ),  # no base case: RecursionError
    (
        "def is_palindrome(s):\n    return s == s[::-1]",
        ["assert is_palindrome('aba')", "assert not is_palindrome('ab')", "assert is_palindrome('')"],
        "def is_palindrome(s):\n    return True",
    ),
    (
        "def largest(xs):\n    return max(xs)",
        ["assert largest([1, 3, 2]) == 3", "assert largest([-1]) == -1", "assert largest([2, 2]) == 2"],
        "def largest(xs):\n    return xs[0]",
    ),
    (
        "import math\n\ndef hypot(a, b):\n    return math.sqrt(a * a + b * b)",
        ["assert hypot(3, 4) == 5", "assert hypot(0, 0) == 0", "assert abs(hypot(1, 1) - 2 ** 0.5) < 1e-9"],
        "def hypot(a, b):\n    return a + b",
    ),
]
HANG = "def add(a, b):\n    while True:\n        pass"


def math_batch(n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    completions, answers = [], []
    for i in range(n):
        kind = i % 5
        wrong = rng.random() < 0.25
        if kind == 0:  # GSM8K
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            answers.append(f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}")
            completions.append(
                f"She has {a} and buys {b}, so {a} + {b} = {a + b + wrong}.\n#### {a + b + wrong}"
            )
        elif kind == 1:  # boxed fraction vs decimal reference
            q = rng.choice([2, 4, 5, 8])
            answers.append(str(1 / q))
            completions.append(
                f"Each share is $\\frac{{1}}{{{q}}}$ of the cake, so \\boxed{{\\frac{{1}}{{{q + wrong}}}}}."
            )
        elif kind == 2:  # thousands separator
            value = rng.randint(1000, 99999)
            answers.append(str(value))
            completions.append(f"<think>{value // 2} twice</think><answer>{value + wrong:,}</answer>")
        elif kind == 3:  # polynomial, symbolic
            c = rng.randint(1, 9)
            answers.append(f"x^2 + {c}")
            completions.append(f"Expanding gives \\boxed{{{c + wrong} + x^{{2}}}}.")
        else:  # bare last number
            value = rng.randint(1, 500)
            answers.append(f"{value}.0")
            completions.append(f"After counting twice I get {value + wrong} marbles")
    return completions, answers


def code_batch(n: int, hangs: int, rng: random.Random) -> tuple[list[str], list[list[str]]]:
    completions, tests = [], []
    hang_at = set(rng.sample(range(n), hangs))
    for i in range(n):
        body, cases, wrong = CODE_TASKS[i % len(CODE_TASKS)]
        if i in hang_at:
            body, cases = HANG, CODE_TASKS[0][1]
        elif rng.random() < 0.25:
            body = wrong
        completions.append(f"Here is the function:\n```python\n{body}\n```\nIt handles the edge cases.")
        tests.append(cases)
    return completions, tests


def run(reward, completions: list, columns: dict, executor: str, workers: int | None) -> dict:
    n = len(completions)
    prompts, completion_ids = ["prompt"] * n, [[0] * 32] * n
    with RewardScorer([reward], executor=executor, max_workers=workers) as scorer:
        began = time.perf_counter()
        scorer.score(
            prompts[:2], completions[:2], completion_ids[:2], columns={k: v[:2] for k, v in columns.items()}
        )
        warmup = time.perf_counter() - began  # starts the pool (processes import torch, sympy)
        began = time.perf_counter()
        scores = scorer.score(prompts, completions, completion_ids, columns=columns)
        seconds = time.perf_counter() - began
    mean = scores.means()[scores.names[0]]
    shown_workers = "-" if executor == "serial" else str(scorer.max_workers)
    return {
        "seconds": seconds,
        "per_second": n / seconds,
        "mean": mean,
        "warmup": warmup,
        "workers": shown_workers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="completions per reward")
    parser.add_argument("--executors", default="serial,thread,process")
    parser.add_argument(
        "--workers", type=int, default=None, help="max_workers (default: the scorer's default)"
    )
    parser.add_argument("--timeout", type=float, default=2.0, help="sandbox wall-clock limit per completion")
    parser.add_argument("--hangs", type=int, default=3, help="code completions that loop forever")
    parser.add_argument("--rewards", default="math,code")
    args = parser.parse_args()

    code_reward = make_code_tests_reward(SandboxLimits(timeout_seconds=args.timeout))

    def batch(name: str, seed: int) -> tuple:
        # A fresh batch per configuration, so no run profits from caches (sympy's) warmed by another.
        rng = random.Random(seed)
        if name == "math":
            completions, answers = math_batch(args.n, rng)
            return math_answer, completions, {"answer": answers}
        completions, tests = code_batch(args.n, args.hangs, rng)
        return code_reward, completions, {"tests": tests}

    print(f"{args.n} completions per reward, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    print(
        f"{'reward':<8}{'executor':<10}{'workers':>8}{'seconds':>10}{'compl/s':>10}{'mean r':>9}{'warm-up s':>11}"
    )
    for name in args.rewards.split(","):
        for seed, executor in enumerate(args.executors.split(",")):
            reward, completions, columns = batch(name, seed)
            workers = None if executor == "serial" else args.workers
            result = run(reward, completions, columns, executor, workers)
            print(
                f"{name:<8}{executor:<10}{result['workers']:>8}{result['seconds']:>10.2f}{result['per_second']:>10.1f}"
                f"{result['mean']:>9.3f}{result['warmup']:>11.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
