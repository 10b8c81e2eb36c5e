"""Smoke test of benchmarks/bench_iteration.py: the --quick paths run and report every field."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_iteration.py"
FIELDS = {"impl", "size", "mode", "threads", "workload", "iters", "s_per_iter", "s_per_iter_min", "s_per_iter_all",
          "cpu_s_per_iter", "tokens_per_s", "phases", "params", "trainable_params", "versions"}
MEMORY = {"peak_rss_mb", "base_rss_mb", "iter_peak_mb", "iter_peak_delta_mb"}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_iteration", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_iteration", module)
    spec.loader.exec_module(module)
    return module


def check(result, impl, mode):
    assert FIELDS <= set(result), FIELDS - set(result)
    assert result["impl"] == impl and result["mode"] == mode and result["size"] == "quick"
    assert result["iters"] == 1 and result["s_per_iter"] > 0 and result["tokens_per_s"] > 0
    assert set(result["phases"]) == {"sample", "score", "old_logp", "update", "other"}
    assert result["phases"]["sample"] > 0 and result["phases"]["update"] > 0
    assert result["trainable_params"] == result["params"] - 4096  # everything but the frozen EOS bias
    if mode == "separate":
        assert MEMORY <= set(result) and result["peak_rss_mb"] > 0


def test_quick_floor_and_lmpg(bench, tmp_path, capsys):
    out = tmp_path / "out.json"
    bench.main(["--quick", "--impl", "floor,lmpg", "--json", str(out)])
    saved = json.loads(out.read_text())
    floor, lmpg = saved["results"]
    check(floor, "floor", "separate")
    check(lmpg, "lmpg", "separate")
    assert floor["phases"]["old_logp"] > 0  # the floor's extra no-grad forward
    assert lmpg["phases"]["old_logp"] < 1e-3  # one minibatch per epoch: lmpg runs no pass for it
    rows = {r["impl"]: r for r in saved["summary"]}
    assert rows["floor"]["vs_floor"] == 1.0 and rows["lmpg"]["vs_floor"] > 0
    assert "| quick | lmpg |" in capsys.readouterr().out


def test_quick_interleaved_with_and_without_the_speedups(bench):
    import lmpg.logprobs
    import lmpg.sampler
    import lmpg.trainer

    originals = (lmpg.logprobs.selective_log_softmax, lmpg.sampler.distinct_rows, lmpg.trainer.make_adamw)
    impls = ["lmpg-fast", "lmpg-before", "floor"]
    results = bench.main(["--quick", "--interleave", "--impl", ",".join(impls)])
    for r, impl in zip(results, impls):
        check(r, impl, "interleaved")
    # lmpg-before's patches are undone once it has run
    assert (lmpg.logprobs.selective_log_softmax, lmpg.sampler.distinct_rows, lmpg.trainer.make_adamw) == originals


def test_quick_trl(bench):
    pytest.importorskip("trl")
    (result,) = bench.main(["--quick", "--impl", "trl"])
    check(result, "trl", "separate")
    assert result["phases"]["old_logp"] > 0  # num_iterations=2: TRL computes log pi_old with a forward
