"""Smoke tests of benchmarks/bench_iteration.py and bench_components.py: the --quick paths run, report
every field, and time lmpg through its public API only (no timing asserted)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
FIELDS = {"impl", "size", "mode", "threads", "workload", "iters", "s_per_iter", "s_per_iter_min", "s_per_iter_all",
          "cpu_s_per_iter", "tokens_per_s", "phases", "phases_cpu", "params", "trainable_params", "versions"}
MEMORY = {"peak_rss_mb", "base_rss_mb", "iter_peak_mb", "iter_peak_delta_mb"}
PHASES = {"sample", "score", "old_logp", "update", "other"}


def load(name):
    sys.path.insert(0, str(BENCHMARKS))  # the benchmarks import their shared workload module
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load("bench_iteration")


def check(result, impl, mode):
    assert FIELDS <= set(result), FIELDS - set(result)
    assert result["impl"] == impl and result["mode"] == mode and result["size"] == "quick"
    assert result["iters"] == 1 and result["s_per_iter"] > 0 and result["tokens_per_s"] > 0
    assert result["trainable_params"] == result["params"] - 4096  # everything but the frozen EOS bias
    if impl.startswith("trl"):  # TRL's phases have no public timing: its total only
        assert result["phases"] is None and result["phases_cpu"] is None
    else:
        assert set(result["phases"]) == PHASES
        assert result["phases"]["sample"] > 0 and result["phases"]["update"] > 0
        # the phases and what they leave ("other") add up to the iteration's wall time
        assert sum(result["phases"].values()) == pytest.approx(result["s_per_iter"], rel=1e-9)
    if mode == "separate":
        assert MEMORY <= set(result) and result["peak_rss_mb"] > 0


def test_quick_floor_and_lmpg(bench, tmp_path, capsys):
    out = tmp_path / "out.json"
    bench.main(["--quick", "--impl", "floor,lmpg", "--json", str(out)])
    saved = json.loads(out.read_text())
    floor, lmpg = saved["results"]
    check(floor, "floor", "separate")
    check(lmpg, "lmpg", "separate")
    assert set(floor["phases_cpu"]) == PHASES  # the floor times its own loop in CPU seconds too
    assert lmpg["phases_cpu"] is None  # lmpg's phases are StepResult.timings: wall clock only
    rows = {r["impl"]: r for r in saved["summary"]}
    assert rows["floor"]["vs_floor"] == 1.0 and rows["lmpg"]["vs_floor"] > 0
    assert "| quick | lmpg |" in capsys.readouterr().out


def test_quick_interleaved_variants_are_config_switches(bench):
    impls = ["lmpg-fast", "lmpg-noshare", "floor"]
    results = bench.main(["--quick", "--interleave", "--impl", ",".join(impls)])
    for r, impl in zip(results, impls):
        check(r, impl, "interleaved")
    assert bench.LMPG_VARIANTS["lmpg-noshare"] == {"shared_prompt_forward": False}


def test_variants_that_patched_the_library_are_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--impl", "lmpg-before"])
    assert "unknown --impl lmpg-before" in capsys.readouterr().err


def test_quick_trl(bench):
    """TRL is in the test extra (pyproject), so this runs in CI: its iterations timed by a callback."""
    (result,) = bench.main(["--quick", "--impl", "trl"])
    check(result, "trl", "separate")


def test_quick_components():
    (result,) = load("bench_components").main(["--quick"])
    timed = {k: v for k, v in result.items() if k.endswith("_s")}
    assert {"adamw_fused_step_s", "log_softmax_split_B32_s", "train_fwd_bwd_shared_prompt_s",
            "sample_shared_prefill_s"} <= set(timed)
    assert all(v >= 0 for v in timed.values())


def test_quick_vocab_memory_gradient_checkpointing_pair(tmp_path, capsys):
    """bench_vocab_memory's lmpg-gc / trl-gc pair runs (each in its own process) and divides by TRL's row."""
    out = tmp_path / "vocab.json"
    load("bench_vocab_memory").main(["--quick", "--impl", "lmpg-gc,trl-gc", "--no-growth", "--json", str(out)])
    rows = {r["impl"]: r for r in json.loads(out.read_text())["main"]}
    assert set(rows) == {"lmpg-gc", "trl-gc"}
    assert all(r["peak_rss_mb"] > 0 and r["s_per_iter"] > 0 for r in rows.values())
    table = capsys.readouterr().out
    assert "| trl-gc |" in table and "| 1.00 | 1.00 |" in table  # TRL's own row, divided by itself
