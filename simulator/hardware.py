"""HardwareProfile: one GPU's datasheet peaks plus the efficiencies the cost model applies.

Profiles are YAML files under ``hardware_profiles/`` (``h100-sxm``, ``h200``, ``b200``). Every
number in a profile carries a source in its ``sources`` mapping (keyed by the field's dotted
path, e.g. ``peak_flops.bf16``); a profile without one is rejected.

Units: bytes, bytes/second, FLOP/second (dense, no sparsity), seconds; efficiencies are
fractions of the matching peak in (0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from simulator.textio import parse_yaml, read_text

__all__ = [
    "HardwareProfile",
    "HardwareProfileError",
    "PeakFlops",
    "load_hardware",
    "shipped_hardware",
]

PROFILES_DIR = Path(__file__).resolve().parent.parent / "hardware_profiles"

#: Alternative names accepted by :func:`load_hardware`.
ALIASES: dict[str, str] = {"h100": "h100-sxm", "h100_sxm": "h100-sxm", "h200-sxm": "h200"}


class HardwareProfileError(ValueError):
    """A hardware profile that cannot be loaded; the message names the file and the field."""


class PeakFlops(BaseModel):
    """Dense peak tensor-core throughput per GPU (FLOP/s)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    bf16: float = Field(gt=0)
    fp8: float = Field(gt=0)
    fp4: float | None = Field(default=None, gt=0)  # None: no FP4 tensor cores


