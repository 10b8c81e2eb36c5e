"""lmpg.data without the datasets package: PromptTable, and training with datasets / math-verify absent."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmpg.data import PromptTable, load_prompt_dataset
from lmpg.errors import DataError

REPO = Path(__file__).resolve().parents[1]

# imported at start-up by the subprocess: every import of datasets or math_verify fails, as on a
# machine where they are not installed
BLOCKER = '''
import sys

class HideModules:
    names = ("datasets", "math_verify")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HideModules())
'''


def test_prompt_table_reads_like_a_dataset():
    table = PromptTable.from_rows([{"prompt": "a", "answer": 1}, {"prompt": "b"}, {"prompt": "c", "answer": 3}])
    assert len(table) == 3 and table.column_names == ["prompt", "answer"]
    assert table[[2, 0]] == {"prompt": ["c", "a"], "answer": [3, 1]}
    assert table[1] == {"prompt": "b", "answer": None}
    assert table["prompt"] == ["a", "b", "c"]
    assert table.select(range(2))["answer"] == [1, None]
    assert load_prompt_dataset(table) is table
    with pytest.raises(DataError, match="no 'question' column"):
        load_prompt_dataset(table, prompt_column="question")
    with pytest.raises(DataError, match="different lengths"):
        PromptTable({"prompt": ["a", "b"], "answer": [1]})
    with pytest.raises(DataError, match="rows must be dicts"):
        PromptTable.from_rows(["a"])


def test_lmpg_trains_without_datasets_and_math_verify(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    script = textwrap.dedent(f'''
        import pytest
        from lmpg import PGConfig, PGTrainer
        from lmpg.data import PromptTable, load_prompt_dataset
        from lmpg.errors import MissingDependencyError
        from lmpg.tiny import make_char_tokenizer, make_tiny_causal_lm
        from reward_fns import math_answer

        with pytest.raises(ImportError):
            import datasets
        tok = make_char_tokenizer("0123456789+=")
        model = make_tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2, seed=0)
        rows = [{{"prompt": f"{{i}}+{{i}}=", "answer": str(2 * i)}} for i in range(4)]
        config = PGConfig(output_dir={str(tmp_path / "run")!r}, iterations=2, batch_size=4, group_size=2,
                          max_new_tokens=3, sample_log_every=0, progress_bar=False)
        trainer = PGTrainer(model, [math_answer], rows, config, tokenizer=tok)
        assert isinstance(trainer.train_dataset, PromptTable)
        metrics = trainer.train()
        assert len(metrics) == 2 and all(m["unscored_frac"] == 0 for m in metrics)
        assert math_answer(["q"], ["so 1,000"], answer=["1000"]) == [1.0]  # plain numbers: no math_verify
        with pytest.raises(MissingDependencyError, match="pip install 'math-verify"):
            math_answer(["q"], ["\\\\boxed{{\\\\frac{{1}}{{2}}}}"], answer=["0.5"])
        with pytest.raises(MissingDependencyError, match="prompts.jsonl' needs the datasets package"):
            load_prompt_dataset("prompts.jsonl")
        print("trained without datasets and math_verify")
    ''')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained without datasets and math_verify" in done.stdout


def test_an_empty_prompt_in_the_dataset_trains_from_bos(tmp_path, tiny_model, tokenizer):
    """A row whose prompt is "" is sampled from BOS (lmpg.rollout.encode_prompts), not a 0-sized tensor."""
    import json

    from conftest import count_a, small_config
    from lmpg import PGTrainer

    rows = [{"prompt": ""}, {"prompt": "1+1="}]
    metrics = PGTrainer(tiny_model, [count_a], rows, small_config(tmp_path, iterations=1, sample_log_every=1,
                                                                   num_samples_to_show=8),
                        tokenizer=tokenizer).train()
    assert len(metrics) == 1 and metrics[0]["completion_len_mean"] > 0
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert "" in {s["prompt"] for s in samples}


def test_prompt_order_without_shuffle_is_the_datasets_order_and_resumes():
    """Issue 22 (TRL's shuffle_dataset=False): rows in dataset order, epoch after epoch; the position
    resumes from a state dict, and a checkpoint of the other setting is refused in one line."""
    from lmpg.data import PromptOrder

    order = PromptOrder(5, seed=3, shuffle=False)
    assert order.next_indices(3) == [0, 1, 2]
    state = order.state_dict()
    assert order.next_indices(4) == [3, 4, 0, 1]
    resumed = PromptOrder(5, seed=3, shuffle=False)
    resumed.load_state_dict(state)
    assert resumed.next_indices(4) == [3, 4, 0, 1]
    assert PromptOrder(5, seed=3).next_indices(5) != [0, 1, 2, 3, 4]  # the default shuffles (seed 3)
    with pytest.raises(DataError, match="shuffle_dataset=False.*shuffle_dataset=True") as err:
        PromptOrder(5, seed=3).load_state_dict(state)
    assert "\n" not in str(err.value)
