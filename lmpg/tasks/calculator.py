"""Sums with a calculator tool: a task where the environment's answer carries what the policy needs.

An episode (chat prompt, tiny character-level model, lmpg's simple tool-call format):

    user       "47+85="
    assistant  "add(47,85)"<eos>          a tool call
    tool       ">132;"                    the calculator's answer (environment tokens)
    assistant  "132"<eos>                 the final answer: reward 1 if it is the sum

or, without the tool, the assistant answers "122"<eos> at once. Adding in its head (most significant
digit first) is what a tiny model gets wrong; copying the tool's answer is easy.

Demonstrator. A pupil who reaches for the calculator only `TOOL_PROBABILITY` (40%) of the time and
otherwise adds in its head, always forgetting the carry out of the units column: right with the
tool, wrong on every sum with a units carry without it. It is systematically suboptimal: its most
likely move (no tool) is the worse one. Imitation learns that mode; the policy gradient over
episodes finds that the tool's episodes pay, and calls it.
"""

from __future__ import annotations

import random

from lmpg.rewards.types import completion_text
from lmpg.tasks.addition import AdditionProblem, column_sum, has_units_carry, make_problems

TOOL_PROBABILITY = 0.4
"""How often the demonstrator calls the calculator."""

ALPHABET = "0123456789+=add(),>;"

# A chat template for the character tokenizer: messages concatenated, assistant turns closed by EOS,
# tool results as ">result;".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}{{- '>' + message['content'] + ';' -}}"
    "{%- else -%}{{- message['content'] -}}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)

__all__ = ["AdditionProblem", "Calculator", "make_problems", "prompt_messages", "demonstration",
           "sum_reward", "demonstrator_success"]


class Calculator:
    """The environment, written the TRL way: reset, and one public method, the tool."""

    def reset(self, **row) -> str | None:
        return None

    def add(self, a: int, b: int) -> int:
        """
        Add two integers.

        Args:
            a: The first integer.
            b: The second integer.

        Returns:
            The sum a + b.
        """
        return a + b


def prompt_messages(problem: AdditionProblem) -> list[dict]:
    return [{"role": "user", "content": f"{problem.a}+{problem.b}="}]


def head_sum(problem: AdditionProblem) -> str:
    """The demonstrator's mental sum: column addition forgetting the units carry, written normally."""
    return column_sum(problem.a, problem.b, forgotten_carry_column=0)[::-1]


def demonstration(problem: AdditionProblem, uses_tool: bool) -> list[dict]:
    """The demonstrator's episode as messages after the prompt."""
    if uses_tool:
        return [{"role": "assistant", "content": f"add({problem.a},{problem.b})"},
                {"role": "tool", "content": str(problem.a + problem.b)},
                {"role": "assistant", "content": str(problem.a + problem.b)}]
    return [{"role": "assistant", "content": head_sum(problem)}]


def sample_demonstrations(problems, tool_probability: float = TOOL_PROBABILITY, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    return [demonstration(p, rng.random() < tool_probability) for p in problems]


def demonstrator_success(problems, tool_probability: float = TOOL_PROBABILITY) -> dict:
    """Exact: success and tool calls per episode of one sampled episode, and of its most likely one."""
    plain = sum(not has_units_carry(p) for p in problems) / len(problems)
    greedy_tool = tool_probability > 0.5
    return {"sampled": {"success": tool_probability + (1 - tool_probability) * plain,
                        "tool_calls": tool_probability},
            "greedy": {"success": 1.0 if greedy_tool else plain, "tool_calls": float(greedy_tool)}}


def sum_reward(prompts: list, completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 where the final answer (the last assistant message) is the sum, else 0.0."""
    out = []
    for completion, target in zip(completions, answer, strict=True):
        said = [m for m in completion if m["role"] == "assistant"] if isinstance(completion, list) else completion
        out.append(float(completion_text(said).strip() == target))
    return out
