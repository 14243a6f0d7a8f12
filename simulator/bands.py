"""Prediction bands: how far a simulated number moves when the cost model is as wrong as it was
on the measured kernels.

``servesim calibrate`` keeps, per operator group, the signed residual of every measured row,
``ln(predicted / measured)`` (``calibration.residuals.<group>.log_ratios`` in the profile). A
*resampled cost model* draws one row per group (uniformly, with a seeded generator) and
multiplies that group's time by ``exp(-residual)``: the prediction that row's error would have
turned into its measurement. Groups of the cost model map onto the residual groups as follows:

=====================  ===========================================================
cost-model group       residual group
=====================  ===========================================================
``qkv_o``, ``mlp``     ``gemm_bf16`` or ``gemm_fp8`` (the replica's weight dtype)
``lm_head``            ``gemm_bf16`` (the head stays bf16)
``moe``                ``moe``
``attention_prefill``  ``attention_prefill``
``attention_decode``   ``attention_decode``
elementwise kernels    ``elementwise`` (their bandwidth and ``layer_overhead_s``)
=====================  ===========================================================

Not perturbed, for want of measurements: ``step_overhead_s`` (host side), ``allreduce`` (no
multi-GPU measurement) and ``linear_attention`` (no kernel measured). Groups are drawn
independently (their rows come from different files, so nothing pairs them); one draw applies
to every step of a run, i.e. the band describes a systematic error of the cost model, not noise
from step to step. Replicas on the same hardware profile share a draw.

:func:`run_band` simulates the experiment once per resampled cost model (same workload, same
seed) and reports the 10th/50th/90th percentiles of a few metrics across the runs;
:func:`step_band_coverage` checks the band against measured whole steps (``steps.csv``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from simulator.calibrate import REFERENCE_STEP_MODEL, check_gpu, step_rows
from simulator.costmodel import (
    GROUP_NAMES,
    P_DENSE_PARAMS,
    P_ELEM_RATE,
    P_GROUP_SCALE,
    P_LAYER_OVERHEAD,
    P_NUM_KV_LAYERS,
    P_NUM_MOE_LAYERS,
    P_STEP_OVERHEAD,
    P_WEIGHT_BYTES,
    build_cost_params,
    step_seconds,
)
from simulator.executor import TaskRunner
from simulator.hardware import HardwareProfile, load_hardware
from simulator.metrics import fmt_seconds

__all__ = [
    "BAND_METRICS",
    "BAND_QUANTILES",
    "NOT_PERTURBED",
    "BandError",
    "GroupResiduals",
    "band_rng",
    "check_plans",
    "draw_factors",
    "experiment_residuals",
    "format_band",
    "load_residuals",
    "perturb_params",
    "required_groups",
    "resampled_plans",
    "run_band",
    "step_band_coverage",
]

#: Percentiles reported across the resampled runs (the band is p10-p90, p50 its middle).
BAND_QUANTILES = (10, 50, 90)

#: Summary metrics a band reports, with their labels and units.
BAND_METRICS = {
    "ttft_p50": ("TTFT p50", "s"),
    "ttft_p95": ("TTFT p95", "s"),
    "tbt_p50": ("TBT p50", "s"),
    "tbt_p95": ("TBT p95", "s"),
    "e2e_p50": ("E2E p50", "s"),
    "output_tokens_per_s": ("output tok/s", "tokens/s"),
}

#: What a band leaves at its fitted value, and why (printed with every band).
NOT_PERTURBED = (
    "step_overhead_s (host side, estimated), all-reduce and linear attention "
    "(no measurements)"
)

#: Mixed into every band seed so band draws never coincide with other streams of the same seed.
_BAND_STREAM = 0x62616E64  # "band"


class BandError(ValueError):
    """A band that cannot be drawn (a profile without residuals); one line for the user."""


class GroupResiduals(BaseModel):
    """One operator group's residual block in a profile's ``calibration.residuals``."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    #: ``ln(predicted / measured)`` per measured row (dimensionless)
    log_ratios: list[float] = Field(min_length=1)


def _weight_dtype(params: np.ndarray) -> str:
    return "fp8" if params[P_WEIGHT_BYTES] == 1.0 else "bf16"


