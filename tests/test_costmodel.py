"""Roofline step-time model: sanity targets, monotonicity, breakdown == step_seconds, TP."""

import numpy as np
import pytest

from simulator.costmodel import (
    GROUP_NAMES,
    build_cost_params,
    step_breakdown,
    step_seconds,
)
from simulator.hardware import load_hardware
from simulator.models import load_model


@pytest.fixture(scope="module")
def h100():
    return load_hardware("h100")


@pytest.fixture(scope="module")
def llama8(h100):
    return build_cost_params(load_model("llama-3.1-8b"), h100)


def run(params, new, ctx):
    new = np.asarray(new, dtype=np.int64)
    ctx = np.asarray(ctx, dtype=np.int64)
    return step_seconds(params, new, ctx, len(new))


def test_llama8b_decode_batch1(llama8):
    # measured GPU time on an H100 7.6-7.7 ms (steps.csv) plus 0.8 ms host-side step overhead
    t = run(llama8, [1], [1024])
    assert 7.5e-3 <= t <= 9.5e-3


def test_llama8b_prefill_8k(llama8):
    # ~1.3e14 FLOPs of GEMMs at 781 TF plus causal attention at 0.5 of peak: ~0.18 s
    t = run(llama8, [8192], [0])
    assert 0.15 <= t <= 0.6
    b = step_breakdown(llama8, [8192], [0])
    assert b["groups"]["mlp"]["bound"] == "compute"
    assert b["groups"]["attention_prefill"]["seconds"] > 0


def test_decode_is_memory_bound(llama8):
    b = step_breakdown(llama8, [1] * 8, [2048] * 8)
    assert b["groups"]["mlp"]["bound"] == "memory"
    assert b["groups"]["attention_decode"]["bound"] == "memory"
    assert b["groups"]["attention_prefill"]["seconds"] == 0.0


def test_only_first_num_seqs_read(llama8):
    new = np.array([1, 1, 5000, 5000], dtype=np.int64)
    ctx = np.array([100, 100, 100000, 100000], dtype=np.int64)
    assert step_seconds(llama8, new, ctx, 2) == run(llama8, [1, 1], [100, 100])


def test_monotonic_in_tokens_and_context(llama8):
    prev = 0.0
    for n in [1, 2, 8, 64, 512, 2048, 8192]:
        t = run(llama8, [n], [0])
        assert t >= prev
        prev = t
    prev = 0.0
    for c in [0, 128, 1024, 8192, 65536, 131072]:
        t = run(llama8, [1] * 16, [c] * 16)
        assert t > prev
        prev = t
    # adding a sequence never makes the step cheaper
    assert run(llama8, [1, 1], [10, 10]) >= run(llama8, [1], [10])
    assert run(llama8, [100, 1], [0, 10]) >= run(llama8, [100], [0])


@pytest.mark.parametrize(
    "name,tp,dtype",
    [
        ("llama-3.1-8b", 1, "bf16"),
        ("llama-3.1-70b", 4, "fp8"),
        ("qwen3-30b-a3b", 2, "bf16"),
        ("qwen3.5-35b-a3b", 1, "bf16"),
        ("deepseek-v3", 8, "fp8"),
    ],
)
def test_breakdown_sums_to_step_seconds(h100, name, tp, dtype):
    p = build_cost_params(load_model(name), h100, tp=tp, weight_dtype=dtype)
    new = [3000, 1, 1, 4, 700]
    ctx = [0, 500, 9000, 2000, 1200]
    b = step_breakdown(p, new, ctx)
    assert b["seconds"] == run(p, new, ctx)
    total = b["overhead_seconds"]
    for g in GROUP_NAMES:
        grp = b["groups"][g]
        core = grp["seconds"] - grp["fixed_seconds"] - grp["elementwise_seconds"]
        # the roofline terms combine into at least their max, at most their sum
        hi = max(grp["compute_seconds"], grp["memory_seconds"])
        assert (
            hi * (1 - 1e-12)
            <= core
            <= (grp["compute_seconds"] + grp["memory_seconds"]) * (1 + 1e-12)
        )
        assert grp["bound"] in ("compute", "memory")
        total += grp["seconds"]
    assert total == pytest.approx(b["seconds"], rel=1e-12)


def test_tp_cuts_weight_time_and_adds_allreduce(h100):
    m = load_model("llama-3.1-70b")
    p1 = build_cost_params(m, h100, tp=1)
    p4 = build_cost_params(m, h100, tp=4)
    b1 = step_breakdown(p1, [1] * 16, [1024] * 16)
    b4 = step_breakdown(p4, [1] * 16, [1024] * 16)
    assert b1["groups"]["allreduce"]["seconds"] == 0.0
    assert b4["groups"]["allreduce"]["seconds"] > 0.0
    # weight streaming splits four ways; per-kernel latencies and the (replicated) norms do not
    assert b4["groups"]["mlp"]["memory_seconds"] == pytest.approx(
        b1["groups"]["mlp"]["memory_seconds"] / 4, rel=0.01
    )
    assert b4["groups"]["mlp"]["seconds"] < 0.3 * b1["groups"]["mlp"]["seconds"]
    assert b4["seconds"] < b1["seconds"]


