"""The added distributions: zipf, empirical, mixture, spike + Pareto, Weibull, Pareto, Poisson."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from simulator.workload.compile import parse_workload_spec
from simulator.workload.distributions import (
    Count0Dist,
    Dist,
    TimeDist,
    sample,
    sample_counts,
    sample_times,
)

DIST = TypeAdapter(Dist)
TIME = TypeAdapter(TimeDist)
COUNT0 = TypeAdapter(Count0Dist)
FIX = Path(__file__).resolve().parent / "fixtures" / "workloads"
N = 200_000


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_zipf_probabilities_and_scramble():
    d = DIST.validate_python({"dist": "zipf", "low": 3, "high": 12, "theta": 1.0})
    x = sample_counts(d, rng(), N)
    assert x.min() >= 3 and x.max() <= 12
    w = 1.0 / np.arange(1, 11)
    p = np.bincount(x - 3, minlength=10) / N
    assert np.allclose(p, w / w.sum(), atol=0.005)
    s = sample_counts(
        DIST.validate_python(
            {"dist": "zipf", "low": 3, "high": 12, "theta": 1.0, "scramble": True}
        ),
        rng(),
        N,
    )
    ps = np.bincount(s - 3, minlength=10) / N
    assert np.allclose(np.sort(ps), np.sort(p), atol=0.005) and ps.argmax() != 0


def test_empirical_values_weights_and_trace():
    d = DIST.validate_python({"dist": "empirical", "values": [10, 20, 30], "weights": [1, 0, 3]})
    x = sample(d, rng(), N)
    assert set(np.unique(x)) == {10.0, 30.0}
    assert (x == 30).mean() == pytest.approx(0.75, abs=0.01)
    with pytest.raises(ValidationError, match="weights has 2 entries"):
        DIST.validate_python({"dist": "empirical", "values": [1, 2, 3], "weights": [1, 1]})
    # values read from a trace, relative to the workload file's folder
    spec = parse_workload_spec(
        {
            "kind": "agentic",
            "agents": {
                "a": {
                    "graph": {
                        "type": "linear",
                        "turns": {
                            "dist": "empirical",
                            "trace": "veeksha_dag.jsonl",
                            "field": "requests_per_session",
                        },
                    },
                    "first_input_tokens": 1,
                    "fresh_input_tokens": 1,
                    "output_tokens": {
                        "dist": "empirical",
                        "trace": "veeksha_dag.jsonl",
                        "field": "output",
                    },
                }
            },
            "traffic": {"mode": "sequential", "max_sessions": 1},
        },
        "spec",
        base_dir=FIX,
    )
    a = spec.agents["a"]
    assert sorted(a.graph.turns.values) == [2.0, 4.0]
    assert sorted(a.output_tokens.values) == [4.0, 5.0, 6.0, 10.0, 10.0, 20.0]


def test_mixture_weights():
    d = DIST.validate_python(
        {
            "dist": "mixture",
            "weights": [1, 3],
            "components": [5, {"dist": "uniform", "low": 100, "high": 200}],
        }
    )
    x = sample_counts(d, rng(), N)
    assert (x == 5).mean() == pytest.approx(0.25, abs=0.01)
    assert x[x != 5].min() >= 100 and x.max() <= 200
    t = TIME.validate_python(
        {
            "dist": "mixture",
            "weights": [1, 1],
            "components": [0, {"dist": "exponential", "mean": 2.0}],
        }
    )
    y = sample_times(t, rng(), N)
    assert (y == 0).mean() == pytest.approx(0.5, abs=0.01)
    assert y.mean() == pytest.approx(1.0, rel=0.03)


def test_spike_pareto_matches_agent_waits():
    # WORKLOADS.md: median ~32 ms, ~80% under 100 ms, ~6% over 10 s
    d = TIME.validate_python(
        {
            "dist": "spike_pareto",
            "spike": 0.032,
            "spike_sigma": 0.9,
            "tail_probability": 0.12,
            "tail_min": 1.0,
            "tail_alpha": 0.7,
        }
    )
    x = sample_times(d, rng(), N)
    assert np.median(x) == pytest.approx(0.035, rel=0.15)
    assert (x < 0.1).mean() == pytest.approx(0.80, abs=0.04)
    assert (x > 10).mean() == pytest.approx(0.12 * 10**-0.7, abs=0.01)


@pytest.mark.parametrize(
    ("spec", "mean"),
    [
        ({"dist": "weibull", "shape": 1.5, "scale": 100}, 100 * math.gamma(1 + 1 / 1.5)),
        ({"dist": "pareto", "alpha": 3.0, "scale": 10}, 15.0),
        ({"dist": "poisson", "mean": 4.0}, 4.0),
    ],
)
def test_new_parametric_means(spec, mean):
    x = sample(DIST.validate_python(spec), rng(), N)
    assert x.mean() == pytest.approx(mean, rel=0.02)


def test_count0_allows_zero():
    x = sample_counts(
        COUNT0.validate_python({"dist": "uniform", "low": 0, "high": 2}), rng(), N, low=0
    )
    assert set(np.unique(x)) == {0, 1, 2}
    assert np.all(sample_counts(COUNT0.validate_python(0), rng(), 4, low=0) == 0)
    with pytest.raises(ValidationError):
        DIST.validate_python({"dist": "uniform", "low": 0, "high": 2})
