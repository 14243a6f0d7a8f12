"""Roofline step-time model: one engine step (a batch's forward pass) -> seconds.

The model is split in two halves, in the style of the rest of the simulator:

- :func:`build_cost_params` (Python) turns a :class:`~simulator.models.ModelSpec`, a
  :class:`~simulator.hardware.HardwareProfile`, a tensor-parallel degree and dtypes into one flat
  float64 vector. The named ``P_*`` constants below index it. Everything in it is *per GPU*.
- :func:`step_seconds` (``@njit``) reads that vector plus the batch composition and returns the
  step's predicted duration. It allocates nothing and its work is O(num_seqs).

Per operator group the time is the two roofline terms, ``flops / achievable_flops`` and
``bytes / achievable_bandwidth``, combined by a smoothed max ``(c**p + m**p)**(1/p)`` (a GEMM
near the ridge point is slower than either corner; ``p = gemm_smoothness``), plus fixed
per-kernel latencies (``gemm_latency_s`` per GEMM kernel per layer, per-sequence and per-token
terms of the attention kernels) and the elementwise kernels of the group (norms, RoPE, the KV
write, residual adds, SiLU-and-mul) at their own bandwidth. The step time is the sum over groups
plus ``step_overhead_s`` (host side) and ``layer_overhead_s`` per layer (the small kernels'
latencies). Every term is fitted to operator measurements by ``servesim calibrate``
(:mod:`simulator.calibrate`); ``servesim validate-steps`` checks whole steps against it.

Groups
------
``qkv_o``
    attention projections of every layer (q/k/v/o, MLA's low-rank projections, and Gated
    DeltaNet's input/output projections): weights streamed once per step, 2 FLOPs per weight
    per token.
``mlp``
    dense (SwiGLU) MLPs.
``moe``
    routed experts, shared experts and the router. Only the experts the batch touches are
    read: with T tokens and top-k of E experts, the expected number of distinct experts per
    MoE layer is ``E * (1 - (1 - k/E)**T)`` (uniform independent routing; a caller that knows
    the routing can set ``params[P_MOE_TOUCHED]`` instead, as ``validate-steps`` does with the
    count measured in the step). Shared experts are always read. Plus the routing kernels around the expert GEMMs (softmax, top-k, sort by
    expert, gather of the rows, weighting and scatter-add back): ``moe_routing_latency_s`` per
    MoE layer and ``T * (10*E + 10*k*h + 4*h)`` bytes per layer at
    ``moe_routing_bandwidth_efficiency`` (timed as the group's elementwise seconds).
``attention_prefill`` / ``attention_decode``
    the attention core (scores and weighted values) of full-attention layers. A sequence with
    at most ``DECODE_MAX_NEW_TOKENS`` new tokens (a decode, or a speculative verify) is a
    decode; more is a prefill chunk. FLOPs: ``flops_per_pair * (new * context + new*(new+1)/2)``
    per layer (causal), i.e. ~``4*heads*head_dim*new*(context + new/2)`` for standard
    attention. Bytes: the KV cache of the ``context + new`` tokens read once and the new
    tokens' KV written, plus query/output activations. Fixed terms: prefill, per sequence and
    per query token (FlashAttention launches one kernel per prefill here); decode, per layer and
    per sequence. Decode runs at HBM speed while decode sequences x KV heads is below
    ``attention_decode_split_below`` (the kernel splits the KV over the SMs) and at its own
    FLOP rate above it; MLA has no such rule. Unsplit, the kernel runs one block per
    (sequence, KV head) whose tile holds that KV head's query heads, so its time follows the
    KV heads, not the query heads: the rate of useful FLOPs is ``bf16 peak x
    attention_decode_efficiency x query heads per KV head``.
``linear_attention``
    the recurrent core of Gated DeltaNet layers, as flash-linear-attention's kernels run it
    (``fused_recurrent_gated_delta_rule`` for decodes, ``chunk_gated_delta_rule`` for prefill
    chunks): per sequence the fp32 delta-rule state (and the bf16 conv state) is read, unless a
    prefill starts from nothing, and written once; per token about ``6 * value_heads * key_dim
    * value_dim`` FLOPs (decay, retrieval, rank-1 update, readout) plus the short convolution,
    and the q, k, v, output, gate and beta activations. Time: the plain max of FLOPs at
    ``linear_attention_efficiency`` of the bf16 peak and bytes at
    ``linear_attention_bandwidth_efficiency`` of HBM, plus ``linear_attention_decode_latency_s``
    per layer with decodes and ``linear_attention_prefill_latency_s`` per prefill sequence per
    layer.
``lm_head``
    logits for one row per sequence (``num_seqs`` rows): the bf16 head is read, fp32 logits
    written.
``allreduce``
    two all-reduces per layer under TP (after attention and after the MLP), ring algorithm:
    ``2*(tp-1)/tp * bytes / (per-direction NVLink bandwidth * efficiency) + latency`` each.
    Zero when ``tp == 1``.

GEMM activation traffic (reading a matmul's input, writing its output) is added to the bytes of
``qkv_o``, ``mlp`` and ``moe``; the elementwise traffic (one read of each input and one write
of each output of RMSNorm, RoPE, the KV write, residual adds and SiLU-and-mul) is timed apart at
the elementwise bandwidth and reported as the group's ``elementwise_seconds``. ``moe`` runs at
``grouped_gemm_efficiency`` of the dense GEMM rate and bandwidth, and its two grouped kernels
per layer cost ``grouped_gemm_latency_s`` each (router and shared experts: ``gemm_latency_s``).
``linear_attention`` (calibrated rates) and ``allreduce`` (not calibrated) take the plain max of
their two terms. Left out: embedding lookup, sampling,
MLA's up-projection of cached latents during prefill.

Each group's roofline and fixed seconds are multiplied by its entry of ``P_GROUP_SCALE`` (all
1.0 from :func:`build_cost_params`, which leaves the sums bit-for-bit unchanged);
:mod:`simulator.bands` sets them to draw perturbed cost models for prediction bands.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from simulator.hardware import HardwareProfile
from simulator.models import ModelSpec, dtype_bytes

__all__ = [
    "DECODE_MAX_NEW_TOKENS",
    "GROUP_NAMES",
    "P_GROUP_SCALE",
    "build_cost_params",
    "check_tp",
    "moe_routing_bytes_per_token",
    "smooth_max",
    "step_breakdown",
    "step_seconds",
]

#: A sequence computing at most this many tokens in a step is a decode (1, or 1+k drafts).
DECODE_MAX_NEW_TOKENS = 8

# ---- params vector layout (all figures per GPU) ----
P_NUM_LAYERS = 0  # decoder layers (count)
P_HIDDEN = 1  # hidden size (elements)
P_TP = 2  # tensor-parallel degree
P_MATMUL_RATE = 3  # achievable GEMM throughput (FLOP/s)
P_ATTN_RATE = 4  # achievable attention-kernel throughput (FLOP/s)
P_MEM_RATE = 5  # achievable HBM bandwidth (bytes/s)
P_WEIGHT_BYTES = 6  # bytes per matmul weight element (2 bf16, 1 fp8)
P_ACT_BYTES = 7  # bytes per activation element (2, bf16)
P_PROJ_PARAMS = 8  # attention-projection matmul weights, all layers (elements)
P_PROJ_ACT_BYTES = 9  # activation bytes per token for the qkv_o group, all layers
P_DENSE_PARAMS = 10  # dense-MLP weights, all dense layers (elements)
P_DENSE_ACT_BYTES = 11  # activation bytes per token for the mlp group, all layers
P_NUM_MOE_LAYERS = 12  # MoE layers (count)
P_NUM_EXPERTS = 13  # routed experts per MoE layer
P_TOP_K = 14  # experts per token
P_EXPERT_PARAMS = 15  # weights of one routed expert on this GPU (elements)
P_SHARED_PARAMS = 16  # shared-expert weights per MoE layer on this GPU (elements)
P_ROUTER_PARAMS = 17  # router weights per MoE layer (replicated, bf16) (elements)
P_MOE_ACT_BYTES = 18  # activation bytes per token for the moe group, all MoE layers
P_NUM_KV_LAYERS = 19  # full-attention layers (count)
P_ATTN_FLOPS_PREFILL = 20  # attention FLOPs per (query, key) pair per layer, prefill form
P_ATTN_FLOPS_DECODE = 21  # attention FLOPs per (query, key) pair per layer, decode form
P_KV_BYTES_PER_TOKEN_LAYER = 22  # KV-cache bytes per token per layer on this GPU
P_ATTN_ACT_BYTES = 23  # query + output activation bytes per new token per layer
P_NUM_LINEAR_LAYERS = 24  # linear-attention layers (count)
P_LINEAR_STATE_BYTES = 25  # recurrent state per sequence per layer on this GPU (bytes, fp32)
P_LINEAR_FLOPS_PER_TOKEN = 26  # recurrent-core FLOPs per token per layer on this GPU
P_LM_HEAD_PARAMS = 27  # LM-head weights on this GPU (elements, bf16)
P_VOCAB_PER_GPU = 28  # vocabulary shard (logit columns on this GPU)
P_AR_BANDWIDTH = 29  # all-reduce bandwidth: per-direction link bw x efficiency (bytes/s)
P_AR_LATENCY = 30  # seconds per all-reduce
P_STEP_OVERHEAD = 31  # seconds per step
P_LAYER_OVERHEAD = 32  # seconds per layer per step
P_DECODE_MAX_NEW = 33  # DECODE_MAX_NEW_TOKENS
P_HEAD_RATE = 34  # achievable GEMM throughput for the bf16 LM head (FLOP/s)
P_GEMM_P = 35  # smoothness exponent of the GEMM compute/memory combination (>= 1)
P_GEMM_LATENCY = 36  # fixed seconds per GEMM kernel
P_PROJ_GEMMS = 37  # GEMM kernels of the qkv_o group per step (all layers)
P_DENSE_GEMMS = 38  # GEMM kernels of the mlp group per step
P_MOE_GEMMS = 39  # dense GEMM kernels of the moe group per step (router, shared experts)
P_ATTN_PRE_LATENCY = 40  # seconds per prefill sequence per full-attention layer
P_ATTN_PRE_TOKEN = 41  # seconds per prefill query token per full-attention layer
P_ATTN_DEC_LATENCY = 42  # seconds per full-attention layer when the batch has decodes
P_ATTN_DEC_SEQ = 43  # seconds per decode sequence per full-attention layer
P_ATTN_DEC_RATE = 44  # achievable KV-read bandwidth of decode attention (bytes/s)
P_ELEM_RATE = 45  # achievable bandwidth of elementwise kernels (bytes/s)
P_PROJ_ELEM_BYTES = 46  # elementwise bytes per token, attention side, all layers
P_DENSE_ELEM_BYTES = 47  # elementwise bytes per token, dense-MLP side, all dense layers
P_MOE_ELEM_BYTES = 48  # elementwise bytes per token, MoE side, all MoE layers
P_GROUPED_EFF = 49  # grouped expert GEMMs: fraction of dense GEMM rate and bandwidth
P_ATTN_DEC_FLOP_RATE = 50  # decode attention FLOP/s when the KV is not split (large batches)
P_ATTN_DEC_SPLIT_BELOW = 51  # decode seqs x KV heads below which the kernel splits the KV
P_KV_HEADS_GPU = 52  # KV heads per GPU of GQA attention (0 for MLA: no split rule)
P_MOE_ROUTING_LATENCY = 53  # seconds of routing kernels per MoE layer per step
P_MOE_ROUTING_BYTES = 54  # routing traffic per token, all MoE layers (bytes)
P_MOE_ROUTING_RATE = 55  # achievable bandwidth of the routing kernels (bytes/s)
P_MOE_GROUPED_GEMMS = 56  # grouped expert GEMM kernels per step (gate_up and down per layer)
P_GROUPED_LATENCY = 57  # fixed seconds per grouped GEMM kernel
P_MOE_TOUCHED = 58  # experts touched per MoE layer when known (> 0); 0: the uniform formula
P_LINEAR_IO_BYTES = 59  # linear-attention activation bytes per token per layer on this GPU
P_LINEAR_RATE = 60  # achievable FLOP/s of the linear-attention core
P_LINEAR_BW = 61  # achievable bandwidth of the linear-attention core (bytes/s)
P_LINEAR_DEC_LATENCY = 62  # seconds per linear-attention layer when the batch has decodes
P_LINEAR_PRE_LATENCY = 63  # seconds per prefill sequence per linear-attention layer
P_GROUP_SCALE = 64  # first of 8 multipliers (one per group, GROUP_NAMES order; 1.0 = as fitted)
NUM_PARAMS = P_GROUP_SCALE + 8

#: GEMM kernels per layer: fused qkv + o; fused gate_up + down; router (+2 for shared
#: experts) and 2 grouped expert GEMMs (their own latency); Gated DeltaNet in_proj_qkvz + in_proj_ba + out_proj;
#: MLA q (or q_a + q_b), kv_a, kv_b, o.
GEMMS_FULL_ATTENTION = 2
GEMMS_MLA = 5
GEMMS_LINEAR_ATTENTION = 3
GEMMS_DENSE_MLP = 2
GEMMS_MOE = 1
GEMMS_GROUPED = 2
GEMMS_SHARED_EXPERTS = 2

#: Operator groups, in the order :func:`step_breakdown` reports them.
GROUP_NAMES = (
    "qkv_o",
    "mlp",
    "moe",
    "attention_prefill",
    "attention_decode",
    "linear_attention",
    "lm_head",
    "allreduce",
)
G_QKV_O, G_MLP, G_MOE, G_ATTN_PREFILL, G_ATTN_DECODE, G_LINEAR, G_LM_HEAD, G_ALLREDUCE = range(8)


def check_tp(model: ModelSpec, tp: int) -> None:
    """ValueError unless tensor parallelism of degree ``tp`` can split ``model``'s heads."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tp must be a positive integer (got {tp!r})")
    if model.num_attention_heads % tp:
        raise ValueError(
            f"tp={tp} does not divide {model.name}'s {model.num_attention_heads} attention heads"
        )
    kv = model.num_kv_heads
    if not model.is_mla and (kv % tp if kv >= tp else tp % kv):
        raise ValueError(
            f"tp={tp} and {model.name}'s {kv} KV heads: one must divide the other "
            "(KV heads are split, or replicated when fewer than tp)"
        )
    if model.num_linear_attention_layers:
        for field in ("linear_num_key_heads", "linear_num_value_heads"):
            if getattr(model, field) % tp:
                raise ValueError(
                    f"tp={tp} does not divide {model.name}'s {field}={getattr(model, field)}"
                )
    if model.num_dense_layers and model.intermediate_size % tp:
        raise ValueError(
            f"tp={tp} does not divide {model.name}'s intermediate_size={model.intermediate_size}"
        )


