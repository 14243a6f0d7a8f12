"""Steady state: metrics over time windows, warm-up detection and trimming.

A run starts cold (empty caches, empty batches, sessions still ramping up) and, with a finite
workload, ends draining (no new sessions). Judging SLOs over the whole run mixes both in; the
*stable window* is the part in between:

* **end** = the last session start (``load_end``): after it the offered load falls. For
  independent requests this is the last arrival.
* **start** = the end of the warm-up, detected on the windowed series of every watched metric
  (default TTFT p95 by arrival window and TBT p95 by emission window):

  1. windows with too few samples are ignored; the series is smoothed by a centred rolling
     median of 3 windows (one noisy window is not a trend);
  2. the reference level is the median of the second half of the load period;
  3. the warm-up of a metric ends at the first window inside the band
     ``|x - ref| <= rel_tol * ref + abs_tol`` from which at least ``settle_fraction`` of the
     remaining windows stay inside the band;
  4. the stable part is checked for drift: a least-squares line through it may not move by
     more than ``rel_tol * ref`` from its start to its end (a queue that keeps growing is
     overload, not a steady state).

  The warm-up ends at the latest of the metrics' warm-up ends.

When no window qualifies, when the stable part is shorter than ``min_windows`` windows, or when
it drifts, the run **never stabilizes**: :class:`SteadyState` says why (``stable=False``,
``reason``), a warning is issued, and the metrics are taken over the second half of the load
period (the conservative choice: an overloaded run looks worst there).

:func:`stable_summary` computes the figures that capacity searches and sweeps judge: latency
percentiles of the requests that *arrived* in the window, TBT from the windowed token-gap
histograms, throughput of the tokens *emitted* in the window, error (rejection) rate.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from simulator.core.state import HIST_MIN_SECONDS, WIN_BINS_PER_DECADE

PCTS = (50, 90, 95, 99)
SPEED_PCTS = (5, 25, 50, 95)
DEFAULT_WATCH = ("ttft_p95", "tbt_p95")


class SteadyStateWarning(UserWarning):
    """A run that never reached a steady state."""


# ----------------------------------------------------------------------------- histograms
def win_hist_percentiles(hists: np.ndarray, q: float) -> np.ndarray:
    """The ``q``-th percentile (seconds) of each row of windowed gap histograms (NaN if empty).

    Rows use the windowed layout (``WIN_BINS_PER_DECADE`` bins per decade from
    ``HIST_MIN_SECONDS``, bin 0 underflow, last bin overflow); values are bin centres.
    """
    hists = np.atleast_2d(np.asarray(hists, dtype=np.int64))
    total = hists.sum(axis=1)
    out = np.full(hists.shape[0], np.nan)
    if hists.shape[1] == 0:
        return out
    cum = np.cumsum(hists, axis=1)
    rank = np.maximum(np.ceil(q / 100.0 * total), 1)
    b = (cum < rank[:, None]).sum(axis=1).astype(np.float64)
    last = hists.shape[1] - 1
    centre = HIST_MIN_SECONDS * 10.0 ** ((b - 0.5) / WIN_BINS_PER_DECADE)
    centre = np.where(b == 0, HIST_MIN_SECONDS, centre)
    centre = np.where(
        b >= last, HIST_MIN_SECONDS * 10.0 ** ((last - 1) / WIN_BINS_PER_DECADE), centre
    )
    out[total > 0] = centre[total > 0]
    return out


# --------------------------------------------------------------------------- time windows
def load_end_time(requests: pd.DataFrame) -> float:
    """Start of the last session (the last arrival of a request without an earlier sibling)."""
    arr = requests["arrival_time"].to_numpy(dtype=np.float64)
    ok = np.isfinite(arr)
    if not ok.any():
        return 0.0
    if "session_id" in requests:
        starts = pd.Series(arr[ok]).groupby(requests["session_id"].to_numpy()[ok]).min()
        return float(starts.max())
    return float(arr[ok].max())


def _emitted_tokens_by_time(requests: pd.DataFrame, edges: np.ndarray) -> np.ndarray:
    """Tokens emitted in each interval [edges[i], edges[i+1]), spreading each request's tokens
    after the first evenly between its first token and its finish (used when no windowed gap
    histogram is available)."""
    fin = requests[requests["status"] == "finished"]
    first = fin["first_token_time"].to_numpy(dtype=np.float64)
    finish = fin["finish_time"].to_numpy(dtype=np.float64)
    rest = fin["output_tokens"].to_numpy(dtype=np.float64) - 1.0
    span = finish - first
    ok = (rest > 0) & (span > 0)
    rate = np.where(ok, rest / np.where(span > 0, span, 1.0), 0.0)
    # cumulative tokens F(t) = sum_r clip((t - first_r) * rate_r, 0, rest_r): piecewise linear
    times = np.concatenate([first[ok], finish[ok]])
    slopes = np.concatenate([rate[ok], -rate[ok]])
    order = np.argsort(times, kind="stable")
    times, slopes = times[order], slopes[order]
    s1 = np.concatenate([[0.0], np.cumsum(slopes)])
    s2 = np.concatenate([[0.0], np.cumsum(slopes * times)])
    k = np.searchsorted(times, edges, side="right")
    cum = edges * s1[k] - s2[k]
    firsts, _ = np.histogram(first, bins=edges)
    return np.diff(cum) + firsts


def windowed_metrics(
    requests: pd.DataFrame,
    window_seconds: float,
    gap_hist_windows: np.ndarray | None = None,
    num_gpus: int = 1,
) -> pd.DataFrame:
    """Metrics per time window of ``window_seconds``.

    Latencies (``ttft_*``, ``e2e_p95``, ``tpot_p95``) are those of the requests that *arrived* in
    the window; ``tbt_*`` and ``output_tokens_per_s`` count the tokens *emitted* in the window
    (from the windowed gap histograms when given, else spread over each request's decode span).
    """
    if window_seconds <= 0 or not math.isfinite(window_seconds):
        raise ValueError(f"window_seconds must be a positive number (got {window_seconds})")
    times = requests[["arrival_time", "finish_time"]].to_numpy(dtype=np.float64)
    horizon = float(np.nanmax(times)) if np.isfinite(times).any() else 0.0
    n = max(int(math.floor(horizon / window_seconds)) + 1, 1)
    if gap_hist_windows is not None and gap_hist_windows.size:
        n = min(n, gap_hist_windows.shape[0]) if gap_hist_windows.shape[0] > 1 else n
    edges = np.arange(n + 1, dtype=np.float64) * window_seconds
    arrival = requests["arrival_time"].to_numpy(dtype=np.float64)
    win = np.floor(arrival / window_seconds)
    win = np.where(np.isfinite(win), np.minimum(win, n - 1), -1).astype(np.int64)
    status = requests["status"].astype(str).to_numpy()
    finished = status == "finished"
    df = pd.DataFrame({"start": edges[:-1], "end": edges[1:]})
    df["arrivals"] = np.bincount(win[win >= 0], minlength=n)[:n]
    df["rejected"] = np.bincount(win[(win >= 0) & (status == "rejected")], minlength=n)[:n]
    df["finished"] = np.bincount(win[(win >= 0) & finished], minlength=n)[:n]
    df["error_rate"] = df["rejected"] / df["arrivals"].where(df["arrivals"] > 0)
    sel = finished & (win >= 0)
    frame = pd.DataFrame(
        {
            "w": win[sel],
            "ttft": requests["ttft"].to_numpy(dtype=np.float64)[sel],
            "e2e": requests["e2e"].to_numpy(dtype=np.float64)[sel],
            "tpot": requests["tpot"].to_numpy(dtype=np.float64)[sel],
        }
    )
    grouped = frame.groupby("w")
    for p in PCTS:
        df[f"ttft_p{p}"] = grouped["ttft"].quantile(p / 100.0).reindex(range(n)).to_numpy()
    df["e2e_p95"] = grouped["e2e"].quantile(0.95).reindex(range(n)).to_numpy()
    df["tpot_p95"] = grouped["tpot"].quantile(0.95).reindex(range(n)).to_numpy()
    first = requests["first_token_time"].to_numpy(dtype=np.float64)
    firsts, _ = np.histogram(first[np.isfinite(first)], bins=edges)
    if gap_hist_windows is not None and gap_hist_windows.size:
        rows = np.zeros((n, gap_hist_windows.shape[1]), dtype=np.int64)
        m = min(n, gap_hist_windows.shape[0])
        rows[:m] = gap_hist_windows[:m]
        df["tokens"] = rows.sum(axis=1) + firsts
        df["gaps"] = rows.sum(axis=1)
        for p in PCTS:
            df[f"tbt_p{p}"] = win_hist_percentiles(rows, p)
    else:
        df["tokens"] = _emitted_tokens_by_time(requests, edges)
        df["gaps"] = np.nan
        for p in PCTS:
            df[f"tbt_p{p}"] = np.nan
    df["output_tokens_per_s"] = df["tokens"] / window_seconds
    df["output_tokens_per_s_per_gpu"] = df["output_tokens_per_s"] / max(num_gpus, 1)
    return df


# ------------------------------------------------------------------------ warm-up detector
@dataclass
class SteadyState:
    """The stable window of a run and how it was found."""

    start: float  # seconds; metrics are judged on [start, end)
    end: float
    stable: bool
    reason: str
    load_end: float
    window_seconds: float
    warmup_by_metric: dict[str, float] = field(default_factory=dict)
    windows: pd.DataFrame | None = field(default=None, repr=False)

    def describe(self) -> str:
        state = "stable" if self.stable else "NEVER STABILIZES"
        return f"steady window [{self.start:.0f} s, {self.end:.0f} s): {state}; {self.reason}"


_MIN_SAMPLES = {"ttft": 10, "tbt": 50, "tpot": 10, "e2e": 10}


def _metric_series(windows: pd.DataFrame, metric: str) -> np.ndarray:
    x = windows[metric].to_numpy(dtype=np.float64).copy()
    family = metric.split("_")[0]
    if family == "tbt" and "gaps" in windows:
        x[~(windows["gaps"].to_numpy() >= _MIN_SAMPLES["tbt"])] = np.nan
    elif family in _MIN_SAMPLES:
        x[windows["finished"].to_numpy() < _MIN_SAMPLES[family]] = np.nan
    return x


def _settle_index(
    x: np.ndarray, rel_tol: float, abs_tol: float, settle_fraction: float, min_windows: int
) -> tuple[int | None, str]:
    """First index from which the series stays near its late level; None and why if none."""
    valid = np.isfinite(x)
    if valid.sum() < max(min_windows, 2):
        return None, f"only {int(valid.sum())} windows with enough samples"
    idx = np.flatnonzero(valid)
    vals = x[idx]
    smooth = pd.Series(vals).rolling(3, center=True, min_periods=1).median().to_numpy()
    ref = float(np.median(smooth[len(smooth) // 2 :]))
    band = rel_tol * abs(ref) + abs_tol
    inside = np.abs(smooth - ref) <= band
    # fraction of windows inside the band from i to the end, for every i
    tail_inside = np.cumsum(inside[::-1])[::-1] / np.arange(len(inside), 0, -1)
    ok = np.flatnonzero(inside & (tail_inside >= settle_fraction))
    if ok.size == 0:
        return None, f"never settles within {rel_tol:.0%} of its late level {ref:.4g}"
    i = int(ok[0])
    if len(idx) - i < min_windows:
        return None, f"settles only in the last {len(idx) - i} window(s)"
    t, y = idx[i:].astype(np.float64), smooth[i:]
    slope = np.polyfit(t, y, 1)[0] if len(t) >= 2 else 0.0
    drift = slope * (t[-1] - t[0])
    if drift > band:
        return None, f"keeps rising ({drift:+.4g} over the stable part, band {band:.4g})"
    return int(idx[i]), ""


def detect_steady_state(
    windows: pd.DataFrame,
    load_end: float,
    window_seconds: float,
    watch: tuple[str, ...] = DEFAULT_WATCH,
    rel_tol: float = 0.25,
    abs_tol: float = 0.002,
    settle_fraction: float = 0.8,
    min_windows: int = 3,
    warn: bool = True,
) -> SteadyState:
    """Find the stable window of a run from its :func:`windowed_metrics` table."""
    n_load = int(math.floor(load_end / window_seconds + 1e-9))
    # windows that end by the last session start (at least one)
    n_load = max(min(n_load, len(windows)), 1)
    end = float(windows["end"].iloc[n_load - 1]) if len(windows) else load_end
    sub = windows.iloc[:n_load]
    starts, reasons = {}, []
    for metric in watch:
        if metric not in sub:
            raise ValueError(f"steady state: unknown metric {metric!r}")
        x = _metric_series(sub, metric)
        if not np.isfinite(x).any():
            continue  # nothing to judge (e.g. no windowed TBT histogram)
        i, why = _settle_index(x, rel_tol, abs_tol, settle_fraction, min_windows)
        if i is None:
            reasons.append(f"{metric} {why}")
        else:
            starts[metric] = float(sub["start"].iloc[i])
    if n_load < min_windows:
        reasons.insert(
            0,
            f"load period {load_end:.0f} s is shorter than {min_windows} windows "
            f"of {window_seconds:g} s",
        )
    if reasons:
        start = float(sub["start"].iloc[n_load // 2]) if n_load > 1 else 0.0
        reason = "; ".join(reasons) + "; judging the second half of the load period"
        if warn:
            warnings.warn(f"run never stabilizes: {reason}", SteadyStateWarning, stacklevel=2)
        state = SteadyState(start, end, False, reason, load_end, window_seconds, starts, windows)
    else:
        start = max(starts.values(), default=0.0)
        parts = ", ".join(f"{m} settles at {t:.0f} s" for m, t in starts.items())
        state = SteadyState(
            start,
            end,
            True,
            f"warm-up trimmed: {parts or 'nothing to trim'}",
            load_end,
            window_seconds,
            starts,
            windows,
        )
    if windows is not None and len(windows):
        windows["in_stable"] = (windows["start"] >= start - 1e-9) & (windows["end"] <= end + 1e-9)
    return state


def steady_state(
    result, watch: tuple[str, ...] = DEFAULT_WATCH, warn: bool = True, **kwargs
) -> SteadyState:
    """Windowed metrics and the stable window of a :class:`~simulator.simulate.Result`."""
    windows = windowed_metrics(
        result.requests,
        result.window_seconds,
        getattr(result, "gap_hist_windows", None),
        result.num_gpus,
    )
    return detect_steady_state(
        windows,
        load_end_time(result.requests),
        result.window_seconds,
        watch=watch,
        warn=warn,
        **kwargs,
    )


# ------------------------------------------------------------------------- stable summary
def _pcts(values: np.ndarray, prefix: str, pcts=PCTS) -> dict[str, float]:
    values = values[np.isfinite(values)]
    out = {}
    for p in pcts:
        out[f"{prefix}_p{p}"] = float(np.percentile(values, p)) if values.size else float("nan")
    out[f"{prefix}_mean"] = float(values.mean()) if values.size else float("nan")
    return out


def _mean_active_sessions(requests: pd.DataFrame, start: float, end: float) -> float:
    """Time-average number of sessions in progress in [start, end): a session is active from its
    first arrival to its last finish (tool waits included)."""
    if "session_id" not in requests or end <= start:
        return float("nan")
    done = np.where(
        requests["finish_time"].notna(), requests["finish_time"], requests["arrival_time"]
    )
    g = pd.DataFrame(
        {"s": requests["session_id"].to_numpy(), "a": requests["arrival_time"], "f": done}
    ).groupby("s")
    first, last = g["a"].min().to_numpy(), g["f"].max().to_numpy()
    overlap = np.clip(np.minimum(last, end) - np.maximum(first, start), 0.0, None)
    return float(np.nansum(overlap) / (end - start))


def window_summary(
    requests: pd.DataFrame,
    start: float,
    end: float,
    num_gpus: int,
    window_seconds: float,
    gap_hist_windows: np.ndarray | None = None,
) -> dict:
    """Summary figures over [start, end): the requests that arrived in it, the tokens emitted in
    it. ``start`` and ``end`` should be multiples of ``window_seconds`` when windowed gap
    histograms are given (TBT is read from the whole windows inside the interval)."""
    arr = requests["arrival_time"].to_numpy(dtype=np.float64)
    inside = (arr >= start) & (arr < end)
    req = requests[inside]
    status = req["status"].astype(str)
    fin = req[status == "finished"]
    n_arr = int(len(req))
    n_rej = int((status == "rejected").sum())
    duration = max(end - start, 1e-12)
    s: dict = {
        "window_start": float(start),
        "window_end": float(end),
        "num_requests": n_arr,
        "num_finished": int(len(fin)),
        "num_rejected": n_rej,
        "error_rate": n_rej / n_arr if n_arr else 0.0,
    }
    for col in ("ttft", "tpot", "e2e", "queue_time"):
        s |= _pcts(fin[col].to_numpy(dtype=np.float64), col)
    if "output_speed" in fin:
        speed = fin["output_speed"].to_numpy(dtype=np.float64)
    else:
        tpot = fin["tpot"].to_numpy(dtype=np.float64)
        speed = np.where(tpot > 0, 1.0 / np.where(tpot > 0, tpot, 1.0), np.nan)
    s |= {k: v for k, v in _pcts(speed, "speed", SPEED_PCTS).items() if k != "speed_mean"}
    w0 = int(round(start / window_seconds))
    w1 = int(round(end / window_seconds))
    first = requests["first_token_time"].to_numpy(dtype=np.float64)
    n_first = int(((first >= start) & (first < end)).sum())
    if gap_hist_windows is not None and gap_hist_windows.size and w1 > w0:
        rows = gap_hist_windows[w0 : min(w1, gap_hist_windows.shape[0])]
        hist = rows.sum(axis=0)
        for p in PCTS:
            s[f"tbt_p{p}"] = float(win_hist_percentiles(hist[None, :], p)[0])
        tokens = float(hist.sum()) + n_first
    else:
        for p in PCTS:
            s[f"tbt_p{p}"] = float("nan")
        tokens = float(_emitted_tokens_by_time(requests, np.array([start, end])).sum())
    s["concurrent_sessions"] = _mean_active_sessions(requests, start, end)
    sched = req[req["scheduled_time"].notna()]
    prompt = float(sched["prompt_tokens"].sum())
    # prompt tokens served from the host tier (copied back over PCIe): part of the cached ones
    host = float(sched["host_cached_tokens"].sum()) if "host_cached_tokens" in sched else 0.0
    tput = tokens / duration
    s |= {
        "output_tokens_per_s": tput,
        "output_tokens_per_s_per_gpu": tput / max(num_gpus, 1),
        "tokens_per_s_per_user": s["speed_p50"],
        "requests_per_s": n_arr / duration,
        "prefix_cache_hit_rate": float(sched["cached_tokens"].sum()) / prompt if prompt else 0.0,
        "host_cache_hit_rate": host / prompt if prompt else 0.0,
        "gpu_cache_hit_rate": (float(sched["cached_tokens"].sum()) - host) / prompt
        if prompt else 0.0,
        "num_preemptions": int(req["preemptions"].sum()) if "preemptions" in req else 0,
        "num_gpus": int(num_gpus),
    }
    return s


def stable_summary(
    result, steady: bool = True, watch: tuple[str, ...] = DEFAULT_WATCH, warn: bool = True
) -> dict:
    """The run's summary over its stable window (``steady=False``: over the whole load period,
    warm-up included). Adds ``steady_start``, ``steady_end``, ``stable`` and ``steady_reason``."""
    state = steady_state(result, watch=watch, warn=warn)
    if steady:
        start, end = state.start, state.end
    else:
        start, end = 0.0, state.end
    s = window_summary(
        result.requests,
        start,
        end,
        result.num_gpus,
        result.window_seconds,
        getattr(result, "gap_hist_windows", None),
    )
    s |= {
        "steady_start": state.start,
        "steady_end": state.end,
        "stable": bool(state.stable),
        "steady_reason": state.reason,
        "steady_window_used": bool(steady),
    }
    return s
