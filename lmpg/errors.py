"""User-facing errors.

Every mistake a user can make (bad config, bad data, a broken reward function) raises a subclass of
`LmpgError` whose message is one line saying what is wrong and how to fix it. The CLI prints such
errors without a traceback and exits non-zero; anything else is a bug and keeps its traceback.
"""


class LmpgError(Exception):
    """Base class for errors caused by user input, reported as one line."""


class ConfigError(LmpgError, ValueError):
    """A config field is unknown, of the wrong type, or inconsistent with another field."""


class DataError(LmpgError, ValueError):
    """The dataset cannot be read or lacks what training needs (e.g. a `prompt` column)."""


class RewardError(LmpgError, RuntimeError):
    """A reward function cannot be loaded, raised, or returned something unusable."""


class EnvError(LmpgError, RuntimeError):
    """An environment's code (reset, step, get_reward) raised, stalled or returned something unusable."""


class TrainingError(LmpgError, RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite updates)."""


class MissingDependencyError(LmpgError, ImportError):
    """An optional package that one feature needs (datasets, math-verify, ...) is not installed."""


def require_package(module: str, package: str, feature: str):
    """`import module`, or a MissingDependencyError naming the pip package and what needs it.

    For the dependencies that only some features use, so that lmpg imports and trains without them
    (e.g. on a GPU machine with no package registry; docs/scaling.md)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"{feature} needs the {package} package, which is not installed; "
                                     f"pip install {package}") from None
