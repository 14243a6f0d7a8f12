"""fit_allreduce: recovers known parameters; reproduces the H200 profile from its measurements."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simulator.calibrate import MeasurementError, allreduce_seconds, fit_allreduce
from simulator.hardware import load_hardware

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ROOT / "hardware_profiles" / "measurements" / "h200x2" / "allreduce.csv"
#: Bound on the fit's median absolute error over the measured all-reduce rows (percent).
MEDIAN_ERROR_BOUND_PCT = 15.0


def _synthetic(path: Path, latency: float, eff: float, world: int, noise: float = 0.0) -> None:
    hw = load_hardware("h200")
    sizes = [4096 * 2**i for i in range(17)]
    secs = allreduce_seconds(sizes, world, latency, eff, hw)
    if noise:
        rng = np.random.default_rng(0)
        secs = secs * np.exp(rng.normal(0.0, noise, len(sizes)))
    rows = [
        {"op": "all_reduce", "bytes": b, "seconds": s, "seconds_min": s, "seconds_max": s,
         "world_size": world, "algbw_gb_s": b / s / 1e9, "busbw_gb_s": 0.0, "tokens": ""}
        for b, s in zip(sizes, secs, strict=True)
    ]
    # all_gather rows must be ignored by the fit
    rows.append({**rows[-1], "op": "all_gather", "seconds": 1.0})
    pd.DataFrame(rows).to_csv(path, index=False)


@pytest.mark.parametrize("world", [2, 8])
def test_synthetic_recovered(tmp_path, world):
    path = tmp_path / "allreduce.csv"
    _synthetic(path, 9.5e-6, 0.81, world)
    lat, eff, err = fit_allreduce(path, load_hardware("h200"))
    assert lat == pytest.approx(9.5e-6, rel=1e-6)
    assert eff == pytest.approx(0.81, rel=1e-6)
    assert err < 1e-6


def test_synthetic_with_noise(tmp_path):
    path = tmp_path / "allreduce.csv"
    _synthetic(path, 2e-5, 0.6, 2, noise=0.02)
    lat, eff, err = fit_allreduce(path, load_hardware("h200"))
    assert lat == pytest.approx(2e-5, rel=0.1)
    assert eff == pytest.approx(0.6, rel=0.05)
    assert err < 5.0


def test_rejects_too_few_rows(tmp_path):
    path = tmp_path / "allreduce.csv"
    pd.DataFrame(
        [{"op": "all_reduce", "bytes": 4096, "seconds": 1e-5, "world_size": 2}]
    ).to_csv(path, index=False)
    with pytest.raises(MeasurementError):
        fit_allreduce(path, load_hardware("h200"))


@pytest.mark.skipif(not MEASURED.exists(), reason="no 2-GPU all-reduce measurements committed yet")
def test_measured_fit_reproduces_profile():
    hw = load_hardware("h200")
    lat, eff, err = fit_allreduce(MEASURED, hw)
    assert lat == pytest.approx(hw.allreduce_latency_s, rel=1e-6)
    assert eff == pytest.approx(hw.allreduce_efficiency, rel=1e-6)
    assert err < MEDIAN_ERROR_BOUND_PCT
