"""KV-cache capacity."""

import pytest

from simulator.hardware import load_hardware
from simulator.memory import (
    ModelDoesNotFitError,
    estimate_activation_reserve,
    kv_bytes_per_token_per_gpu,
    kv_cache_capacity,
)
from simulator.models import load_model

GIB = 1 << 30


def test_llama8b_h100_formula():
    m, hw = load_model("llama-3.1-8b"), load_hardware("h100")
    cap = kv_cache_capacity(m, hw, 1, "bf16", "bf16", 0.9, 16, activation_reserve_bytes=2 * GIB)
    expected = (int(hw.hbm_bytes * 0.9) - m.weight_bytes("bf16") - 2 * GIB) // (16 * 131072)
    assert cap.num_blocks == expected
    assert cap.bytes_per_block == 16 * 131072
    assert cap.num_tokens == cap.num_blocks * 16
    assert 400_000 < cap.num_tokens < 500_000
    text = cap.describe()
    assert text.startswith(f"KV cache: {cap.num_blocks:,} blocks x 16 tokens")
    assert "2.0 GiB activations" in text and "15.0 GiB weights" in text


def test_tp_splits_kv_heads_and_weights():
    m, hw = load_model("llama-3.1-70b"), load_hardware("h100")
    assert kv_bytes_per_token_per_gpu(m, 4) == 327680 // 4
    assert kv_bytes_per_token_per_gpu(m, 16) == 327680 // 8  # 8 KV heads: one per GPU
    cap = kv_cache_capacity(m, hw, tp=4, gpu_memory_utilization=0.9, block_size=16)
    assert cap.weight_bytes_per_gpu == pytest.approx(m.weight_bytes("bf16") / 4, abs=1)
    assert cap.kv_bytes_per_token == 81920


def test_mla_latent_not_split():
    m = load_model("deepseek-v3")
    assert kv_bytes_per_token_per_gpu(m, 8) == m.kv_bytes_per_token()


def test_does_not_fit_message():
    with pytest.raises(ModelDoesNotFitError) as info:
        kv_cache_capacity(load_model("llama-3.1-70b"), load_hardware("h100"), tp=1)
    msg = str(info.value)
    for part in ("llama-3.1-70b", "h100-sxm", "tp=1", "131.4 GiB", "larger tp", "fp8"):
        assert part in msg
    assert issubclass(ModelDoesNotFitError, ValueError)


def test_fp8_and_more_memory_give_more_blocks():
    m = load_model("llama-3.1-8b")
    h100, h200 = load_hardware("h100"), load_hardware("h200")
    base = kv_cache_capacity(m, h100).num_blocks
    assert kv_cache_capacity(m, h100, weight_dtype="fp8").num_blocks > base
    assert kv_cache_capacity(m, h100, kv_dtype="fp8").num_blocks == pytest.approx(2 * base, 1e-2)
    assert kv_cache_capacity(m, h200).num_blocks > 2 * base


def test_hybrid_state_reported():
    cap = kv_cache_capacity(load_model("qwen3.5-35b-a3b"), load_hardware("h200"))
    assert cap.state_bytes_per_sequence > 0
    assert cap.state_blocks_per_sequence * cap.bytes_per_block >= cap.state_bytes_per_sequence
    assert "linear-attention state" in cap.describe()


def test_activation_reserve_scales_with_tokens():
    m = load_model("llama-3.1-8b")
    small = estimate_activation_reserve(m, 1, 2048)
    big = estimate_activation_reserve(m, 1, 16384)
    assert big > small > GIB


def test_bad_arguments():
    m, hw = load_model("llama-3.1-8b"), load_hardware("h100")
    with pytest.raises(ValueError):
        kv_cache_capacity(m, hw, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError):
        kv_cache_capacity(m, hw, block_size=0)
    with pytest.raises(ValueError):
        kv_cache_capacity(m, hw, tp=3)