def build_cost_params(
    model: ModelSpec,
    hw: HardwareProfile,
    tp: int = 1,
    weight_dtype: str = "bf16",
    kv_dtype: str = "bf16",
) -> np.ndarray:
    """The per-GPU parameter vector :func:`step_seconds` reads (float64[NUM_PARAMS]).

    ``weight_dtype`` is ``"bf16"`` or ``"fp8"`` (fp8: FP8 GEMMs at the FP8 peak and 1 byte per
    matmul weight; embeddings and LM head stay bf16). ``kv_dtype`` is ``"bf16"`` or ``"fp8"``.
    Raises ValueError when ``tp`` cannot split the model's heads.
    """
    check_tp(model, tp)
    if weight_dtype not in ("bf16", "fp8"):
        raise ValueError(f"weight_dtype must be 'bf16' or 'fp8' (got {weight_dtype!r})")
    if kv_dtype not in ("bf16", "fp8"):
        raise ValueError(f"kv_dtype must be 'bf16' or 'fp8' (got {kv_dtype!r})")
    act = 2.0
    h = float(model.hidden_size)
    n_full = model.num_full_attention_layers
    n_lin = model.num_linear_attention_layers
    n_moe = model.num_moe_layers
    n_dense = model.num_dense_layers
    kvb = dtype_bytes(kv_dtype)

    p = np.zeros(NUM_PARAMS, dtype=np.float64)
    p[P_NUM_LAYERS] = model.num_layers
    p[P_HIDDEN] = h
    p[P_TP] = tp
    p[P_MATMUL_RATE] = hw.matmul_rate(weight_dtype)
    p[P_ATTN_RATE] = hw.peak_flops.bf16 * hw.attention_efficiency
    p[P_MEM_RATE] = hw.hbm_bandwidth * hw.memory_efficiency
    p[P_WEIGHT_BYTES] = dtype_bytes(weight_dtype)
    p[P_ACT_BYTES] = act

    proj = (
        n_full * model.full_attention_matmul_params()
        + n_lin * model.linear_attention_matmul_params()
    ) / tp
    p[P_PROJ_PARAMS] = proj
    # GEMM inputs and outputs per token (sum of K + N over a layer's projections)
    p[P_PROJ_ACT_BYTES] = act * (model.num_layers * 2.0 * h + proj / h)
    p[P_PROJ_GEMMS] = n_full * (GEMMS_MLA if model.is_mla else GEMMS_FULL_ATTENTION)
    p[P_PROJ_GEMMS] += n_lin * GEMMS_LINEAR_ATTENTION

    dense = n_dense * model.dense_mlp_params() / tp
    p[P_DENSE_PARAMS] = dense
    p[P_DENSE_ACT_BYTES] = act * (n_dense * 2.0 * h + dense / h)
    p[P_DENSE_GEMMS] = n_dense * GEMMS_DENSE_MLP
    # RMSNorm (read + write h), residual add (2 reads + 1 write of h), SiLU-and-mul (3 f)
    p[P_DENSE_ELEM_BYTES] = act * n_dense * (5.0 * h + 3.0 * model.intermediate_size / tp)

    p[P_NUM_MOE_LAYERS] = n_moe
    if n_moe:
        expert = model.expert_params() / tp
        shared = model.shared_expert_params() / tp
        p[P_NUM_EXPERTS] = model.num_experts
        p[P_TOP_K] = model.num_experts_per_tok
        p[P_EXPERT_PARAMS] = expert
        p[P_SHARED_PARAMS] = shared
        p[P_ROUTER_PARAMS] = model.router_params()
        copies = model.num_experts_per_tok + model.num_shared_experts
        p[P_MOE_ACT_BYTES] = (
            act
            * n_moe
            * (copies * 2.0 * h + 2.0 * (model.num_experts_per_tok * expert + shared) / h)
        )
        p[P_MOE_GEMMS] = n_moe * (
            GEMMS_MOE + (GEMMS_SHARED_EXPERTS if model.num_shared_experts else 0)
        )
        widths = (
            model.num_experts_per_tok * model.moe_intermediate_size
            + model.num_shared_experts * model.shared_expert_intermediate_size
        )
        p[P_MOE_ELEM_BYTES] = act * n_moe * (5.0 * h + 3.0 * widths / tp)

    heads = model.num_attention_heads / tp
    p[P_NUM_KV_LAYERS] = n_full
    if model.is_mla:
        latent = model.kv_lora_rank + model.qk_rope_head_dim
        p[P_ATTN_FLOPS_PREFILL] = 2.0 * heads * (model.qk_head_dim + model.v_head_dim)
        # decode runs the absorbed form: scores over the latent+rope, values over the latent
        p[P_ATTN_FLOPS_DECODE] = 2.0 * heads * (latent + model.kv_lora_rank)
        p[P_KV_BYTES_PER_TOKEN_LAYER] = latent * kvb  # one latent, not split by TP
    else:
        p[P_ATTN_FLOPS_PREFILL] = 4.0 * heads * model.head_dim
        p[P_ATTN_FLOPS_DECODE] = 4.0 * heads * model.head_dim
        kv_heads_gpu = max(1, model.num_kv_heads // tp)
        p[P_KV_BYTES_PER_TOKEN_LAYER] = 2.0 * kv_heads_gpu * model.head_dim * kvb
    p[P_ATTN_ACT_BYTES] = act * heads * (model.qk_head_dim + model.attn_v_head_dim)
    # attention side, every layer: RMSNorm (2h) and residual add (3h); full-attention layers
    # also RoPE on q and k (read + write) and the KV-cache write (read + write)
    kv_heads_rope = 0.0 if model.is_mla else max(1, model.num_kv_heads // tp)
    rope = 0.0 if model.is_mla else act * 2.0 * (heads + kv_heads_rope) * model.head_dim
    p[P_PROJ_ELEM_BYTES] = act * model.num_layers * 5.0 * h + n_full * (
        rope + 2.0 * p[P_KV_BYTES_PER_TOKEN_LAYER]
    )

    p[P_NUM_LINEAR_LAYERS] = n_lin
    if n_lin:
        # the kernels keep the delta-rule state in fp32; the conv state stays bf16
        conv_state = model.linear_conv_dim * (model.linear_conv_kernel_dim - 1) * 2.0
        matrix_state = (
            4.0
            * model.linear_num_value_heads
            * model.linear_key_head_dim
            * model.linear_value_head_dim
        )
        p[P_LINEAR_STATE_BYTES] = (matrix_state + conv_state) / tp
        # q, k (key heads), v and the output (value heads) in bf16, the gate (fp32), beta (bf16)
        p[P_LINEAR_IO_BYTES] = (
            act
            * (
                2.0 * model.linear_num_key_heads * model.linear_key_head_dim
                + 2.0 * model.linear_num_value_heads * model.linear_value_head_dim
            )
            + 6.0 * model.linear_num_value_heads
        ) / tp
        core = (
            6.0
            * model.linear_num_value_heads
            * model.linear_key_head_dim
            * model.linear_value_head_dim
        )
        conv = 2.0 * model.linear_conv_dim * model.linear_conv_kernel_dim
        p[P_LINEAR_FLOPS_PER_TOKEN] = (core + conv) / tp

    p[P_LINEAR_RATE] = hw.peak_flops.bf16 * hw.linear_attention_efficiency
    p[P_LINEAR_BW] = hw.hbm_bandwidth * hw.linear_attention_bandwidth_efficiency
    p[P_LINEAR_DEC_LATENCY] = hw.linear_attention_decode_latency_s
    p[P_LINEAR_PRE_LATENCY] = hw.linear_attention_prefill_latency_s

    p[P_LM_HEAD_PARAMS] = model.vocab_size * h / tp
    p[P_VOCAB_PER_GPU] = model.vocab_size / tp
    p[P_AR_BANDWIDTH] = hw.nvlink_bandwidth_per_direction * hw.allreduce_efficiency
    p[P_AR_LATENCY] = hw.allreduce_latency_s
    p[P_STEP_OVERHEAD] = hw.step_overhead_s
    p[P_LAYER_OVERHEAD] = hw.layer_overhead_s
    p[P_DECODE_MAX_NEW] = DECODE_MAX_NEW_TOKENS
    p[P_HEAD_RATE] = hw.matmul_rate("bf16")
    p[P_GEMM_P] = hw.gemm_smoothness
    p[P_GEMM_LATENCY] = hw.gemm_latency_s
    p[P_ATTN_PRE_LATENCY] = hw.attention_prefill_latency_s
    p[P_ATTN_PRE_TOKEN] = hw.attention_prefill_token_s
    p[P_ATTN_DEC_LATENCY] = hw.attention_decode_latency_s
    p[P_ATTN_DEC_SEQ] = hw.attention_decode_seq_s
    p[P_ATTN_DEC_RATE] = hw.hbm_bandwidth * hw.attention_decode_bandwidth_efficiency
    p[P_ELEM_RATE] = hw.hbm_bandwidth * hw.elementwise_bandwidth_efficiency
    p[P_GROUPED_EFF] = hw.grouped_gemm_efficiency
    kv_heads_gpu = 0.0 if model.is_mla else max(1, model.num_kv_heads // tp)
    group = heads / kv_heads_gpu if kv_heads_gpu else 1.0
    p[P_ATTN_DEC_FLOP_RATE] = hw.peak_flops.bf16 * hw.attention_decode_efficiency * group
    p[P_ATTN_DEC_SPLIT_BELOW] = hw.attention_decode_split_below
    p[P_KV_HEADS_GPU] = kv_heads_gpu
    if n_moe:
        p[P_MOE_ROUTING_LATENCY] = hw.moe_routing_latency_s
        p[P_MOE_ROUTING_BYTES] = n_moe * moe_routing_bytes_per_token(
            model.num_experts, model.num_experts_per_tok, model.hidden_size
        )
    p[P_MOE_ROUTING_RATE] = hw.hbm_bandwidth * hw.moe_routing_bandwidth_efficiency
    p[P_MOE_GROUPED_GEMMS] = n_moe * GEMMS_GROUPED
    p[P_GROUPED_LATENCY] = hw.grouped_gemm_latency_s
    p[P_GROUP_SCALE : P_GROUP_SCALE + len(GROUP_NAMES)] = 1.0
    return p


def moe_routing_bytes_per_token(experts: int, top_k: int, hidden: int) -> float:
    """Bytes the routing kernels of one MoE layer move per token (as ``measure.py`` counts its
    ``moe_routing`` rows): router logits read (bf16) and fp32 probabilities written and read
    (``10*E``), the token's rows gathered into expert order (read + write, ``4*k*h``), the
    expert outputs read, scaled and scatter-added back (``6*k*h``), the output zeroed and
    written (``4*h``)."""
    return 10.0 * experts + 10.0 * top_k * hidden + 4.0 * hidden


@numba.njit(cache=True)
def smooth_max(a, b, p):
    """``(a**p + b**p) ** (1/p)`` for a, b >= 0: the larger of the two, rounded up where they
    are close (p = 1: their sum; p -> infinity: the plain roofline max)."""
    hi = max(a, b)
    if hi <= 0.0:
        return 0.0
    lo = min(a, b)
    if p >= 64.0:
        return hi
    return hi * (1.0 + (lo / hi) ** p) ** (1.0 / p)


@numba.njit(cache=True)
def _step_terms(params, new_tokens, context_tokens, num_seqs):
    """FLOPs and bytes of every group, in GROUP_NAMES order, the overhead (seconds) and the
    batch counts the fixed costs need.

    Returns a flat tuple: (f0, b0, f1, b1, ..., f7, b7, overhead, total_tokens,
    prefill_seqs, prefill_tokens, decode_seqs). No allocation.
    """
    h = params[P_HIDDEN]
    tp = params[P_TP]
    wb = params[P_WEIGHT_BYTES]
    act = params[P_ACT_BYTES]
    decode_max = params[P_DECODE_MAX_NEW]
    n_kv = params[P_NUM_KV_LAYERS]
    kv_tok = params[P_KV_BYTES_PER_TOKEN_LAYER]
    attn_act = params[P_ATTN_ACT_BYTES]
    f_pre = params[P_ATTN_FLOPS_PREFILL]
    f_dec = params[P_ATTN_FLOPS_DECODE]
    n_lin = params[P_NUM_LINEAR_LAYERS]
    lin_state = params[P_LINEAR_STATE_BYTES]
    lin_flops = params[P_LINEAR_FLOPS_PER_TOKEN]
    lin_io = params[P_LINEAR_IO_BYTES]

    total = 0.0
    rows = 0.0
    n_pre = 0.0
    pre_tok = 0.0
    n_dec = 0.0
    ap_f = 0.0
    ap_b = 0.0
    ad_f = 0.0
    ad_b = 0.0
    la_f = 0.0
    la_b = 0.0
    for i in range(num_seqs):
        q = float(new_tokens[i])
        if q <= 0.0:
            continue
        c = float(context_tokens[i])
        total += q
        rows += 1.0
        pairs = q * c + q * (q + 1.0) * 0.5
        kv_bytes = n_kv * (kv_tok * (c + q) + kv_tok * q + attn_act * q)
        if q <= decode_max:
            ad_f += n_kv * f_dec * pairs
            ad_b += kv_bytes
            n_dec += 1.0
        else:
            ap_f += n_kv * f_pre * pairs
            ap_b += kv_bytes
            n_pre += 1.0
            pre_tok += q
        if n_lin > 0.0:
            reads = 1.0 if (c > 0.0 or q <= decode_max) else 0.0  # a fresh prefill reads none
            la_f += n_lin * lin_flops * q
            la_b += n_lin * ((1.0 + reads) * lin_state + lin_io * q)

    if total <= 0.0:  # nothing to compute: no step, no cost
        return (0.0,) * 16 + (0.0, 0.0, 0.0, 0.0, 0.0)

    proj = params[P_PROJ_PARAMS]
    qkv_f = 2.0 * total * proj
    qkv_b = proj * wb + total * params[P_PROJ_ACT_BYTES]

    dense = params[P_DENSE_PARAMS]
    mlp_f = 2.0 * total * dense
    mlp_b = dense * wb + total * params[P_DENSE_ACT_BYTES]

    moe_f = 0.0
    moe_b = 0.0
    n_moe = params[P_NUM_MOE_LAYERS]
    if n_moe > 0.0:
        e = params[P_NUM_EXPERTS]
        k = params[P_TOP_K]
        expert = params[P_EXPERT_PARAMS]
        shared = params[P_SHARED_PARAMS]
        router = params[P_ROUTER_PARAMS]
        touched = params[P_MOE_TOUCHED]
        if touched <= 0.0:
            touched = e * (1.0 - (1.0 - k / e) ** total)
        moe_f = n_moe * 2.0 * total * (k * expert + shared + router)
        moe_b = n_moe * ((touched * expert + shared) * wb + router * 2.0)
        moe_b += total * params[P_MOE_ACT_BYTES]

    head = params[P_LM_HEAD_PARAMS]
    lm_f = 2.0 * rows * head
    lm_b = head * 2.0 + rows * params[P_VOCAB_PER_GPU] * 4.0 + rows * h * act

    ar_f = 0.0
    ar_b = 0.0
    if tp > 1.0:
        ar_b = 2.0 * params[P_NUM_LAYERS] * 2.0 * (tp - 1.0) / tp * total * h * act

    overhead = params[P_STEP_OVERHEAD] + params[P_LAYER_OVERHEAD] * params[P_NUM_LAYERS]
    return (
        qkv_f,
        qkv_b,
        mlp_f,
        mlp_b,
        moe_f,
        moe_b,
        ap_f,
        ap_b,
        ad_f,
        ad_b,
        la_f,
        la_b,
        lm_f,
        lm_b,
        ar_f,
        ar_b,
        overhead,
        total,
        n_pre,
        pre_tok,
        n_dec,
    )


@numba.njit(cache=True)
def _group_times(params, terms):
    """Per group, as four 8-tuples: compute seconds, memory seconds (the two roofline terms),
    fixed seconds (per-kernel latencies, all-reduce latency) and elementwise seconds."""
    mm = params[P_MATMUL_RATE]
    at = params[P_ATTN_RATE]
    mem = params[P_MEM_RATE]
    head_rate = params[P_HEAD_RATE]
    g_eff = params[P_GROUPED_EFF]
    dec_bw = params[P_ATTN_DEC_RATE]
    elem = params[P_ELEM_RATE]
    lat = params[P_GEMM_LATENCY]
    n_kv = params[P_NUM_KV_LAYERS]
    total = terms[17]
    n_pre = terms[18]
    pre_tok = terms[19]
    n_dec = terms[20]

    ar_time = 0.0
    ar_fixed = 0.0
    if terms[15] > 0.0:
        ar_time = terms[15] / params[P_AR_BANDWIDTH]
        ar_fixed = 2.0 * params[P_NUM_LAYERS] * params[P_AR_LATENCY]
    has_moe = 1.0 if terms[4] > 0.0 else 0.0
    has_dense = 1.0 if terms[2] > 0.0 else 0.0
    has_head = 1.0 if terms[12] > 0.0 else 0.0
    # decode attention: with few sequences x KV heads the kernel splits the KV over the SMs
    # and streams at HBM speed; with many it runs one block per (sequence, KV head) and is
    # bound by its own throughput (a FLOP rate of its own)
    dec_rate = params[P_ATTN_RATE]
    if n_dec * params[P_KV_HEADS_GPU] >= params[P_ATTN_DEC_SPLIT_BELOW] > 0.0:
        dec_rate = params[P_ATTN_DEC_FLOP_RATE]
    lin_fixed = 0.0
    if terms[10] > 0.0:
        lin_fixed = params[P_NUM_LINEAR_LAYERS] * (
            (params[P_LINEAR_DEC_LATENCY] if n_dec > 0.0 else 0.0)
            + n_pre * params[P_LINEAR_PRE_LATENCY]
        )
    dec_fixed = 0.0
    if n_dec > 0.0:
        dec_fixed = n_kv * (params[P_ATTN_DEC_LATENCY] + n_dec * params[P_ATTN_DEC_SEQ])
    compute = (
        terms[0] / mm,
        terms[2] / mm,
        terms[4] / (mm * g_eff) if has_moe > 0.0 else 0.0,
        terms[6] / at,
        terms[8] / dec_rate,
        terms[10] / params[P_LINEAR_RATE] if terms[10] > 0.0 else 0.0,
        terms[12] / head_rate,
        0.0,
    )
    memory = (
        terms[1] / mem,
        terms[3] / mem,
        terms[5] / (mem * g_eff) if has_moe > 0.0 else 0.0,
        terms[7] / dec_bw,
        terms[9] / dec_bw,
        terms[11] / params[P_LINEAR_BW] if terms[11] > 0.0 else 0.0,
        terms[13] / mem,
        ar_time,
    )
    fixed = (
        params[P_PROJ_GEMMS] * lat if total > 0.0 else 0.0,
        params[P_DENSE_GEMMS] * lat * has_dense,
        (
            params[P_MOE_GEMMS] * lat
            + params[P_MOE_GROUPED_GEMMS] * params[P_GROUPED_LATENCY]
            + params[P_NUM_MOE_LAYERS] * params[P_MOE_ROUTING_LATENCY]
        )
        * has_moe,
        n_kv * (n_pre * params[P_ATTN_PRE_LATENCY] + pre_tok * params[P_ATTN_PRE_TOKEN]),
        dec_fixed,
        lin_fixed,
        lat * has_head,
        ar_fixed,
    )
    elementwise = (
        total * params[P_PROJ_ELEM_BYTES] / elem,
        total * params[P_DENSE_ELEM_BYTES] / elem,
        total * params[P_MOE_ELEM_BYTES] / elem
        + (
            total * params[P_MOE_ROUTING_BYTES] / params[P_MOE_ROUTING_RATE]
            if has_moe > 0.0
            else 0.0
        ),
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
    )
    return compute, memory, fixed, elementwise


@numba.njit(cache=True)
def _group_seconds(params, g, compute, memory, fixed, elementwise):
    """Seconds of group ``g``: the two roofline terms combined, plus fixed, times the group's
    multiplier (``params[P_GROUP_SCALE + g]``, 1.0 unless a prediction band perturbs it), plus
    the elementwise seconds."""
    if g == G_LINEAR or g == G_ALLREDUCE:  # plain roofline max
        core = max(compute[g], memory[g])
    else:
        core = smooth_max(compute[g], memory[g], params[P_GEMM_P])
    return (core + fixed[g]) * params[P_GROUP_SCALE + g] + elementwise[g]


@numba.njit(cache=True)
def step_seconds(params, new_tokens, context_tokens, num_seqs):
    """Predicted duration of one engine step (seconds).

    ``new_tokens[i]``: tokens computed for sequence ``i`` in this step (a prefill chunk, 1 for
    a decode, 1+k for a speculative verify); ``context_tokens[i]``: tokens already in its KV
    cache before the step. Only the first ``num_seqs`` entries are read. ``params`` comes from
    :func:`build_cost_params`. A batch with no new tokens costs 0.
    """
    terms = _step_terms(params, new_tokens, context_tokens, num_seqs)
    if terms[17] <= 0.0:
        return 0.0
    compute, memory, fixed, elementwise = _group_times(params, terms)
    seconds = terms[16]
    for g in range(8):
        seconds += _group_seconds(params, g, compute, memory, fixed, elementwise)
    return seconds


def step_breakdown(params: np.ndarray, new_tokens, context_tokens) -> dict:
    """Per-group breakdown of :func:`step_seconds` (same numbers, same summation order).

    Returns ``{"seconds", "overhead_seconds", "groups": {name: {"seconds",
    "compute_seconds", "memory_seconds", "fixed_seconds", "elementwise_seconds", "bound",
    "flops", "bytes"}}}``; a group's ``seconds`` is its compute and memory terms combined
    (a smoothed max) plus its fixed and elementwise seconds; ``seconds`` equals
    ``step_seconds(params, new_tokens, context_tokens, len(new_tokens))``.
    """
    new = np.ascontiguousarray(new_tokens, dtype=np.int64)
    ctx = np.ascontiguousarray(context_tokens, dtype=np.int64)
    if new.shape != ctx.shape or new.ndim != 1:
        raise ValueError("new_tokens and context_tokens must be 1-D arrays of the same length")
    n = int(new.shape[0])
    terms = _step_terms(params, new, ctx, n)
    compute, memory, fixed, elementwise = _group_times(params, terms)
    empty = terms[17] <= 0.0
    groups = {}
    seconds = 0.0 if empty else terms[16]
    for g, name in enumerate(GROUP_NAMES):
        t = 0.0 if empty else _group_seconds(params, g, compute, memory, fixed, elementwise)
        seconds += t
        groups[name] = {
            "seconds": t,
            "compute_seconds": compute[g],
            "memory_seconds": memory[g],
            "fixed_seconds": fixed[g],
            "elementwise_seconds": elementwise[g],
            "bound": "compute" if compute[g] > memory[g] else "memory",
            "flops": terms[2 * g],
            "bytes": terms[2 * g + 1],
        }
    total = float(step_seconds(params, new, ctx, n))
    if not math.isclose(seconds, total, rel_tol=1e-12, abs_tol=0.0):
        raise AssertionError(f"breakdown {seconds} != step_seconds {total}")  # pragma: no cover
    return {"seconds": total, "overhead_seconds": 0.0 if empty else terms[16], "groups": groups}
