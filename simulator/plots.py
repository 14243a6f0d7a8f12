"""Figures (matplotlib, Agg backend, PNG) for runs, sweeps and capacity searches.

Every ``fig_*`` function returns a :class:`matplotlib.figure.Figure`; :func:`save` writes it.
Run figures take a :class:`RunData`, built from a :class:`~simulator.simulate.Result`
(:meth:`RunData.from_result`) or from what ``servesim run --out DIR`` wrote (:func:`load_run`).
:func:`plot_directory` draws everything a directory allows (``servesim plot DIR``).

Run figures: ECDFs of TTFT, TBT, E2E and prompt tokens; TTFT vs prompt tokens; per-request
output speed with percentile marks; decode overlap (share of decode time with >= k concurrent
decodes); metrics over time with the stable window shaded; sessions at the GPU vs in a tool
wait over time. Sweep: the Pareto frontier and, when the sweep names a ``figure``, metrics
against a grid axis with one line per value of another (``lines.png``). Capacity: the search
trace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from simulator.core.state import HIST_BINS_PER_DECADE, HIST_MIN_SECONDS  # noqa: E402
from simulator.steady import detect_steady_state, load_end_time, windowed_metrics  # noqa: E402

DPI = 110


class PlotError(ValueError):
    """Nothing to plot, or a directory without the files a figure needs."""


@dataclass
class RunData:
    """What the run figures need; optional parts are None when not recorded."""

    requests: pd.DataFrame
    summary: dict
    gap_hist: np.ndarray | None = None
    steps: pd.DataFrame | None = None
    gap_hist_windows: np.ndarray | None = None
    decode_seconds_by_count: np.ndarray | None = None  # [replica, k]
    window_seconds: float = 10.0
    num_gpus: int = 1
    name: str = "run"

    @classmethod
    def from_result(cls, result) -> RunData:
        return cls(
            result.requests,
            result.summary(),
            result.gap_hist,
            result.steps,
            result.gap_hist_windows,
            result.decode_seconds_by_count,
            result.window_seconds,
            result.num_gpus,
            result.experiment.name,
        )


def load_run(run_dir: str | Path) -> RunData:
    """Read a directory written by ``servesim run --out DIR`` (optional files where present:
    ``steps.parquet``, ``token_gaps_hist_windows.npy``, ``decode_seconds_by_count.npy``)."""
    d = Path(run_dir)
    if not (d / "requests.parquet").is_file():
        raise PlotError(f"{d}: no requests.parquet (write one with servesim run --out {d})")
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}

    def opt_npy(name):
        return np.load(d / name) if (d / name).is_file() else None

    steps = pd.read_parquet(d / "steps.parquet") if (d / "steps.parquet").is_file() else None
    return RunData(
        requests=pd.read_parquet(d / "requests.parquet"),
        summary=summary,
        gap_hist=opt_npy("token_gaps_hist.npy"),
        steps=steps,
        gap_hist_windows=opt_npy("token_gaps_hist_windows.npy"),
        decode_seconds_by_count=opt_npy("decode_seconds_by_count.npy"),
        window_seconds=float(summary.get("window_seconds", 10.0)),
        num_gpus=int(summary.get("num_gpus", 1)),
        name=str(summary.get("name", d.name)),
    )


def save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _finished(run: RunData) -> pd.DataFrame:
    return run.requests[run.requests["status"].astype(str) == "finished"]


def _ecdf(ax, values, label=None, **kw):
    v = np.sort(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v)]
    if v.size:
        ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=label, **kw)


def _pct_lines(ax, values, pcts=(50, 95, 99), vertical=True):
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return
    for p, style in zip(pcts, (":", "--", "-."), strict=False):
        x = float(np.percentile(v, p))
        ax.axvline(x, color="grey", ls=style, lw=1)
        ax.text(
            x,
            0.02,
            f" p{p}",
            rotation=90,
            va="bottom",
            fontsize=7,
            color="dimgrey",
            transform=ax.get_xaxis_transform(),
        )


# ---------------------------------------------------------------------------- run figures
def fig_ecdfs(run: RunData) -> Figure:
    """ECDFs of TTFT, TBT (from the token-gap histogram), E2E and prompt tokens."""
    fin = _finished(run)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, col, title in ((axes[0, 0], "ttft", "TTFT (s)"), (axes[1, 0], "e2e", "E2E (s)")):
        _ecdf(ax, fin[col])
        _pct_lines(ax, fin[col])
        ax.set_xscale("log")
        ax.set_xlabel(title)
    ax = axes[0, 1]
    if run.gap_hist is not None and run.gap_hist.sum() > 0:
        h = np.asarray(run.gap_hist, dtype=np.float64)
        b = np.arange(h.size)
        upper = HIST_MIN_SECONDS * 10.0 ** (b / HIST_BINS_PER_DECADE)
        cdf = np.cumsum(h) / h.sum()
        keep = h > 0
        first = int(np.argmax(keep))
        last = h.size - int(np.argmax(keep[::-1]))
        ax.step(upper[first:last], cdf[first:last], where="post")
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no token-gap histogram", ha="center", transform=ax.transAxes)
    ax.set_xlabel("TBT (s, every token gap)")
    ax = axes[1, 1]
    _ecdf(ax, run.requests["prompt_tokens"])
    _pct_lines(ax, run.requests["prompt_tokens"])
    ax.set_xscale("log")
    ax.set_xlabel("prompt tokens")
    for ax in axes.flat:
        ax.set_ylabel("fraction <= x")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.01)
    fig.suptitle(f"{run.name}: distributions ({len(fin):,} finished requests)")
    fig.tight_layout()
    return fig


def fig_ttft_vs_prompt(run: RunData, other: RunData | None = None, labels=("", "")) -> Figure:
    """TTFT against prompt tokens, coloured by the cached share of the prompt (a second run,
    e.g. without prefix caching, in grey)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    if other is not None:
        o = _finished(other)
        ax.scatter(o["prompt_tokens"], o["ttft"], s=5, c="lightgrey", label=labels[1] or other.name)
    fin = _finished(run)
    share = fin["cached_tokens"] / fin["prompt_tokens"].clip(lower=1)
    sc = ax.scatter(
        fin["prompt_tokens"],
        fin["ttft"],
        s=5,
        c=share,
        cmap="viridis",
        vmin=0,
        vmax=1,
        label=labels[0] or run.name,
    )
    fig.colorbar(sc, ax=ax, label="cached share of the prompt")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (s)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", markerscale=3)
    ax.set_title("TTFT vs prompt tokens")
    return fig