def _group_map(params: np.ndarray) -> dict[str, str]:
    """Cost-model group -> residual group for the groups ``params`` can spend time in."""
    gemm = f"gemm_{_weight_dtype(params)}"
    out = {"qkv_o": gemm, "lm_head": "gemm_bf16"}
    if params[P_DENSE_PARAMS] > 0.0:
        out["mlp"] = gemm
    if params[P_NUM_MOE_LAYERS] > 0.0:
        out["moe"] = "moe"
    if params[P_NUM_KV_LAYERS] > 0.0:
        out["attention_prefill"] = "attention_prefill"
        out["attention_decode"] = "attention_decode"
    return out


def required_groups(params: np.ndarray) -> set[str]:
    """Residual groups a band needs for a replica with cost parameters ``params``."""
    return set(_group_map(params).values()) | {"elementwise"}


def load_residuals(hw: HardwareProfile) -> dict[str, np.ndarray]:
    """Per operator group, the profile's signed log residuals (float64 arrays).

    Raises :class:`BandError` (one line naming the profile and field) when the profile keeps no
    ``calibration.residuals.<group>.log_ratios`` (an uncalibrated profile such as B200, or one
    fitted before residual rows were kept) or when a group's rows are malformed.
    """
    residuals = (hw.calibration or {}).get("residuals") or {}
    out: dict[str, np.ndarray] = {}
    if isinstance(residuals, Mapping):
        for group, block in residuals.items():
            if not isinstance(block, Mapping) or "log_ratios" not in block:
                continue
            try:
                rows = GroupResiduals(**block).log_ratios
            except ValidationError as exc:
                err = exc.errors()[0]
                raise BandError(
                    f"hardware profile {hw.name!r}: calibration.residuals.{group}.log_ratios: "
                    f"{err['msg']}"
                ) from None
            out[str(group)] = np.asarray(rows, dtype=np.float64)
    if not out:
        raise BandError(
            f"hardware profile {hw.name!r} has no calibration residuals "
            "(calibration.residuals.<group>.log_ratios): prediction bands need a profile "
            "fitted by servesim calibrate"
        )
    return out


def draw_factors(residuals: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, float]:
    """One resampled cost model: per residual group, ``exp(-r)`` for one row ``r`` drawn
    uniformly from that group's log residuals (groups in sorted order, so a seeded ``rng``
    gives the same factors every time). A factor multiplies the group's predicted seconds."""
    out = {}
    for group in sorted(residuals):
        rows = residuals[group]
        out[group] = math.exp(-float(rows[int(rng.integers(rows.size))]))
    return out


def perturb_params(params: np.ndarray, factors: Mapping[str, float]) -> np.ndarray:
    """A copy of cost parameters ``params`` whose groups take ``factors`` (per residual group,
    multipliers of seconds; groups absent from ``factors`` are left as they are).

    GEMM, attention, MoE and LM-head groups go through their ``P_GROUP_SCALE`` entries; the
    elementwise factor divides the elementwise bandwidth and multiplies ``layer_overhead_s``.
    An all-zero vector (an n-gram drafter's) is returned unchanged.
    """
    out = np.array(params, dtype=np.float64, copy=True)
    if not out.any():
        return out
    mapping = _group_map(out)
    for g, name in enumerate(GROUP_NAMES):
        residual_group = mapping.get(name)
        if residual_group is not None and residual_group in factors:
            out[P_GROUP_SCALE + g] *= factors[residual_group]
    f = factors.get("elementwise")
    if f is not None:
        out[P_ELEM_RATE] /= f
        out[P_LAYER_OVERHEAD] *= f
    return out


def band_rng(seed: int, run: int) -> np.random.Generator:
    """The generator of resampled cost model ``run`` for experiment seed ``seed``: run ``i``
    draws the same factors whatever the number of runs."""
    return np.random.default_rng([_BAND_STREAM, int(seed), int(run)])


