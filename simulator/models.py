"""ModelSpec: the shape of a transformer, read from a Hugging Face ``config.json``.

Supported families (one parser, keyed on which fields are present, not on ``model_type``):

- dense GQA transformers (Llama-3.x),
- mixture-of-experts (Qwen3-MoE: every layer MoE; DeepSeek-V3: the first
  ``first_k_dense_replace`` layers dense, the rest MoE with shared experts),
- hybrid linear/full attention (Qwen3.5 / Qwen3-Next: ``layer_types`` with
  ``"linear_attention"`` Gated DeltaNet layers and ``"full_attention"`` layers, fields possibly
  nested under ``text_config``),
- multi-head latent attention (DeepSeek-V3: ``kv_lora_rank`` and friends),
- multi-token-prediction (MTP) layers, counted apart from the main model.

Units: parameter counts are plain counts; bytes are bytes. Small tensors that do not change the
totals by more than ~0.01% (q/k norms, biases of routers) are left out and say so where they are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from simulator.textio import read_text

__all__ = [
    "DTYPE_BYTES",
    "ModelConfigError",
    "ModelSpec",
    "load_model",
    "shipped_models",
]

#: Bytes per element of the dtypes the simulator knows.
DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}

LayerKind = Literal["full_attention", "linear_attention"]

#: Shipped model configs live next to the hardware profiles, at the repository root.
MODELS_DIR = Path(__file__).resolve().parent.parent / "hardware_profiles" / "models"


class ModelConfigError(ValueError):
    """A config.json that cannot be turned into a ModelSpec (names the file and the field)."""


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``dtype`` (one of :data:`DTYPE_BYTES`); ValueError otherwise."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}"
        ) from None


class ModelSpec(BaseModel):
    """The shape of one decoder-only model. Frozen; build it with :meth:`from_hf_config`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int = 0  # dense MLP width (0 when no layer is dense)
    vocab_size: int
    tie_word_embeddings: bool = False
    attn_output_gate: bool = False  # Qwen3.5: q_proj also emits a per-head output gate

    # --- mixture of experts ---
    num_experts: int = 0  # routed experts per MoE layer
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # width of one routed expert
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0  # width of one shared expert
    first_k_dense_replace: int = 0  # informational: leading dense layers (DeepSeek)
    moe_layers: tuple[bool, ...] = ()  # per layer: True when its MLP is MoE

    # --- hybrid linear attention (Gated DeltaNet) ---
    layer_types: tuple[LayerKind, ...] = ()  # per layer token mixer
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0

    # --- multi-head latent attention ---
    kv_lora_rank: int = 0  # 0: not MLA
    q_lora_rank: int = 0  # 0: q projected directly
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

    # --- multi-token prediction, not part of the main model ---
    num_mtp_layers: int = 0

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        for field in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be > 0 (got {getattr(self, field)})")
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries, num_layers is {self.num_layers}"
            )
        if len(self.moe_layers) != self.num_layers:
            raise ValueError(
                f"moe_layers has {len(self.moe_layers)} entries, num_layers is {self.num_layers}"
            )
        if any(self.moe_layers):
            if self.num_experts <= 0 or not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    "MoE layers need num_experts > 0 and 0 < num_experts_per_tok <= num_experts"
                )
            if self.moe_intermediate_size <= 0:
                raise ValueError("MoE layers need moe_intermediate_size > 0")
        if not all(self.moe_layers) and self.intermediate_size <= 0:
            raise ValueError("dense MLP layers need intermediate_size > 0")
        if "linear_attention" in self.layer_types:
            for field in (
                "linear_num_key_heads",
                "linear_num_value_heads",
                "linear_key_head_dim",
                "linear_value_head_dim",
                "linear_conv_kernel_dim",
            ):
                if getattr(self, field) <= 0:
                    raise ValueError(f"linear-attention layers need {field} > 0")
        if self.is_mla and (self.qk_rope_head_dim <= 0 or self.v_head_dim <= 0):
            raise ValueError("MLA needs qk_rope_head_dim > 0 and v_head_dim > 0")
        return self

    # ------------------------------------------------------------------ parsing

    @classmethod
    def from_hf_config(
        cls, path_or_dict: str | Path | dict[str, Any], name: str | None = None
    ) -> ModelSpec:
        """Parse a Hugging Face ``config.json`` (a path, or the already-loaded dict).

        Fields nested under ``text_config`` (multimodal wrappers such as Qwen3.5) override the
        top level. Raises :class:`ModelConfigError` naming the file and the missing/bad field.
        """
        if isinstance(path_or_dict, dict):
            source = "<dict>"
            raw = path_or_dict
        else:
            path = Path(path_or_dict)
            source = str(path)
            text = read_text(path, ModelConfigError)
            try:
                raw = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise ModelConfigError(f"{source}: not valid JSON ({exc})") from None
            if not isinstance(raw, dict):
                raise ModelConfigError(f"{source}: expected a JSON object at top level")
        cfg = dict(raw)
        text = raw.get("text_config")
        if isinstance(text, dict):
            cfg.update(text)
        try:
            fields = _fields_from_hf(cfg, source)
        except ModelConfigError:
            raise
        except (TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
            raise ModelConfigError(f"{source}: {exc}") from None
        if name is None:
            name = str(raw.get("_name_or_path") or "")
        if not name:
            src = Path(source)
            name = src.parent.name if src.name == "config.json" else src.stem
        fields["name"] = name
        try:
            return cls(**fields)
        except ValidationError as exc:
            msg = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
                for e in exc.errors()
            )
            raise ModelConfigError(f"{source}: {msg}") from None

    # ------------------------------------------------------------- structure

    @property
    def is_mla(self) -> bool:
        """True for multi-head latent attention (DeepSeek-V2/V3)."""
        return self.kv_lora_rank > 0

    @property
    def num_full_attention_layers(self) -> int:
        return sum(1 for k in self.layer_types if k == "full_attention")

    @property
    def num_linear_attention_layers(self) -> int:
        return sum(1 for k in self.layer_types if k == "linear_attention")

    @property
    def num_kv_layers(self) -> int:
        """Layers that keep a per-token KV cache (full-attention layers)."""
        return self.num_full_attention_layers

    @property
    def num_moe_layers(self) -> int:
        return sum(1 for m in self.moe_layers if m)

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def qk_head_dim(self) -> int:
        """Dimension of one query/key head in the attention score product."""
        if self.is_mla:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    @property
    def attn_v_head_dim(self) -> int:
        """Dimension of one value head."""
        return self.v_head_dim if self.is_mla else self.head_dim

    # ---------------------------------------------------- per-layer counts

    def full_attention_matmul_params(self) -> int:
        """Matmul weights of one full-attention layer (q/k/v/o or the MLA projections)."""
        h, nh = self.hidden_size, self.num_attention_heads
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank > 0:
                q = h * self.q_lora_rank + self.q_lora_rank * nh * qk
            else:
                q = h * nh * qk
            kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv_b = self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim)
            o = nh * self.v_head_dim * h
            return q + kv_a + kv_b + o
        q_out = nh * self.head_dim * (2 if self.attn_output_gate else 1)
        kv_out = 2 * self.num_kv_heads * self.head_dim
        return h * q_out + h * kv_out + nh * self.head_dim * h

    def full_attention_small_params(self) -> int:
        """Non-matmul weights of one full-attention layer (MLA latent norms; q/k norms omitted)."""
        if self.is_mla:
            return self.kv_lora_rank + (self.q_lora_rank if self.q_lora_rank > 0 else 0)
        return 0

    @property
    def linear_conv_dim(self) -> int:
        """Channels of the Gated DeltaNet short convolution (q, k and v together)."""
        return (
            2 * self.linear_num_key_heads * self.linear_key_head_dim
            + self.linear_num_value_heads * self.linear_value_head_dim
        )

    def linear_attention_matmul_params(self) -> int:
        """Matmul weights of one Gated DeltaNet layer: in_proj (q,k,v,z), in_proj (b,a), out."""
        h = self.hidden_size
        key = self.linear_num_key_heads * self.linear_key_head_dim
        val = self.linear_num_value_heads * self.linear_value_head_dim
        return h * (2 * key + 2 * val) + h * 2 * self.linear_num_value_heads + val * h

    def linear_attention_small_params(self) -> int:
        """Conv1d weights, dt bias, A_log and the gated norm of one Gated DeltaNet layer."""
        return (
            self.linear_conv_dim * self.linear_conv_kernel_dim
            + 2 * self.linear_num_value_heads
            + self.linear_value_head_dim
        )

    def dense_mlp_params(self) -> int:
        """One gated (SwiGLU) dense MLP: gate, up and down projections."""
        return 3 * self.hidden_size * self.intermediate_size

    def expert_params(self) -> int:
        """One routed expert (gated MLP of width moe_intermediate_size)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def shared_expert_params(self) -> int:
        """All shared experts of one MoE layer (plus Qwen's 1-output shared-expert gate)."""
        if self.num_shared_experts == 0:
            return 0
        return self.num_shared_experts * 3 * self.hidden_size * self.shared_expert_intermediate_size

    def router_params(self) -> int:
        """The router (gate) of one MoE layer: hidden -> num_experts."""
        return self.hidden_size * self.num_experts

    # ------------------------------------------------------------ totals

    def _param_groups(self) -> dict[str, int]:
        """Parameter counts of the main model (MTP excluded), by group.

        ``*_linear`` groups are matmul weights (stored in fp8 under ``weight_bytes("fp8")``);
        the others stay in bf16.
        """
        h = self.hidden_size
        n_full = self.num_full_attention_layers
        n_lin = self.num_linear_attention_layers
        n_moe = self.num_moe_layers
        return {
            "embedding": self.vocab_size * h,
            "lm_head": 0 if self.tie_word_embeddings else self.vocab_size * h,
            "attention_linear": n_full * self.full_attention_matmul_params()
            + n_lin * self.linear_attention_matmul_params(),
            "attention_other": n_full * self.full_attention_small_params()
            + n_lin * self.linear_attention_small_params(),
            "mlp_linear": self.num_dense_layers * self.dense_mlp_params(),
            "experts_linear": n_moe * self.num_experts * self.expert_params(),
            "shared_experts_linear": n_moe * self.shared_expert_params(),
            "router": n_moe * self.router_params(),
            "norms": self.num_layers * 2 * h + h,
        }

    @property
    def total_params(self) -> int:
        """All parameters of the main model, embeddings included, MTP layers excluded (count)."""
        return sum(self._param_groups().values())

    @property
    def active_params(self) -> int:
        """Parameters touched per token (count): everything except the routed experts a token
        does not use (top-k of them count), embeddings and LM head included (the convention of
        the published "activated" counts, e.g. Qwen3-30B-A3B's 3.3B)."""
        g = self._param_groups()
        routed_active = self.num_moe_layers * self.num_experts_per_tok * self.expert_params()
        return self.total_params - g["experts_linear"] + routed_active

    @property
    def mtp_params(self) -> int:
        """Parameters of the MTP layers (count), excluding the embedding and head they share
        with the main model: per MTP layer one decoder layer like the last main layer, an
        input projection of 2*hidden -> hidden and three norms."""
        if self.num_mtp_layers == 0:
            return 0
        h = self.hidden_size
        last = self.num_layers - 1
        if self.layer_types[last] == "full_attention":
            mixer = self.full_attention_matmul_params() + self.full_attention_small_params()
        else:
            mixer = self.linear_attention_matmul_params() + self.linear_attention_small_params()
        if self.moe_layers[last]:
            mlp = (
                self.num_experts * self.expert_params()
                + self.shared_expert_params()
                + self.router_params()
            )
        else:
            mlp = self.dense_mlp_params()
        per_layer = mixer + mlp + 2 * h + 2 * h * h + 3 * h
        return self.num_mtp_layers * per_layer

    def weight_bytes(self, dtype: str = "bf16") -> int:
        """Bytes of the main model's weights on one GPU at TP=1 (bytes).

        ``"bf16"``: 2 bytes per parameter. ``"fp8"``: 1 byte for matmul weights of the decoder
        layers (attention projections, dense MLPs, experts); the embedding, the LM head, the
        routers, norms and convolution weights stay in bf16, as in DeepSeek-V3's FP8 checkpoint
        and vLLM's dynamic FP8 (the per-block scales, < 0.1%, are ignored).
        """
        if dtype not in ("bf16", "fp8"):
            raise ValueError(f"weight dtype must be 'bf16' or 'fp8' (got {dtype!r})")
        g = self._param_groups()
        total = self.total_params
        if dtype == "bf16":
            return 2 * total
        linear = sum(v for k, v in g.items() if k.endswith("_linear"))
        return linear + 2 * (total - linear)

    def kv_bytes_per_token(self, kv_dtype: str = "bf16") -> int:
        """KV-cache bytes per token summed over the layers that keep one (bytes, TP=1).

        Standard attention: 2 * kv_heads * head_dim * dtype bytes per layer. MLA: one latent
        vector of kv_lora_rank + qk_rope_head_dim per layer. Linear-attention layers: 0.
        """
        b = dtype_bytes(kv_dtype)
        if self.is_mla:
            per_layer = (self.kv_lora_rank + self.qk_rope_head_dim) * b
        else:
            per_layer = 2 * self.num_kv_heads * self.head_dim * b
        return self.num_kv_layers * per_layer

    def linear_state_bytes_per_layer(self, state_dtype: str = "bf16") -> int:
        """Fixed recurrent state of one Gated DeltaNet layer for one sequence (bytes, TP=1):
        conv state (conv_dim x (kernel - 1)) plus the delta-rule matrix state
        (value_heads x key_head_dim x value_head_dim)."""
        if self.num_linear_attention_layers == 0:
            return 0
        b = dtype_bytes(state_dtype)
        conv = self.linear_conv_dim * (self.linear_conv_kernel_dim - 1)
        ssm = self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim
        return (conv + ssm) * b

    def state_bytes_per_sequence(self, state_dtype: str = "bf16") -> int:
        """Fixed per-sequence recurrent state of all linear-attention layers (bytes, TP=1).

        vLLM stores both the conv and the recurrent (temporal) state of Gated DeltaNet in the
        model dtype by default (``MambaStateDtypeCalculator.gated_delta_net_state_dtype`` with
        ``mamba_cache_dtype="auto"``), i.e. bf16 for bf16 checkpoints; hence the default.
        """
        return self.num_linear_attention_layers * self.linear_state_bytes_per_layer(state_dtype)


# ---------------------------------------------------------------------- parser


MAX_CONFIG_INT = 10_000_000  # no real model has a dimension, count or vocabulary this large
MAX_LAYERS = 10_000


def _get_int(cfg: dict[str, Any], source: str, *keys: str, default: int | None = None) -> int:
    """First present, non-null key among ``keys`` as an int; else default or an error."""
    for key in keys:
        value = cfg.get(key)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (isinstance(value, float) and not math.isfinite(value))
            or int(value) != value
        ):
            raise ModelConfigError(f"{source}: field {key!r} must be an integer (got {value!r})")
        if not 0 <= value <= MAX_CONFIG_INT:
            raise ModelConfigError(
                f"{source}: field {key!r} = {value!r} is out of range (0..{MAX_CONFIG_INT:,})"
            )
        return int(value)
    if default is None:
        raise ModelConfigError(f"{source}: missing required field {keys[0]!r}")
    return default