def fig_ttft_vs_prompt_points(points: list[tuple[str, pd.DataFrame]]) -> Figure:
    """TTFT against prompt tokens for several runs (e.g. the points of a sweep), one colour each."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, req in points:
        fin = req[req["status"].astype(str) == "finished"]
        ax.scatter(fin["prompt_tokens"], fin["ttft"], s=6, alpha=0.6, label=_short(label, 60))
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (s)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(markerscale=3, fontsize=8)
    ax.set_title("TTFT vs prompt tokens")
    return fig


def fig_speed_hist(run: RunData) -> Figure:
    """Per-request output speed (tokens/s after the first token) with p5/p25/p50/p95 marks."""
    fin = _finished(run)
    if "output_speed" in fin:
        speed = fin["output_speed"].to_numpy(dtype=np.float64)
    else:
        speed = 1.0 / fin["tpot"].to_numpy(dtype=np.float64)
    speed = speed[np.isfinite(speed) & (speed > 0)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if speed.size:
        ax.hist(speed, bins=60, color="steelblue", alpha=0.8)
        for p, color in ((5, "firebrick"), (25, "darkorange"), (50, "black"), (95, "green")):
            x = float(np.percentile(speed, p))
            ax.axvline(x, color=color, ls="--", lw=1.2, label=f"p{p} = {x:.1f} tok/s")
        ax.legend()
    ax.set_xlabel("output speed per request (tokens/s)")
    ax.set_ylabel("requests")
    ax.set_title(f"{run.name}: per-request speed")
    return fig


def decode_overlap(run: RunData) -> np.ndarray:
    """``share[k]``: fraction of decode-active time with >= k concurrent decodes (k >= 1)."""
    if run.decode_seconds_by_count is not None and np.sum(run.decode_seconds_by_count) > 0:
        by_k = np.asarray(run.decode_seconds_by_count, dtype=np.float64).sum(axis=0)
    elif run.steps is not None and len(run.steps):
        dur = (run.steps["end"] - run.steps["start"]).to_numpy()
        k = run.steps["num_decodes"].to_numpy()
        by_k = np.bincount(k, weights=dur)
    else:
        raise PlotError("decode overlap needs the step log (outputs.step_log: true) or a Result")
    by_k[0] = 0.0
    total = by_k.sum()
    if total <= 0:
        return np.zeros(1)
    return np.cumsum(by_k[::-1])[::-1] / total


def fig_decode_overlap(run: RunData) -> Figure:
    share = decode_overlap(run)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    k = np.arange(1, share.size)
    ax.step(k, share[1:], where="post")
    ax.set_xscale("log")
    ax.set_xlabel("k (concurrent decodes in a step)")
    ax.set_ylabel("share of decode time with >= k decodes")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{run.name}: decode overlap")
    return fig


def run_windows(run: RunData):
    windows = windowed_metrics(run.requests, run.window_seconds, run.gap_hist_windows, run.num_gpus)
    state = detect_steady_state(
        windows, load_end_time(run.requests), run.window_seconds, warn=False
    )
    return windows, state


def fig_over_time(run: RunData) -> Figure:
    """Windowed TTFT/TBT p95 and throughput, the stable window shaded."""
    windows, state = run_windows(run)
    has_tbt = np.isfinite(windows["tbt_p95"]).any()
    fig, axes = plt.subplots(3 if has_tbt else 2, 1, figsize=(10, 8 if has_tbt else 6), sharex=True)
    mid = (windows["start"] + windows["end"]) / 2
    axes[0].plot(mid, windows["ttft_p95"], label="TTFT p95")
    axes[0].plot(mid, windows["ttft_p50"], label="TTFT p50", alpha=0.7)
    axes[0].set_ylabel("TTFT (s), by arrival")
    axes[0].set_yscale("log")
    i = 1
    if has_tbt:
        axes[1].plot(mid, windows["tbt_p95"], label="TBT p95")
        axes[1].plot(mid, windows["tbt_p50"], label="TBT p50", alpha=0.7)
        axes[1].set_ylabel("TBT (s)")
        i = 2
    axes[i].plot(mid, windows["output_tokens_per_s"], label="output tokens/s")
    axes[i].set_ylabel("output tokens/s")
    axes[i].set_xlabel("time (s)")
    for ax in axes:
        ax.axvspan(
            state.start,
            state.end,
            color="green" if state.stable else "orange",
            alpha=0.12,
            label="stable window" if state.stable else "judged (unstable)",
        )
        ax.axvline(state.load_end, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{run.name}: {state.describe()}", fontsize=9)
    fig.tight_layout()
    return fig


def concurrency_timeline(requests: pd.DataFrame, points: int = 2000) -> pd.DataFrame:
    """Requests at the engine (arrived, not finished: queued or on the GPU) and in a tool wait
    (ready, not yet dispatched: ``wait_after_ready``) over time."""
    arr = requests["arrival_time"].to_numpy(dtype=np.float64)
    ready = requests["ready_time"].to_numpy(dtype=np.float64)
    fin = requests["finish_time"].to_numpy(dtype=np.float64)
    sched = requests["scheduled_time"].to_numpy(dtype=np.float64)
    end = np.where(np.isfinite(fin), fin, arr)  # rejected: leave at arrival
    horizon = float(np.nanmax(end)) if np.isfinite(end).any() else 0.0
    t = np.linspace(0.0, horizon, points)

    def level(starts, stops):
        ok = np.isfinite(starts) & np.isfinite(stops) & (stops > starts)
        s = np.sort(starts[ok])
        e = np.sort(stops[ok])
        return np.searchsorted(s, t, side="right") - np.searchsorted(e, t, side="right")

    return pd.DataFrame(
        {
            "time": t,
            "queued": level(arr, np.where(np.isfinite(sched), sched, end)),
            "on_gpu": level(sched, end),
            "tool_wait": level(ready, arr),
        }
    )


def fig_concurrency(run: RunData) -> Figure:
    tl = concurrency_timeline(run.requests)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.stackplot(
        tl["time"],
        tl["on_gpu"],
        tl["queued"],
        tl["tool_wait"],
        labels=["on the GPU (running)", "queued at the engine", "in a tool wait"],
        colors=["tab:blue", "tab:red", "tab:green"],
        alpha=0.75,
    )
    ax.set_xlabel("time (s)")
    ax.set_ylabel("requests (one per active session)")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    ax.set_title(f"{run.name}: GPU-busy vs tool-wait concurrency")
    return fig


# ------------------------------------------------------------------------- sweep, capacity
def _short(label: str, width: int = 38) -> str:
    for prefix in ("engine.", "cluster.", "workload."):
        label = label.replace(prefix, "")
    return label if len(label) <= width else label[: width - 3] + "..."


def fig_pareto(
    df: pd.DataFrame,
    frontier: pd.DataFrame,
    x: str = "tokens_per_s_per_user",
    y: str = "output_tokens_per_s_per_gpu",
) -> Figure:
    fig, ax = plt.subplots(figsize=(10, 6.5))
    ok = df[(df.get("error", "") == "") if "error" in df else slice(None)]
    if "healthy" in ok:
        h = ok["healthy"].astype(bool)
        ax.scatter(ok.loc[h, x], ok.loc[h, y], s=14, c="tab:blue", alpha=0.6, label="healthy")
        ax.scatter(ok.loc[~h, x], ok.loc[~h, y], s=14, c="lightgrey", label="violates SLOs")
    else:
        ax.scatter(ok[x], ok[y], s=14, c="tab:blue", alpha=0.6, label="runs")
    lines = []
    if len(frontier):
        f = frontier.sort_values(x)
        ax.plot(f[x], f[y], "o-", color="black", ms=5, label="Pareto frontier")
        for i, (_, r) in enumerate(f.iterrows(), start=1):
            load = f" @ load {r['load']:g}" if "load" in r and pd.notna(r["load"]) else ""
            ax.annotate(
                str(i),
                (r[x], r[y]),
                fontsize=8,
                fontweight="bold",
                xytext=(4, 4),
                textcoords="offset points",
            )
            lines.append(f"{i}: {_short(str(r.get('config', '')), 90)}{load}")
    if lines:
        fig.text(0.01, -0.01, "\n".join(lines), fontsize=7.5, va="top", family="monospace")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Pareto frontier")
    return fig


#: how the line figure shows a metric: (axis label, scale factor)
_LINE_UNITS = {
    "seconds": ("ms", 1e3),
    "fraction": ("%", 100.0),
}


def _metric_axis(metric: str) -> tuple[str, float]:
    from simulator.search import SLO_METRICS

    kind = SLO_METRICS.get(metric)
    if kind is None and metric.endswith("hit_rate"):
        kind = "fraction"
    unit, scale = _LINE_UNITS.get(kind or "", (kind or "", 1.0))
    return f"{metric.replace('_', ' ')}{f' ({unit})' if unit else ''}", scale


def fig_lines(
    df: pd.DataFrame,
    x: str,
    metrics: list[str],
    lines: str | None = None,
    x_log: bool = False,
    title: str | None = None,
) -> Figure:
    """Each of ``metrics`` against column ``x`` of a sweep table, one line per value of column
    ``lines`` (``None``: per configuration), the mean over seeds; rows with an error are left
    out. Seconds are drawn in ms (log scale), fractions (hit rates) in %."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    missing = [c for c in [x, *metrics, *([lines] if lines else [])] if c not in df]
    if missing:
        raise PlotError(f"lines.png: no column {missing[0]!r} in the sweep table")
    ok = df[df["error"].fillna("") == ""] if "error" in df else df
    if ok.empty:
        raise PlotError("lines.png: every run of the sweep failed")
    group = lines or "config"
    ncol = 2 if len(metrics) == 4 else min(len(metrics), 3)
    nrow = -(-len(metrics) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.6 * nrow), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        label, scale = _metric_axis(metric)
        for i, (value, part) in enumerate(ok.groupby(group, sort=False)):
            mean = part.groupby(x, sort=True)[metric].mean()
            ax.plot(mean.index, mean.to_numpy(dtype=float) * scale, "o-", color=f"C{i}",
                    ms=4, label=_short(str(value)))
        xlabel = _short(x)
        if x in ("load", "offered_load") and "load_unit" in ok:
            unit = str(ok["load_unit"].iloc[0]).replace("_", " ")
            per_replica = "offered_load" in ok and bool((ok["offered_load"] != ok["load"]).any())
            what = "load per replica" if x == "load" and per_replica else x.replace("_", " ")
            xlabel = f"{what} ({unit})"
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        if x_log:
            ax.set_xscale("log", base=2)
            ticks = sorted(ok[x].unique())
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        if metric.startswith(("ttft", "tbt", "tpot", "e2e", "queue_time")):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8, title=_short(group))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def fig_capacity_trace(cap: dict) -> Figure:
    """Probe loads against their worst SLO ratio (metric / limit; > 1 violates)."""
    from simulator.search import SLO

    slos = [SLO.parse(s) for s in cap.get("slos", [])]
    fig, ax = plt.subplots(figsize=(9, 5))
    for p in cap["probes"]:
        ratios = [s.ratio(p["metrics"]) for s in slos] or [np.nan]
        worst = min(max(ratios), 20.0)
        ax.scatter(p["load"], worst, c="tab:green" if p["healthy"] else "tab:red", s=30, zorder=3)
        ax.annotate(
            str(p["index"]),
            (p["load"], worst),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.axhline(1.0, color="black", lw=1, ls="--", label="SLO limit")
    if cap.get("max_healthy_load"):
        ax.axvline(
            cap["max_healthy_load"],
            color="tab:green",
            lw=1,
            label=f"max healthy {cap['max_healthy_load']:.4g}",
        )
    if cap.get("first_failing_load"):
        ax.axvline(
            cap["first_failing_load"],
            color="tab:red",
            lw=1,
            label=f"first failing {cap['first_failing_load']:.4g}",
        )
    ax.set_yscale("log")
    ax.set_xlabel(f"load ({cap.get('unit', '')})")
    ax.set_ylabel("worst SLO metric / limit")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"capacity search ({len(cap['probes'])} probes; numbers = probe order)")
    return fig


