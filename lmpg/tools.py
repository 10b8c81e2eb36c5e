"""Tools: schemas from type hints and docstrings, calls parsed from the model's text, run with a timeout.

A tool is a Python function (or an environment's public method) with type-hinted arguments and a
Google-style docstring, as transformers and TRL take them: `tool_schemas` turns it into the JSON
schema chat templates render through `tools=` (`transformers.utils.get_json_schema`).

Two call formats (`TOOL_FORMATS`):

- hermes: what Hermes, Qwen 2.5 / 3 and most open chat templates ask for,
      <tool_call>{"name": "add", "arguments": {"a": 12, "b": 34}}</tool_call>
  one JSON object per tag; several tags in one turn are several calls.
- simple: `name(arg, arg)`, positional arguments in the schema's order, each a JSON literal or a
  bare word, e.g. `add(12,34)`: short enough for a tiny character-level model to learn. Every
  `name(...)` in the text is taken as a call.

Nothing a model writes can crash a run: a malformed call, an unknown tool, wrong arguments, a tool
that raises or one that runs past its timeout each become an error observation the model reads
(`ToolResult.error` True, counted as a tool error).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
from dataclasses import dataclass
from typing import Callable, get_args

from lmpg.choices import ToolFormat
from lmpg.errors import ConfigError

TOOL_FORMATS = get_args(ToolFormat)
RESERVED_METHODS = ("reset", "step", "get_reward", "close")
"""Methods of an environment class that are never tools."""

_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
CALL_MARKERS = {"hermes": ("<tool_call>", "</tool_call>"), "simple": ()}
"""The text each format wraps a call in: a tokenizer may hold these as special tokens (decode them kept)."""
_SIMPLE = re.compile(r"([A-Za-z_]\w*)\(([^()]*)\)")


@dataclass
class ToolCall:
    """One call parsed from the model's text; `error` says why it cannot run (None when it can)."""

    name: str
    arguments: dict
    error: str | None = None


@dataclass
class ToolResult:
    name: str
    content: str
    error: bool


def environment_tools(instance) -> dict[str, Callable]:
    """The public methods of an environment instance, by name: its tools (TRL's rule: listed on the
    class, so properties are not evaluated; `reset`, `step`, `get_reward`, `close` and _private
    names excluded)."""
    return {name: getattr(instance, name) for name, _ in inspect.getmembers(type(instance), inspect.isfunction)
            if not name.startswith("_") and name not in RESERVED_METHODS}


def tool_schemas(tools: dict[str, Callable]) -> list[dict]:
    """The JSON schema of each tool (`transformers.utils.get_json_schema`), in the dict's order."""
    from transformers.utils import get_json_schema

    schemas = []
    for name, fn in tools.items():
        try:
            schemas.append(get_json_schema(fn))
        except Exception as e:  # noqa: BLE001 - transformers raises its own parsing exceptions
            raise ConfigError(f"tool {name!r} has no usable schema ({str(e).splitlines()[0]}); give every "
                              "argument a type hint and a Google-style docstring with an Args section") from None
    return schemas


def parse_tool_calls(text: str, tool_format: str, schemas: dict[str, dict] | None = None) -> list[ToolCall]:
    """Every tool call in `text`, in order; malformed ones carry an `error`.

    schemas: name -> JSON schema, needed by the simple format to map positional arguments to names.
    """
    if tool_format == "hermes":
        return [_hermes_call(body) for body in _HERMES.findall(text)]
    if tool_format == "simple":
        return [_simple_call(name, args, (schemas or {}).get(name)) for name, args in _SIMPLE.findall(text)]
    raise ConfigError(f"tool_format={tool_format!r} is not valid; set it to one of {', '.join(TOOL_FORMATS)}")