def _fields_from_hf(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    num_layers = _get_int(cfg, source, "num_hidden_layers", "n_layers", "num_layers")
    if not 1 <= num_layers <= MAX_LAYERS:
        raise ModelConfigError(
            f"{source}: field 'num_hidden_layers' = {num_layers} is out of range (1..{MAX_LAYERS})"
        )
    hidden = _get_int(cfg, source, "hidden_size", "dim", "d_model")
    heads = _get_int(cfg, source, "num_attention_heads", "n_heads")
    kv_heads = _get_int(cfg, source, "num_key_value_heads", default=heads)
    for key, value in (("hidden_size", hidden), ("num_attention_heads", heads),
                       ("num_key_value_heads", kv_heads)):
        if value < 1:
            raise ModelConfigError(f"{source}: field {key!r} must be >= 1 (got {value})")
    vocab = _get_int(cfg, source, "vocab_size")

    # MLA
    kv_lora_rank = _get_int(cfg, source, "kv_lora_rank", default=0)
    q_lora_rank = _get_int(cfg, source, "q_lora_rank", default=0) if kv_lora_rank else 0
    rope = _get_int(cfg, source, "qk_rope_head_dim", default=0) if kv_lora_rank else 0
    nope = _get_int(cfg, source, "qk_nope_head_dim", default=0) if kv_lora_rank else 0
    v_head = _get_int(cfg, source, "v_head_dim", default=0) if kv_lora_rank else 0
    if kv_lora_rank:
        for key, val in (("qk_rope_head_dim", rope), ("v_head_dim", v_head)):
            if val <= 0:
                raise ModelConfigError(f"{source}: MLA config (kv_lora_rank) needs field {key!r}")
        head_dim = _get_int(cfg, source, "head_dim", default=nope + rope)
    else:
        if hidden % heads and cfg.get("head_dim") is None:
            raise ModelConfigError(
                f"{source}: missing field 'head_dim' and hidden_size {hidden} is not divisible "
                f"by num_attention_heads {heads}"
            )
        head_dim = _get_int(cfg, source, "head_dim", default=hidden // heads)

    # MoE
    num_experts = _get_int(
        cfg, source, "num_experts", "n_routed_experts", "num_local_experts", default=0
    )
    top_k = _get_int(cfg, source, "num_experts_per_tok", default=0) if num_experts else 0
    if num_experts and top_k <= 0:
        raise ModelConfigError(f"{source}: MoE config needs field 'num_experts_per_tok'")
    moe_inter = 0
    if num_experts:
        moe_inter = _get_int(cfg, source, "moe_intermediate_size", "intermediate_size")
    n_shared = 0
    shared_inter = 0
    if num_experts and cfg.get("n_shared_experts"):
        n_shared = _get_int(cfg, source, "n_shared_experts")
        shared_inter = moe_inter
    elif num_experts and cfg.get("shared_expert_intermediate_size"):
        n_shared = 1
        shared_inter = _get_int(cfg, source, "shared_expert_intermediate_size")

    first_k_dense = _get_int(cfg, source, "first_k_dense_replace", default=0)
    moe_layers: list[bool] = []
    if num_experts:
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        sparse_step = _get_int(cfg, source, "decoder_sparse_step", default=1)
        layer_freq = _get_int(cfg, source, "moe_layer_freq", default=1)
        for i in range(num_layers):
            is_moe = i >= first_k_dense and i not in mlp_only
            is_moe = is_moe and (i + 1) % max(sparse_step, 1) == 0
            is_moe = is_moe and (i - first_k_dense) % max(layer_freq, 1) == 0
            moe_layers.append(is_moe)
    else:
        moe_layers = [False] * num_layers
    intermediate = _get_int(cfg, source, "intermediate_size", default=0)
    if not all(moe_layers) and intermediate <= 0:
        raise ModelConfigError(f"{source}: missing required field 'intermediate_size'")
    if all(moe_layers) and "moe_intermediate_size" not in cfg:
        intermediate = 0  # Mixtral style: intermediate_size is the expert width

    # hybrid layers
    raw_types = cfg.get("layer_types")
    layer_types: list[str] = []
    if raw_types is not None:
        if not isinstance(raw_types, list) or len(raw_types) != num_layers:
            raise ModelConfigError(
                f"{source}: field 'layer_types' must be a list of {num_layers} entries"
            )
        for i, kind in enumerate(raw_types):
            if kind in ("full_attention", "attention"):
                layer_types.append("full_attention")
            elif kind in ("linear_attention", "linear"):
                layer_types.append("linear_attention")
            else:
                raise ModelConfigError(
                    f"{source}: field 'layer_types[{i}]' is {kind!r}; supported: "
                    "'full_attention', 'linear_attention'"
                )
    elif cfg.get("full_attention_interval") and cfg.get("linear_num_value_heads"):
        interval = _get_int(cfg, source, "full_attention_interval")
        layer_types = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(num_layers)
        ]
    else:
        layer_types = ["full_attention"] * num_layers
    linear: dict[str, int] = {}
    if "linear_attention" in layer_types:
        for key in (
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_conv_kernel_dim",
        ):
            linear[key] = _get_int(cfg, source, key)

    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ModelConfigError(f"{source}: field 'tie_word_embeddings' must be a boolean")

    return {
        "num_layers": num_layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": intermediate,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
        "attn_output_gate": bool(cfg.get("attn_output_gate", False)),
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": moe_inter,
        "num_shared_experts": n_shared,
        "shared_expert_intermediate_size": shared_inter,
        "first_k_dense_replace": first_k_dense,
        "moe_layers": tuple(moe_layers),
        "layer_types": tuple(layer_types),
        **linear,
        "kv_lora_rank": kv_lora_rank,
        "q_lora_rank": q_lora_rank,
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": nope,
        "v_head_dim": v_head,
        "num_mtp_layers": _get_int(
            cfg, source, "num_nextn_predict_layers", "mtp_num_hidden_layers", default=0
        ),
    }


# ---------------------------------------------------------------------- loading


def shipped_models() -> list[str]:
    """Names of the model configs shipped under ``hardware_profiles/models``."""
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def load_model(ref: str | Path) -> ModelSpec:
    """A shipped model by name (case-insensitive, e.g. ``"llama-3.1-8b"``) or a config.json path."""
    text = str(ref)
    candidate = MODELS_DIR / f"{text.lower()}.json"
    if "/" not in text and "\\" not in text and candidate.is_file():
        return ModelSpec.from_hf_config(candidate, name=text.lower())
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return ModelSpec.from_hf_config(path)
    raise ModelConfigError(
        f"unknown model {text!r}: not a shipped model ({', '.join(shipped_models())}) "
        "and not a path to a config.json"
    )