# ------------------------------------------------------------------------------ directory
def plot_run(run: RunData, out_dir: Path) -> tuple[list[Path], list[str]]:
    written, skipped = [], []
    figures = {
        "ecdfs.png": fig_ecdfs,
        "ttft_vs_prompt.png": fig_ttft_vs_prompt,
        "speed_hist.png": fig_speed_hist,
        "over_time.png": fig_over_time,
        "concurrency.png": fig_concurrency,
        "decode_overlap.png": fig_decode_overlap,
    }
    for name, fn in figures.items():
        try:
            written.append(save(fn(run), out_dir / name))
        except PlotError as exc:
            skipped.append(f"{name}: {exc}")
    return written, skipped


def plot_directory(d: str | Path, out_dir: str | Path) -> tuple[list[Path], list[str]]:
    """Every figure the files in ``d`` allow: a run, a sweep, a capacity search."""
    d, out_dir = Path(d), Path(out_dir)
    written: list[Path] = []
    skipped: list[str] = []
    found = False
    if (d / "requests.parquet").is_file():
        found = True
        w, s = plot_run(load_run(d), out_dir)
        written += w
        skipped += s
    if (d / "sweep.parquet").is_file():
        found = True
        from simulator.sweep import pareto_frontier

        df = pd.read_parquet(d / "sweep.parquet")
        meta = json.loads((d / "sweep.json").read_text()) if (d / "sweep.json").is_file() else {}
        x = meta.get("frontier", {}).get("x", "tokens_per_s_per_user")
        y = meta.get("frontier", {}).get("y", "output_tokens_per_s_per_gpu")
        front = pareto_frontier(df, x, y, healthy_only="healthy" in df)
        written.append(save(fig_pareto(df, front, x, y), out_dir / "pareto.png"))
        spec = meta.get("figure")
        if spec:
            try:
                fig = fig_lines(df, spec["x"], spec["metrics"], spec.get("lines"),
                                spec.get("x_log", False), spec.get("title") or meta.get("name"))
                written.append(save(fig, out_dir / "lines.png"))
            except PlotError as exc:
                skipped.append(str(exc))
        files = (
            sorted((d / "requests").glob("point_*.parquet")) if (d / "requests").is_dir() else []
        )
        if files:
            points = []
            for f in files[:12]:
                i = int(f.stem.split("_")[1])
                r = df.iloc[i]
                load = f" @ {r['load']:g}" if pd.notna(r.get("load")) else ""
                points.append((f"{r['config']}{load}", pd.read_parquet(f)))
            fig = fig_ttft_vs_prompt_points(points)
            written.append(save(fig, out_dir / "ttft_vs_prompt.png"))
    if (d / "capacity.json").is_file():
        found = True
        cap = json.loads((d / "capacity.json").read_text())
        caps = cap if isinstance(cap, list) else [cap]
        for i, c in enumerate(caps):
            name = "capacity_trace.png" if len(caps) == 1 else f"capacity_trace_{i}.png"
            written.append(save(fig_capacity_trace(c), out_dir / name))
    if not found:
        raise PlotError(
            f"{d}: nothing to plot (no requests.parquet, sweep.parquet or capacity.json)"
        )
    return written, skipped