def other_format(text: str, tool_format: str, schemas: dict[str, dict] | None = None) -> str | None:
    """The other format's name when `text`, in which `tool_format` finds no call, holds what looks
    like calls in it (a hermes tag, or a known tool's name(...)); else None."""
    if tool_format == "simple" and "<tool_call>" in text:
        return "hermes"
    if tool_format == "hermes" and any(c.name in (schemas or {}) for c in parse_tool_calls(text, "simple", schemas)):
        return "simple"
    return None


def _special_ids(tokenizer) -> set[int]:
    """The ids `decode(skip_special_tokens=True)` drops: the named special tokens and every added
    token marked special (which `all_special_ids` does not always list)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


def call_marker_ids(tokenizer, tool_format: str) -> set[int]:
    """The ids of the format's call markers (`CALL_MARKERS`) that the tokenizer holds as special
    tokens: decoding a turn with special tokens skipped would drop them, and every call with them."""
    special = _special_ids(tokenizer)
    ids = {tokenizer.convert_tokens_to_ids(marker) for marker in CALL_MARKERS.get(tool_format, ())}
    return {i for i in ids if isinstance(i, int) and i in special}


def decode_turn(tokenizer, ids: list[int], keep: set[int] = frozenset()) -> str:
    """The text of one turn of the policy: special tokens skipped, except the ids in `keep` (the call
    markers of `call_marker_ids`), which stay in the text for the calls to be parsed from it."""
    if not keep.intersection(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)
    drop = _special_ids(tokenizer) - keep
    return tokenizer.decode([t for t in ids if t not in drop], skip_special_tokens=False)


def _hermes_call(body: str) -> ToolCall:
    try:
        call = json.loads(body.strip())
    except json.JSONDecodeError as e:
        return ToolCall("", {}, f"the tool call is not valid JSON ({e.msg})")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return ToolCall("", {}, 'a tool call must be {"name": ..., "arguments": {...}}')
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return ToolCall(call["name"], {}, "the arguments are not a JSON object")
    if not isinstance(arguments, dict):
        return ToolCall(call["name"], {}, "the arguments are not a JSON object")
    return ToolCall(call["name"], arguments)


def _simple_call(name: str, args: str, schema: dict | None) -> ToolCall:
    if schema is None:
        return ToolCall(name, {}, f"unknown tool {name!r}")
    names = list(schema["function"]["parameters"].get("properties", {}))
    values = [v.strip() for v in args.split(",")] if args.strip() else []
    if len(values) != len(names):
        return ToolCall(name, {}, f"{name} takes {len(names)} arguments ({', '.join(names)}), got {len(values)}")
    parsed = []
    for v in values:
        try:
            parsed.append(json.loads(v))
        except json.JSONDecodeError:
            parsed.append(v)
    return ToolCall(name, dict(zip(names, parsed)))


def call_tool(tools: dict[str, Callable], call: ToolCall, timeout: float | None) -> ToolResult:
    """Run one parsed call; any failure is an error result, never an exception.

    The tool runs in a daemon thread that is abandoned after `timeout` seconds (Python cannot kill a
    thread: a tool that never returns keeps its thread, but the episode goes on). A coroutine
    function is run to completion in that thread's own event loop.
    """
    if call.error is not None:
        return ToolResult(call.name, f"error: {call.error}", True)
    fn = tools.get(call.name)
    if fn is None:
        return ToolResult(call.name, f"error: unknown tool {call.name!r}; tools: {', '.join(tools)}", True)
    outcome: dict = {}

    def run():
        try:
            value = fn(**call.arguments)
            outcome["value"] = asyncio.run(value) if inspect.iscoroutine(value) else value
        except Exception as e:  # noqa: BLE001 - a tool's failure is the model's observation
            outcome["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=run, daemon=True, name=f"lmpg-tool-{call.name}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return ToolResult(call.name, f"error: {call.name} timed out after {timeout:g} s", True)
    if "error" in outcome:
        return ToolResult(call.name, f"error: {outcome['error']}", True)
    return ToolResult(call.name, str(outcome.get("value")), False)
