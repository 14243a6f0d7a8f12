"""Speculative decoding: configuration, draft cost, acceptance draws, and the closed form.

What is modelled (REFERENCE.md §5):

* A decoding request proposes ``k`` draft tokens per step; the target verifies them in one
  forward pass in which the request counts as a ``(1 + k)``-token chunk, both against the step's
  token budget (vLLM charges ``1 + k``) and in the cost model. KV blocks are allocated for the
  lookahead positions.
* Per-token acceptance: request ``r`` has an acceptance probability ``alpha_r`` (all equal, or
  drawn from a Beta distribution with the configured mean and concentration ``a + b``); draft
  position ``i`` (0-based) is accepted with probability ``alpha_r * position_decay**i``, and the
  run stops at the first rejection. The step emits ``accepted + 1`` tokens together (the accepted
  drafts and the target's own next token); the rejected positions are rolled back
  (``num_computed_tokens -= rejected``, as vLLM's ``update_from_output`` does). With i.i.d.
  acceptance the expected tokens per step is ``(1 - alpha**(k+1)) / (1 - alpha)``
  (Leviathan et al. 2023, arXiv 2211.17192 §3) — :func:`expected_tokens_per_step`.
* Draws are counter-based (a hash of seed, request, output position and draft position), so the
  result does not depend on event order and a seed fixes it.
* Draft cost, added to the step: ``mtp`` runs the model's MTP module (one decoder layer + LM
  head) once per draft token; ``eagle`` a one-layer head shaped like a target layer per draft
  token; ``draft_model`` ``k`` decode passes of a separate model; ``ngram`` (prompt lookup) costs
  nothing on the GPU. The draft passes cover the sequences that emit a token in the step.
* Memory: MTP and EAGLE heads hold one extra layer of weights and KV; a draft model its weights
  and KV. Both come out of the KV budget (vLLM allocates KV for the drafter's layers too).
* ``k`` may depend on the batch: ``k_by_batch_size: [[max_running, k], ...]`` (first matching
  row; past the last row the last ``k``).

Simplifications: drafts beyond the request's remaining output are not proposed (vLLM proposes
and discards them); the drafter's own per-step launch overhead is not added (its per-layer
overhead is).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from simulator.costmodel import P_STEP_OVERHEAD, build_cost_params
from simulator.hardware import HardwareProfile
from simulator.memory import KVCapacity, kv_bytes_per_token_per_gpu
from simulator.models import ModelSpec, load_model

MAX_K_ROWS = 8  # rows of the dynamic-k table
SPEC_NONE, SPEC_MTP, SPEC_EAGLE, SPEC_DRAFT_MODEL, SPEC_NGRAM = 0, 1, 2, 3, 4
METHOD_CODES = {"mtp": SPEC_MTP, "eagle": SPEC_EAGLE, "draft_model": SPEC_DRAFT_MODEL,
                "ngram": SPEC_NGRAM}


class SpecDecodeError(ValueError):
    """A speculative-decoding configuration that cannot work."""


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """E[tokens emitted per verify step] with i.i.d. acceptance ``alpha`` and ``k`` drafts."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def one_layer_head(model: ModelSpec, name: str) -> ModelSpec:
    """A one-decoder-layer model shaped like ``model``'s last layer (an MTP or EAGLE head)."""
    last = model.num_layers - 1
    return model.model_copy(
        update={
            "name": name,
            "num_layers": 1,
            "layer_types": ("full_attention",) if model.layer_types else (),
            "moe_layers": (model.moe_layers[last],) if model.moe_layers else (),
            "num_mtp_layers": 0,
        }
    )