def check_plans(
    plans: Sequence, residuals_by_hw: Mapping[str, Mapping[str, np.ndarray]], where: str = ""
) -> None:
    """BandError unless every replica's profile has the residual groups its model needs;
    ``where`` (the experiment's file) starts the message."""
    prefix = f"{where}: " if where else ""
    for pl in plans:
        have = residuals_by_hw[pl.hardware]
        missing = sorted(required_groups(pl.cost_params) - set(have))
        if missing:
            raise BandError(
                f"{prefix}--band: hardware profile {pl.hardware!r}: calibration.residuals lacks "
                f"{', '.join(missing)} (needed by {pl.model} on it)"
            )


def resampled_plans(
    plans: Sequence, residuals_by_hw: Mapping[str, Mapping[str, np.ndarray]], seed: int, run: int
) -> tuple[list, dict[str, dict[str, float]]]:
    """Replica plans with resampled cost models (one draw per hardware profile, shared by its
    replicas) and the factors drawn, ``{hardware: {residual group: factor}}``."""
    rng = band_rng(seed, run)
    factors = {hw: draw_factors(residuals_by_hw[hw], rng) for hw in sorted(residuals_by_hw)}
    out = []
    for pl in plans:
        f = factors[pl.hardware]
        draft = pl.draft_params
        out.append(
            dataclasses.replace(
                pl,
                cost_params=perturb_params(pl.cost_params, f),
                draft_params=None if draft is None else perturb_params(draft, f),
            )
        )
    return out, factors


def _band_task(task) -> dict[str, float]:
    """Simulate one resampled cost model (a module-level function, for the process pool)."""
    # imported here, as the CLI does, so that commands other than run start without the core
    from simulator.simulate import simulate

    exp, plans = task
    summary = simulate(exp, progress=False, plans=plans).summary()
    return {m: float(summary[m]) for m in BAND_METRICS}


def run_band(
    exp,
    plans: Sequence,
    residuals_by_hw: Mapping[str, Mapping[str, np.ndarray]],
    runs: int,
    point: Mapping[str, float],
    progress: bool | None = None,
    workers: int | None = None,
) -> dict:
    """Simulate ``exp`` once per resampled cost model (``runs`` of them, seeded by the
    experiment's seed) on a :class:`~simulator.executor.TaskRunner`; returns the band.

    ``plans`` are the experiment's replica plans, ``residuals_by_hw`` each profile's residuals
    (:func:`load_residuals`), ``point`` the unperturbed run's summary. The returned dict holds
    ``runs``, ``seed``, ``quantiles``, per metric ``{"point", "p10", "p50", "p90", "unit"}``,
    every run's values and the factors each run drew.
    """
    if runs < 2:
        raise BandError(f"--band: must be 0 (off) or at least 2 runs (got {runs})")
    check_plans(plans, residuals_by_hw)
    tasks = []
    drawn = []
    for i in range(runs):
        new_plans, factors = resampled_plans(plans, residuals_by_hw, exp.seed, i)
        tasks.append((exp, new_plans))
        drawn.append(factors)
    with TaskRunner(workers=workers, progress=progress) as runner:
        values = runner.map(_band_task, tasks, label=f"band of {exp.name}")
    metrics = {}
    for m, (label, unit) in BAND_METRICS.items():
        column = np.array([v[m] for v in values], dtype=np.float64)
        q = np.percentile(column, BAND_QUANTILES) if np.isfinite(column).all() else [math.nan] * 3
        metrics[m] = {
            "label": label,
            "unit": unit,
            "point": float(point[m]),
            **{f"p{p}": float(x) for p, x in zip(BAND_QUANTILES, q, strict=True)},
        }
    return {
        "runs": runs,
        "seed": int(exp.seed),
        "quantiles": list(BAND_QUANTILES),
        "hardware": sorted(residuals_by_hw),
        "metrics": metrics,
        "values": {m: [v[m] for v in values] for m in BAND_METRICS},
        "factors": drawn,
        "not_perturbed": NOT_PERTURBED,
    }


def _fmt(x: float, unit: str) -> str:
    if unit == "tokens/s" and math.isfinite(x):
        return f"{x:,.0f}"
    return fmt_seconds(x)


