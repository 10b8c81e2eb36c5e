"""Smoke test of benchmarks/bench_memory.py: LoRA vs full fine-tuning on the quick model."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"


def load():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_full_vs_lora(tmp_path, capsys):
    bench = load()
    full, lora = bench.main(["--quick", "--json", str(tmp_path / "m.json")])
    assert (full["mode"], lora["mode"]) == ("full", "lora")
    assert full["params"] == lora["params"] > 0
    # full fine-tuning trains every weight but the frozen EOS bias; LoRA only its adapters
    assert full["trainable_params"] == full["params"] - 4096
    assert 0 < lora["trainable_params"] < full["trainable_params"] / 2
    for r in (full, lora):
        assert r["peak_mb"] >= r["base_mb"] > 0 and r["peak_over_base_mb"] >= 0
    assert "| quick | lora |" in capsys.readouterr().out
