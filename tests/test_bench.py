"""The benchmark commands: workloads as documented, reports that add up, scaling runs, soak."""

from __future__ import annotations

import json
import math

import numpy as np
from click.testing import CliRunner
from numba import njit

from simulator.bench import (
    CLUSTER_REPLICAS,
    bench_experiment,
    cluster_experiment,
    run_cluster_bench,
    soak_one,
)
from simulator.cli import main
from simulator.core.borrow import borrow
from simulator.simulate import simulate
from simulator.workload.compile import compile_workload


def test_cluster_workload_is_the_documented_one():
    exp = cluster_experiment(20_000)
    assert exp.cluster.router.policy == "kv_aware"
    assert sum(g.count for g in exp.cluster.replicas) == CLUSTER_REPLICAS == 16
    assert exp.engine.enable_prefix_caching
    wl = compile_workload(exp.workload, exp.seed)
    prompts = wl.req_prompt_tokens
    # multi-turn: about 75 turns a session, contexts up to (not past) 100k tokens
    assert 14_000 < wl.num_requests < 26_000
    assert 90_000 < prompts.max() <= 100_000
    # a scaffold shared across sessions: every session's first node is the same content
    first_nodes = wl.path_nodes[wl.req_path_start[:-1]]
    assert np.unique(first_nodes).size == 1
    short = compile_workload(cluster_experiment(20_000, 0.25).workload, 1)
    assert short.req_prompt_tokens.max() <= 25_000


def test_cluster_bench_report_adds_up():
    report = run_cluster_bench(2_000, scaling=True, progress=False)
    labels = [r["label"] for r in report["runs"]]
    assert labels == ["main", "quarter requests", "quarter requests, contexts / 4",
                      "one at a time, 1,000-token prompts", "one at a time, 100,000-token prompts"]
    for r in report["runs"]:
        assert r["num_finished"] == r["num_requests"] > 0
        assert 0 < r["loop_seconds"] <= r["wall_seconds"]
        assert math.isclose(r["loop_us_per_event"] * r["num_events"] / 1e6, r["loop_seconds"])
        assert r["events_per_request"] > 1
    main_run, quarter, short, one, hundred = report["runs"]
    assert quarter["num_requests"] < main_run["num_requests"]
    assert short["mean_prompt_tokens"] < 0.5 * quarter["mean_prompt_tokens"]
    # the context check: the same events per request whatever the prompt length
    assert one["max_prompt_tokens"] == 1_000 and hundred["max_prompt_tokens"] == 100_000
    assert one["num_events"] == hundred["num_events"]
    assert round(one["events_per_request"]) == 51  # arrival, one prefill step, 49 decodes


def test_cli_cluster_bench_json():
    res = CliRunner().invoke(main, ["bench", "--cluster", "--requests", "1500", "--no-scaling",
                                    "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert [r["label"] for r in report["runs"]] == ["main"]
    assert report["runs"][0]["num_finished"] > 1000


def test_cli_bench_rejects_two_modes():
    res = CliRunner().invoke(main, ["bench", "--cluster", "--soak"])
    assert res.exit_code == 2
    assert "pick one" in res.output


def test_soak_follows_rate_and_memory():
    out = soak_one(bench_experiment(30_000), "chat", pause_every=5_000)
    assert out["all_accounted_for"]
    assert out["num_finished"] + out["num_rejected"] == 30_000
    assert out["rate_first_10pct"] > 0 and out["rate_last_10pct"] > 0
    assert out["event_rate_first_10pct"] > out["rate_first_10pct"]
    assert out["rss_at_10pct_mib"] > 0
    assert out["num_events"] > 30_000


def test_simulate_reports_chunks_and_core_time():
    calls = []
    res = simulate(bench_experiment(2_000), progress=False,
                   on_chunk=lambda done, events: calls.append((done, events)))
    assert calls[-1] == (2_000, res.num_events)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(calls, calls[1:], strict=False))
    assert 0 < res.loop_seconds <= res.wall_seconds


@njit
def _write_through(a):
    view = borrow(a)
    view[1] = 7.0
    return view.shape[0], view[1:].sum()


def test_borrowed_view_is_the_same_memory():
    a = np.zeros(4)
    n, tail = _write_through(a)
    assert n == 4 and tail == 7.0
    assert a[1] == 7.0