class HardwareProfile(BaseModel):
    """One GPU model: capacities, peaks and the efficiencies that turn peaks into time."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    hbm_bytes: int = Field(gt=0, le=10**13)  # device memory as CUDA reports it (bytes)
    hbm_bandwidth: float = Field(gt=0)  # datasheet HBM bandwidth (bytes/s)
    peak_flops: PeakFlops
    nvlink_bandwidth: float = Field(gt=0)  # per GPU, both directions added (bytes/s)
    pcie_bandwidth: float = Field(gt=0)  # host link, per direction (bytes/s)

    matmul_efficiency: float = Field(gt=0, le=1)  # of peak_flops.bf16 for bf16 GEMMs
    fp8_matmul_efficiency: float = Field(gt=0, le=1)  # of peak_flops.fp8 for fp8 GEMMs
    attention_efficiency: float = Field(gt=0, le=1)  # of peak_flops.bf16 for attention kernels
    memory_efficiency: float = Field(gt=0, le=1)  # of hbm_bandwidth for streaming reads
    step_overhead_s: float = Field(ge=0, le=10)  # fixed cost per engine step (seconds)
    layer_overhead_s: float = Field(ge=0, le=1)  # fixed cost per decoder layer per step (s)
    allreduce_efficiency: float = Field(gt=0, le=1)  # of per-direction NVLink bandwidth
    allreduce_latency_s: float = Field(ge=0)  # fixed cost of one all-reduce (seconds)

    # kernel-shape terms between the roofline corners (see simulator/costmodel.py)
    gemm_smoothness: float = Field(ge=1, le=64)  # p of (compute^p + memory^p)^(1/p)
    gemm_latency_s: float = Field(ge=0)  # fixed cost of one GEMM kernel (seconds)
    grouped_gemm_efficiency: float = Field(gt=0, le=1)  # grouped expert GEMMs vs dense GEMMs
    grouped_gemm_latency_s: float = Field(ge=0)  # fixed cost of one grouped GEMM kernel (s)
    moe_routing_latency_s: float = Field(ge=0)  # routing kernels per MoE layer per step (s)
    moe_routing_bandwidth_efficiency: float = Field(gt=0, le=1)  # routing traffic, of hbm bw
    attention_prefill_latency_s: float = Field(ge=0)  # per prefill sequence per layer (s)
    attention_prefill_token_s: float = Field(ge=0)  # per prefill query token per layer (s)
    attention_decode_latency_s: float = Field(ge=0)  # per layer with decodes (s)
    attention_decode_seq_s: float = Field(ge=0)  # per decode sequence per layer (s)
    attention_decode_bandwidth_efficiency: float = Field(gt=0, le=1)  # KV read, of hbm_bandwidth
    # of bf16 peak, unsplit decode kernel, FLOPs of one query head per KV head (see costmodel)
    attention_decode_efficiency: float = Field(gt=0, le=1)
    attention_decode_split_below: float = Field(
        ge=0
    )  # decode seqs x KV heads under which KV splits
    elementwise_bandwidth_efficiency: float = Field(gt=0, le=1)  # norms, SiLU, adds; of hbm bw
    elementwise_latency_s: float = Field(ge=0)  # fixed cost of one small elementwise kernel (s)
    # Gated DeltaNet core (flash-linear-attention kernels; see costmodel)
    linear_attention_efficiency: float = Field(gt=0, le=1)  # of bf16 peak, prefill chunks
    linear_attention_bandwidth_efficiency: float = Field(gt=0, le=1)  # state traffic, of hbm
    linear_attention_decode_latency_s: float = Field(ge=0)  # per layer with decodes (s)
    linear_attention_prefill_latency_s: float = Field(ge=0)  # per prefill sequence per layer (s)

    calibrated: bool = False  # True when fitted and validate-steps meets its targets here
    calibration: dict[str, Any] | None = None  # where the fit came from, residuals per group
    sources: dict[str, str]

    @model_validator(mode="after")
    def _every_number_has_a_source(self) -> HardwareProfile:
        missing = [k for k in self.numeric_fields() if not self.sources.get(k, "").strip()]
        if missing:
            raise ValueError(f"sources lacks an entry for: {', '.join(missing)}")
        return self

    def numeric_fields(self) -> list[str]:
        """Dotted names of every number in the profile (each needs a source)."""
        names = []
        for field, value in self:
            if field in ("name", "calibrated", "calibration", "sources"):
                continue
            if isinstance(value, PeakFlops):
                names += [f"peak_flops.{k}" for k, v in value if v is not None]
            else:
                names.append(field)
        return names

    @property
    def nvlink_bandwidth_per_direction(self) -> float:
        """NVLink bandwidth one way (bytes/s): half the bidirectional total."""
        return self.nvlink_bandwidth / 2.0

    def matmul_rate(self, weight_dtype: str) -> float:
        """Achievable GEMM throughput for ``weight_dtype`` weights: peak x efficiency (FLOP/s)."""
        peak = self.matmul_peak(weight_dtype)
        eff = self.matmul_efficiency if weight_dtype == "bf16" else self.fp8_matmul_efficiency
        return peak * eff

    def matmul_peak(self, weight_dtype: str) -> float:
        """Tensor-core peak used for GEMMs with ``weight_dtype`` weights (FLOP/s).

        FP8 weights run FP8 x FP8 GEMMs (vLLM quantizes activations dynamically); FP4 uses
        the FP4 peak where the GPU has one.
        """
        if weight_dtype == "bf16":
            return self.peak_flops.bf16
        if weight_dtype == "fp8":
            return self.peak_flops.fp8
        if weight_dtype == "fp4":
            if self.peak_flops.fp4 is None:
                raise ValueError(f"{self.name} has no FP4 tensor cores")
            return self.peak_flops.fp4
        raise ValueError(f"unknown weight dtype {weight_dtype!r}")


def shipped_hardware() -> list[str]:
    """Names of the hardware profiles shipped under ``hardware_profiles/``."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _format_validation_error(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "profile"
        got = f" (got {err['input']!r})" if "input" in err and err["type"] != "missing" else ""
        if isinstance(err.get("input"), dict):
            got = ""
        lines.append(f"{source}: {loc}: {err['msg']}{got}")
    return "\n".join(lines)


def hardware_from_dict(data: Any, source: str = "<dict>") -> HardwareProfile:
    """Validate a mapping as a :class:`HardwareProfile`; errors name ``source`` and the field."""
    if not isinstance(data, dict):
        raise HardwareProfileError(f"{source}: expected a mapping at top level")
    try:
        return HardwareProfile(**data)
    except ValidationError as exc:
        raise HardwareProfileError(_format_validation_error(source, exc)) from None


def load_hardware(ref: str | Path) -> HardwareProfile:
    """A shipped profile by name (``h100-sxm`` alias ``h100``, ``h200``, ``b200``) or a YAML path."""
    text = str(ref)
    key = ALIASES.get(text.lower(), text.lower())
    path = PROFILES_DIR / f"{key}.yaml"
    if not ("/" not in text and path.is_file()):
        path = Path(text)
        if not path.is_file():
            raise HardwareProfileError(
                f"unknown hardware {text!r}: not a shipped profile "
                f"({', '.join(shipped_hardware())}; alias h100) and not a path to a YAML file"
            )
    data = parse_yaml(read_text(path, HardwareProfileError), path, HardwareProfileError)
    return hardware_from_dict(data, str(path))