def test_fp8_faster_decode(h100):
    m = load_model("llama-3.1-8b")
    bf16 = run(build_cost_params(m, h100), [1], [1024])
    fp8 = run(build_cost_params(m, h100, weight_dtype="fp8"), [1], [1024])
    assert fp8 < 0.75 * bf16


def test_moe_reads_only_touched_experts(h100):
    p = build_cost_params(load_model("qwen3-30b-a3b"), h100)
    one = step_breakdown(p, [1], [100])["groups"]["moe"]["bytes"]
    many = step_breakdown(p, [4096], [0])["groups"]["moe"]["bytes"]
    # one token touches 8 of 128 experts per layer; 4096 tokens touch all of them
    expert_bytes = 48 * 3 * 2048 * 768 * 2
    assert one == pytest.approx(8 * expert_bytes, rel=0.02)
    assert many > 15 * one


def test_hybrid_linear_attention_group(h100):
    p = build_cost_params(load_model("qwen3.5-35b-a3b"), h100)
    b = step_breakdown(p, [1] * 4, [1000] * 4)
    assert b["groups"]["linear_attention"]["bytes"] > 0
    # linear layers' cost does not depend on context
    b2 = step_breakdown(p, [1] * 4, [100000] * 4)
    assert b2["groups"]["linear_attention"]["bytes"] == b["groups"]["linear_attention"]["bytes"]
    assert b2["groups"]["attention_decode"]["bytes"] > b["groups"]["attention_decode"]["bytes"]


def test_bad_tp_and_dtype(h100):
    with pytest.raises(ValueError, match="attention heads"):
        build_cost_params(load_model("llama-3.1-8b"), h100, tp=3)
    with pytest.raises(ValueError, match="tp must be"):
        build_cost_params(load_model("llama-3.1-8b"), h100, tp=0)
    with pytest.raises(ValueError, match="weight_dtype"):
        build_cost_params(load_model("llama-3.1-8b"), h100, weight_dtype="int4")
    # 8 KV heads replicated at tp=16 is allowed only when heads split: 32 % 16 == 0
    p = build_cost_params(load_model("llama-3.1-8b"), h100, tp=16)
    assert p.ndim == 1 and p.dtype == np.float64


def test_empty_batch_costs_nothing(llama8):
    assert run(llama8, [], []) == 0.0
    assert run(llama8, [0, 0], [5, 5]) == 0.0
    assert run(llama8, [1], [0]) > 0.0


def test_smooth_max_between_max_and_sum():
    from simulator.costmodel import smooth_max

    assert smooth_max(0.0, 0.0, 4.0) == 0.0
    assert smooth_max(3.0, 0.0, 4.0) == 3.0
    assert smooth_max(1.0, 1.0, 1.0) == pytest.approx(2.0)
    assert smooth_max(1.0, 1.0, 4.0) == pytest.approx(2**0.25)
    assert smooth_max(2.0, 1.0, 64.0) == 2.0


def test_kernel_latency_terms(llama8):
    b = step_breakdown(llama8, [1], [100])
    g = b["groups"]
    # 32 layers x 2 GEMMs per group, one attention kernel per layer
    assert g["qkv_o"]["fixed_seconds"] > 0 and g["mlp"]["fixed_seconds"] > 0
    assert g["attention_decode"]["fixed_seconds"] > 0
    assert g["attention_prefill"]["fixed_seconds"] == 0.0
    assert g["qkv_o"]["elementwise_seconds"] > 0


def test_decode_attention_regimes(h100):
    # few sequences x KV heads: KV split over the SMs, HBM-bound; many: the kernel's own rate
    p = build_cost_params(load_model("llama-3.1-8b"), h100)
    few = step_breakdown(p, [1] * 16, [8192] * 16)["groups"]["attention_decode"]
    many = step_breakdown(p, [1] * 64, [2048] * 64)["groups"]["attention_decode"]
    assert few["memory_seconds"] > few["compute_seconds"]
    assert many["compute_seconds"] > many["memory_seconds"]
    # MLA has no split rule (FlashMLA-style kernels): stays memory/rate bound as before
    pd = build_cost_params(load_model("deepseek-v3"), h100, tp=8)
    mla = step_breakdown(pd, [1] * 64, [2048] * 64)["groups"]["attention_decode"]
    assert mla["compute_seconds"] < 10 * mla["memory_seconds"]


def test_step_seconds_is_fast(llama8):
    import time

    new = np.ones(256, dtype=np.int64)
    ctx = np.full(256, 2048, dtype=np.int64)
    step_seconds(llama8, new, ctx, 256)
    t0 = time.perf_counter()
    for _ in range(2000):
        step_seconds(llama8, new, ctx, 256)
    per_seq = (time.perf_counter() - t0) / 2000 / 256
    assert per_seq < 50e-9  # generous: ~4 ns per sequence on a laptop core
