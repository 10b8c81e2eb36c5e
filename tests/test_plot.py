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


def episode_row(i):
    return {**full_row(i), "entropy": 4.4912 + 1e-5 * i, "episode_len_mean": 30.0 + i, "turns_mean": 1.5 + 0.1 * i,
            "turns_max": 3, "tool_calls_per_episode": 0.5, "tool_errors_per_episode": 0.1, "truncated_episodes": 2,
            "truncated_frac": 0.25, "max_turns_frac": 0.125}


def test_axes_have_integer_iteration_ticks_and_no_offset(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmpg.plot import metrics_figure

    write_metrics(tmp_path / "run", [episode_row(i) for i in range(1, 6)])  # 5 points: default ticks every 0.5
    fig = metrics_figure(tmp_path / "run")
    fig.canvas.draw()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    try:
        for ax in axes:
            low, high = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if low <= t <= high]
            assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)
            assert ax.yaxis.get_offset_text().get_text() == "", ax.get_title()
        (entropy,) = [ax for ax in axes if ax.get_title().startswith("entropy")]
        labels = [label.get_text() for label in entropy.get_yticklabels() if label.get_text()]
        assert labels and all(text.startswith("4.491") for text in labels), labels  # the values, not offsets
    finally:
        plt.close(fig)


def test_episode_panels_when_the_run_had_episodes(tmp_path):
    rows = [episode_row(i) for i in range(1, 4)]
    panels = {title: [k for k, _ in lines] for title, lines, _ in _panels(rows)}
    assert panels["turns per episode"] == ["turns_mean", "turns_max"]
    assert panels["tool calls per episode"] == ["tool_calls_per_episode", "tool_errors_per_episode"]
    assert panels["truncated episodes (fraction)"] == ["truncated_frac", "max_turns_frac"]
    assert panels["completion length (tokens)"] == ["completion_len_mean", "completion_len_max", "episode_len_mean"]
    single_turn = {title for title, _, _ in _panels([full_row(i) for i in range(1, 4)])}
    assert not {"turns per episode", "tool calls per episode", "truncated episodes (fraction)"} & single_turn
    write_metrics(tmp_path / "run", rows)
    assert plot_run(tmp_path / "run").read_bytes()[:8] == PNG_MAGIC
