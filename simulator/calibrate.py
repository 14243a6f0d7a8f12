"""Fit a hardware profile's efficiency terms to operator measurements; check whole steps.

The measurements are the CSVs written by ``hardware_profiles/measure/measure.py`` (one per kind,
units in the column names) plus its ``metadata.json``. Two uses:

- :func:`calibrate` fits the profile's efficiencies and kernel-shape terms with
  ``scipy.optimize.least_squares`` (log residuals: every row weighs by its relative error) from
  the *operator* rows only: GEMMs, attention prefill and decode, MoE expert GEMMs, elementwise
  kernels. Whole-step rows (``steps.csv``) are never used for fitting.
- :func:`validate_steps` predicts every whole-step row with the cost model and a profile and
  reports the absolute percentage errors per model and kind (prefill, decode, mixed).

The operator formulas below are the cost model's (:mod:`simulator.costmodel`) applied to one
kernel: a GEMM takes ``gemm_latency_s + smooth_max(flops / rate, bytes / bandwidth, p)``, and so
on; ``tests/test_calibrate.py`` checks that both agree.

Measured step times are GPU time of the forward pass (CUDA-graph replay); the cost model's
``step_overhead_s`` (host-side scheduling and sampling, not measurable with torch ops) is left out
of the prediction when comparing.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy.optimize import least_squares

from simulator.costmodel import (
    P_MOE_TOUCHED,
    P_NUM_MOE_LAYERS,
    P_STEP_OVERHEAD,
    build_cost_params,
    moe_routing_bytes_per_token,
    step_seconds,
)
from simulator.hardware import HardwareProfile, hardware_from_dict, load_hardware
from simulator.models import load_model

__all__ = [
    "CalibrationError",
    "FitResult",
    "MeasurementError",
    "Measurements",
    "REFERENCE_STEP_MODEL",
    "ROUTING_MODES",
    "allreduce_seconds",
    "calibrate",
    "fit_allreduce",
    "load_measurements",
    "predict_operators",
    "profile_to_yaml",
    "step_rows",
    "validate_steps",
]

#: Kernels per elementwise row as the reference layer of ``measure.py`` runs them: SiLU-and-mul
#: is two torch ops, RoPE on q and k seven each, the KV write two copies.
ELEMENTWISE_KERNELS = {"rms_norm": 1, "silu_mul": 2, "residual_add": 1, "rope": 14, "kv_write": 2}

#: Occurrences per decoder layer of the reference layer (Llama-3.1-8B) and the bytes each moves
#: per token (one read of each input, one write of each output, bf16), used to turn the per-op
#: fits into the profile's two numbers: ``layer_overhead_s`` = the layer's small kernels x their
#: fitted latencies, ``elementwise_bandwidth_efficiency`` = the layer's byte-weighted mix.
_H, _F, _HQ, _HK, _D = 4096, 14336, 32, 8, 128
REFERENCE_LAYER_OPS = {
    "rms_norm": (2, 2 * (2 * _H)),
    "residual_add": (2, 2 * (3 * _H)),
    "silu_mul": (1, 2 * (3 * _F)),
    "rope": (1, 2 * (2 * (_HQ + _HK) * _D)),
    "kv_write": (1, 2 * (2 * 2 * _HK * _D)),
}
REFERENCE_SMALL_OPS_PER_LAYER = sum(
    n * ELEMENTWISE_KERNELS[op] for op, (n, _) in REFERENCE_LAYER_OPS.items()
)

#: FlashAttention-2 as PyTorch calls it splits the KV of a decode batch over the SMs while
#: batch x KV heads < 0.8 x 2 x SMs (its num_splits_heuristic; 132 SMs on H100 and H200).
DEFAULT_DECODE_SPLIT_BELOW = 0.8 * 2 * 132

#: Required columns per measurement file. Units are part of the names.
OPERATOR_COLUMNS = {
    "gemm": ("dtype", "m", "n", "k", "flops", "bytes", "seconds"),
    "attention_prefill": ("query_tokens", "context_tokens", "flops", "bytes", "seconds"),
    "attention_decode": (
        "batch",
        "heads",
        "kv_heads",
        "context_tokens",
        "flops",
        "bytes",
        "seconds",
    ),
    "moe": ("tokens", "experts_touched", "moe_inter", "top_k", "flops", "bytes", "seconds"),
    "elementwise": ("op", "tokens", "bytes", "seconds"),
}
OPTIONAL_FILES = {
    "moe_routing": ("tokens", "experts", "top_k", "hidden", "bytes", "seconds"),
    "gdn": ("phase", "method", "batch", "tokens", "flops", "bytes", "seconds"),
    "memcpy": ("direction", "pinned", "bytes", "seconds"),
    "launch": ("kernels", "timing", "seconds"),
}
STEP_COLUMNS = (
    "model",
    "kind",
    "layers",
    "prefill_new_tokens",
    "prefill_context_tokens",
    "decode_batch",
    "decode_context_tokens",
    "seconds_graph",
)
#: Column names that say a time is not in seconds: a unit mismatch.
_WRONG_TIME_UNITS = ("ms", "us", "ns", "milliseconds", "microseconds", "nanoseconds")

#: Targets for validate-steps (absolute percentage error of whole steps).
TARGET_MEDIAN_PCT = 5.0
TARGET_P90_PCT = 12.0

#: Fitted profile fields, with the operator group that determines each.
FITTED_FIELDS = {
    "matmul_efficiency": "gemm",
    "fp8_matmul_efficiency": "gemm",
    "memory_efficiency": "gemm",
    "gemm_smoothness": "gemm",
    "gemm_latency_s": "gemm",
    "attention_efficiency": "attention",
    "attention_prefill_latency_s": "attention",
    "attention_prefill_token_s": "attention",
    "attention_decode_latency_s": "attention",
    "attention_decode_seq_s": "attention",
    "attention_decode_bandwidth_efficiency": "attention",
    "attention_decode_efficiency": "attention",
    "elementwise_bandwidth_efficiency": "elementwise",
    "elementwise_latency_s": "elementwise",
    "layer_overhead_s": "elementwise",
    "grouped_gemm_efficiency": "moe",
    "grouped_gemm_latency_s": "moe",
    "moe_routing_latency_s": "moe_routing",
    "moe_routing_bandwidth_efficiency": "moe_routing",
    "linear_attention_efficiency": "gdn",
    "linear_attention_bandwidth_efficiency": "gdn",
    "linear_attention_decode_latency_s": "gdn",
    "linear_attention_prefill_latency_s": "gdn",
}


class MeasurementError(ValueError):
    """Measurements that cannot be used: missing file or column, unit mismatch, wrong GPU."""


class CalibrationError(RuntimeError):
    """A fit that did not converge; no profile is written."""


@dataclass
class Measurements:
    """The CSVs of one measurement directory, as DataFrames, and its metadata."""

    path: Path
    metadata: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def gpu_name(self) -> str:
        return str(self.metadata.get("gpu_name", ""))


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MeasurementError(f"{path}: not a readable CSV ({exc})") from None
    cols = set(df.columns)
    wrong = [c for c in df.columns if c.split("_")[0] in _WRONG_TIME_UNITS]
    if "seconds" in required and "seconds" not in cols and wrong:
        raise MeasurementError(
            f"{path}: unit mismatch: times must be in a 'seconds' column (found {wrong[0]!r})"
        )
    if "seconds_graph" in required and "seconds_graph" not in cols and wrong:
        raise MeasurementError(
            f"{path}: unit mismatch: step times must be in 'seconds_graph' (found {wrong[0]!r})"
        )
    missing = [c for c in required if c not in cols]
    if missing:
        raise MeasurementError(f"{path}: missing column(s) {', '.join(missing)}")
    if df.empty:
        raise MeasurementError(f"{path}: no rows")
    for c in required:
        if c in ("seconds", "seconds_graph", "flops", "bytes"):
            v = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float)
            if not np.all(np.isfinite(v)) or np.any(v <= 0):
                raise MeasurementError(f"{path}: column {c!r} must hold positive numbers")
            if c.startswith("seconds") and np.any(v > 1e3):
                raise MeasurementError(
                    f"{path}: unit mismatch: {c!r} holds values over 1000 (not seconds?)"
                )
    return df


def load_measurements(path: str | Path, need_operators: bool = True) -> Measurements:
    """Read a measurement directory; MeasurementError (one line) on anything unusable."""
    root = Path(path)
    if not root.is_dir():
        raise MeasurementError(f"{root}: not a directory of measurements")
    meta_path = root / "metadata.json"
    if not meta_path.is_file():
        raise MeasurementError(f"{meta_path}: missing (the GPU name is read from it)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise MeasurementError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not str(meta.get("gpu_name", "")).strip():
        raise MeasurementError(f"{meta_path}: no 'gpu_name'")
    m = Measurements(root, meta)
    if need_operators:
        for kind, cols in OPERATOR_COLUMNS.items():
            f = root / f"{kind}.csv"
            if not f.is_file():
                raise MeasurementError(f"{f}: missing")
            m.tables[kind] = _read_csv(f, cols)
        for kind, cols in OPTIONAL_FILES.items():
            f = root / f"{kind}.csv"
            if f.is_file():
                m.tables[kind] = _read_csv(f, cols)
    f = root / "steps.csv"
    if f.is_file():
        m.tables["steps"] = _read_csv(f, STEP_COLUMNS)
    elif not need_operators:
        raise MeasurementError(f"{f}: missing")
    return m


def gpu_token(hw: HardwareProfile) -> str:
    """The GPU model a profile describes, as it appears in CUDA's device name (``H100``)."""
    return hw.name.split("-")[0].upper()


