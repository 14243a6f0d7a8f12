"""The shipped workloads and their experiments load, compile, and (one) simulate."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.config import load_experiment
from simulator.workload.compile import compile_workload, load_workload_spec, workload_graph
from simulator.workload.stats import graph_stats

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [
    "agentic_coding",
    "veeksha_linear5",
    "veeksha_dag15",
    "openclaw_research",
    "chat_azure",
    "mooncake_prefix",
]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_workload_and_experiment_load(name):
    spec = load_workload_spec(ROOT / "workloads" / f"{name}.yaml")
    wl = compile_workload(spec, 0)
    assert wl.num_requests > 100
    exp = load_experiment(ROOT / "experiments" / "workloads" / f"{name}.yaml")
    assert exp.workload == spec


def test_agentic_coding_matches_case_study_1():
    g, _ = workload_graph(load_workload_spec(ROOT / "workloads" / "agentic_coding.yaml"), 0)
    s = graph_stats(g)
    assert s["sessions"] == 5
    assert 110 <= s["requests_per_session"]["min"] and s["requests_per_session"]["max"] <= 150
    assert 400 <= s["history_input"]["min"] and s["history_input"]["max"] <= 600
    assert 150 <= s["output"]["min"] and s["output"]["max"] <= 250
    assert s["wait_after_ready"]["mean"] == pytest.approx(0.032, rel=0.1)
    assert s["content_nodes"] == 5  # one node per 110-150-turn session


def test_openclaw_research_has_subagents_and_compaction():
    g, _ = workload_graph(load_workload_spec(ROOT / "workloads" / "openclaw_research.yaml"), 0)
    s = graph_stats(g)
    assert s["agent_runs"] > 3 * s["sessions"]
    assert s["fan_in"]["max"] >= 2  # subagent results join the parent
    assert s["wait_after_ready"]["p50"] == pytest.approx(0.035, rel=0.3)


def test_dag_experiment_runs_and_hits_the_cacheable_prefix():
    from simulator.simulate import simulate

    exp = load_experiment(ROOT / "experiments" / "workloads" / "veeksha_dag15.yaml")
    res = simulate(exp, progress=False)
    summary = res.summary()
    assert summary["num_finished"] == summary["num_requests"]
    g, _ = workload_graph(exp.workload, exp.seed)
    cacheable = graph_stats(g)["cacheable_fraction"]
    # block-granular caching can only lose a little of the token-level upper bound
    assert cacheable - 0.03 <= summary["prefix_cache_hit_rate"] <= cacheable
