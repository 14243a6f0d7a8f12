"""Synthetic agent sessions: linear, branching, subagents, compaction, determinism, speed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from simulator.workload.agentic import AgenticWorkload, generate_sessions
from simulator.workload.compile import (
    compile_workload,
    load_workload_spec,
    parse_workload_spec,
    workload_graph,
)
from simulator.workload.compiled import WorkloadError
from simulator.workload.graph import KIND_COMPACTION, compile_graph, graph_positions

FIX = Path(__file__).resolve().parent / "fixtures" / "workloads"


def spec(agents: dict, traffic=None, **kw) -> AgenticWorkload:
    return parse_workload_spec(
        {
            "kind": "agentic",
            "agents": agents,
            "traffic": traffic or {"mode": "sequential", "max_sessions": 4},
            **kw,
        }
    )


def agent(graph: dict, **kw) -> dict:
    return {
        "graph": graph,
        "first_input_tokens": 100,
        "fresh_input_tokens": 50,
        "output_tokens": 20,
        **kw,
    }


def parents_of(g, r):
    return g.parent_ids[g.parents_start[r] : g.parents_start[r + 1]].tolist()


def test_linear_chains_with_scaffold():
    s = spec(
        {
            "a": agent(
                {"type": "linear", "turns": {"dist": "uniform", "low": 3, "high": 6}},
                scaffold="tools",
                wait_after_ready=0.5,
            )
        },
        scaffolds={"sys": {"tokens": 1000}, "tools": {"tokens": 200, "parent": "sys"}},
        traffic={"mode": "rate", "sessions_per_s": 1.0, "max_sessions": 50},
    )
    g, _ = generate_sessions(s, 50, np.random.default_rng(0))
    counts = np.bincount(g.session)
    assert counts.min() >= 3 and counts.max() <= 6
    first = np.r_[0, np.cumsum(counts)[:-1]]
    _, prompt, _ = graph_positions(g)
    assert np.all(prompt[first] == 1200 + 100)  # scaffold + first input
    assert np.all(g.prefix[first] == 1) and np.all(g.history_parent[first] == -1)
    rest = np.setdiff1d(np.arange(g.num_requests), first)
    assert np.all(g.history_parent[rest] == rest - 1)
    assert np.all(g.wait[first] == 0.0) and np.all(g.wait[rest] == 0.5)
    wl = compile_graph(g)
    assert wl.num_nodes == 1 + 50  # sys + tools merged (one child), one node per session


def test_branching_graph_shape():
    s = spec(
        {
            "a": agent(
                {
                    "type": "branching",
                    "layers": 4,
                    "width": 3,
                    "fan_out": 2,
                    "fan_in": 2,
                    "single_root": True,
                }
            )
        }
    )
    g, _ = generate_sessions(s, 30, np.random.default_rng(1))
    assert np.all(np.bincount(g.session) == 1 + 3 + 3 + 3)
    fan_in = np.diff(g.parents_start)
    roots = fan_in == 0
    assert roots.sum() == 30  # one root per session
    layer = np.arange(g.num_requests) % 10  # 0 | 1-3 | 4-6 | 7-9
    assert np.all(fan_in[(layer >= 1) & (layer <= 3)] == 1)  # the only node of layer 0
    assert np.all(fan_in[layer >= 4] >= 2)  # at least fan_in from a previous layer of width 3
    hp = g.history_parent
    assert all(hp[r] in parents_of(g, r) for r in np.flatnonzero(~roots))
    wl = compile_graph(g)
    assert wl.num_requests == g.num_requests


def test_subagents_spawn_and_return_results():
    s = spec(
        {
            "main": agent(
                {"type": "linear", "turns": 5},
                scaffold="m",
                spawn={"agent": "sub", "count": 2, "result_fan_in": 1.0},
            ),
            "sub": agent(
                {"type": "linear", "turns": 3}, scaffold="s", first_input_tokens=7, output_tokens=11
            ),
        },
        scaffolds={"m": {"tokens": 300}, "s": {"tokens": 40}},
        max_spawn_depth=1,
    )
    g, agent_of = generate_sessions(s, 4, np.random.default_rng(2))
    assert g.num_requests == 4 * (5 + 2 * 3)
    assert len(np.unique(g.subsession)) == 4 * 3
    sub_roots = np.flatnonzero((agent_of == 1) & (g.history_parent < 0))
    assert sub_roots.size == 8
    _, prompt, _ = graph_positions(g)
    assert np.all(prompt[sub_roots] == 40 + 7)  # own scaffold + task, no parent history
    for r in sub_roots:
        (p,) = parents_of(g, r)
        assert agent_of[p] == 0 and g.session[p] == g.session[r]
    # each subagent's last request feeds a main request, whose fresh input grows by 11
    main_fresh = g.fresh[agent_of == 0]
    extra = main_fresh[main_fresh != 100] - 50
    assert extra.size >= 1 and np.all(extra % 11 == 0) and extra.sum() == 8 * 11
    compile_graph(g)


def test_spawn_depth_limit_and_zero_counts():
    s = spec(
        {
            "a": agent(
                {"type": "linear", "turns": 3},
                spawn={"agent": "a", "count": 1, "result_fan_in": 0.0},
            )
        },
        max_spawn_depth=3,
    )
    g, _ = generate_sessions(s, 1, np.random.default_rng(0))
    assert len(np.unique(g.subsession)) == 4  # depths 0, 1, 2, 3
    s0 = spec({"a": agent({"type": "linear", "turns": 3}, spawn={"agent": "a", "count": 0})})
    g0, _ = generate_sessions(s0, 3, np.random.default_rng(0))
    assert g0.num_requests == 9


def test_compaction_in_agentic_spec():
    s = spec(
        {
            "a": agent(
                {"type": "linear", "turns": 40},
                scaffold="sys",
                compaction={"context_limit": 2000, "prompt_tokens": 10, "summary_tokens": 100},
            )
        },
        scaffolds={"sys": {"tokens": 500}},
    )
    g, _ = workload_graph(s, 0)
    comp = g.kind == KIND_COMPACTION
    assert comp.sum() >= 4  # at least once per session
    _, prompt, end = graph_positions(g)
    assert np.all(end[~comp] <= 2000)
    after = np.flatnonzero(comp) + 1
    assert np.all(prompt[after] == 500 + 100 + 50)


def test_deterministic_per_seed_and_end_rule():
    s = load_workload_spec(FIX / "agentic_small.yaml")
    a = compile_workload(s, 5)
    b = compile_workload(s, 5)
    for name, x, y in zip(a._fields, a, b, strict=True):
        assert np.array_equal(x, y), name
    c = compile_workload(s, 6)
    assert (
        not np.array_equal(a.req_output_tokens, c.req_output_tokens)
        or a.num_requests != c.num_requests
    )
    for seed in range(6):
        g, start = workload_graph(s, seed)
        wl = compile_graph(g, start)
        last = wl.path_nodes[wl.req_path_start[1:] - 1]
        for node in np.unique(last):  # requests ending in one node are history ancestors
            reqs = np.flatnonzero(last == node)
            for x, y in zip(reqs[:-1], reqs[1:], strict=True):
                r = int(y)
                while g.history_parent[r] >= 0 and r != x:
                    r = int(g.history_parent[r])
                assert r == x


def test_spec_errors_name_the_field():
    with pytest.raises(WorkloadError, match=r"w: .*unknown scaffold 'nope'"):
        parse_workload_spec(
            {
                "kind": "agentic",
                "agents": {"a": agent({"type": "linear", "turns": 2}, scaffold="nope")},
                "traffic": {"mode": "sequential", "max_sessions": 1},
            },
            "w",
        )
    with pytest.raises(WorkloadError, match="scaffolds: cycle"):
        parse_workload_spec(
            {
                "kind": "agentic",
                "scaffolds": {"x": {"tokens": 1, "parent": "y"}, "y": {"tokens": 1, "parent": "x"}},
                "agents": {"a": agent({"type": "linear", "turns": 2})},
                "traffic": {"mode": "sequential", "max_sessions": 1},
            },
            "w",
        )
    with pytest.raises(WorkloadError, match=r"agents\.a\.graph\.turns"):
        parse_workload_spec(
            {
                "kind": "agentic",
                "agents": {
                    "a": agent(
                        {"type": "linear", "turns": {"dist": "uniform", "low": 0, "high": 3}}
                    )
                },
                "traffic": {"mode": "sequential", "max_sessions": 1},
            },
            "w",
        )


def test_compile_speed_scales():
    # 200k requests with contexts to ~100k tokens; the 1M-request figure is in docs/workloads.md
    s = spec(
        {
            "a": agent(
                {"type": "linear", "turns": {"dist": "uniform", "low": 110, "high": 150}},
                first_input_tokens={"dist": "uniform", "low": 400, "high": 600},
                fresh_input_tokens={"dist": "uniform", "low": 400, "high": 600},
                output_tokens={"dist": "uniform", "low": 150, "high": 250},
                wait_after_ready={"dist": "exponential", "mean": 0.032},
            )
        },
        traffic={"mode": "rate", "sessions_per_s": 1.0, "max_sessions": 1540},
    )
    compile_workload(spec({"a": agent({"type": "linear", "turns": 2})}), 0)  # warm the JIT
    t = time.perf_counter()
    wl = compile_workload(s, 0)
    dt = time.perf_counter() - t
    assert wl.num_requests > 190_000
    assert (wl.req_prompt_tokens + wl.req_output_tokens).max() > 95_000
    assert wl.num_nodes == 1540 and dt < 3.0
