"""Distribution models: validation messages, sampling moments, rounding and clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from simulator.workload.distributions import (
    Dist,
    Exponential,
    Fixed,
    FixedTime,
    Gamma,
    InverseGaussian,
    LogNormal,
    Normal,
    TimeDist,
    Uniform,
    UniformTime,
    sample,
    sample_counts,
    sample_times,
)

DIST = TypeAdapter(Dist)
TIME = TypeAdapter(TimeDist)
N = 400_000


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize(
    ("dist", "mean", "std"),
    [
        (Fixed(value=7), 7.0, 0.0),
        (Uniform(low=10, high=20), 15.0, math.sqrt((11**2 - 1) / 12)),
        (Normal(mean=100, std=10), 100.0, 10.0),
        (LogNormal(mean=1000, sigma=0.8), 1000.0, 1000 * math.sqrt(math.exp(0.64) - 1)),
        (Exponential(mean=3.0), 3.0, 3.0),
        (InverseGaussian(mean=815, shape=200), 815.0, math.sqrt(815**3 / 200)),
        (Gamma(mean=50, cv=0.5), 50.0, 25.0),
    ],
)
def test_sample_moments(dist, mean, std):
    x = sample(dist, rng(), N)
    assert x.dtype == np.float64 and x.shape == (N,)
    # 5 standard errors of the mean, plus a little slack for fixed values
    assert abs(x.mean() - mean) <= 5 * std / math.sqrt(N) + 1e-9
    if std > 0:
        assert x.std() == pytest.approx(std, rel=0.1)


def test_lognormal_mean_is_distribution_mean():
    d = LogNormal(mean=200, sigma=1.5)
    x = sample(d, rng(1), 2_000_000)
    assert x.mean() == pytest.approx(200, rel=0.05)
    assert np.median(x) == pytest.approx(200 * math.exp(-(1.5**2) / 2), rel=0.02)


def test_uniform_is_inclusive_integers():
    x = sample(Uniform(low=4, high=6), rng(), 10_000)
    assert set(np.unique(x)) == {4.0, 5.0, 6.0}


def test_clipping_bounds():
    x = sample(Normal(mean=0, std=100, min=-5, max=5), rng(), 10_000)
    assert x.min() == -5 and x.max() == 5


def test_sample_counts_round_and_clip_to_one():
    x = sample_counts(Normal(mean=1, std=5), rng(), 10_000)
    assert x.dtype == np.int64 and x.min() == 1
    assert np.all(sample_counts(Fixed(value=2.6), rng(), 5) == 3)


def test_sample_times_clip_to_zero_and_allow_zero():
    x = sample_times(Normal(mean=0, std=1), rng(), 10_000)
    assert x.dtype == np.float64 and x.min() == 0.0
    assert np.all(sample_times(TIME.validate_python(0), rng(), 3) == 0.0)
    u = sample_times(UniformTime(low=0.5, high=1.5), rng(), 10_000)
    assert 0.5 <= u.min() and u.max() <= 1.5 and len(np.unique(u)) > 100


def test_fixed_draws_nothing():
    a, b = rng(3), rng(3)
    sample(Fixed(value=5), a, 100)
    assert a.random() == b.random()


def test_same_seed_same_draws():
    d = InverseGaussian(mean=10, shape=2)
    assert np.array_equal(sample(d, rng(9), 1000), sample(d, rng(9), 1000))
    assert not np.array_equal(sample(d, rng(9), 1000), sample(d, rng(10), 1000))


def test_yaml_shapes_and_shorthand():
    assert DIST.validate_python(128) == Fixed(value=128)
    assert TIME.validate_python(0.0) == FixedTime(value=0.0)
    d = DIST.validate_python({"dist": "gamma", "mean": 3, "cv": 1, "max": 10})
    assert isinstance(d, Gamma) and d.max == 10
    assert isinstance(TIME.validate_python({"dist": "uniform", "low": 0, "high": 2}), UniformTime)


def test_models_are_frozen():
    d = Exponential(mean=1)
    with pytest.raises(ValidationError):
        d.mean = 2


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"dist": "lognormal", "mean": -3, "sigma": 1}, "greater than 0"),
        ({"dist": "lognormal", "mean": 3, "sigma": 0}, "greater than 0"),
        ({"dist": "normal", "mean": 3, "std": -1}, "greater than 0"),
        ({"dist": "uniform", "low": 5, "high": 2}, "low (5) must be <= high (2)"),
        ({"dist": "uniform", "low": 1.5, "high": 2}, "integer"),
        ({"dist": "fixed", "value": 0}, "greater than or equal to 1"),
        ({"dist": "fixed", "value": 3, "min": 5, "max": 1}, "min (5.0) must be <= max (1.0)"),
        ({"dist": "exponential", "mean": 1, "rate": 2}, "Extra inputs are not permitted"),
        ({"dist": "beta", "s": 1}, "does not match any of the expected tags"),
        ({"dist": "zipf", "s": 1}, "Extra inputs are not permitted"),
        ({"mean": 1}, "Unable to extract tag"),
        ({"dist": "gamma", "mean": float("inf"), "cv": 1}, "finite"),
    ],
)
def test_invalid_dists(data, needle):
    with pytest.raises(ValidationError) as info:
        DIST.validate_python(data)
    assert needle in str(info.value)


def test_time_dists_allow_zero_but_not_negative():
    assert TIME.validate_python({"dist": "fixed", "value": 0}).value == 0
    with pytest.raises(ValidationError):
        TIME.validate_python({"dist": "fixed", "value": -1})
    with pytest.raises(ValidationError):
        TIME.validate_python({"dist": "uniform", "low": -1, "high": 1})
