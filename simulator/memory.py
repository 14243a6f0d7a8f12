"""KV-cache capacity of one replica: how many blocks fit next to the weights.

``kv_bytes_total = hbm_bytes * gpu_memory_utilization - weights/tp - activation reserve``
(per GPU), and ``num_blocks = kv_bytes_total // bytes_per_block`` with
``bytes_per_block = block_size * kv_bytes_per_token`` (per GPU). This mirrors vLLM's
``determine_available_memory`` and ``get_num_blocks`` (REFERENCE.md section 1). KV heads are split
across TP (replicated when there are fewer KV heads than GPUs); an MLA latent is not split.

Linear-attention layers keep a fixed state per sequence instead of a per-token cache. vLLM
takes that state from the same pool as the blocks, one state slot per running sequence, so the
capacity is reported in blocks and the per-sequence state alongside it
(``state_bytes_per_sequence``, ``state_blocks_per_sequence``) for the engine to charge.

Units: bytes, tokens, blocks; GiB only in :meth:`KVCapacity.describe`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from simulator.costmodel import check_tp
from simulator.hardware import HardwareProfile
from simulator.models import ModelSpec, dtype_bytes

__all__ = [
    "FIXED_RESERVE_BYTES",
    "KVCapacity",
    "ModelDoesNotFitError",
    "estimate_activation_reserve",
    "kv_bytes_per_token_per_gpu",
    "kv_cache_capacity",
]

GIB = float(1 << 30)

#: Memory outside the profiled forward pass: CUDA context, cuBLAS/NCCL workspaces and CUDA
#: graphs. An estimate (vLLM logs typically show 0.5-1.5 GiB of non-torch + graph memory).
FIXED_RESERVE_BYTES = 1 << 30


class ModelDoesNotFitError(ValueError):
    """The weights (and activation reserve) leave no room for a KV cache."""


@dataclass(frozen=True)
class KVCapacity:
    """KV-cache capacity of one replica. Byte figures are per GPU."""

    num_blocks: int
    block_size: int  # tokens per block
    bytes_per_block: int  # per GPU
    kv_bytes_per_token: int  # per GPU
    weight_bytes_per_gpu: int
    activation_reserve_bytes: int  # per GPU
    kv_bytes_total: int  # per GPU, memory given to the cache (before rounding to blocks)
    state_bytes_per_sequence: int  # per GPU, linear-attention state of one sequence
    state_blocks_per_sequence: int  # that state in blocks (0 for models without it)

    @property
    def num_tokens(self) -> int:
        """Tokens the cache holds (num_blocks x block_size)."""
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        """One line for printing."""
        text = (
            f"KV cache: {self.num_blocks:,} blocks x {self.block_size} tokens = "
            f"{self.num_tokens:,} tokens ({self.num_blocks * self.bytes_per_block / GIB:.1f} "
            f"GiB/GPU) after {self.weight_bytes_per_gpu / GIB:.1f} GiB weights + "
            f"{self.activation_reserve_bytes / GIB:.1f} GiB activations"
        )
        if self.state_bytes_per_sequence:
            text += (
                f"; linear-attention state {self.state_bytes_per_sequence / (1 << 20):.1f} "
                f"MiB/sequence ({self.state_blocks_per_sequence} blocks)"
            )
        return text


def kv_bytes_per_token_per_gpu(model: ModelSpec, tp: int, kv_dtype: str = "bf16") -> int:
    """KV-cache bytes per token on one GPU under TP degree ``tp`` (bytes)."""
    b = dtype_bytes(kv_dtype)
    if model.is_mla:
        per_layer = (model.kv_lora_rank + model.qk_rope_head_dim) * b
    else:
        per_layer = 2 * max(1, model.num_kv_heads // tp) * model.head_dim * b
    return model.num_kv_layers * per_layer


def estimate_activation_reserve(
    model: ModelSpec,
    tp: int = 1,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 1024,
) -> int:
    """Estimated peak non-KV memory of a forward pass on one GPU (bytes).

    ``FIXED_RESERVE_BYTES`` plus, per token of the largest step, the widest live activations
    (a few hidden-size buffers, the attention q/k/v outputs and the MLP or MoE intermediate,
    bf16), plus fp32 logits for ``max_num_seqs`` rows (logits and their softmax). Defaults are
    vLLM's API-server limits on >= 70 GiB GPUs (REFERENCE.md section 1).
    """
    act = 2
    h = model.hidden_size
    qkv = (model.num_attention_heads * model.qk_head_dim * 2) // tp
    mlp = 0
    if model.num_dense_layers:
        mlp = 3 * model.intermediate_size // tp
    if model.num_moe_layers:
        moe = (
            3 * model.num_experts_per_tok * model.moe_intermediate_size
            + 3 * model.num_shared_experts * model.shared_expert_intermediate_size
        ) // tp
        mlp = max(mlp, moe)
    per_token = act * (4 * h + qkv + mlp)
    logits = 2 * 4 * max_num_seqs * model.vocab_size // tp
    return FIXED_RESERVE_BYTES + max_num_batched_tokens * per_token + logits


def kv_cache_capacity(
    model: ModelSpec,
    hw: HardwareProfile,
    tp: int = 1,
    weight_dtype: str = "bf16",
    kv_dtype: str = "bf16",
    gpu_memory_utilization: float = 0.9,
    block_size: int = 16,
    activation_reserve_bytes: int | None = None,
    *,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 1024,
) -> KVCapacity:
    """Blocks of ``block_size`` tokens that fit on each GPU of a TP-``tp`` replica.

    ``activation_reserve_bytes`` overrides :func:`estimate_activation_reserve` (which uses
    ``max_num_batched_tokens`` and ``max_num_seqs``). Raises :class:`ModelDoesNotFitError` when
    nothing is left for the cache, ValueError on bad arguments.
    """
    check_tp(model, tp)
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1] (got {gpu_memory_utilization})")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1 (got {block_size})")
    if activation_reserve_bytes is None:
        reserve = estimate_activation_reserve(model, tp, max_num_batched_tokens, max_num_seqs)
    else:
        if activation_reserve_bytes < 0:
            raise ValueError("activation_reserve_bytes must be >= 0")
        reserve = int(activation_reserve_bytes)
    weights = math.ceil(model.weight_bytes(weight_dtype) / tp)
    per_token = kv_bytes_per_token_per_gpu(model, tp, kv_dtype)
    if per_token <= 0:
        raise ValueError(f"{model.name} has no layer with a KV cache")
    per_block = per_token * block_size
    budget = int(hw.hbm_bytes * gpu_memory_utilization)
    available = budget - weights - reserve
    if available < per_block:
        hint = "use a larger tp" + (" or fp8 weights" if weight_dtype == "bf16" else "")
        raise ModelDoesNotFitError(
            f"{model.name} does not fit on {hw.name} with tp={tp} ({weight_dtype} weights): "
            f"weights need {weights / GIB:.1f} GiB per GPU plus {reserve / GIB:.1f} GiB of "
            f"activations, but only {budget / GIB:.1f} GiB is available "
            f"({gpu_memory_utilization:.0%} of {hw.hbm_bytes / GIB:.1f} GiB); {hint}"
        )
    state = model.state_bytes_per_sequence("bf16") // tp
    return KVCapacity(
        num_blocks=available // per_block,
        block_size=block_size,
        bytes_per_block=per_block,
        kv_bytes_per_token=per_token,
        weight_bytes_per_gpu=weights,
        activation_reserve_bytes=reserve,
        kv_bytes_total=available,
        state_bytes_per_sequence=state,
        state_blocks_per_sequence=-(-state // per_block) if state else 0,
    )