def draft_spec(spec, target: ModelSpec) -> ModelSpec | None:
    """The model whose passes make the drafts, or None (n-gram lookup)."""
    if spec.method == "ngram":
        return None
    if spec.method == "mtp":
        if target.num_mtp_layers == 0:
            raise SpecDecodeError(
                f"{target.name} has no MTP layers (num_nextn_predict_layers = 0); "
                "use method eagle or draft_model"
            )
        return one_layer_head(target, f"{target.name}-mtp")
    if spec.method == "eagle":
        return one_layer_head(target, f"{target.name}-eagle")
    draft = load_model(spec.draft_model)
    if draft.total_params >= target.total_params:
        raise SpecDecodeError(
            f"draft model {draft.name} ({draft.total_params / 1e9:.1f}B parameters) is not "
            f"smaller than the target {target.name} ({target.total_params / 1e9:.1f}B)"
        )
    if draft.vocab_size != target.vocab_size:
        raise SpecDecodeError(
            f"draft model {draft.name} has vocab_size {draft.vocab_size}, the target "
            f"{target.name} {target.vocab_size}: a draft must share the target's tokenizer"
        )
    return draft


def draft_cost_params(draft: ModelSpec | None, hw: HardwareProfile, tp: int, weight_dtype: str,
                      kv_dtype: str, num_params: int) -> np.ndarray:
    """Cost parameters of one draft pass (zeros for n-gram: no GPU work)."""
    if draft is None:
        return np.zeros(num_params, dtype=np.float64)
    params = build_cost_params(draft, hw, tp, weight_dtype, kv_dtype)
    params[P_STEP_OVERHEAD] = 0.0
    return params


def capacity_with_draft(cap: KVCapacity, draft: ModelSpec | None, spec, tp: int,
                        weight_dtype: str, kv_dtype: str, where: str) -> KVCapacity:
    """KV capacity left once the drafter's weights and KV are placed beside the target."""
    if draft is None:
        return cap
    weights = -(-draft.weight_bytes(weight_dtype) // tp)
    if spec.method != "draft_model":  # heads share the target's embedding and LM head
        weights = max(weights - _embedding_bytes(draft, tp), 0)
    per_block = cap.bytes_per_block + kv_bytes_per_token_per_gpu(draft, tp, kv_dtype) * (
        cap.block_size
    )
    available = cap.kv_bytes_total - weights
    if available < per_block:
        raise SpecDecodeError(
            f"{where}: the {spec.method} drafter ({draft.name}, {weights / 2**30:.1f} GiB per "
            f"GPU) does not fit beside the target: {cap.kv_bytes_total / 2**30:.1f} GiB was left "
            "for the KV cache"
        )
    return replace(
        cap,
        num_blocks=available // per_block,
        bytes_per_block=per_block,
        weight_bytes_per_gpu=cap.weight_bytes_per_gpu + weights,
        kv_bytes_total=available,
    )


def _embedding_bytes(model: ModelSpec, tp: int) -> int:
    """bf16 bytes of the embedding and LM head per GPU (shared by MTP/EAGLE heads)."""
    tables = 1 if model.tie_word_embeddings else 2
    return tables * model.vocab_size * model.hidden_size * 2 // tp


def k_table(spec) -> np.ndarray:
    """int64[MAX_K_ROWS, 2] rows (max running requests, k); unused rows repeat the last."""
    rows = spec.k_by_batch_size or [(2**62, spec.num_speculative_tokens)]
    table = np.empty((MAX_K_ROWS, 2), dtype=np.int64)
    for i in range(MAX_K_ROWS):
        limit, k = rows[min(i, len(rows) - 1)]
        table[i] = (limit if i < len(rows) else 2**62, k)
    return table


def draw_alphas(spec, num_requests: int, seed: int, profile: int) -> np.ndarray:
    """Per-request acceptance probabilities (float64[R]) for one speculative configuration."""
    mean = spec.acceptance_rate
    if spec.acceptance_concentration is None or mean in (0.0, 1.0):
        return np.full(num_requests, mean, dtype=np.float64)
    rng = np.random.default_rng([seed, 0x5BEC, profile])
    c = spec.acceptance_concentration
    return rng.beta(mean * c, (1.0 - mean) * c, size=num_requests)