def check_gpu(meas: Measurements, hw: HardwareProfile) -> None:
    if gpu_token(hw) not in meas.gpu_name.upper():
        raise MeasurementError(
            f"{meas.path}: measured on {meas.gpu_name!r}, which does not match profile "
            f"{hw.name!r} (expected {gpu_token(hw)!r} in the GPU name)"
        )


def infer_hardware(meas: Measurements) -> HardwareProfile:
    """The shipped profile whose GPU appears in the measurements' GPU name."""
    name = meas.gpu_name.upper()
    for ref in ("h100-sxm", "h200", "b200"):
        hw = load_hardware(ref)
        if gpu_token(hw) in name:
            return hw
    raise MeasurementError(
        f"{meas.path}: no shipped profile matches GPU {meas.gpu_name!r}; pass --hardware"
    )


# ---------------------------------------------------------------------- operator formulas


def _smooth(a, b, p):
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    hi = np.maximum(a, b)
    lo = np.minimum(a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(hi > 0, lo / np.where(hi > 0, hi, 1.0), 0.0)
    if p >= 64.0:
        return hi
    return hi * (1.0 + r**p) ** (1.0 / p)


def predict_operators(meas: Measurements, hw: HardwareProfile) -> dict[str, np.ndarray]:
    """Predicted seconds of every operator row under ``hw`` (the cost model's formulas)."""
    t = meas.tables
    out = {}
    p = hw.gemm_smoothness
    bw = hw.hbm_bandwidth
    g = t["gemm"]
    rate = np.where(
        g["dtype"].to_numpy() == "fp8",
        hw.peak_flops.fp8 * hw.fp8_matmul_efficiency,
        hw.peak_flops.bf16 * hw.matmul_efficiency,
    )
    out["gemm"] = hw.gemm_latency_s + _smooth(
        g["flops"] / rate, g["bytes"] / (bw * hw.memory_efficiency), p
    )
    attn_rate = hw.peak_flops.bf16 * hw.attention_efficiency
    dec_bw = bw * hw.attention_decode_bandwidth_efficiency
    a = t["attention_prefill"]
    out["attention_prefill"] = (
        hw.attention_prefill_latency_s
        + a["query_tokens"].to_numpy() * hw.attention_prefill_token_s
        + _smooth(a["flops"] / attn_rate, a["bytes"] / dec_bw, p)
    )
    d = t["attention_decode"]
    dec_rate = np.where(
        _unsplit(d, hw.attention_decode_split_below),
        hw.peak_flops.bf16 * hw.attention_decode_efficiency * _group(d),
        attn_rate,
    )
    out["attention_decode"] = (
        hw.attention_decode_latency_s
        + d["batch"].to_numpy() * hw.attention_decode_seq_s
        + _smooth(d["flops"] / dec_rate, d["bytes"] / dec_bw, p)
    )
    e = t["elementwise"]
    kernels = e["op"].map(ELEMENTWISE_KERNELS).fillna(1).to_numpy(dtype=float)
    per_op = (hw.calibration or {}).get("elementwise_ops", {})
    lat = np.full(len(e), hw.elementwise_latency_s)
    elem_bw = np.full(len(e), bw * hw.elementwise_bandwidth_efficiency)
    for op, fit in per_op.items():  # per-op fits where the profile keeps them
        sel = e["op"].to_numpy() == op
        lat[sel] = fit["latency_s"]
        elem_bw[sel] = fit["bandwidth_bytes_per_s"]
    out["elementwise"] = kernels * lat + e["bytes"].to_numpy() / elem_bw
    elem_bw = bw * hw.elementwise_bandwidth_efficiency
    mo = t["moe"]
    assign = mo["tokens"].to_numpy(dtype=float) * mo["top_k"].to_numpy(dtype=float)
    silu_bytes = 2.0 * 3.0 * assign * mo["moe_inter"].to_numpy(dtype=float)
    geff = hw.grouped_gemm_efficiency
    out["moe"] = (
        2.0 * hw.grouped_gemm_latency_s
        + _smooth(
            mo["flops"] / (hw.peak_flops.bf16 * hw.matmul_efficiency * geff),
            (mo["bytes"] - silu_bytes) / (bw * hw.memory_efficiency * geff),
            p,
        )
        + 2.0 * hw.elementwise_latency_s
        + silu_bytes / elem_bw
    )
    if "moe_routing" in t:
        r = t["moe_routing"]
        out["moe_routing"] = hw.moe_routing_latency_s + r["bytes"].to_numpy(dtype=float) / (
            bw * hw.moe_routing_bandwidth_efficiency
        )
    if "gdn" in t:
        gd = _fused_gdn(t["gdn"])
        pre = gd["phase"].to_numpy() == "prefill"
        out["gdn"] = np.where(
            pre, hw.linear_attention_prefill_latency_s, hw.linear_attention_decode_latency_s
        ) + np.maximum(
            gd["flops"].to_numpy(dtype=float)
            / (hw.peak_flops.bf16 * hw.linear_attention_efficiency),
            gd["bytes"].to_numpy(dtype=float) / (bw * hw.linear_attention_bandwidth_efficiency),
        )
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


def _fused_gdn(gd: pd.DataFrame) -> pd.DataFrame:
    """The rows of gdn.csv timed with the fused kernels (the proxies are diagnostics)."""
    return gd[gd["method"].astype(str).str.startswith("fla")]


def _group(d: pd.DataFrame) -> np.ndarray:
    """Query heads per KV head of decode-attention rows (the unsplit kernel's tile rows)."""
    return d["heads"].to_numpy(dtype=float) / d["kv_heads"].to_numpy(dtype=float)


def _unsplit(d: pd.DataFrame, split_below: float) -> np.ndarray:
    """Decode rows whose batch x KV heads is large enough that the KV is not split."""
    work = d["batch"].to_numpy(dtype=float) * d["kv_heads"].to_numpy(dtype=float)
    return (work >= split_below) & (split_below > 0)


# ----------------------------------------------------------------------------------- fit


@dataclass
class FitResult:
    """Fitted values, per-group residual summaries and the fitted profile.

    ``log_ratios`` holds, per operator group, ``ln(predicted / measured)`` of every row in the
    measurement file's order (dimensionless, rounded to 4 decimals): the signed residual
    distribution :mod:`simulator.bands` resamples.
    """

    values: dict[str, float]
    residuals: dict[str, dict[str, float]]
    profile: HardwareProfile
    messages: list[str] = field(default_factory=list)
    log_ratios: dict[str, list[float]] = field(default_factory=dict)


def _abs_pct(pred, meas) -> np.ndarray:
    return 100.0 * np.abs(np.asarray(pred) / np.asarray(meas) - 1.0)


def _log_ratios(pred, meas) -> list[float]:
    """``ln(predicted / measured)`` per row, rounded to 4 decimals (0.01 % of a ratio)."""
    return [round(float(x), 4) for x in np.log(np.asarray(pred) / np.asarray(meas))]


def _summary(err: np.ndarray) -> dict[str, float]:
    return {
        "rows": int(err.size),
        "median_abs_pct": float(np.median(err)),
        "p90_abs_pct": float(np.percentile(err, 90)),
        "max_abs_pct": float(np.max(err)),
    }


def _solve(name, fun, x0, lo, hi, max_nfev):
    try:
        r = least_squares(fun, x0, bounds=(lo, hi), max_nfev=max_nfev, x_scale="jac")
    except (ValueError, FloatingPointError) as exc:
        raise CalibrationError(f"fit of {name} failed: {exc}") from None
    if not r.success or not np.all(np.isfinite(r.x)) or not np.isfinite(r.cost):
        raise CalibrationError(f"fit of {name} did not converge: {r.message}")
    return r.x


def calibrate(
    meas: Measurements,
    hw: HardwareProfile,
    max_nfev: int | None = None,
    date: str | None = None,
    source_dir: str | None = None,
) -> FitResult:
    """Fit ``hw``'s efficiency and kernel-shape terms to ``meas``'s operator rows.

    Peaks (datasheet numbers) are kept; CalibrationError when a fit does not converge.
    """
    check_gpu(meas, hw)
    _check_routing_bytes(meas)
    t = meas.tables
    bw = hw.hbm_bandwidth
    pk16 = hw.peak_flops.bf16
    pk8 = hw.peak_flops.fp8
    v: dict[str, float] = {}

    # GEMMs: [bf16 eff, fp8 eff, memory eff, smoothness, latency (us)]
    g = t["gemm"]
    is8 = g["dtype"].to_numpy() == "fp8"
    gf = g["flops"].to_numpy(dtype=float)
    gb = g["bytes"].to_numpy(dtype=float)
    gt = g["seconds"].to_numpy(dtype=float)

    def gemm_model(x):
        rate = np.where(is8, pk8 * x[1], pk16 * x[0])
        return x[4] * 1e-6 + _smooth(gf / rate, gb / (bw * x[2]), x[3])

    x = _solve(
        "gemm",
        lambda x: np.log(gemm_model(x) / gt),
        [0.75, 0.7, 0.85, 4.0, 3.0],
        [0.05, 0.05, 0.05, 1.0, 0.0],
        [1.0, 1.0, 1.0, 64.0, 200.0],
        max_nfev,
    )
    v.update(
        matmul_efficiency=x[0],
        fp8_matmul_efficiency=x[1] if is8.any() else hw.fp8_matmul_efficiency,
        memory_efficiency=x[2],
        gemm_smoothness=x[3],
        gemm_latency_s=x[4] * 1e-6,
    )
    p = x[3]

    # attention, prefill and decode together:
    # [attn eff, prefill latency us, prefill ns/token, decode bw eff, decode latency us,
    #  decode ns/sequence]
    a = t["attention_prefill"]
    d = t["attention_decode"]
    af, ab, aq = (a[c].to_numpy(dtype=float) for c in ("flops", "bytes", "query_tokens"))
    df_, db, dn = (d[c].to_numpy(dtype=float) for c in ("flops", "bytes", "batch"))
    at = a["seconds"].to_numpy(dtype=float)
    dt = d["seconds"].to_numpy(dtype=float)
    split_below = hw.attention_decode_split_below
    unsplit = _unsplit(d, split_below)
    group = _group(d)

    def attn_model(x):
        rate = pk16 * x[0]
        dbw = bw * x[3]
        drate = np.where(unsplit, pk16 * x[6] * group, rate)
        pre = x[1] * 1e-6 + aq * x[2] * 1e-9 + _smooth(af / rate, ab / dbw, p)
        dec = x[4] * 1e-6 + dn * x[5] * 1e-9 + _smooth(df_ / drate, db / dbw, p)
        return pre, dec

    def attn_res(x):
        pre, dec = attn_model(x)
        return np.concatenate([np.log(pre / at), np.log(dec / dt)])

    x = _solve(
        "attention",
        attn_res,
        [0.35, 10.0, 20.0, 0.75, 8.0, 50.0, 0.003],
        [0.01, 0.0, 0.0, 0.05, 0.0, 0.0, 1e-4],
        [1.0, 1e4, 1e5, 1.0, 1e4, 1e5, 1.0],
        max_nfev,
    )
    v.update(
        attention_efficiency=x[0],
        attention_prefill_latency_s=x[1] * 1e-6,
        attention_prefill_token_s=x[2] * 1e-9,
        attention_decode_bandwidth_efficiency=x[3],
        attention_decode_latency_s=x[4] * 1e-6,
        attention_decode_seq_s=x[5] * 1e-9,
        attention_decode_efficiency=x[6] if unsplit.any() else hw.attention_decode_efficiency,
    )

    # elementwise, one fit per op: [latency us per kernel, bandwidth TB/s]
    e = t["elementwise"]
    missing = sorted(set(REFERENCE_LAYER_OPS) - set(e["op"]))
    if missing:
        raise MeasurementError(
            f"{meas.path / 'elementwise.csv'}: no rows for op(s) {', '.join(missing)}"
        )
    ops = {}
    for op in REFERENCE_LAYER_OPS:
        rows = e[e["op"] == op]
        k = ELEMENTWISE_KERNELS[op]
        eb = rows["bytes"].to_numpy(dtype=float)
        et = rows["seconds"].to_numpy(dtype=float)
        x = _solve(
            f"elementwise {op}",
            lambda x, k=k, eb=eb, et=et: np.log((k * x[0] * 1e-6 + eb / (x[1] * 1e12)) / et),
            [2.0, 1.0],
            [0.0, 1e-3],
            [1e3, 1e2],
            max_nfev,
        )
        ops[op] = {"latency_s": _round(x[0] * 1e-6), "bandwidth_bytes_per_s": _round(x[1] * 1e12)}
    overhead = sum(
        n * ELEMENTWISE_KERNELS[op] * ops[op]["latency_s"]
        for op, (n, _) in REFERENCE_LAYER_OPS.items()
    )
    nbytes = sum(n * b for n, b in REFERENCE_LAYER_OPS.values())
    seconds = sum(
        n * b / ops[op]["bandwidth_bytes_per_s"] for op, (n, b) in REFERENCE_LAYER_OPS.items()
    )
    v.update(
        layer_overhead_s=overhead,
        elementwise_latency_s=overhead / REFERENCE_SMALL_OPS_PER_LAYER,
        elementwise_bandwidth_efficiency=min(1.0, nbytes / seconds / bw),
    )

    # MoE grouped expert GEMMs: [grouped efficiency, grouped latency us], the dense GEMM and
    # elementwise terms fixed
    base = hw.model_copy(update={**v, "grouped_gemm_efficiency": 1.0})
    mo = t["moe"]
    mt = mo["seconds"].to_numpy(dtype=float)

    def moe_res(x):
        trial = base.model_copy(
            update={"grouped_gemm_efficiency": float(x[0]), "grouped_gemm_latency_s": x[1] * 1e-6}
        )
        return np.log(predict_operators(meas, trial)["moe"] / mt)

    x = _solve("moe", moe_res, [0.6, 5.0], [0.01, 0.0], [1.0, 200.0], max_nfev)
    v["grouped_gemm_efficiency"] = x[0]
    v["grouped_gemm_latency_s"] = x[1] * 1e-6

    # MoE routing kernels (optional rows): [latency us per MoE layer, bandwidth efficiency]
    if "moe_routing" in t:
        r = t["moe_routing"]
        rb = r["bytes"].to_numpy(dtype=float)
        rt = r["seconds"].to_numpy(dtype=float)
        x = _solve(
            "moe_routing",
            lambda x: np.log((x[0] * 1e-6 + rb / (bw * x[1])) / rt),
            [40.0, 0.3],
            [0.0, 1e-3],
            [1e4, 1.0],
            max_nfev,
        )
        v.update(moe_routing_latency_s=x[0] * 1e-6, moe_routing_bandwidth_efficiency=x[1])

    # Gated DeltaNet kernels (optional rows, fused kernels only): [decode latency us, FLOP
    # efficiency, bandwidth efficiency, prefill latency us]
    if "gdn" in t and not _fused_gdn(t["gdn"]).empty:
        gd = _fused_gdn(t["gdn"])
        pre = gd["phase"].to_numpy() == "prefill"
        lf = gd["flops"].to_numpy(dtype=float)
        lb = gd["bytes"].to_numpy(dtype=float)
        lt = gd["seconds"].to_numpy(dtype=float)

        def gdn_res(x):
            lat = np.where(pre, x[3], x[0]) * 1e-6
            return np.log((lat + np.maximum(lf / (pk16 * x[1]), lb / (bw * x[2]))) / lt)

        x = _solve(
            "gdn",
            gdn_res,
            [5.0, 0.05, 0.7, 30.0],
            [0.0, 1e-4, 0.01, 0.0],
            [1e3, 1.0, 1.0, 1e4],
            max_nfev,
        )
        v.update(
            linear_attention_decode_latency_s=x[0] * 1e-6,
            linear_attention_efficiency=x[1],
            linear_attention_bandwidth_efficiency=x[2],
            linear_attention_prefill_latency_s=x[3] * 1e-6,
        )

    v = {k: _round(val) for k, val in v.items()}
    fitted = _fitted_profile(hw, v, meas, date, source_dir)
    fitted = fitted.model_copy(update={"calibration": {"elementwise_ops": ops}})
    pred = predict_operators(meas, fitted)
    residuals = {}
    log_ratios = {}
    for kind, pr in pred.items():
        measured = t[kind]["seconds"].to_numpy(dtype=float)
        if kind == "gdn":
            measured = _fused_gdn(t["gdn"])["seconds"].to_numpy(dtype=float)
        if kind == "gemm":
            for dtype in ("bf16", "fp8"):
                sel = t["gemm"]["dtype"].to_numpy() == dtype
                if sel.any():
                    residuals[f"gemm_{dtype}"] = _summary(_abs_pct(pr[sel], measured[sel]))
                    log_ratios[f"gemm_{dtype}"] = _log_ratios(pr[sel], measured[sel])
        else:
            residuals[kind] = _summary(_abs_pct(pr, measured))
            log_ratios[kind] = _log_ratios(pr, measured)
    block = _calibration_block(meas, residuals, date)
    for kind, ratios in log_ratios.items():
        block["residuals"][kind]["log_ratios"] = ratios
    block["elementwise_ops"] = ops
    fitted = fitted.model_copy(update={"calibration": block})
    return FitResult(values=v, residuals=residuals, profile=fitted, log_ratios=log_ratios)


def _round(x: float) -> float:
    """Four significant digits: the fits are not better than that."""
    x = float(x)
    if x == 0.0 or not math.isfinite(x):
        return x
    return float(f"{x:.4g}")


def _today(date: str | None) -> str:
    return date or datetime.date.today().isoformat()


def _calibration_block(meas: Measurements, residuals: dict, date: str | None) -> dict:
    md = meas.metadata
    return {
        "measurements": str(meas.path),
        "gpu_name": meas.gpu_name,
        "measured_on": str(md.get("date", "unknown")),
        "software": f"torch {md.get('torch', '?')}, CUDA {md.get('cuda', '?')}",
        "fitted_on": _today(date),
        "residuals": {
            k: {kk: round(vv, 2) if isinstance(vv, float) else vv for kk, vv in r.items()}
            for k, r in residuals.items()
        },
    }


_FIT_NOTES = {
    "gemm": "bf16 and fp8 GEMM rows (F.linear / torch._scaled_mm, M 1..16384 over Llama-3.1-8B "
    "and Qwen3-30B-A3B shapes): t = gemm_latency_s + smooth_max(flops / (peak x eff), "
    "bytes / (hbm_bandwidth x memory_efficiency), gemm_smoothness)",
    "attention": "FlashAttention-2 (aten._flash_attention_forward) prefill rows (query x context, "
    "causal, GQA) and decode rows (batch x context): prefill t = latency + query_tokens x "
    "token_s + smooth_max(flops / (bf16 peak x attention_efficiency), bytes / decode bandwidth); "
    "decode t = latency + batch x seq_s + the same roofline term; unsplit decode rows (batch x "
    "KV heads >= attention_decode_split_below) at bf16 peak x attention_decode_efficiency x "
    "query heads per KV head",
    "elementwise": "RMSNorm, SiLU-and-mul, residual-add, RoPE and KV-write rows, one fit per op "
    "(t = kernels x latency + bytes / bandwidth), combined over the reference layer of measure.py "
    f"({REFERENCE_SMALL_OPS_PER_LAYER} small torch ops per layer): layer_overhead_s = the "
    "layer's kernels x their latencies, elementwise_latency_s = that / "
    f"{REFERENCE_SMALL_OPS_PER_LAYER}, elementwise_bandwidth_efficiency = the layer's bytes over "
    "the sum of bytes / per-op bandwidth, as a fraction of hbm_bandwidth",
    "moe": "Qwen3-30B-A3B grouped expert GEMM rows (torch._grouped_mm, tokens x experts "
    "touched), dense GEMM terms fixed: t = 2 x grouped_gemm_latency_s + smooth_max of the GEMM "
    "terms at grouped_gemm_efficiency of the dense rate and bandwidth + SiLU-and-mul",
    "gdn": "Qwen3.5-35B-A3B Gated DeltaNet rows timed with flash-linear-attention's Triton "
    "kernels (gdn.csv, method fla_*: fused_recurrent_gated_delta_rule decode steps, batch 1..256, "
    "fp32 state read and written; chunk_gated_delta_rule prefill chunks, 64..16384 tokens): t = "
    "latency (decode: per layer call, prefill: per sequence) + max(flops / (bf16 peak x "
    "linear_attention_efficiency), bytes / (hbm_bandwidth x "
    "linear_attention_bandwidth_efficiency)), flops = 6 x value_heads x key_dim x value_dim per "
    "token",
    "moe_routing": "Qwen3-30B-A3B routing rows (moe_routing.csv: softmax, top-8, sort by expert, "
    "counts and offsets, gather of the rows, weighting and index_add back; tokens 1..16384): "
    "t = moe_routing_latency_s + bytes / (hbm_bandwidth x moe_routing_bandwidth_efficiency), "
    "bytes = tokens x (10 x experts + 10 x top_k x hidden + 4 x hidden)",
}


def _check_routing_bytes(meas: Measurements) -> None:
    """The routing rows' byte counts must be the cost model's formula (one definition)."""
    r = meas.tables.get("moe_routing")
    if r is None:
        return
    want = r["tokens"].to_numpy(dtype=float) * np.array(
        [
            moe_routing_bytes_per_token(e, k, h)
            for e, k, h in zip(r["experts"], r["top_k"], r["hidden"], strict=True)
        ]
    )
    if not np.allclose(want, r["bytes"].to_numpy(dtype=float), rtol=1e-9):
        raise MeasurementError(
            f"{meas.path / 'moe_routing.csv'}: bytes do not match the cost model's routing bytes"
        )


def _fitted_profile(
    hw: HardwareProfile, v: dict, meas: Measurements, date: str | None, source_dir: str | None
) -> HardwareProfile:
    where = source_dir or str(meas.path)
    sources = dict(hw.sources)
    for name, group in FITTED_FIELDS.items():
        if name not in v:  # optional rows absent: value and source kept
            continue
        sources[name] = (
            f"fitted by servesim calibrate from {where} on {_today(date)} "
            f"({meas.gpu_name}, measured {meas.metadata.get('date', '?')}, "
            f"torch {meas.metadata.get('torch', '?')}): {_FIT_NOTES[group]}"
        )
    data = hw.model_dump()
    data.update(v)
    data["sources"] = sources
    return hardware_from_dict(data, f"fitted {hw.name}")


class _FlowList(list):
    """A list written in YAML flow style (``[a, b, ...]``): the residual rows stay compact."""


class _ProfileDumper(yaml.SafeDumper):
    """SafeDumper that writes :class:`_FlowList` in flow style, everything else as usual."""


_ProfileDumper.add_representer(
    _FlowList,
    lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True),
)