def format_band(band: dict) -> str:
    """The band as a text table: point estimate and p10/p50/p90 across resampled runs."""
    hws = ", ".join(band["hardware"])
    lines = [
        f"prediction band: {band['runs']} runs with cost models resampled from the operator-fit "
        f"residuals of {hws} (seed {band['seed']})",
        f"{'metric':<14}{'point':>11}{'p10':>11}{'p50':>11}{'p90':>11}{'p10-p90':>10}",
    ]
    for m in band["metrics"].values():
        width = (m["p90"] - m["p10"]) / m["point"] * 100 if m["point"] else math.nan
        cells = "".join(f"{_fmt(m[k], m['unit']):>11}" for k in ("point", "p10", "p50", "p90"))
        width_text = f"{width:.1f}%" if math.isfinite(width) else "-"
        lines.append(f"{m['label']:<14}{cells}{width_text:>10}")
    lines.append(f"not perturbed: {band['not_perturbed']}")
    return "\n".join(lines)


def step_band_coverage(meas, hw: HardwareProfile, draws: int = 200, seed: int = 0) -> dict:
    """How often measured whole steps (``steps.csv``) fall inside the p10-p90 band of
    ``draws`` resampled cost models of ``hw``.

    Predictions are :func:`~simulator.costmodel.step_seconds` minus ``step_overhead_s``, as in
    :func:`simulator.calibrate.validate_steps`. Only the rows of the reference step model
    (``calibrate.REFERENCE_STEP_MODEL``, measured on every GPU) are counted. Returns ``{"draws", "seed", "band",
    "coverage", "by_kind": {kind: fraction}, "median_half_width_pct", "rows": [...]}``; a
    fraction near 0.8 means the band is as wide as the errors; above, wider (conservative).
    """
    check_gpu(meas, hw)
    residuals = load_residuals(hw)
    factors = [draw_factors(residuals, band_rng(seed, i)) for i in range(draws)]
    lo_q, _, hi_q = BAND_QUANTILES
    rows = []
    params_by_model: dict[str, list[np.ndarray]] = {}
    for row in step_rows(meas):
        name = row["model_name"]
        if name != REFERENCE_STEP_MODEL:
            continue
        if name not in params_by_model:
            base = build_cost_params(row["model"], hw)
            missing = sorted(required_groups(base) - set(residuals))
            if missing:
                raise BandError(
                    f"hardware profile {hw.name!r}: calibration.residuals lacks "
                    f"{', '.join(missing)}"
                )
            params_by_model[name] = [perturb_params(base, f) for f in factors]
        new, ctx = row["new"], row["context"]
        preds = np.array(
            [float(step_seconds(p, new, ctx, len(new))) - p[P_STEP_OVERHEAD]
             for p in params_by_model[name]]
        )
        lo, mid, hi = np.percentile(preds, BAND_QUANTILES)
        measured = row["measured_seconds"]
        rows.append(
            {
                "kind": row["kind"],
                "batch": row["batch"],
                "measured_seconds": measured,
                "p10_seconds": float(lo),
                "p50_seconds": float(mid),
                "p90_seconds": float(hi),
                "inside": bool(lo <= measured <= hi),
                "half_width_pct": float(50.0 * (hi - lo) / mid),
            }
        )
    by_kind = {}
    for kind in sorted({r["kind"] for r in rows}):
        sel = [r["inside"] for r in rows if r["kind"] == kind]
        by_kind[kind] = sum(sel) / len(sel)
    return {
        "hardware": hw.name,
        "draws": draws,
        "seed": seed,
        "band": [lo_q, hi_q],
        "coverage": sum(r["inside"] for r in rows) / len(rows),
        "by_kind": by_kind,
        "median_half_width_pct": float(np.median([r["half_width_pct"] for r in rows])),
        "rows": rows,
    }


def experiment_residuals(exp) -> dict[str, dict[str, np.ndarray]]:
    """Residuals of every hardware profile ``exp``'s replicas use, keyed by profile name.

    BandError (one line starting with the experiment's file) when a profile keeps none.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for gi, group in enumerate(exp.cluster.replicas):
        ref = group.hardware or exp.hardware
        hw = load_hardware(ref)
        if hw.name in out:
            continue
        try:
            out[hw.name] = load_residuals(hw)
        except BandError as exc:
            field = f"cluster.replicas[{gi}].hardware" if group.hardware else "hardware"
            raise BandError(f"{exp._source}: {field} = {ref!r}: --band: {exc}") from None
    return out
