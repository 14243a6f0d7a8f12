"""Compiling workload specs into CompiledWorkload arrays, and loading specs from YAML."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from simulator.workload.compile import compile_workload, load_workload_spec, parse_workload_spec
from simulator.workload.compiled import WorkloadError, validate_compiled
from simulator.workload.spec import (
    BurstArrival,
    FixedRateArrival,
    PoissonArrival,
    RequestsWorkload,
    SessionsWorkload,
)

ROOT = Path(__file__).resolve().parents[1]


def requests_spec(**kw) -> RequestsWorkload:
    base = dict(
        num_requests=500,
        arrival=PoissonArrival(rate=10.0),
        prompt_tokens={"dist": "lognormal", "mean": 1000, "sigma": 0.8},
        output_tokens={"dist": "inverse_gaussian", "mean": 250, "shape": 100},
        shared_prefix_tokens=300,
    )
    return RequestsWorkload(**(base | kw))


def sessions_spec(**kw) -> SessionsWorkload:
    base = dict(
        num_sessions=50,
        arrival=PoissonArrival(rate=1.0),
        turns={"dist": "uniform", "low": 1, "high": 9},
        first_prompt_tokens={"dist": "lognormal", "mean": 400, "sigma": 0.7},
        fresh_input_tokens={"dist": "gamma", "mean": 300, "cv": 1.0},
        output_tokens={"dist": "exponential", "mean": 200},
        wait_after_ready={"dist": "exponential", "mean": 2.0},
        shared_prefix_tokens=2000,
    )
    return SessionsWorkload(**(base | kw))


def paths(wl) -> list[list[int]]:
    s = wl.req_path_start
    return [wl.path_nodes[s[r] : s[r + 1]].tolist() for r in range(wl.num_requests)]


def parents(wl) -> list[list[int]]:
    s = wl.req_parents_start
    return [wl.parent_ids[s[r] : s[r + 1]].tolist() for r in range(wl.num_requests)]


def assert_same(a, b) -> None:
    for name, x, y in zip(a._fields, a, b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y), name


# --------------------------------------------------------------------------- requests


def test_requests_tree_with_shared_prefix():
    spec = requests_spec()
    wl = compile_workload(spec, seed=1)
    n = spec.num_requests
    assert wl.num_requests == n and wl.num_nodes == n + 1
    assert wl.node_parent[0] == -1 and wl.node_num_tokens[0] == 300
    assert np.all(wl.node_parent[1:] == 0) and np.all(wl.node_start_tokens[1:] == 300)
    assert paths(wl) == [[0, r + 1] for r in range(n)]
    # own node = private prompt + output; prompt = shared + private
    private = wl.node_num_tokens[1:] - wl.req_output_tokens
    assert np.all(private >= 1)
    assert np.array_equal(wl.req_prompt_tokens, 300 + private)
    assert np.array_equal(wl.req_session, np.arange(n))
    assert wl.parent_ids.size == 0 and wl.child_ids.size == 0
    assert np.all(wl.req_wait_after_ready == 0)
    assert wl.req_arrival_time[0] == 0 and np.all(np.diff(wl.req_arrival_time) >= 0)


def test_requests_without_prefix_are_roots():
    wl = compile_workload(requests_spec(shared_prefix_tokens=0, num_requests=20), seed=0)
    assert wl.num_nodes == 20 and np.all(wl.node_parent == -1)
    assert paths(wl) == [[r] for r in range(20)]
    assert np.array_equal(wl.node_num_tokens, wl.req_prompt_tokens + wl.req_output_tokens)


def test_arrival_processes():
    fixed = compile_workload(requests_spec(arrival=FixedRateArrival(rate=4.0)), seed=0)
    assert np.allclose(fixed.req_arrival_time, np.arange(500) / 4.0)
    burst = compile_workload(requests_spec(arrival=BurstArrival()), seed=0)
    assert np.all(burst.req_arrival_time == 0)
    poisson = compile_workload(requests_spec(num_requests=50_000), seed=0)
    gaps = np.diff(poisson.req_arrival_time)
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)


def test_requests_determinism():
    spec = requests_spec()
    assert_same(compile_workload(spec, 7), compile_workload(spec, 7))
    a, b = compile_workload(spec, 7), compile_workload(spec, 8)
    assert not np.array_equal(a.req_prompt_tokens, b.req_prompt_tokens)
    assert not np.array_equal(a.req_arrival_time, b.req_arrival_time)


def test_one_million_requests_compile_fast():
    spec = requests_spec(num_requests=1_000_000)
    t0 = time.perf_counter()
    wl = compile_workload(spec, seed=0)
    elapsed = time.perf_counter() - t0
    assert wl.num_requests == 1_000_000
    assert elapsed < 20.0, f"compiling 1M requests took {elapsed:.1f} s"


# --------------------------------------------------------------------------- sessions


def test_session_chains():
    spec = sessions_spec()
    wl = compile_workload(spec, seed=3)
    shared = spec.shared_prefix_tokens
    sess = wl.req_session
    num_sessions = spec.num_sessions
    assert np.array_equal(np.unique(sess), np.arange(num_sessions))
    assert np.all(np.diff(sess) >= 0)  # session-major
    # shared prefix: node 0, reused by every request; one conversation node per session
    assert wl.num_nodes == num_sessions + 1
    assert wl.node_parent[0] == -1 and wl.node_num_tokens[0] == shared
    assert paths(wl) == [[0, int(s) + 1] for s in sess]
    par = parents(wl)
    first = np.r_[True, sess[1:] != sess[:-1]]
    for r in range(wl.num_requests):
        if first[r]:
            assert par[r] == []
            assert wl.req_wait_after_ready[r] == 0
            assert wl.req_prompt_tokens[r] > shared
        else:
            assert par[r] == [r - 1] and sess[r - 1] == sess[r]
            assert wl.req_arrival_time[r] == 0
            fresh = (
                wl.req_prompt_tokens[r] - wl.req_prompt_tokens[r - 1] - wl.req_output_tokens[r - 1]
            )
            assert fresh >= 1  # prompt_{k+1} = prompt_k + out_k + fresh_{k+1}
    # children CSR is the inverse of the parents CSR
    cs = wl.req_children_start
    for r in range(wl.num_requests):
        kids = wl.child_ids[cs[r] : cs[r + 1]].tolist()
        assert kids == ([r + 1] if r + 1 < wl.num_requests and not first[r + 1] else [])
    # the session node holds the whole conversation: it ends where the last turn's output ends
    last = np.r_[np.flatnonzero(first)[1:] - 1, wl.num_requests - 1]
    end = wl.node_start_tokens[1:] + wl.node_num_tokens[1:]
    assert np.array_equal(end, wl.req_prompt_tokens[last] + wl.req_output_tokens[last])
    # turn-1 arrivals are the session arrivals (Poisson, first at 0)
    starts = wl.req_arrival_time[first]
    assert starts[0] == 0 and np.all(np.diff(starts) > 0)
    assert wl.req_wait_after_ready[~first].mean() == pytest.approx(2.0, rel=0.3)


def test_session_fresh_inputs_match_fixed_values():
    spec = sessions_spec(
        turns=3, first_prompt_tokens=100, fresh_input_tokens=10, output_tokens=5, num_sessions=2
    )
    wl = compile_workload(spec, seed=0)
    assert wl.req_prompt_tokens.tolist() == [2100, 2115, 2130] * 2
    assert wl.node_num_tokens.tolist() == [2000, 135, 135]
    assert wl.req_session.tolist() == [0, 0, 0, 1, 1, 1]


def test_session_without_prefix():
    wl = compile_workload(sessions_spec(shared_prefix_tokens=0, num_sessions=5), seed=2)
    assert wl.num_nodes == 5 and np.all(wl.node_parent == -1)
    assert paths(wl) == [[int(s)] for s in wl.req_session]


def test_max_context_truncates_chains():
    spec = sessions_spec(
        turns=10,
        first_prompt_tokens={"dist": "uniform", "low": 50, "high": 3000},
        fresh_input_tokens=100,
        output_tokens=100,
        max_context_tokens=4000,
        num_sessions=40,
    )
    wl = compile_workload(spec, seed=5)
    full = compile_workload(spec.model_copy(update={"max_context_tokens": None}), seed=5)
    assert np.all(wl.req_prompt_tokens + wl.req_output_tokens <= 4000)
    assert wl.num_requests < full.num_requests
    # some sessions vanish (first turn too long), survivors are renumbered densely
    assert np.array_equal(np.unique(wl.req_session), np.arange(wl.num_nodes - 1))
    assert wl.num_nodes - 1 < spec.num_sessions
    # kept turns are the same as without the limit (draws happen before truncation)
    kept_full = (full.req_prompt_tokens + full.req_output_tokens) <= 4000
    assert np.array_equal(wl.req_prompt_tokens, full.req_prompt_tokens[kept_full])
    assert np.array_equal(wl.req_arrival_time, full.req_arrival_time[kept_full])


def test_max_context_leaving_nothing_is_an_error():
    spec = sessions_spec(first_prompt_tokens=5000, max_context_tokens=3000)
    with pytest.raises(WorkloadError, match="no requests"):
        compile_workload(spec, seed=0)


def test_sessions_determinism():
    spec = sessions_spec()
    assert_same(compile_workload(spec, 11), compile_workload(spec, 11))
    a, b = compile_workload(spec, 11), compile_workload(spec, 12)
    assert a.num_requests != b.num_requests or not np.array_equal(
        a.req_prompt_tokens, b.req_prompt_tokens
    )


# --------------------------------------------------------------------------- validate_compiled


def test_validate_catches_broken_path():
    wl = compile_workload(sessions_spec(num_sessions=3), seed=0)
    bad = wl.path_nodes.copy()
    bad[1], bad[0] = bad[0], bad[1]  # [session node, prefix]: does not start at a root
    with pytest.raises(WorkloadError, match="request 0: content path does not start at a root"):
        validate_compiled(wl._replace(path_nodes=bad))
    bad = wl.path_nodes.copy()
    bad[2], bad[3] = 0, 0  # [prefix, prefix]: not a parent-to-child chain
    with pytest.raises(WorkloadError, match="request 1: content path is not a parent-to-child"):
        validate_compiled(wl._replace(path_nodes=bad))


def test_validate_catches_cycle():
    wl = compile_workload(sessions_spec(num_sessions=3, turns=3), seed=0)
    # make request 1's parent request 2 (which depends on 1): a cycle, out of topological order
    bad = wl.parent_ids.copy()
    bad[0] = 2
    with pytest.raises(WorkloadError, match="request 1: parent 2 does not come before it"):
        validate_compiled(wl._replace(parent_ids=bad))


def test_validate_catches_negative_wait():
    wl = compile_workload(sessions_spec(num_sessions=3, turns=3), seed=0)
    bad = wl.req_wait_after_ready.copy()
    bad[4] = -0.5
    with pytest.raises(
        WorkloadError, match=r"request 4: req_wait_after_ready = .*-0\.5.*must be finite"
    ):
        validate_compiled(wl._replace(req_wait_after_ready=bad))


def test_validate_catches_request_outside_its_node():
    wl = compile_workload(requests_spec(num_requests=4), seed=0)
    bad = wl.req_output_tokens.copy()
    bad[2] += 1
    with pytest.raises(WorkloadError, match="request 2: prompt \\+ output"):
        validate_compiled(wl._replace(req_output_tokens=bad))


# --------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("name", ["chat.yaml", "multiturn.yaml"])
def test_shipped_specs_compile(name):
    spec = load_workload_spec(ROOT / "workloads" / name)
    wl = compile_workload(spec, seed=0)
    assert wl.num_requests > 0


def test_shipped_multiturn_shape():
    spec = load_workload_spec(ROOT / "workloads" / "multiturn.yaml")
    assert isinstance(spec, SessionsWorkload) and spec.shared_prefix_tokens == 2000
    wl = compile_workload(spec, seed=0)
    turns = np.bincount(wl.req_session)
    assert turns.min() >= 4 and turns.max() <= 12


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wl.yaml"
    path.write_text(text)
    return path


GOOD = """
kind: sessions
num_sessions: 3
arrival: {process: burst}
turns: 2
first_prompt_tokens: 10
fresh_input_tokens: 10
output_tokens: {dist: lognormal, mean: 20, sigma: 0.5}
"""


def test_load_good_yaml(tmp_path):
    spec = load_workload_spec(write(tmp_path, GOOD))
    assert isinstance(spec, SessionsWorkload) and spec.wait_after_ready.value == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD + "colour: blue\n", "colour: Extra inputs are not permitted (got 'blue')"),
        (
            GOOD.replace("sigma: 0.5", "sigma: -1"),
            "output_tokens.sigma: Input should be greater than 0 (got -1)",
        ),
        (GOOD.replace("num_sessions: 3", "num_sessions: 0"), "num_sessions: Input should be"),
        (GOOD.replace("num_sessions: 3\n", ""), "num_sessions: Field required"),
        (GOOD.replace("kind: sessions", "kind: dag"), "kind: Input tag 'dag' found"),
        (GOOD.replace("kind: sessions\n", ""), "kind: missing 'kind'"),
        (GOOD.replace("{process: burst}", "{process: poisson}"), "arrival.rate: Field required"),
        (
            GOOD.replace("turns: 2", "turns: {dist: uniform, low: 5, high: 2}"),
            "turns: low (5) must be <= high (2)",
        ),
        (GOOD.replace("{process: burst}", "{process: hourly}"), "arrival.process: Input tag"),
        (
            GOOD + "wait_after_ready: -1\n",
            "wait_after_ready: Input should be greater than or equal to 0",
        ),
        ("kind: sessions\n  bad: [indent\n", "malformed YAML (line"),
        ("- 1\n- 2\n", "must be a mapping"),
        ("", "must be a mapping"),
    ],
)
def test_load_errors_name_file_and_field(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(WorkloadError) as info:
        load_workload_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message


def test_load_missing_file(tmp_path):
    with pytest.raises(WorkloadError, match="file not found"):
        load_workload_spec(tmp_path / "nope.yaml")


def test_parse_reports_every_error():
    with pytest.raises(WorkloadError) as info:
        parse_workload_spec(
            {"kind": "requests", "num_requests": -1, "arrival": {"process": "burst"}},
            source="inline",
        )
    lines = str(info.value).splitlines()
    assert "inline: num_requests: Input should be greater than or equal to 1 (got -1)" in lines
    assert "inline: prompt_tokens: Field required" in lines
    assert "inline: output_tokens: Field required" in lines
