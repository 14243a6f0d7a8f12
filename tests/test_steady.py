"""Windowed metrics, warm-up detection and trimming, the never-stabilizes warning, stable
summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from simulator.bench import bench_experiment
from simulator.core.state import HIST_MIN_SECONDS, WIN_BINS_PER_DECADE, WIN_NUM_BINS
from simulator.simulate import simulate
from simulator.steady import (
    SteadyStateWarning,
    _emitted_tokens_by_time,
    detect_steady_state,
    stable_summary,
    steady_state,
    win_hist_percentiles,
    window_summary,
    windowed_metrics,
)


def test_win_hist_percentiles_reads_bin_centres():
    rows = np.zeros((3, WIN_NUM_BINS), dtype=np.int64)
    rows[0, 81] = 100  # all gaps in bin 81
    rows[1, 81] = 94
    rows[1, 121] = 6  # 6 % far slower
    got = win_hist_percentiles(rows, 95)
    centre = lambda b: HIST_MIN_SECONDS * 10 ** ((b - 0.5) / WIN_BINS_PER_DECADE)  # noqa: E731
    assert got[0] == pytest.approx(centre(81))
    assert got[1] == pytest.approx(centre(121))  # the 95th gap is in the slow bin
    assert np.isnan(got[2])
    assert win_hist_percentiles(rows, 50)[1] == pytest.approx(centre(81))


def test_emitted_tokens_conserve_output():
    rng = np.random.default_rng(0)
    n = 300
    first = rng.uniform(0, 100, n)
    out = rng.integers(1, 50, n)
    df = pd.DataFrame(
        {
            "status": ["finished"] * n,
            "first_token_time": first,
            "finish_time": first + rng.uniform(0, 30, n) * (out > 1),
            "output_tokens": out,
        }
    )
    edges = np.arange(0, 141, 10.0)
    per = _emitted_tokens_by_time(df, edges)
    assert per.sum() == pytest.approx(out.sum())
    assert (per >= -1e-9).all()


def synthetic_windows(series: list[float], ws: float = 10.0) -> pd.DataFrame:
    n = len(series)
    return pd.DataFrame(
        {
            "start": np.arange(n) * ws,
            "end": (np.arange(n) + 1) * ws,
            "finished": np.full(n, 100),
            "gaps": np.full(n, 1000),
            "ttft_p95": series,
            "tbt_p95": np.full(n, 0.02),
        }
    )


def test_warm_up_is_trimmed():
    rng = np.random.default_rng(1)
    flat = list(0.2 * (1 + 0.05 * rng.standard_normal(26)))
    windows = synthetic_windows([2.0, 1.2, 0.8, 0.5] + flat)
    st = detect_steady_state(windows, load_end=300.0, window_seconds=10.0)
    assert st.stable
    assert 30.0 <= st.start <= 50.0  # after the cold windows, not later than needed
    assert st.end == 300.0
    assert windows["in_stable"].sum() == (st.end - st.start) / 10


def test_growing_queue_never_stabilizes():
    windows = synthetic_windows(list(np.linspace(0.1, 8.0, 30)))
    with pytest.warns(SteadyStateWarning, match="never stabilizes"):
        st = detect_steady_state(windows, load_end=300.0, window_seconds=10.0)
    assert not st.stable
    assert "ttft_p95" in st.reason and "second half" in st.reason
    assert st.start == 150.0 and st.end == 300.0  # judged on the second half


def test_short_run_is_flagged():
    windows = synthetic_windows([0.2, 0.2])
    st = detect_steady_state(windows, load_end=20.0, window_seconds=10.0, warn=False)
    assert not st.stable and "shorter than 3 windows" in st.reason


def test_real_runs_light_vs_overloaded():
    light = simulate(bench_experiment(1200, 10.0), progress=False)
    st = steady_state(light, warn=False)
    assert st.stable, st.reason
    assert st.end <= light.requests["arrival_time"].max() + 1e-9
    over = simulate(bench_experiment(1800, 30.0), progress=False)
    with pytest.warns(SteadyStateWarning):
        st_over = steady_state(over)
    assert not st_over.stable
    s_light, s_over = stable_summary(light, warn=False), stable_summary(over, warn=False)
    assert s_light["stable"] and not s_over["stable"]
    assert s_over["ttft_p95"] > 10 * s_light["ttft_p95"]
    # over the whole run, the window summary agrees with the run's own summary
    full = light.summary()
    w = window_summary(light.requests, 0.0, 1e9, light.num_gpus, light.window_seconds)
    assert w["num_requests"] == full["num_requests"]
    assert w["ttft_p95"] == pytest.approx(full["ttft_p95"])
    ws = window_summary(
        light.requests,
        0.0,
        light.window_seconds * light.gap_hist_windows.shape[0],
        light.num_gpus,
        light.window_seconds,
        light.gap_hist_windows,
    )
    assert ws["tbt_p95"] == pytest.approx(full["tbt_p95"], rel=0.03)  # coarser bins
    out_tokens = int(light.requests["output_tokens"].sum())
    assert ws["output_tokens_per_s"] * (
        light.window_seconds * light.gap_hist_windows.shape[0]
    ) == pytest.approx(out_tokens, rel=0.01)


def test_windowed_metrics_counts_and_rates():
    r = simulate(bench_experiment(600, 10.0), progress=False)
    w = windowed_metrics(r.requests, r.window_seconds, r.gap_hist_windows, r.num_gpus)
    assert w["arrivals"].sum() == len(r.requests)
    assert (w["end"] - w["start"]).eq(r.window_seconds).all()
    busy = w[w["arrivals"] > 30]
    assert busy["arrivals"].mean() / r.window_seconds == pytest.approx(10.0, rel=0.15)
    assert busy["tbt_p95"].notna().all() and (busy["tbt_p95"] > 0).all()
    # without the windowed histogram, tokens are spread over decode spans: same total
    w2 = windowed_metrics(r.requests, r.window_seconds, None, r.num_gpus)
    assert w2["tokens"].sum() == pytest.approx(w["tokens"].sum(), rel=0.01)
    with pytest.raises(ValueError, match="window_seconds"):
        windowed_metrics(r.requests, 0.0)
