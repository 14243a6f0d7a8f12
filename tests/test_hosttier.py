"""Host KV tier and retention policies for tool gaps: reloads, LRU in the tier, session TTL
(protection, expiry, breaking under pressure), offload-and-prefetch, conservation, errors."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.config import ExperimentError, parse_experiment
from simulator.invariants import check_result
from simulator.reference import run_reference
from simulator.reference.builder import WorkloadBuilder
from simulator.simulate import simulate

KV_BYTES_LLAMA8B = 2 * 32 * 8 * 128 * 2  # bytes per token (REFERENCE.md §6)
BLOCK_BYTES = 16 * KV_BYTES_LLAMA8B
H2D = 45.3e9  # default host -> GPU bandwidth, bytes/s (REFERENCE.md §8)
WAIT = 5.0  # the session's tool call between its two turns (s)


def _exp(blocks=250, host_blocks=None, policy="lru", **retention):
    engine = {"num_gpu_blocks_override": blocks, "retention": {"policy": policy, **retention}}
    if host_blocks is not None:
        engine["kv_host_tier"] = {"capacity_gb": host_blocks * BLOCK_BYTES / 1e9}
    return parse_experiment(
        {
            "model": "llama-3.1-8b", "hardware": "h100-sxm", "seed": 0, "engine": engine,
            "workload": {"kind": "requests", "num_requests": 1,
                                       "arrival": {"process": "burst"},
                         "prompt_tokens": 10, "output_tokens": 2},
        },
        "test.yaml",
    )


def _tool_gap_workload(num_flood=3):
    """Session turn A (1600-token prompt = 100 blocks), a tool call of WAIT s, then its second
    turn A2 on the same content; meanwhile ``num_flood`` unrelated 101-block requests, one per
    second, churn the GPU cache."""
    b = WorkloadBuilder()
    a = b.node(None, 1800)
    first = b.request([a], prompt=1600, output=2, session=0)
    for i in range(num_flood):
        b.request([b.node(None, 1700)], prompt=1600, output=2, arrival=1.0 + i, session=1 + i)
    second = b.request([a], prompt=1700, output=2, parents=[first], wait=WAIT, session=0)
    return b.build(), second


def _run(exp, **kw):
    wl, second = _tool_gap_workload(**kw)
    r = simulate(exp, workload=wl, progress=False, check_every=1)
    assert check_result(r) == []
    return r, r.requests.iloc[second]


def test_without_host_tier_the_flood_evicts_the_session():
    r, row = _run(_exp())
    assert row["cached_tokens"] == 0
    assert r.replicas["host_loads"].iloc[0] == 0


def test_host_tier_serves_the_evicted_prefix_and_the_load_delays_the_request():
    r, row = _run(_exp(host_blocks=1000))
    assert row["cached_tokens"] == 1600
    assert row["host_cached_tokens"] == 1600  # nothing of it left on the GPU
    load = 100 * BLOCK_BYTES / H2D
    assert row["host_load_time"] == pytest.approx(load, rel=1e-12)
    assert row["scheduled_time"] == row["arrival_time"]
    # the first token comes after the copy plus a 100-token prefill step
    assert row["ttft"] > load
    rep = r.replicas.iloc[0]
    assert rep["host_loads"] == 1 and rep["host_load_blocks"] == 100
    assert rep["h2d_busy_seconds"] == pytest.approx(load, rel=1e-12)
    assert rep["host_stored_blocks"] >= 100
    s = r.summary()
    assert s["host_cache_hit_rate"] > 0
    assert s["gpu_cache_hit_rate"] + s["host_cache_hit_rate"] == pytest.approx(
        s["prefix_cache_hit_rate"])


def test_host_tier_is_lru_the_oldest_content_goes_first():
    # room for 120 blocks: A's 100 go in first, then the flood's evictions push them out
    r, row = _run(_exp(host_blocks=120))
    assert row["host_cached_tokens"] < 1600
    rep = r.replicas.iloc[0]
    assert rep["host_peak_blocks"] == 120
    assert rep["host_evicted_blocks"] > 0


def test_other_requests_keep_stepping_during_a_load():
    b = WorkloadBuilder()
    a = b.node(None, 1800)
    first = b.request([a], prompt=1600, output=2, session=0)
    for i in range(3):
        b.request([b.node(None, 1700)], prompt=1600, output=2, arrival=1.0 + i, session=1 + i)
    # a long decode that runs across the second turn's load
    b.request([b.node(None, 3000)], prompt=100, output=2000, arrival=4.9, session=9)
    second = b.request([a], prompt=1700, output=2, parents=[first], wait=WAIT, session=0)
    exp = _exp(host_blocks=1000).model_copy(
        update={"outputs": _exp().outputs.model_copy(update={"step_log": True})})
    r = simulate(exp, workload=b.build(), progress=False)
    row = r.requests.iloc[second]
    start, end = row["scheduled_time"], row["scheduled_time"] + row["host_load_time"]
    steps = r.steps
    during = steps[(steps["start"] < end) & (steps["end"] > start)]
    # the decode steps on through the copy; the loading request is in none of those steps
    assert len(during) > 0
    assert (during["num_seqs"] == 1).all() and (during["prefill_tokens"] == 0).all()


def test_session_ttl_protects_the_session_blocks():
    r, row = _run(_exp(policy="session_ttl", ttl_s=60.0))
    assert row["cached_tokens"] == 1600
    rep = r.replicas.iloc[0]
    assert rep["pins"] >= 1 and rep["pins_broken"] == 0


def test_session_ttl_expires():
    _, row = _run(_exp(policy="session_ttl", ttl_s=0.5))
    assert row["cached_tokens"] == 0


def test_session_ttl_breaks_when_running_work_needs_the_blocks():
    # 180 blocks: with A's 100 protected only 80 are free and the flood needs 101
    r, row = _run(_exp(blocks=180, policy="session_ttl", ttl_s=60.0))
    rep = r.replicas.iloc[0]
    assert rep["pins_broken"] >= 1
    assert r.requests["status"].eq("finished").all()
    assert row["cached_tokens"] < 1600


def test_offload_prefetch_hides_the_load():
    _, lru = _run(_exp(host_blocks=1000))
    r, row = _run(_exp(host_blocks=1000, policy="offload_prefetch"))
    assert row["cached_tokens"] == 1600
    assert row["host_cached_tokens"] == 0  # back on the GPU before the turn arrived
    assert row["ttft"] < lru["ttft"]
    rep = r.replicas.iloc[0]
    assert rep["prefetches"] == 1 and rep["prefetch_blocks"] == 100


def test_prefetch_too_late_when_the_gap_is_shorter_than_the_copy():
    # margin larger than the wait: the prefetch starts at once, still a GPU hit
    r, row = _run(_exp(host_blocks=1000, policy="offload_prefetch", prefetch_margin_s=60.0))
    assert row["cached_tokens"] == 1600


def _sessions_exp(policy, host_gb=None, **retention):
    engine = {"num_gpu_blocks_override": 3000, "retention": {"policy": policy, **retention}}
    if host_gb:
        engine["kv_host_tier"] = {"capacity_gb": host_gb}
    return parse_experiment(
        {
            "model": "llama-3.1-8b", "hardware": "h100-sxm", "seed": 3, "engine": engine,
            "cluster": {"replicas": [{"count": 2}], "router": "session_affinity"},
            "workload": {
                "kind": "sessions", "num_sessions": 30,
                "arrival": {"process": "poisson", "rate": 3.0}, "shared_prefix_tokens": 1000,
                "turns": {"dist": "uniform", "low": 3, "high": 6},
                "first_prompt_tokens": {"dist": "lognormal", "mean": 3000, "sigma": 0.5,
                                        "max": 10000},
                "fresh_input_tokens": {"dist": "lognormal", "mean": 300, "sigma": 0.5,
                                       "max": 3000},
                "output_tokens": {"dist": "lognormal", "mean": 100, "sigma": 0.5, "max": 500},
                "wait_after_ready": {"dist": "exponential", "mean": 8.0},
                "max_context_tokens": 20000,
            },
        },
        "sessions.yaml",
    )


@pytest.mark.parametrize(
    "policy,host_gb,retention",
    [("lru", 20, {}), ("session_ttl", None, {"ttl_s": 10.0}), ("session_ttl", 20, {}),
     ("offload_prefetch", 20, {"prefetch_margin_s": 0.5}), ("offload_prefetch", 1, {})],
)
def test_blocks_are_conserved_and_runs_repeat(policy, host_gb, retention):
    exp = _sessions_exp(policy, host_gb, **retention)
    a = simulate(exp, progress=False, check_every=200)
    assert check_result(a) == []
    b = simulate(exp, progress=False)
    assert a.requests.equals(b.requests)
    assert a.replicas.equals(b.replicas)
    if host_gb:
        rep = a.replicas
        assert (rep["host_peak_blocks"] <= rep["host_capacity_blocks"]).all()


def test_retention_raises_hit_rate_under_long_tool_waits():
    hit = {name: simulate(_sessions_exp(*args), progress=False).summary()["prefix_cache_hit_rate"]
           for name, args in {"lru": ("lru",), "ttl": ("session_ttl", None),
                              "offload": ("offload_prefetch", 20)}.items()}
    assert hit["ttl"] > hit["lru"]
    assert hit["offload"] > hit["lru"]


@pytest.mark.parametrize(
    "engine,needle",
    [
        ({"retention": {"policy": "offload_prefetch"}}, "needs kv_host_tier"),
        ({"enable_prefix_caching": False, "kv_host_tier": {"capacity_gb": 10}},
         "kv_host_tier needs enable_prefix_caching"),
        ({"enable_prefix_caching": False, "retention": {"policy": "session_ttl"}},
         "needs enable_prefix_caching"),
        ({"retention": {"policy": "forever"}}, "forever"),
        ({"retention": {"policy": "session_ttl", "ttl_s": 0}}, "ttl_s"),
        ({"kv_host_tier": {"capacity_gb": -1}}, "capacity_gb"),
        ({"kv_host_tier": {"capacity_gb": 10, "h2d_gb_per_s": 0}}, "h2d_gb_per_s"),
        ({"kv_host_tier": {"capacity_gb": 10, "bandwidth": 3}}, "bandwidth"),
    ],
)
def test_bad_config_is_named(engine, needle):
    with pytest.raises(ExperimentError, match=needle):
        parse_experiment({"model": "llama-3.1-8b", "hardware": "h100-sxm", "engine": engine,
                          "workload": {"kind": "requests", "num_requests": 1,
                                       "arrival": {"process": "burst"},
                                       "prompt_tokens": 10, "output_tokens": 2}}, "bad.yaml")


def test_host_tier_smaller_than_one_block_is_an_error():
    exp = parse_experiment({"model": "llama-3.1-8b", "hardware": "h100-sxm",
                            "engine": {"kv_host_tier": {"capacity_gb": 1e-6}},
                            "workload": {"kind": "requests", "num_requests": 1,
                                       "arrival": {"process": "burst"},
                                         "prompt_tokens": 10, "output_tokens": 2}}, "tiny.yaml")
    with pytest.raises(ExperimentError, match=r"tiny.yaml.*kv_host_tier.capacity_gb = 1e-06.*"
                                              r"one KV block"):
        simulate(exp, progress=False)


@pytest.mark.parametrize(
    "exp",
    [
        _exp(host_blocks=1000),
        _exp(host_blocks=120),
        _exp(policy="session_ttl", ttl_s=60.0),
        _exp(policy="session_ttl", ttl_s=0.5),
        _exp(blocks=180, policy="session_ttl", ttl_s=60.0),
        _exp(host_blocks=1000, policy="offload_prefetch"),
        _exp(host_blocks=50, policy="offload_prefetch", prefetch_margin_s=60.0),
    ],
    ids=["host", "small-host", "ttl", "ttl-expires", "ttl-breaks", "prefetch", "prefetch-small"],
)
def test_reference_model_agrees_on_the_tool_gap(exp):
    """The SimPy reference (simulator/reference/) covers the host tier and retention: the same
    times and counters as the core (the random scenarios: tests/test_reference_diff.py)."""
    from test_reference_diff import compare

    wl, _ = _tool_gap_workload()
    exp = exp.model_copy(update={"outputs": exp.outputs.model_copy(update={"step_log": True})})
    core = simulate(exp, workload=wl, progress=False)
    problems = compare(core, run_reference(exp, workload=wl))
    assert not problems, "\n".join(problems)


def test_tier_blocks_count_from_capacity():
    from simulator.simulate import plan_replicas

    plan = plan_replicas(_exp(host_blocks=1000))[0]
    assert plan.host_blocks == 1000
    assert plan.h2d_bytes_per_s == H2D
    assert np.isclose(plan.ttl_s, 60.0)
