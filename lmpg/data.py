"""Prompts: loading, checking, rendering, and a resumable order over them.

A dataset row is one initial state: its `prompt` column is a string, or a list of chat messages
({"role", "content"}) rendered with the tokenizer's chat template. Every other column (e.g.
`answer`) is handed to the reward functions, aligned to the completions.

Rows given in memory (a list of dicts, or a dict of columns) need no `datasets` package: without
it they are held in a `PromptTable`; files and hub names need `datasets`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmpg.errors import DataError, require_package

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_prompt_dataset(source, split: str = "train", prompt_column: str = "prompt"):
    """A `datasets.Dataset` from a Dataset, a DatasetDict, a local file, or a hub name; checked.

    Rows in memory (a list of dicts, a dict of columns) become a `datasets.Dataset` where the package
    is installed and a `PromptTable` where it is not."""
    if isinstance(source, (list, dict)) and not _have_datasets():
        source = PromptTable.from_rows(source)
    if isinstance(source, PromptTable):
        check_prompt_dataset(source, prompt_column)
        return source
    what = f"{str(source)!r}" if isinstance(source, (str, Path)) else f"a {type(source).__name__}"
    datasets = require_package("datasets", "datasets", f"loading prompts from {what}")

    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise DataError(f"dataset has no split {split!r}; it has {', '.join(source)}; set dataset_split")
        source = source[split]
    if isinstance(source, (str, Path)):
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix in LOCAL_FORMATS or path.exists():
            if not path.is_file():
                raise DataError(f"dataset file {path} does not exist; give a .jsonl/.json/.csv/.parquet path or a hub name")
            if suffix not in LOCAL_FORMATS:
                raise DataError(f"dataset file {path} has an unknown format; use one of {', '.join(LOCAL_FORMATS)}")
            if path.stat().st_size == 0 or not path.read_bytes()[:4096].strip():
                raise DataError(f"dataset file {path} is empty; give at least one prompt")
            try:
                source = datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train")
            except Exception as e:
                raise _file_error(path, e) from None
        else:
            try:
                source = datasets.load_dataset(str(source), split=split)
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DataError(f"cannot load dataset {source!r} from the hub: {first}") from None
    if isinstance(source, list):
        source = datasets.Dataset.from_list(source)
    elif isinstance(source, dict):
        source = datasets.Dataset.from_dict(source)
    if not isinstance(source, datasets.Dataset):
        raise DataError(f"train_dataset must be a datasets.Dataset, a file path or a hub name, not {type(source).__name__}")
    check_prompt_dataset(source, prompt_column)
    return source


def _have_datasets() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


class PromptTable:
    """Rows held in memory, read the way the trainer and `evaluate` read a `datasets.Dataset`:
    `len`, `column_names`, `table[i]` (a row dict), `table[[i, j]]` (a dict of columns),
    `table["col"]` (a column list) and `select(indices)`."""

    def __init__(self, columns: dict[str, list]):
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise DataError(f"dataset columns have different lengths ({', '.join(f'{k}: {len(v)}' for k, v in columns.items())}); "
                            "give every column one value per row")
        self._columns = {k: list(v) for k, v in columns.items()}
        self._len = lengths.pop() if lengths else 0

    @classmethod
    def from_rows(cls, rows) -> "PromptTable":
        """From a list of row dicts (columns in order of first appearance; a missing value is None) or a dict of columns."""
        if isinstance(rows, dict):
            return cls(rows)
        if not all(isinstance(r, dict) for r in rows):
            bad = next(r for r in rows if not isinstance(r, dict))
            raise DataError(f"dataset rows must be dicts like {{'prompt': ...}}, not {type(bad).__name__}")
        names = list(dict.fromkeys(k for r in rows for k in r))
        return cls({k: [r.get(k) for r in rows] for k in names})

    @property
    def column_names(self) -> list[str]:
        return list(self._columns)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._columns:
                raise KeyError(key)
            return list(self._columns[key])
        if isinstance(key, int):
            return {k: v[key] for k, v in self._columns.items()}
        indices = [int(i) for i in key]
        return {k: [v[i] for i in indices] for k, v in self._columns.items()}

    def select(self, indices) -> "PromptTable":
        return PromptTable(self[list(indices)])


def _file_error(path: Path, error: BaseException) -> DataError:
    """One line from a datasets/pyarrow failure: the innermost cause says what is wrong."""
    inner = error
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__
    text = str(error)
    if isinstance(inner, StopIteration) or "corresponds to no data" in text:
        return DataError(f"dataset file {path} is empty; give at least one prompt")
    lines = str(inner).strip().splitlines() or [type(inner).__name__]
    return DataError(f"cannot read dataset file {path}: {lines[0]}")


def check_prompt_dataset(dataset, prompt_column: str = "prompt") -> None:
    """Raise DataError unless the dataset is non-empty and has the prompt column."""
    if prompt_column not in dataset.column_names:
        raise DataError(f"dataset has no {prompt_column!r} column; its columns are {', '.join(dataset.column_names) or 'none'}; "
                        f"rename one (dataset.rename_column) or set prompt_column")
    if len(dataset) == 0:
        raise DataError("dataset is empty; give at least one prompt")


def is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


def render_prompt(tokenizer, prompt, chat_template_kwargs: dict | None = None) -> tuple[str, bool]:
    """(text, add_special_tokens): chat messages go through the chat template (which already holds
    any BOS) with `chat_template_kwargs` (e.g. enable_thinking), plain strings are tokenized with the
    tokenizer's special tokens."""
    if is_conversational(prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("prompts are chat messages but the tokenizer has no chat_template; "
                            "set tokenizer.chat_template or give string prompts")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                             **(chat_template_kwargs or {})), False
    if not isinstance(prompt, str):
        raise DataError(f"a prompt must be a string or a list of chat messages, not {type(prompt).__name__}")
    return prompt, True


class PromptOrder:
    """Endless, reproducible order over dataset rows: a fresh permutation each epoch (shuffle), or
    the dataset's own order every epoch (shuffle=False, TRL's shuffle_dataset=False).

    The permutation of epoch e is a function of (seed, e) alone, so the position (epoch, index) is
    all a checkpoint needs to resume the same order.
    """

    def __init__(self, num_rows: int, seed: int, shuffle: bool = True):
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.epoch, self.position = 0, 0

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_rows))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def next_indices(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            perm = self._permutation(self.epoch)
            take = perm[self.position:self.position + n - len(out)]
            out += take
            self.position += len(take)
            if self.position >= self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_rows": self.num_rows, "seed": self.seed,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows:
            raise DataError(f"checkpoint was made with a dataset of {state['num_rows']} rows, this one has "
                            f"{self.num_rows}; resume with the same dataset")
        if state.get("shuffle", True) != self.shuffle:
            raise DataError(f"checkpoint was made with shuffle_dataset={state.get('shuffle', True)}, this run has "
                            f"shuffle_dataset={self.shuffle}; resume with the same setting")
        self.epoch, self.position = state["epoch"], state["position"]