def profile_to_yaml(hw: HardwareProfile, header: str = "") -> str:
    """The profile as YAML, fields in declaration order, sources last.

    Residual rows (``calibration.residuals.<group>.log_ratios``) are written as flow lists.
    """
    data = hw.model_dump(exclude_none=False)
    sources = data.pop("sources")
    calib = data.pop("calibration", None)
    text = header
    text += yaml.safe_dump(data, sort_keys=False, width=100)
    if calib:
        calib = copy.deepcopy(calib)
        for group in (calib.get("residuals") or {}).values():
            if isinstance(group, dict) and isinstance(group.get("log_ratios"), list):
                group["log_ratios"] = _FlowList(group["log_ratios"])
        text += yaml.dump(
            {"calibration": calib}, Dumper=_ProfileDumper, sort_keys=False, width=100
        )
    text += yaml.safe_dump({"sources": sources}, sort_keys=False, width=10_000)
    return text


# ------------------------------------------------------------------------------ validate


def _step_batch(row) -> tuple[np.ndarray, np.ndarray]:
    new: list[int] = []
    ctx: list[int] = []
    if int(row["prefill_new_tokens"]) > 0:
        new.append(int(row["prefill_new_tokens"]))
        ctx.append(int(row["prefill_context_tokens"]))
    b = int(row["decode_batch"])
    new += [1] * b
    ctx += [int(row["decode_context_tokens"])] * b
    return np.array(new, dtype=np.int64), np.array(ctx, dtype=np.int64)


