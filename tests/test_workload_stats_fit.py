"""Workload statistics, distribution fitting, the `servesim workload` CLI, session timelines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from simulator.cli_workload import workload_group
from simulator.workload.compile import parse_workload_spec, workload_graph
from simulator.workload.fit import fit_distribution, fit_workload
from simulator.workload.graph import compile_graph
from simulator.workload.stats import graph_stats
from simulator.workload.timeline import interval_union, session_timelines
from simulator.workload.trace import load_trace
from simulator.workload.veeksha import write_veeksha

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "workloads"
SHARED = ROOT.parent / "shared" / "data"


def test_stats_of_the_shipped_dag():
    g = load_trace(ROOT / "workloads" / "traces" / "dag15.jsonl")
    s = graph_stats(g)
    assert s["requests"] == 15 and s["depth"]["max"] == 5 and s["width"]["max"] == 9
    assert s["fan_out"]["max"] == 4 and s["fan_in"]["max"] == 4  # node 1: 2, 3, 4 and 14
    assert s["max_context"] == 4000 and s["total_prompt_tokens"] == 37_900
    # every inherited token was produced before: prompt - fresh = 37,900 - 15 * 500
    assert s["cacheable_tokens"] == 37_900 - 7_500
    assert s["history_overlap"]["min"] == pytest.approx(800 / 1300)


def test_fit_distribution_recovers_shapes():
    r = np.random.default_rng(0)
    best, table = fit_distribution(r.wald(815, 200, size=4000))
    assert best["dist"] == "inverse_gaussian"
    assert best["mean"] == pytest.approx(815, rel=0.1) and best["shape"] == pytest.approx(
        200, rel=0.1
    )
    assert [c["aic"] for c in table] == sorted(c["aic"] for c in table)
    best, _ = fit_distribution(r.lognormal(5, 0.7, size=4000))
    assert best["dist"] == "lognormal" and best["sigma"] == pytest.approx(0.7, rel=0.05)
    waits = np.where(r.random(4000) < 0.3, 0.0, r.exponential(2.0, size=4000))
    best, _ = fit_distribution(waits, time=True)
    assert best["dist"] == "mixture" and best["weights"][0] == pytest.approx(0.3, abs=0.03)
    assert fit_distribution(np.full(10, 500))[0] == {"dist": "fixed", "value": 500.0}


TRUTH = {
    "kind": "agentic",
    "agents": {
        "a": {
            "graph": {"type": "linear", "turns": {"dist": "uniform", "low": 5, "high": 15}},
            "first_input_tokens": {"dist": "lognormal", "mean": 800, "sigma": 0.5},
            "fresh_input_tokens": {"dist": "inverse_gaussian", "mean": 500, "shape": 200},
            "output_tokens": {"dist": "gamma", "mean": 200, "cv": 0.8},
            "wait_after_ready": {
                "dist": "spike_pareto",
                "spike": 0.03,
                "spike_sigma": 0.6,
                "tail_probability": 0.1,
                "tail_min": 1.0,
                "tail_alpha": 1.1,
                "max": 60,
            },
        }
    },
    "traffic": {"mode": "sequential", "max_sessions": 300},
}


def _close(a: dict, b: dict, key: str, q: str, rel: float) -> None:
    assert b[key][q] == pytest.approx(a[key][q], rel=rel), (key, q, a[key][q], b[key][q])


def test_fit_round_trip_matches_trace_statistics(tmp_path):
    g, _ = workload_graph(parse_workload_spec(TRUTH), 1)
    write_veeksha(g, tmp_path / "t.jsonl")
    trace = load_trace(tmp_path / "t.jsonl")
    res = CliRunner().invoke(
        workload_group, ["fit", str(tmp_path / "t.jsonl"), "-o", str(tmp_path / "fit.yaml")]
    )
    assert res.exit_code == 0, res.output
    text = (tmp_path / "fit.yaml").read_text()
    assert "AIC" in text
    fitted = parse_workload_spec(yaml.safe_load(text))
    assert fitted.agents["main"].fresh_input_tokens.dist == "inverse_gaussian"
    a = graph_stats(trace)
    b = graph_stats(workload_graph(fitted, 7)[0])
    assert b["sessions"] == 300
    _close(a, b, "requests_per_session", "mean", 0.05)
    for key in ("first_input", "history_input", "output"):
        for q in ("p25", "p50", "p90"):
            _close(a, b, key, q, 0.12)
    _close(a, b, "wait_after_ready", "p50", 0.25)
    _close(a, b, "wait_after_ready", "p95", 0.3)  # (p90 sits on the spike/tail boundary)
    _close(a, b, "context", "p50", 0.1)


def test_fit_subagents_and_scaffolds():
    spec, report = fit_workload(load_trace(FIX / "openclaw_small.json"))
    assert set(spec["agents"]) == {"main", "sub"}
    assert spec["agents"]["main"]["spawn"] == {"agent": "sub", "count": 1, "result_fan_in": 1.0}
    assert spec["scaffolds"]["common"]["tokens"] == 800
    assert spec["agents"]["main"]["scaffold"] == "main"
    parse_workload_spec(spec)  # the fitted spec is valid
    assert report["sessions"] == 1


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real traces not available ({SHARED} is absent)")
def test_fit_real_openclaw_chain(tmp_path):
    trace = load_trace(SHARED / "openclaw" / "case1_interp.json")
    spec, _ = fit_workload(trace)
    spec["traffic"] = {"mode": "sequential", "max_sessions": 30}
    gen = graph_stats(workload_graph(parse_workload_spec(spec), 0)[0])
    ref = graph_stats(trace)
    assert gen["requests_per_session"]["mean"] == 129
    for key in ("history_input", "output"):
        _close(ref, gen, key, "p50", 0.3)
    assert gen["wait_after_ready"]["p50"] < 0.2  # the spike at ~32 ms survives the fit


def test_stats_cli_json_and_errors(tmp_path):
    res = CliRunner().invoke(
        workload_group, ["stats", str(FIX / "agentic_small.yaml"), "--json", "--seed", "3"]
    )
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["sessions"] == 6 and s["agent_runs"] > 6 and s["compactions"] >= 1
    res = CliRunner().invoke(workload_group, ["stats", str(FIX / "veeksha_dag.jsonl")])
    assert res.exit_code == 0 and "cacheable under an infinite cache" in res.output
    res = CliRunner().invoke(workload_group, ["stats", str(tmp_path / "nope.jsonl")])
    assert res.exit_code == 2 and "nope.jsonl: cannot read" in res.output
    (tmp_path / "r.yaml").write_text(
        "kind: requests\nnum_requests: 1\narrival: {process: burst}\n"
        "prompt_tokens: 1\noutput_tokens: 1\n"
    )
    res = CliRunner().invoke(workload_group, ["stats", str(tmp_path / "r.yaml")])
    assert res.exit_code == 2 and "session-graph workload" in res.output


def test_interval_union():
    g = np.array([0, 0, 0, 1, 1])
    s = np.array([0.0, 1.0, 5.0, 2.0, np.nan])
    e = np.array([2.0, 3.0, 6.0, 4.0, 9.0])
    assert interval_union(g, s, e, 3).tolist() == [4.0, 2.0, 0.0]


def test_session_timelines():
    nan = float("nan")
    req = pd.DataFrame(
        {
            "session_id": [0, 0, 1, 1, 1],
            "status": ["finished", "finished", "finished", "finished", "rejected"],
            "ready_time": [0.0, 3.0, 0.0, 0.0, 1.0],
            "arrival_time": [1.0, 5.0, 0.0, 0.5, 1.0],
            "scheduled_time": [1.5, 5.0, 0.0, 1.0, nan],
            "first_token_time": [2.0, 5.5, 1.0, 2.0, nan],
            "finish_time": [3.0, 6.0, 2.0, 4.0, nan],
        }
    )
    t = session_timelines(req).set_index("session_id")
    a = t.loc[0]
    assert (a.span_s, a.tool_s, a.queue_s, a.prefill_s, a.decode_s) == (6.0, 3.0, 0.5, 1.0, 1.5)
    assert (a.in_system_s, a.gpu_s, a.idle_s) == (3.0, 2.5, 3.0)
    assert a.idle_fraction == 0.5
    b = t.loc[1]
    assert (b.num_requests, b.num_finished) == (3, 2)
    assert (b.in_system_s, b.gpu_s, b.idle_s) == (4.0, 4.0, 0.0)


def test_compiled_stats_agree_with_core_view():
    g, start = workload_graph(
        parse_workload_spec(TRUTH | {"traffic": {"mode": "sequential", "max_sessions": 3}}), 0
    )
    wl = compile_graph(g, start)
    s = graph_stats(g, wl)
    assert s["total_prompt_tokens"] == int(wl.req_prompt_tokens.sum())
    assert s["content_nodes"] == wl.num_nodes == 3
