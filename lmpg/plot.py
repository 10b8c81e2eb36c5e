"""Plotting a run: one PNG of the metrics `lmpg train` writes to RUN_DIR/metrics.jsonl.

    plot_run("runs/lmpg")            # -> runs/lmpg/metrics.png

Panels, each drawn only when its metric was logged: the task's reward mean with a ±std band (and,
with kl_in=reward, the KL-penalised reward the returns sum beside it); the mean of each
reward function; KL to the reference; entropy; completion length (mean and max); clip fraction;
importance ratio min/mean/max; gradient signal-to-noise ratio and noise scale; effective sample size
of the importance weights; for runs with an environment, turns per episode, tool calls and errors
per episode, and how episodes were truncated. The iteration axis has integer ticks and no axis
uses an offset (a flat entropy reads 4.4912, not +4.491 over 1e-4 ticks).
"""

from __future__ import annotations

import math
from pathlib import Path

from lmpg.errors import DataError
from lmpg.metrics import read_jsonl


def _series(rows: list[dict], key: str) -> list[float]:
    """Values of `key` per row, NaN where absent or null (metrics.jsonl writes NaN as null)."""
    out = []
    for row in rows:
        v = row.get(key)
        out.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)
    return out


def _present(rows: list[dict], key: str) -> bool:
    return any(isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) for r in rows)


def _keys_with_prefix(rows: list[dict], prefix: str) -> list[str]:
    keys = dict.fromkeys(k for r in rows for k in r if k.startswith(prefix))
    return [k for k in keys if _present(rows, k)]


def _panels(rows: list[dict]) -> list[tuple[str, list[tuple[str, str]], str | None]]:
    """(title, [(metric key, label)], band std key or None) for each panel whose metrics exist."""
    panels = []

    def add(title, lines, band=None):
        lines = [(k, label) for k, label in lines if _present(rows, k)]
        if lines:
            panels.append((title, lines, band if band and _present(rows, band) else None))

    # the task's reward; with kl_in=reward also what the returns sum, the task reward minus the KL penalty
    add("reward (mean ± std)", [("reward_mean", "task reward"),
                                ("kl_penalised_reward_mean", "minus KL penalty (kl_in=reward)")], band="reward_std")
    add("reward per function (mean)", [(k, k[len("reward/"):]) for k in _keys_with_prefix(rows, "reward/")])
    add("KL to reference", [("kl", "kl")])
    add("entropy (nats / token)", [("entropy", "entropy")])
    add("completion length (tokens)", [("completion_len_mean", "mean"), ("completion_len_max", "max"),
                                       ("episode_len_mean", "episode mean, environment's tokens too")])
    if _present(rows, "turns_mean"):  # a run with an environment (multi-turn episodes)
        add("turns per episode", [("turns_mean", "mean"), ("turns_max", "max")])
        add("tool calls per episode", [("tool_calls_per_episode", "calls"), ("tool_errors_per_episode", "errors")])
        add("truncated episodes (fraction)", [("truncated_frac", "turn cut at a token limit"),
                                              ("max_turns_frac", "out of turns")])
    add("clip fraction", [("clip_frac", "clip_frac")])
    add("importance ratio", [("ratio_max", "max"), ("ratio_mean", "mean"), ("ratio_min", "min")])
    add("gradient SNR", [(k, k) for k in _keys_with_prefix(rows, "grad_snr")])
    add("gradient noise scale", [("grad_noise_scale", "grad_noise_scale")])
    ess = _keys_with_prefix(rows, "ess")
    add("effective sample size (ESS / n)" if ess == ["ess_frac"] else "effective sample size", [(k, k) for k in ess])
    return panels


def _clip_bounds(run_dir: Path) -> list[float]:
    """The clipping range 1 - clip_eps_low, 1 + clip_eps_high from the run's config.yaml, if any."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(config, dict):
        return []
    low, high = config.get("clip_eps_low"), config.get("clip_eps_high")
    return [b for b in (1 - low if isinstance(low, (int, float)) else None,
                        1 + high if isinstance(high, (int, float)) else None) if b is not None]


def plot_run(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Write a PNG of RUN_DIR/metrics.jsonl (default RUN_DIR/metrics.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out_path) if out_path is not None else run_dir / "metrics.png"
    fig = metrics_figure(run_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise DataError(f"cannot write {out} ({e.strerror}); choose a writable path with -o") from None
    finally:
        plt.close(fig)
    return out


def metrics_figure(run_dir: Path):
    """The matplotlib figure of RUN_DIR/metrics.jsonl: one panel per metric family that was logged."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise DataError(f"{metrics_path} does not exist; give a run directory written by `lmpg train`")
    try:
        rows = read_jsonl(metrics_path)
    except ValueError as e:
        raise DataError(f"{metrics_path} is not valid JSON lines ({e}); was it written by `lmpg train`?") from None
    if not rows:
        raise DataError(f"{metrics_path} is empty; the run has not finished an iteration yet")

    x = [r.get("iteration", i + 1) for i, r in enumerate(rows)]
    panels = _panels(rows)
    if not panels:
        raise DataError(f"{metrics_path} holds none of the plotted metrics (reward_mean, kl, entropy, ...)")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 * nrows), squeeze=False, sharex=True)
    marker = "o" if len(rows) <= 30 else None  # a handful of points: show them
    for ax, (title, lines, band) in zip(axes.flat, panels):
        for key, label in lines:
            ax.plot(x, _series(rows, key), label=label, marker=marker, markersize=3, linewidth=1.4)
        if band is not None:
            mean, std = _series(rows, lines[0][0]), _series(rows, band)
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            alpha=0.25, linewidth=0, label="± std")
        values = [v for key, _ in lines for v in _series(rows, key) if math.isfinite(v)]
        if title == "gradient noise scale" and values and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")  # the noise scale spans orders of magnitude as the gradient shrinks
        if title == "importance ratio":
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
            bounds = _clip_bounds(run_dir)
            for bound in bounds:
                ax.axhline(bound, color="grey", linewidth=0.8, linestyle="--")
            if bounds:
                title += " (dashed: clip range)"
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers
        if isinstance(ax.yaxis.get_major_formatter(), ScalarFormatter):  # (not on a log axis)
            ax.yaxis.get_major_formatter().set_useOffset(False)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if len(lines) > 1 or band is not None or title.startswith("reward per function"):
            ax.legend(fontsize=7, loc="best")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("iteration", fontsize=9)
    # hidden panels in the last row leave the panel above without an x label
    for col in range(ncols):
        for row in range(nrows - 1, -1, -1):
            ax = axes[row, col]
            if ax.get_visible():
                ax.set_xlabel("iteration", fontsize=9)
                ax.xaxis.set_tick_params(labelbottom=True)
                break
    fig.suptitle(f"{run_dir.resolve().name}: {len(rows)} iterations", fontsize=11)
    fig.tight_layout()
    return fig