#: The model whose whole-step rows gate a profile's ``calibrated`` flag and validate-steps' exit
#: status (dense, measured on every GPU); other models' rows are reported beside it.
REFERENCE_STEP_MODEL = "llama-3.1-8b"

#: How validate-steps counts the experts an MoE step reads.
ROUTING_MODES = ("uniform", "measured")


def step_rows(meas: Measurements) -> list[dict]:
    """The whole-step rows of ``meas`` as batches: per row ``model_name``, ``model``
    (:class:`~simulator.models.ModelSpec`), ``kind``, ``batch`` (text), ``new`` and ``context``
    (int64 arrays of tokens per sequence), ``measured_seconds`` and ``experts_touched`` (mean
    experts an MoE layer of the step read, where recorded, else None).

    MeasurementError when ``steps.csv`` is missing, names an unknown model, or ran a different
    number of layers than the model has.
    """
    if "steps" not in meas.tables:
        raise MeasurementError(f"{meas.path / 'steps.csv'}: missing")
    models = {}
    out = []
    for _, r in meas.tables["steps"].iterrows():
        name = str(r["model"])
        if name not in models:
            try:
                model = load_model(name)
            except ValueError as exc:
                raise MeasurementError(f"steps.csv: model {name!r}: {exc}") from None
            if int(r["layers"]) != model.num_layers:
                raise MeasurementError(
                    f"steps.csv: rows of {name} ran {int(r['layers'])} layers, "
                    f"the model has {model.num_layers}"
                )
            models[name] = model
        new, ctx = _step_batch(r)
        out.append(
            {
                "model_name": name,
                "model": models[name],
                "kind": str(r["kind"]),
                "batch": _describe(r),
                "new": new,
                "context": ctx,
                "measured_seconds": float(r["seconds_graph"]),
                "experts_touched": _experts_touched(r),
            }
        )
    return out


