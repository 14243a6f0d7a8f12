"""Figures: every run figure renders to a PNG from a Result and from a run directory; the
numbers behind the decode-overlap and concurrency figures are right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from simulator.cli import main
from simulator.config import parse_experiment
from simulator.plots import (
    PlotError,
    RunData,
    concurrency_timeline,
    decode_overlap,
    fig_capacity_trace,
    fig_pareto,
    load_run,
    plot_directory,
    plot_run,
)
from simulator.search import Probe
from simulator.simulate import simulate

PNG = b"\x89PNG\r\n\x1a\n"

EXP = {
    "name": "plots",
    "model": "llama-3.1-8b",
    "hardware": "h100-sxm",
    "workload": {
        "kind": "sessions",
        "num_sessions": 40,
        "arrival": {"process": "poisson", "rate": 0.5},
        "shared_prefix_tokens": 500,
        "turns": 4,
        "first_prompt_tokens": 300,
        "fresh_input_tokens": 200,
        "output_tokens": 100,
        "wait_after_ready": {"dist": "exponential", "mean": 3.0},
    },
    "outputs": {"step_log": True, "window_seconds": 5.0},
}


@pytest.fixture(scope="module")
def result():
    return simulate(parse_experiment(EXP), progress=False)


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def test_run_figures_from_result(result, tmp_path):
    written, skipped = plot_run(RunData.from_result(result), tmp_path)
    names = {p.name for p in written}
    assert names == {
        "ecdfs.png",
        "ttft_vs_prompt.png",
        "speed_hist.png",
        "over_time.png",
        "concurrency.png",
        "decode_overlap.png",
    }
    assert not skipped
    assert all(is_png(p) for p in written)


def test_decode_overlap_from_result_and_steps_agree(result):
    run = RunData.from_result(result)
    a = decode_overlap(run)
    run.decode_seconds_by_count = None  # fall back to the step log
    b = decode_overlap(run)
    assert a[1] == pytest.approx(1.0) and b[1] == pytest.approx(1.0)
    assert np.all(np.diff(a[1:]) <= 1e-12)  # share of time with >= k decodes falls with k
    n = min(len(a), len(b))
    np.testing.assert_allclose(a[:n], b[:n], atol=1e-9)
    run.steps = None
    with pytest.raises(PlotError, match="step_log"):
        decode_overlap(run)


def test_concurrency_timeline_counts():
    req = pd.DataFrame(
        {
            "ready_time": [0.0, 5.0, 5.0],
            "arrival_time": [0.0, 7.0, 5.0],
            "scheduled_time": [1.0, 8.0, 5.0],
            "finish_time": [5.0, 9.0, 6.0],
        }
    )
    tl = concurrency_timeline(req, points=1001)  # t = 0, 0.009, ..., 9
    at = lambda t: tl.iloc[int(round(t / 9.0 * 1000))]  # noqa: E731
    assert (at(0.5)["queued"], at(0.5)["on_gpu"], at(0.5)["tool_wait"]) == (1, 0, 0)
    assert (at(3.0)["queued"], at(3.0)["on_gpu"]) == (0, 1)
    assert (at(5.5)["on_gpu"], at(5.5)["tool_wait"]) == (1, 1)
    assert (at(7.5)["queued"], at(7.5)["tool_wait"]) == (1, 0)


def test_plot_directory_run_and_cli(result, tmp_path):
    run_dir = tmp_path / "run"
    result.save(run_dir)
    run = load_run(run_dir)
    assert run.steps is not None and len(run.requests) == len(result.requests)
    res = CliRunner().invoke(main, ["plot", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert res.output.count("wrote ") == 6
    assert is_png(run_dir / "plots" / "over_time.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PlotError, match="nothing to plot"):
        plot_directory(empty, empty / "plots")
    res = CliRunner().invoke(main, ["plot", str(empty)])
    assert res.exit_code == 2 and "nothing to plot" in res.stderr


def test_pareto_and_capacity_figures(tmp_path):
    df = pd.DataFrame(
        {
            "config": ["a", "b", "c"],
            "load": [1.0, 2.0, 3.0],
            "error": ["", "", ""],
            "healthy": [True, True, False],
            "tokens_per_s_per_user": [100.0, 60.0, 40.0],
            "output_tokens_per_s_per_gpu": [1000.0, 3000.0, 3500.0],
        }
    )
    from simulator.plots import save

    assert is_png(save(fig_pareto(df, df.iloc[:2]), tmp_path / "p.png"))
    probes = [
        Probe(1, 1.0, True, [0], 1, {"ttft_p95": 0.1}, []),
        Probe(2, 8.0, False, [0], 0, {"ttft_p95": 2.0}, ["ttft_p95 <= 750.0 ms"]),
    ]
    cap = {
        "slos": ["ttft_p95 <= 750.0 ms"],
        "unit": "rate",
        "max_healthy_load": 1.0,
        "first_failing_load": 8.0,
        "probes": [p.__dict__ for p in probes],
    }
    assert is_png(save(fig_capacity_trace(cap), tmp_path / "c.png"))
