"""Prefill/decode disaggregation: hand-off timing, transfer bytes, conditional prefill, KV
conservation on both sides, configuration errors."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.config import ExperimentError, parse_experiment
from simulator.costmodel import step_seconds
from simulator.invariants import check_result
from simulator.simulate import plan_replicas, simulate

KV_BYTES_LLAMA8B = 2 * 32 * 8 * 128 * 2  # 131072 bytes per token (REFERENCE.md §6)


def _exp(workload, prefill=1, decode=1, router="round_robin", threshold=0, **engine):
    return parse_experiment(
        {
            "model": "llama-3.1-8b",
            "hardware": "h100-sxm",
            "seed": 2,
            "engine": engine,
            "cluster": {
                "replicas": [{"count": prefill, "role": "prefill"},
                             {"count": decode, "role": "decode"}],
                "router": router,
                "disaggregation": {"link": {"bandwidth_gb_per_s": 50.0, "latency_s": 1e-4},
                                   "local_prefill_threshold_tokens": threshold},
            },
            "workload": workload,
        },
        "test.yaml",
    )


def _single(prompt, output):
    return {"kind": "requests", "num_requests": 1, "arrival": {"process": "burst"},
            "prompt_tokens": prompt, "output_tokens": output}


def test_lone_request_timeline_is_prefill_then_transfer_then_decode():
    exp = _exp(_single(2000, 3))
    params = plan_replicas(exp)[0].cost_params
    one = lambda new, ctx: step_seconds(params, np.array([new]), np.array([ctx]), 1)  # noqa: E731
    r = simulate(exp, progress=False)
    row = r.requests.iloc[0]
    prefill = one(2000, 0)
    assert row["first_token_time"] == pytest.approx(prefill, rel=1e-12)
    assert row["prefill_replica"] == 0 and row["decode_replica"] == 1 and row["replica"] == 1
    nbytes = 2000 * KV_BYTES_LLAMA8B
    assert row["kv_transfer_bytes"] == nbytes
    transfer = nbytes / 50e9 + 1e-4
    assert row["kv_transfer_time"] == pytest.approx(transfer, rel=1e-12)
    assert row["kv_wait"] == 0.0
    expected_finish = prefill + transfer + one(1, 2000) + one(1, 2001)
    assert row["finish_time"] == pytest.approx(expected_finish, rel=1e-12)
    assert check_result(r) == []
    assert r.replicas["kv_transfers_in"].tolist() == [0, 1]


def test_decode_side_cache_shrinks_the_transfer():
    # a 3000-token shared prefix: after the first session turn the decode replica holds it
    sessions = {"kind": "sessions", "num_sessions": 6, "arrival": {"process": "fixed",
                "rate": 0.5}, "shared_prefix_tokens": 3000, "turns": 3, "first_prompt_tokens": 200,
                "fresh_input_tokens": 100, "output_tokens": 50,
                "wait_after_ready": {"dist": "fixed", "value": 0.2}}
    r = simulate(_exp(sessions, router="kv_aware"), progress=False)
    df = r.requests
    full = df["prompt_tokens"] * KV_BYTES_LLAMA8B
    assert (df["kv_transfer_bytes"] <= full).all()
    assert (df["kv_transfer_bytes"].iloc[1:] < full.iloc[1:]).all()
    assert check_result(r) == []


def test_conditional_disaggregation_prefills_short_uncached_prompts_locally():
    burst = {"kind": "requests", "num_requests": 40, "arrival": {"process": "poisson",
             "rate": 5.0}, "prompt_tokens": {"dist": "uniform", "low": 100, "high": 4000},
             "output_tokens": 20}
    always = simulate(_exp(burst, threshold=0), progress=False).requests
    some = simulate(_exp(burst, threshold=2000), progress=False).requests
    never = simulate(_exp(burst, threshold=10**9), progress=False).requests
    assert (always["decode_replica"] >= 0).all()
    assert (never["decode_replica"] < 0).all() and (never["kv_transfer_bytes"] == 0).all()
    local = some["decode_replica"] < 0
    assert local.any() and (~local).any()
    assert (some.loc[local, "prompt_tokens"] < 2000).all()
    assert (some.loc[~local, "prompt_tokens"] >= 2000).all()


def test_memory_pressure_on_both_pools_conserves_blocks():
    heavy = {"kind": "requests", "num_requests": 120, "arrival": {"process": "poisson",
             "rate": 40.0}, "prompt_tokens": {"dist": "uniform", "low": 200, "high": 1500},
             "output_tokens": {"dist": "uniform", "low": 20, "high": 400}}
    r = simulate(_exp(heavy, prefill=2, decode=2, num_gpu_blocks_override=600,
                      max_num_seqs=32), progress=False, check_every=7)
    assert check_result(r) == []
    assert (r.requests["status"] == "finished").all()
    assert r.summary()["num_preemptions"] > 0


def test_output_of_one_token_never_leaves_the_prefill_replica():
    r = simulate(_exp(_single(500, 1)), progress=False)
    row = r.requests.iloc[0]
    assert row["replica"] == 0 and row["decode_replica"] == -1 and row["kv_transfer_bytes"] == 0


@pytest.mark.parametrize(
    "replicas,needle",
    [
        ([{"count": 2, "role": "prefill"}], "no decode replicas"),
        ([{"count": 2, "role": "decode"}], "no prefill replicas"),
        ([{"count": 1, "role": "prefill"}, {"count": 1, "role": "decode"}, {"count": 1}],
         "mixing aggregated"),
    ],
)
def test_pool_configuration_errors(replicas, needle):
    with pytest.raises(ExperimentError, match=needle):
        parse_experiment({"model": "llama-3.1-8b", "hardware": "h100", "workload": _single(1, 1),
                          "cluster": {"replicas": replicas}}, "test.yaml")


def test_zero_bandwidth_link_is_rejected():
    with pytest.raises(ExperimentError, match="bandwidth_gb_per_s"):
        parse_experiment({"model": "llama-3.1-8b", "hardware": "h100", "workload": _single(1, 1),
                          "cluster": {"replicas": [{"role": "prefill"}, {"role": "decode"}],
                                      "disaggregation": {"link": {"bandwidth_gb_per_s": 0}}}},
                         "test.yaml")


def _decode_groups(*decode_blocks, max_model_len=None):
    engine = {"num_gpu_blocks_override": 400}
    if max_model_len:
        engine["max_model_len"] = max_model_len
    return [{"count": 1, "role": "prefill", "engine": engine}] + [
        {"count": 1, "role": "decode", "engine": {**engine, "num_gpu_blocks_override": n}}
        for n in decode_blocks
    ]


def _cluster_exp(groups, workload):
    return parse_experiment({"model": "llama-3.1-8b", "hardware": "h100-sxm", "workload": workload,
                             "cluster": {"replicas": groups}}, "pd.yaml")


def test_decode_replica_that_can_never_hold_the_prompt_is_an_error_before_the_run():
    # group 1 holds 200 blocks = 3,200 tokens, group 2 only 40 blocks = 640 tokens
    exp = _cluster_exp(_decode_groups(200, 40), _single(1000, 8))
    with pytest.raises(ExperimentError, match=r"^pd.yaml: cluster.replicas\[2\] \(role decode\): "
                       r"its KV cache \(40 blocks x 16 tokens = 640 tokens\) can never hold the "
                       r"longest transferred prompt \(1,000 tokens, request 0, 63 blocks\)"):
        simulate(exp, progress=False)
    # both decode groups large enough: it runs
    r = simulate(_cluster_exp(_decode_groups(200, 63), _single(1000, 8)), progress=False)
    assert (r.requests["status"] == "finished").all()


def test_prompts_that_are_never_transferred_do_not_count():
    # one output token: the prefill replica answers alone
    r = simulate(_cluster_exp(_decode_groups(4), _single(1000, 1)), progress=False)
    assert (r.requests["status"] == "finished").all()
    # beyond max_model_len: rejected for that reason, not a capacity error
    r = simulate(_cluster_exp(_decode_groups(4, max_model_len=512), _single(1000, 8)),
                 progress=False)
    assert list(r.requests["reject_reason"].str.contains("max_model_len")) == [True]
