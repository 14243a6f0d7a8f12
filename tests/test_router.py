"""Routing policies: distribution, affinity, prefix awareness, staleness, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.config import ExperimentError, parse_experiment
from simulator.invariants import check_result
from simulator.simulate import simulate
from simulator.workload.compiled import CompiledWorkload, children_from_parents


def _exp(router, replicas=4, workload=None, **engine):
    return parse_experiment(
        {
            "model": "llama-3.1-8b",
            "hardware": "h100-sxm",
            "seed": 1,
            "engine": engine,
            "cluster": {"replicas": [{"count": replicas}], "router": router},
            "workload": workload
            or {"kind": "requests", "num_requests": 200, "arrival": {"process": "poisson",
                "rate": 20.0}, "prompt_tokens": 500, "output_tokens": 50},
        },
        "test.yaml",
    )


SESSIONS = {
    "kind": "sessions", "num_sessions": 60, "arrival": {"process": "poisson", "rate": 2.0},
    "shared_prefix_tokens": 1000, "turns": 6, "first_prompt_tokens": 800,
    "fresh_input_tokens": 200, "output_tokens": 100,
    "wait_after_ready": {"dist": "fixed", "value": 0.5},
}


def test_round_robin_spreads_evenly():
    r = simulate(_exp("round_robin"), progress=False)
    routed = r.replicas["routed_requests"].to_numpy()
    assert routed.sum() == 200 and routed.max() - routed.min() <= 1
    assert check_result(r) == []


@pytest.mark.parametrize("policy", ["random", "power_of_two", "least_outstanding",
                                    "least_kv_usage", "kv_aware", "weighted_scorer"])
def test_every_policy_uses_every_replica_and_is_deterministic(policy):
    a = simulate(_exp(policy), progress=False)
    b = simulate(_exp(policy), progress=False)
    assert (a.requests["replica"] == b.requests["replica"]).all()
    assert (a.replicas["routed_requests"] > 0).all()
    assert check_result(a) == []


def test_session_affinity_keeps_sessions_home():
    r = simulate(_exp({"policy": "session_affinity", "affinity_overload_factor": 1e9},
                      workload=SESSIONS), progress=False)
    per_session = r.requests.groupby("session_id")["replica"].nunique()
    assert (per_session == 1).all()
    assert r.requests.groupby("session_id")["replica"].first().nunique() == 4


def test_affinity_and_prefix_aware_routing_beat_round_robin_on_hit_rate():
    rates = {
        policy: simulate(_exp(policy, workload=SESSIONS), progress=False).summary()[
            "prefix_cache_hit_rate"]
        for policy in ("round_robin", "session_affinity", "weighted_scorer", "kv_aware")
    }
    assert rates["session_affinity"] > rates["round_robin"] + 0.1
    assert rates["weighted_scorer"] > rates["round_robin"] + 0.1
    assert rates["kv_aware"] > rates["round_robin"]


def _two_identical_requests(gap: float) -> CompiledWorkload:
    """Request 1 has request 0's content and arrives ``gap`` s later (after it finished)."""
    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    parents_start = i64(0, 0, 0)
    child_start, child_ids = children_from_parents(2, parents_start, i64())
    return CompiledWorkload(
        node_parent=i64(-1), node_start_tokens=i64(0), node_num_tokens=i64(2100),
        req_session=i64(0, 1), req_prompt_tokens=i64(2000, 2000), req_output_tokens=i64(10, 10),
        req_arrival_time=np.array([0.0, gap]), req_wait_after_ready=np.zeros(2),
        req_path_start=i64(0, 1, 2), path_nodes=i64(0, 0), req_parents_start=parents_start,
        parent_ids=i64(), req_children_start=child_start, child_ids=child_ids,
    )


@pytest.mark.parametrize("policy", ["kv_aware", "weighted_scorer"])
def test_prefix_aware_policies_follow_the_cache(policy):
    wl = _two_identical_requests(gap=5.0)
    for seed in range(5):
        r = simulate(_exp(policy, replicas=8), seed=seed, workload=wl, progress=False)
        first, second = r.requests["replica"].tolist()
        assert first == second
        assert r.requests["cached_tokens"].iloc[1] == (1999 // 16) * 16


def test_stale_view_changes_decisions():
    burst = {"kind": "requests", "num_requests": 64, "arrival": {"process": "burst"},
             "prompt_tokens": 300, "output_tokens": 20}
    live = simulate(_exp("least_outstanding", workload=burst), progress=False)
    stale = simulate(_exp({"policy": "least_outstanding", "staleness_s": 1000.0},
                          workload=burst), progress=False)
    assert set(live.replicas["routed_requests"]) == {16}
    # the stale router saw four idle replicas at t = 0 for the whole burst: random ties
    assert set(stale.replicas["routed_requests"]) != {16}
    assert check_result(stale) == []


@pytest.mark.parametrize(
    "router,needle",
    [("cheapest", "round_robin.*cheapest"), ({"policy": "kv_aware", "temperature": -1}, "temperature"),
     ({"policy": "kv_aware", "bogus": 1}, "bogus"),
     ({"policy": "weighted_scorer", "weights": {"prefix": -2}}, "prefix")],
)
def test_bad_router_config(router, needle):
    with pytest.raises(ExperimentError, match=needle):
        _exp(router)