def validate_steps(
    meas: Measurements, hw: HardwareProfile, worst: int = 5, routing: str = "uniform"
) -> dict:
    """Predicted vs measured for every whole-step row; summary per model and kind (prefill,
    decode, mixed, all: ``report["summary"][model][kind]``) and the worst rows.

    ``routing``: for MoE rows, ``"uniform"`` (the cost model as the simulator runs it) uses its
    expected count of touched experts for uniform routing; ``"measured"`` predicts with the
    experts the step's routing touched (``experts_touched_mean``, where the row has it), so the
    row checks the cost of the experts read apart from the formula.
    """
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing must be one of {ROUTING_MODES} (got {routing!r})")
    check_gpu(meas, hw)
    params_by_model: dict[str, np.ndarray] = {}
    rows = []
    for r in step_rows(meas):
        name = r["model_name"]
        if name not in params_by_model:
            params_by_model[name] = build_cost_params(r["model"], hw)
        params = params_by_model[name]
        touched = r["experts_touched"] if params[P_NUM_MOE_LAYERS] > 0 else None
        if touched is not None and routing == "measured":
            params = params.copy()
            params[P_MOE_TOUCHED] = touched
        new, ctx = r["new"], r["context"]
        predicted = float(step_seconds(params, new, ctx, len(new))) - params[P_STEP_OVERHEAD]
        measured = r["measured_seconds"]
        rows.append(
            {
                "kind": r["kind"],
                "model": name,
                "batch": r["batch"],
                "experts_touched": touched,
                "measured_seconds": measured,
                "predicted_seconds": predicted,
                "error_pct": 100.0 * (predicted / measured - 1.0),
            }
        )
    summary: dict[str, dict[str, dict]] = {}
    for name in params_by_model:
        mine = [x for x in rows if x["model"] == name]
        kinds = {}
        for kind in ("prefill", "decode", "mixed"):
            err = np.array([abs(x["error_pct"]) for x in mine if x["kind"] == kind])
            if err.size:
                kinds[kind] = _summary(err)
        kinds["all"] = _summary(np.array([abs(x["error_pct"]) for x in mine]))
        for s in kinds.values():
            s["meets_targets"] = bool(
                s["median_abs_pct"] <= TARGET_MEDIAN_PCT and s["p90_abs_pct"] <= TARGET_P90_PCT
            )
        summary[name] = kinds
    ranked = sorted(rows, key=lambda x: -abs(x["error_pct"]))
    return {
        "hardware": hw.name,
        "calibrated": hw.calibrated,
        "gpu_name": meas.gpu_name,
        "measurements": str(meas.path),
        "targets": {"median_abs_pct": TARGET_MEDIAN_PCT, "p90_abs_pct": TARGET_P90_PCT},
        "note": "measured: GPU time of the forward pass (CUDA graph replay); predicted: "
        "step_seconds minus step_overhead_s (host-side cost, not measured)",
        "routing": routing,
        "summary": summary,
        "worst": ranked[:worst],
        "rows": rows,
    }


