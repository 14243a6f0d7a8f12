"""Heterogeneous clusters: replica groups with different GPUs, models, TP and engine settings,
aggregated and disaggregated, run end to end; each replica reports its own hardware and KV
capacity; under least-outstanding routing the faster replica does more of the work."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.config import parse_experiment
from simulator.invariants import check_result
from simulator.simulate import plan_replicas, simulate

# a steady stream that keeps every replica busy (requests queue), short enough for CI
BUSY = {"kind": "requests", "num_requests": 600, "arrival": {"process": "poisson", "rate": 60.0},
        "prompt_tokens": {"dist": "uniform", "low": 500, "high": 3000},
        "output_tokens": {"dist": "uniform", "low": 50, "high": 300}}


def _exp(replicas, router="least_outstanding", workload=None, **cluster):
    return parse_experiment(
        {"model": "llama-3.1-8b", "hardware": "h100-sxm", "seed": 5,
         "cluster": {"replicas": replicas, "router": router, **cluster},
         "workload": workload or BUSY},
        "hetero.yaml",
    )


def _blocks(model, hardware, **engine):
    """KV blocks of one replica of ``model`` on ``hardware`` with ``engine``, planned alone."""
    exp = parse_experiment({"model": model, "hardware": hardware, "engine": engine,
                            "workload": BUSY}, "alone.yaml")
    return plan_replicas(exp)[0].num_blocks


MIXED = [
    {"count": 2, "hardware": "h100-sxm", "engine": {"tp": 1}},
    {"count": 1, "hardware": "h200", "engine": {"tp": 2, "max_num_seqs": 128}},
]


@pytest.fixture(scope="module")
def mixed():
    return simulate(_exp(MIXED), progress=False, check_every=500)


def test_mixed_pool_reports_each_replicas_hardware_and_capacity(mixed):
    rep = mixed.replicas
    assert list(rep["hardware"]) == ["h100-sxm", "h100-sxm", "h200"]
    assert list(rep["tp"]) == [1, 1, 2]
    h100 = _blocks("llama-3.1-8b", "h100-sxm", tp=1)
    h200 = _blocks("llama-3.1-8b", "h200", tp=2, max_num_seqs=128)
    assert list(rep["num_blocks"]) == [h100, h100, h200]
    # two GPUs of 141 GB hold far more KV than one of 80 GB
    assert h200 > 2.5 * h100
    assert [p.max_num_seqs for p in mixed.replicas_plan] == [1024, 1024, 128]
    assert mixed.num_gpus == 4 and mixed.summary()["num_gpus"] == 4


def test_mixed_pool_runs_end_to_end(mixed):
    assert check_result(mixed) == []
    assert (mixed.requests["status"] == "finished").all()
    assert set(mixed.requests["replica"]) == {0, 1, 2}
    # every replica's counters add up to the requests it served
    served = mixed.requests.groupby("replica").size()
    assert list(mixed.replicas["routed_requests"]) == list(served.reindex(range(3)))


def test_faster_replica_does_more_work_under_least_outstanding(mixed):
    rep = mixed.replicas
    routed = rep["routed_requests"].to_numpy()
    tokens = (rep["prefill_tokens"] + rep["decode_tokens"]).to_numpy()
    assert routed[2] > 1.3 * routed[:2].max()
    assert tokens[2] > 1.3 * tokens[:2].max()
    # ... while round-robin gives every replica the same share regardless of speed
    rr = simulate(_exp(MIXED, router="round_robin"), progress=False)
    assert np.ptp(rr.replicas["routed_requests"].to_numpy()) <= 1


def test_groups_with_different_models_and_engines():
    groups = [
        {"count": 1, "hardware": "h100-sxm", "engine": {"max_num_batched_tokens": 4096}},
        {"count": 1, "model": "qwen3-30b-a3b", "hardware": "h200",
         "engine": {"weight_dtype": "fp8"}},
    ]
    r = simulate(_exp(groups, router="round_robin"), progress=False, check_every=500)
    assert check_result(r) == []
    assert (r.requests["status"] == "finished").all()
    assert list(r.replicas["model"]) == ["llama-3.1-8b", "qwen3-30b-a3b"]
    assert list(r.replicas["hardware"]) == ["h100-sxm", "h200"]
    assert r.replicas["num_blocks"].iloc[0] == _blocks(
        "llama-3.1-8b", "h100-sxm", max_num_batched_tokens=4096)
    assert r.replicas["num_blocks"].iloc[1] == _blocks(
        "qwen3-30b-a3b", "h200", weight_dtype="fp8")
    assert [p.max_num_batched_tokens for p in r.replicas_plan] == [4096, 8192]
    # the same requests cost different GPU time on the two replicas: both served half
    assert list(r.replicas["routed_requests"]) == [300, 300]
    assert r.replicas["busy_seconds"].iloc[0] != pytest.approx(r.replicas["busy_seconds"].iloc[1],
                                                                rel=0.02)


def test_disaggregated_h200_prefill_pool_and_h100_decode_pool():
    groups = [{"count": 1, "role": "prefill", "hardware": "h200"},
              {"count": 2, "role": "decode", "hardware": "h100-sxm"}]
    r = simulate(_exp(groups), progress=False, check_every=500)
    assert check_result(r) == []
    req, rep = r.requests, r.replicas
    assert (req["status"] == "finished").all()
    assert list(rep["role"]) == ["prefill", "decode", "decode"]
    assert list(rep["hardware"]) == ["h200", "h100-sxm", "h100-sxm"]
    assert list(rep["num_blocks"]) == [_blocks("llama-3.1-8b", "h200")] + 2 * [
        _blocks("llama-3.1-8b", "h100-sxm")]
    # every prompt is computed on the H200 and decoded on an H100, its KV moved over the link
    assert (req["prefill_replica"] == 0).all()
    assert set(req["decode_replica"]) == {1, 2}
    assert (req["kv_transfer_bytes"] > 0).all()
    assert rep["prefill_tokens"].iloc[0] >= req["computed_prompt_tokens"].sum()
    assert rep["decode_tokens"].iloc[0] == 0
    assert (rep["decode_tokens"].iloc[1:] > 0).all()
    assert (rep["kv_transfers_in"].iloc[1:] > 0).all() and rep["kv_transfers_in"].iloc[0] == 0


def test_heterogeneous_prefill_pool_faster_gpu_prefills_more():
    groups = [{"count": 1, "role": "prefill", "hardware": "h200", "engine": {"tp": 2}},
              {"count": 1, "role": "prefill", "hardware": "h100-sxm"},
              {"count": 2, "role": "decode", "hardware": "h100-sxm"}]
    r = simulate(_exp(groups), progress=False, check_every=500)
    assert check_result(r) == []
    assert (r.requests["status"] == "finished").all()
    prefill = r.replicas["prefill_tokens"].to_numpy()
    assert prefill[0] > 1.3 * prefill[1]
    assert set(r.requests["prefill_replica"]) == {0, 1}
