"""Side-by-side comparison of experiment variants: ``servesim compare STUDY.yaml``.

A study names a base experiment and variants that override parts of it::

    name: specdec_speed_tail
    base: quickstart.yaml            # an experiment file (relative to this file) or a mapping
    variants:
      "off": {}
      "MTP-3": {engine: {speculative: {method: mtp, num_speculative_tokens: 3,
                                       acceptance_rate: 0.75, acceptance_concentration: 2}}}
    metrics: [ttft_p50, ttft_p95, tbt_p95, speed_p5, speed_p25, speed_p50]

Overrides are deep-merged into the base (mappings merge, anything else replaces). Every variant
runs with the base's seed, so they see the same workload. The output is a table of the chosen
summary metrics, a Parquet file of all summaries, a bar chart of the chosen metrics per variant
(``metrics.png``) and a figure of the per-request output-speed distributions with their
p5/p25/p50 marked (WORKLOADS.md: speculative decoding moves the median right but can stretch the
left tail, so say which percentile an SLO uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from simulator.config import ExperimentError, load_yaml, parse_experiment
from simulator.workload.compile import format_validation_error

DEFAULT_METRICS = [
    "ttft_p50", "ttft_p95", "tbt_p50", "tbt_p95", "tpot_p50", "speed_p5", "speed_p25",
    "speed_p50", "output_tokens_per_s_per_gpu", "prefix_cache_hit_rate",
]


class Study(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "study"
    base: str | dict[str, Any]
    variants: dict[str, dict[str, Any]] = Field(min_length=1)
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS), min_length=1)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in: nested mappings merge, other values replace."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_study(path: str | Path):
    """Read a study file; returns (study, {variant: Experiment}). Errors name file and field."""
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: expected a mapping at the top level")
    try:
        study = Study.model_validate(data)
    except ValidationError as err:
        raise ExperimentError(format_validation_error(str(path), err, data)) from None
    if isinstance(study.base, str):
        base_path = path.parent / study.base
        base_data = load_yaml(base_path)
        base_dir = base_path.parent
        if not isinstance(base_data, dict):
            raise ExperimentError(f"{base_path}: expected a mapping at the top level")
    else:
        base_data, base_dir = study.base, path.parent
    experiments = {}
    for name, override in study.variants.items():
        merged = deep_merge(base_data, override)
        merged["name"] = f"{study.name}:{name}"
        experiments[name] = parse_experiment(merged, f"{path}: variants.{name}", base_dir)
    return study, experiments


def run_study(study: Study, experiments: dict, out_dir: Path | None = None,
              progress: bool | None = None) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Run every variant; returns (summary table indexed by variant, per-variant requests)."""
    from simulator.simulate import simulate

    rows, requests = [], {}
    for name, exp in experiments.items():
        result = simulate(exp, progress=progress)
        summary = result.summary()
        rows.append({"variant": name} | {k: v for k, v in summary.items()
                                         if not isinstance(v, dict)})
        requests[name] = result.requests
    table = pd.DataFrame(rows).set_index("variant")
    unknown = [m for m in study.metrics if m not in table.columns]
    if unknown:
        raise ExperimentError(
            f"metrics: unknown metric(s) {unknown}; available: {sorted(table.columns)}"
        )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        table.to_parquet(out_dir / "summaries.parquet")
        plot_speed_distributions(requests, out_dir / "speed_distribution.png", study.name)
        plot_metric_bars(table, study.metrics, out_dir / "metrics.png", study.name)
    return table, requests


_SECONDS_PREFIXES = ("ttft", "tbt", "tpot", "tbc", "e2e", "queue_time")


def _metric_scale(metric: str) -> tuple[str, float]:
    """How a summary metric is drawn: (unit shown, factor from the summary's unit): seconds
    -> ms, fractions -> %, bytes -> GB."""
    if metric.startswith(_SECONDS_PREFIXES):
        return "ms", 1e3
    if metric.endswith(("hit_rate", "error_rate")) or metric.startswith("decode_overlap"):
        return "%", 100.0
    if metric.startswith(("output_tokens_per_s", "speed_", "tokens_per_s")):
        return "tokens/s", 1.0
    if metric == "kv_transfer_bytes":
        return "GB", 1e-9
    return "", 1.0


def plot_metric_bars(table: pd.DataFrame, metrics: list[str], path: Path, title: str) -> Path:
    """One panel per metric, one bar per variant, the value written on each bar. Latencies are
    drawn in ms on a log axis, fractions in %, bytes in GB; NaN (not measured) leaves the bar
    out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = min(len(metrics), 4)
    nrow = -(-len(metrics) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.2 * nrow + 0.6), squeeze=False)
    names = [str(v) for v in table.index]
    colors = [f"C{i % 10}" for i in range(len(names))]
    for ax, metric in zip(axes.flat, metrics, strict=False):
        unit, scale = _metric_scale(metric)
        values = table[metric].astype(float).to_numpy() * scale
        bars = ax.bar(range(len(names)), np.nan_to_num(values, nan=0.0), color=colors)
        for bar, v in zip(bars, values, strict=True):
            if np.isfinite(v):
                text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
        if unit == "ms" and np.nanmin(values) > 0:
            ax.set_yscale("log")
        ax.set_title(f"{metric}{f' ({unit})' if unit else ''}", fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speed_distributions(requests: dict[str, pd.DataFrame], path: Path, title: str) -> Path:
    """ECDF of per-request output speed (tokens/s) per variant with p5/p25/p50 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, df) in enumerate(requests.items()):
        speed = df.loc[df["status"] == "finished", "output_speed"].to_numpy()
        speed = np.sort(speed[np.isfinite(speed)])
        if speed.size == 0:
            continue
        color = f"C{i}"
        marks = {q: float(np.percentile(speed, q)) for q in (5, 25, 50)}
        label = f"{name}: p5 {marks[5]:.0f}, p25 {marks[25]:.0f}, p50 {marks[50]:.0f} tok/s"
        ax.plot(speed, np.arange(1, speed.size + 1) / speed.size, color=color, label=label)
        for q, v in marks.items():
            ax.plot([v], [q / 100], marker="o", color=color, markersize=5)
    for q in (5, 25, 50):
        ax.axhline(q / 100, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("per-request output speed (tokens/s after the first token)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
