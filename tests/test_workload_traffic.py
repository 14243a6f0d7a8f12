"""Traffic: session rates, normalised request rate, closed loops, wrap, limits, trace timing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter

from simulator.workload.compile import compile_workload, parse_workload_spec, workload_graph
from simulator.workload.compiled import WorkloadError
from simulator.workload.graph import roots_and_sinks
from simulator.workload.traffic import Traffic, closed_loop_edges, plan_sessions

FIX = Path(__file__).resolve().parent / "fixtures" / "workloads"
TRAFFIC = TypeAdapter(Traffic)


def plan(spec: dict, available=None, mean=1.0, times=None, seed=0):
    return plan_sessions(
        TRAFFIC.validate_python(spec),
        np.random.default_rng(seed),
        available=available,
        mean_requests=mean,
        session_time=times,
    )


def test_poisson_rate_and_duration():
    p = plan({"mode": "rate", "sessions_per_s": 2.0, "duration_s": 2000})
    assert p.start[0] == 0 and np.all(np.diff(p.start) >= 0) and p.start[-1] < 2000
    assert p.num_sessions == pytest.approx(4000, rel=0.05)  # 2/s for 2000 s
    gaps = np.diff(p.start)
    assert gaps.std() == pytest.approx(gaps.mean(), rel=0.1)  # exponential: cv = 1


def test_fixed_and_gamma_processes():
    p = plan({"mode": "rate", "process": "fixed", "sessions_per_s": 4.0, "max_sessions": 5})
    assert p.start.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    g = plan(
        {
            "mode": "rate",
            "process": "gamma",
            "cv": 0.25,
            "sessions_per_s": 1.0,
            "max_sessions": 20000,
        }
    )
    gaps = np.diff(g.start)
    assert gaps.mean() == pytest.approx(1.0, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(0.25, rel=0.05)


def test_normalised_request_rate():
    # rho = 3 requests/s with 15 requests per session -> 0.2 sessions/s
    p = plan(
        {"mode": "rate", "process": "fixed", "requests_per_s": 3.0, "max_sessions": 3}, mean=15.0
    )
    assert p.start.tolist() == [0.0, 5.0, 10.0]


def test_wrap_reshuffles_later_passes():
    p = plan(
        {"mode": "rate", "sessions_per_s": 1.0, "max_sessions": 30, "wrap": True}, available=10
    )
    assert p.order[:10].tolist() == list(range(10))
    for k in (1, 2):
        assert sorted(p.order[10 * k : 10 * (k + 1)].tolist()) == list(range(10))
    assert p.order[10:20].tolist() != list(range(10)) or p.order[20:].tolist() != list(range(10))
    q = plan({"mode": "rate", "sessions_per_s": 1.0, "max_sessions": 30}, available=10)
    assert q.num_sessions == 10  # without wrap a trace runs once


def test_closed_loop_plan_and_errors():
    p = plan({"mode": "concurrent", "sessions": 3, "rampup_s": 3.0, "max_sessions": 7})
    assert p.concurrency == 3 and p.start.tolist() == [0.0, 1.0, 2.0, 0, 0, 0, 0]
    with pytest.raises(WorkloadError, match="duration_s: closed-loop"):
        plan({"mode": "sequential", "duration_s": 10})
    with pytest.raises(WorkloadError, match="needs max_sessions"):
        plan({"mode": "sequential"})
    with pytest.raises(WorkloadError, match="wrap: true needs max_sessions or duration_s"):
        plan({"mode": "sequential", "wrap": True}, available=3)
    with pytest.raises(WorkloadError, match="mode: trace needs a trace with arrival times"):
        plan({"mode": "trace"}, available=3)


def test_trace_mode_scaling_wrap_and_duration():
    times = np.array([0.0, 1.0, 3.0])
    p = plan({"mode": "trace", "time_scale": 0.5}, available=3, times=times)
    assert p.start.tolist() == [0.0, 0.5, 1.5]
    w = plan({"mode": "trace", "wrap": True, "duration_s": 9.0}, available=3, times=times)
    # each pass shifted by span (3) + mean gap (1.5)
    assert w.start.tolist() == [0.0, 1.0, 3.0, 4.5, 5.5, 7.5]
    assert w.order.tolist() == [0, 1, 2, 0, 1, 2]


def test_closed_loop_dependencies_in_compiled_workload():
    spec = parse_workload_spec(
        {
            "kind": "agentic",
            "agents": {
                "a": {
                    "graph": {"type": "branching", "layers": 3, "width": 2, "single_root": True},
                    "first_input_tokens": 10,
                    "fresh_input_tokens": 10,
                    "output_tokens": 5,
                }
            },
            "traffic": {"mode": "concurrent", "sessions": 2, "max_sessions": 5},
        }
    )
    g, start = workload_graph(spec, 0)
    child_of_edge = np.repeat(np.arange(g.num_requests), np.diff(g.parents_start))
    inside = g.session[g.parent_ids] == g.session[child_of_edge]
    has_child = np.zeros(g.num_requests, dtype=bool)
    has_child[g.parent_ids[inside]] = True
    for s in range(2, 5):
        root = int(np.flatnonzero(g.session == s)[0])
        pars = g.parent_ids[g.parents_start[root] : g.parents_start[root + 1]]
        ends = np.flatnonzero((g.session == s - 2) & ~has_child)
        assert ends.size == 2 and sorted(pars.tolist()) == ends.tolist()
    roots, _ = roots_and_sinks(g)
    assert np.flatnonzero(roots).tolist() == [0, 5]  # only sessions 0 and 1 start freely
    assert closed_loop_edges(g, 2)[0].size == 0  # nothing left to add
    wl = compile_workload(spec, 0)
    assert wl.req_arrival_time.max() == 0.0 and np.all(start == 0)


def test_sequential_launch_runs_sessions_in_order():
    spec = parse_workload_spec(
        {
            "kind": "agentic",
            "agents": {
                "a": {
                    "graph": {"type": "linear", "turns": 3},
                    "first_input_tokens": 10,
                    "fresh_input_tokens": 10,
                    "output_tokens": 5,
                }
            },
            "traffic": {"mode": "sequential", "max_sessions": 3},
        }
    )
    wl = compile_workload(spec, 0)
    # request 3 (first of session 1) waits for request 2 (last of session 0), and so on
    assert wl.parent_ids[wl.req_parents_start[3] : wl.req_parents_start[4]].tolist() == [2]
    assert wl.parent_ids[wl.req_parents_start[6] : wl.req_parents_start[7]].tolist() == [5]


def test_synthetic_rho_with_duration_uses_pilot_mean():
    spec = parse_workload_spec(
        {
            "kind": "agentic",
            "agents": {
                "a": {
                    "graph": {"type": "linear", "turns": 4},
                    "first_input_tokens": 10,
                    "fresh_input_tokens": 10,
                    "output_tokens": 5,
                }
            },
            "traffic": {
                "mode": "rate",
                "process": "fixed",
                "requests_per_s": 2.0,
                "duration_s": 10.0,
            },
        }
    )
    g, start = workload_graph(spec, 0)
    assert start.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]  # 0.5 sessions/s
    assert g.num_requests == 20


def test_trace_spec_default_traffic_uses_timestamps():
    spec = parse_workload_spec({"kind": "trace", "path": str(FIX / "mooncake_small.jsonl")})
    wl = compile_workload(spec, 0)
    assert sorted(wl.req_arrival_time.tolist()) == [0.0, 0.25, 0.5, 1.5, 2.0]
    with pytest.raises(WorkloadError, match="wrap: only a trace"):
        compile_workload(
            parse_workload_spec(
                {
                    "kind": "agentic",
                    "agents": {
                        "a": {
                            "graph": {"type": "linear", "turns": 1},
                            "first_input_tokens": 1,
                            "fresh_input_tokens": 1,
                            "output_tokens": 1,
                        }
                    },
                    "traffic": {"mode": "sequential", "max_sessions": 2, "wrap": True},
                }
            ),
            0,
        )
