"""benchmarks/bench_gpu.py --smoke: the GPU check's code path on CPU at tiny shapes (no timings asserted)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_gpu  # noqa: E402


def test_smoke_writes_every_figure(tmp_path):
    rows = "sample-lmpg,sample-generate,full-kl,lora-gc"
    report = bench_gpu.main(["--smoke", "--out", str(tmp_path), "--rows", rows])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["row"] for r in saved["rows"]] == rows.split(",")
    assert all(r["status"] == "ok" for r in report["rows"]), report["rows"]
    w = bench_gpu.SMOKE
    for r in saved["rows"][:2]:  # both samplers, same prompts, up to T tokens per row
        assert 0 < r["tokens"] <= w.batch_size * w.max_new_tokens and r["tokens_per_s"] > 0
    for r in saved["rows"][2:]:
        assert r["iterations"] == w.iters
        assert {"sample", "score", "update"} <= set(r["phases"])
        assert abs(sum(r["phases"].values()) - r["s_per_iter"]) < 1e-6 + 0.01 * r["s_per_iter"]
        assert r["update_tokens_per_s"] > 0 and r["peak_mb"] is None  # CPU: no CUDA memory figure
    full_kl, lora_gc = saved["rows"][2:]
    assert lora_gc["trainable_params"] < full_kl["trainable_params"] == full_kl["params"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| smoke | generate |" in table and "| smoke | lora-gc |" in table and "accuracy is not measured" in table


def test_rows_past_the_budget_are_skipped_and_listed(tmp_path):
    # budget 0: the first row runs (nothing to estimate from), the second sampling row is expected
    # to take as long as the first and is skipped; the training row has no estimate, runs, and stops
    # after its first iteration
    report = bench_gpu.run(["smoke"], bench_gpu.SMOKE, "cpu", 0.0, tmp_path,
                           {"smoke": ["sample-lmpg", "sample-generate", "lora"]}, strict=True)
    assert [r["row"] for r in report["rows"]] == ["sample-lmpg", "lora"]
    assert report["rows"][1]["iterations"] == 1 and "time budget" in report["rows"][1]["status"]
    assert [s["row"] for s in report["skipped"]] == ["sample-generate"]
    assert "sample-generate: skipped, time budget" in (tmp_path / "gpu_check.md").read_text()


def test_estimate_scales_from_the_other_model():
    done = [{"model": "qwen2.5-0.5b", "row": "sample-lmpg", "status": "ok", "wall_s": 10.0},
            {"model": "qwen2.5-0.5b", "row": "lora", "status": "ok", "wall_s": 5.0},
            {"model": "qwen2.5-0.5b", "row": "full", "status": "error: OutOfMemoryError: ...", "wall_s": 1.0}]
    assert bench_gpu.estimate("sample-generate", "qwen2.5-0.5b", done) == 10.0
    assert bench_gpu.estimate("lora-gc", "qwen2.5-0.5b", done) == 5.0 * 1.3
    assert bench_gpu.estimate("sample-lmpg", "qwen2.5-1.5b", done) == 10.0 * 28 / 24  # layers
    ratio = (28 * 1536 * (1536 + 8960)) / (24 * 896 * (896 + 4864))  # per-layer weights x layers
    assert abs(bench_gpu.estimate("full", "qwen2.5-1.5b", done) - 5.0 * ratio) < 1e-9
    assert bench_gpu.estimate("full", "qwen2.5-1.5b", done[:1]) is None