def _experts_touched(r) -> float | None:
    """Mean experts touched per MoE layer, measured in the step (None where not recorded)."""
    v = r.get("experts_touched_mean")
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _describe(r) -> str:
    parts = []
    if int(r["prefill_new_tokens"]) > 0:
        parts.append(f"{int(r['prefill_new_tokens'])}@{int(r['prefill_context_tokens'])}")
    if int(r["decode_batch"]) > 0:
        parts.append(f"{int(r['decode_batch'])}x1@{int(r['decode_context_tokens'])}")
    return " + ".join(parts)


def allreduce_seconds(
    nbytes, world_size: int, latency_s: float, efficiency: float, hw: HardwareProfile
):
    """The cost model's ring all-reduce time for one all-reduce of ``nbytes`` over ``world_size``
    GPUs: ``2(n-1)/n x bytes / (per-direction NVLink bandwidth x efficiency) + latency``."""
    ring = 2.0 * (world_size - 1) / world_size
    return latency_s + ring * np.asarray(nbytes, dtype=float) / (
        hw.nvlink_bandwidth_per_direction * efficiency
    )


def fit_allreduce(csv_path, hw: HardwareProfile) -> tuple[float, float, float]:
    """Fit ``allreduce_latency_s`` and ``allreduce_efficiency`` to the ``all_reduce`` rows of a
    CSV from ``hardware_profiles/measure/allreduce.py`` (least squares on log error, so every row
    weighs by its relative error). Returns (latency_s, efficiency, median_abs_pct_error)."""
    df = _read_csv(Path(csv_path), ("op", "bytes", "seconds", "world_size"))
    df = df[df["op"] == "all_reduce"]
    if len(df) < 2:
        raise MeasurementError(f"{csv_path}: fewer than 2 all_reduce rows")
    worlds = df["world_size"].unique()
    if len(worlds) != 1 or int(worlds[0]) < 2:
        raise MeasurementError(f"{csv_path}: all_reduce rows need one world_size >= 2: {worlds}")
    world = int(worlds[0])
    nbytes = df["bytes"].to_numpy(dtype=float)
    secs = df["seconds"].to_numpy(dtype=float)
    if not np.all(secs > 0):
        raise MeasurementError(f"{csv_path}: non-positive seconds")

    def resid(x):
        return np.log(allreduce_seconds(nbytes, world, math.exp(x[0]), math.exp(x[1]), hw)) - (
            np.log(secs)
        )

    x0 = np.array([math.log(max(float(secs.min()) * 0.5, 1e-7)), math.log(0.5)])
    res = least_squares(resid, x0, method="lm", xtol=1e-14, ftol=1e-14, gtol=1e-14)
    if not res.success:
        raise CalibrationError(f"all-reduce fit did not converge: {res.message}")
    latency, eff = math.exp(res.x[0]), math.exp(res.x[1])
    pred = allreduce_seconds(nbytes, world, latency, eff, hw)
    err = float(np.median(np.abs(pred / secs - 1.0)) * 100.0)
    return latency, eff, err
