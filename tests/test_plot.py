"""plot_run: a PNG with a panel per logged metric; absent metrics get no panel; bad run dirs are one-line errors."""

import json

import pytest

from lmpg.errors import DataError
from lmpg.plot import _panels, plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def full_row(i):
    return {"iteration": i, "reward_mean": 0.1 * i, "reward_std": 0.05, "reward/exact": 0.1 * i,
            "reward/format": 0.5, "kl": 0.01 * i, "entropy": 2.0 - 0.1 * i, "completion_len_mean": 10.0 + i,
            "completion_len_max": 20.0, "clip_frac": 0.02, "ratio_min": 0.9, "ratio_mean": 1.0, "ratio_max": 1.1,
            "grad_snr": 0.3, "grad_noise_scale": 10.0 * i, "ess_frac": 0.9}


def test_every_panel_when_every_metric_is_logged(tmp_path):
    rows = [full_row(i) for i in range(1, 6)]
    rows[2]["kl"] = None  # a NaN written as null by metrics.jsonl
    write_metrics(tmp_path / "run", rows)
    titles = [title for title, _, _ in _panels(rows)]
    assert titles == ["reward (mean ± std)", "reward per function (mean)", "KL to reference",
                      "entropy (nats / token)", "completion length (tokens)", "clip fraction", "importance ratio",
                      "gradient SNR", "gradient noise scale", "effective sample size (ESS / n)"]
    reward_panel = _panels(rows)[0]
    assert reward_panel[2] == "reward_std"  # the ±std band
    assert [k for k, _ in _panels(rows)[1][1]] == ["reward/exact", "reward/format"]
    out = plot_run(tmp_path / "run")
    assert out == tmp_path / "run" / "metrics.png"
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000


def test_absent_metrics_get_no_panel(tmp_path):
    rows = [{k: v for k, v in full_row(i).items() if k not in ("kl", "grad_snr", "grad_noise_scale", "ess_frac", "ratio_min", "ratio_mean",
                                                                 "ratio_max")} for i in range(1, 4)]
    titles = [title for title, _, _ in _panels(rows)]
    assert "KL to reference" not in titles and "gradient SNR" not in titles
    assert not any(t.startswith("effective sample size") for t in titles) and "importance ratio" not in titles
    assert "entropy (nats / token)" in titles
    write_metrics(tmp_path / "run", rows)
    out = plot_run(tmp_path / "run", tmp_path / "plots" / "m.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_missing_or_empty_metrics_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="metrics.jsonl does not exist"):
        plot_run(tmp_path / "nowhere")
    write_metrics(tmp_path / "empty", [])
    with pytest.raises(DataError, match="empty"):
        plot_run(tmp_path / "empty")


def test_the_reward_panel_shows_the_task_reward_and_with_kl_in_reward_the_penalised_one(tmp_path):
    """Issue 23: reward_mean (the task's reward, with its ±std band) and, when logged (kl_in=reward),
    kl_penalised_reward_mean beside it, each under its own label."""
    rows = [{**full_row(i), "kl_penalised_reward_mean": 0.1 * i - 0.02 * i} for i in range(1, 4)]
    title, lines, band = _panels(rows)[0]
    assert title == "reward (mean ± std)" and band == "reward_std"
    assert lines == [("reward_mean", "task reward"), ("kl_penalised_reward_mean", "minus KL penalty (kl_in=reward)")]
    assert [k for k, _ in _panels([full_row(1)])[0][1]] == ["reward_mean"]
    write_metrics(tmp_path / "run", rows)
    assert plot_run(tmp_path / "run").read_bytes()[:8] == PNG_MAGIC
