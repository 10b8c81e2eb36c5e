"""Reward specs: the strings a config or command line names a reward function with.

- 'package.module:function' or 'path/to/file.py:function' (the attribute may be dotted);
- the bare name of a built-in (`reward_fns.BUILTIN_REWARDS`, e.g. 'math_answer');
- a reward model, as TRL's `reward_funcs` takes one: a local directory or a hub id ('org/name') of a
  sequence-classification model with one label, scored by `reward_fns.reward_model.RewardModelReward`.

`reward_fns` depends on `lmpg`, never the reverse: lmpg finds the built-ins by module name at run
time, as it finds any user module.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from lmpg.errors import RewardError

BUILTINS_MODULE = "reward_fns"
"""The package whose `BUILTIN_REWARDS` dict the bare names resolve in."""
REWARD_MODEL_MODULE = "reward_fns.reward_model"


def one_line(text: Any, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def builtin_rewards() -> dict[str, Callable]:
    """The built-in rewards by name (imported on demand: math_answer pulls in sympy)."""
    return importlib.import_module(BUILTINS_MODULE).BUILTIN_REWARDS


def _public_callables(module: Any) -> list[str]:
    return sorted(
        name
        for name, value in vars(module).items()
        if callable(value) and not name.startswith("_") and not inspect.isclass(value)
    )


def _import_module(target: str, spec: str) -> Any:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as error:
        if error.name and (target == error.name or target.startswith(error.name + ".")):
            raise RewardError(
                f"reward function '{spec}': module '{target}' not found; install it, or give a file"
                " path instead (e.g. 'path/to/rewards.py:my_reward')"
            ) from None
        raise RewardError(f"reward function '{spec}': importing '{target}' failed: {one_line(error)}") from None
    except Exception as error:
        raise RewardError(
            f"reward function '{spec}': importing '{target}' raised {type(error).__name__}: {one_line(error)}"
        ) from None


def _import_file(path: str, spec: str) -> Any:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise RewardError(f"reward function '{spec}': file not found: {path}")
    stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
    module_name = f"lmpg_reward_file_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    if module_name in sys.modules:  # loaded before: the same functions, not a second copy
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # registered first, as a normal import does (dataclasses need it)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise RewardError(
            f"reward function '{spec}': running {path} raised {type(error).__name__}: {one_line(error)}"
        ) from None
    return module


def is_reward_model_spec(spec: str) -> bool:
    """A spec with no ':' that is a directory or looks like a hub id ('org/name') names a reward model."""
    return ":" not in spec and (os.path.isdir(spec) or (spec.count("/") == 1 and not spec.endswith(".py")))


def load_reward_model(spec: str) -> Callable:
    """`RewardModelReward` of the sequence-classification model at a path or hub id, named after it."""
    reward_model = importlib.import_module(REWARD_MODEL_MODULE)
    try:
        return reward_model.RewardModelReward(spec)
    except RewardError:
        raise
    except Exception as error:
        raise RewardError(
            f"reward model '{spec}' did not load ({type(error).__name__}: {one_line(error, 120)}); give a"
            " directory or hub id of a sequence-classification model with num_labels=1"
        ) from None


def load_reward_fn(spec: str) -> Callable:
    """The reward function a spec names (module docstring).

    Raises RewardError saying why a spec does not resolve: module or file not found, import failure,
    no such attribute (listing the callables the module has), an attribute that is a class or not
    callable, an unknown built-in name (with the closest ones), a reward model that does not load.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"reward function spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if ":" not in spec:
        builtins = builtin_rewards()
        if spec in builtins:
            return builtins[spec]
        if is_reward_model_spec(spec):
            return load_reward_model(spec)
        close = difflib.get_close_matches(spec, builtins, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise RewardError(
            f"reward function '{spec}' is not a built-in ({', '.join(sorted(builtins))}); {hint}give"
            " 'package.module:function', 'path/to/file.py:function' or a reward model directory"
        )
    target, _, attribute = spec.rpartition(":")
    if not target or not attribute:
        raise RewardError(f"reward function '{spec}' must be 'module:function' or 'file.py:function'")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    module = _import_file(target, spec) if is_file else _import_module(target, spec)
    value = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            available = _public_callables(module)
            listing = ", ".join(available[:20]) + (", ..." if len(available) > 20 else "") or "none"
            raise RewardError(
                f"reward function '{spec}': '{target}' has no attribute '{attribute}'; its callables: {listing}"
            )
        value = getattr(value, part)
    if inspect.isclass(value):
        raise RewardError(
            f"reward function '{spec}' is a class; create an instance at module level and name that instead"
        )
    if not callable(value):
        raise RewardError(f"reward function '{spec}' is a {type(value).__name__}, not a callable")
    return value
