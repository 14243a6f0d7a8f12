"""Token-gap histogram percentiles and the summary's TBT figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulator.config import parse_experiment
from simulator.core.state import HIST_MIN_SECONDS, HIST_NUM_BINS, hist_bin_edges
from simulator.costmodel import build_cost_params, step_seconds
from simulator.hardware import load_hardware
from simulator.metrics import hist_mean, hist_percentile
from simulator.models import load_model
from simulator.simulate import simulate

PCTS = (1, 10, 50, 90, 95, 99, 99.9)


def histogram(samples: np.ndarray) -> np.ndarray:
    """A gap histogram as the simulator lays it out: underflow, regular bins, overflow."""
    edges = hist_bin_edges()
    hist = np.zeros(HIST_NUM_BINS, dtype=np.int64)
    regular, _ = np.histogram(samples, bins=edges)
    assert regular.shape[0] == HIST_NUM_BINS - 2
    hist[1 : 1 + regular.shape[0]] = regular
    hist[0] = int((samples < edges[0]).sum())
    hist[-1] = int((samples > edges[-1]).sum())
    assert hist.sum() == samples.size
    return hist


SAMPLERS = {
    "lognormal_10ms": lambda rng: rng.lognormal(np.log(0.01), 0.5, 200_000),
    "uniform_5_50ms": lambda rng: rng.uniform(0.005, 0.05, 100_000),
    "bimodal": lambda rng: np.concatenate(
        [rng.normal(0.008, 0.0005, 93_000), rng.lognormal(np.log(0.2), 0.3, 7_000)]
    ),
    "wide_log_uniform": lambda rng: 10.0 ** rng.uniform(-4, 2, 100_000),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_hist_percentile_matches_numpy(name):
    samples = SAMPLERS[name](np.random.default_rng(1))
    assert samples.min() > HIST_MIN_SECONDS
    hist = histogram(samples)
    for q in PCTS:
        exact = np.percentile(samples, q)
        assert hist_percentile(hist, q) == pytest.approx(exact, rel=0.01), q
    assert hist_mean(hist) == pytest.approx(samples.mean(), rel=0.01)


def test_hist_percentile_single_value():
    for value in (2e-5, 0.0123, 7.5, 999.0):
        hist = histogram(np.full(10, value))
        for q in (0, 50, 100):
            got = hist_percentile(hist, q)
            assert got == pytest.approx(value, rel=0.006)  # half a bin: 10**(1/400) - 1


def test_hist_percentile_edges():
    empty = np.zeros(HIST_NUM_BINS, dtype=np.int64)
    assert math.isnan(hist_percentile(empty, 50))
    assert math.isnan(hist_mean(empty))
    under = histogram(np.full(5, 1e-7))
    assert under[0] == 5
    assert hist_percentile(under, 50) == HIST_MIN_SECONDS
    over = histogram(np.full(5, 5e3))
    assert over[-1] == 5
    assert hist_percentile(over, 99) == pytest.approx(1e3)
    # the percentile picks the right side of a split histogram
    split = histogram(np.array([0.001] * 60 + [0.1] * 40))
    assert hist_percentile(split, 60) == pytest.approx(0.001, rel=0.006)
    assert hist_percentile(split, 61) == pytest.approx(0.1, rel=0.006)


def test_lone_request_tbt_percentiles_are_its_decode_steps():
    prompt, output = 2000, 400
    exp = parse_experiment(
        {
            "model": "llama-3.1-8b",
            "hardware": "h100-sxm",
            "workload": {
                "kind": "requests",
                "num_requests": 1,
                "arrival": {"process": "burst"},
                "prompt_tokens": prompt,
                "output_tokens": output,
            },
        }
    )
    res = simulate(exp, progress=False)
    params = build_cost_params(load_model("llama-3.1-8b"), load_hardware("h100-sxm"))
    gaps = np.array(
        [step_seconds(params, np.array([1]), np.array([prompt + k]), 1) for k in range(output - 1)]
    )
    assert int(res.gap_hist.sum()) == output - 1
    s = res.summary()
    for p in (50, 90, 95, 99):
        assert s[f"tbt_p{p}"] == pytest.approx(np.percentile(gaps, p), rel=0.01)
    assert s["tbt_mean"] == pytest.approx(gaps.mean(), rel=0.01)
    assert s["tpot_p50"] == pytest.approx(gaps.mean(), rel=1e-9)  # one request: its TPOT
    assert res.requests["max_tbt"].iloc[0] == pytest.approx(gaps.max(), rel=1e-9)
