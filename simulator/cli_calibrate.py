"""``servesim calibrate`` and ``servesim validate-steps``: fit a profile, check whole steps.

Examples::

    servesim calibrate hardware_profiles/measurements/h100-sxm -o h100-fitted.yaml
    servesim validate-steps hardware_profiles/measurements/h100-sxm --hardware h100-fitted.yaml

Exit status: 0 done; 1 a fit that did not converge (no profile written, the previous one kept)
or, for validate-steps, targets not met; 2 bad input (missing file or column, unit mismatch,
GPU name not matching the profile).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import click

from simulator.bands import BandError, step_band_coverage
from simulator.calibrate import (
    REFERENCE_STEP_MODEL,
    ROUTING_MODES,
    TARGET_MEDIAN_PCT,
    TARGET_P90_PCT,
    CalibrationError,
    MeasurementError,
    calibrate,
    check_gpu,
    infer_hardware,
    load_measurements,
    profile_to_yaml,
    validate_steps,
)
from simulator.hardware import HardwareProfile, HardwareProfileError, load_hardware

__all__ = ["calibrate_command", "validate_steps_command"]


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"error: {msg}", err=True)
    raise SystemExit(code)


def _hardware(ref: str | None, meas) -> HardwareProfile:
    try:
        hw = load_hardware(ref) if ref else infer_hardware(meas)
        check_gpu(meas, hw)
    except (HardwareProfileError, MeasurementError) as exc:
        _fail(str(exc).splitlines()[0])
    return hw


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@click.command("calibrate")
@click.argument("measurements", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), required=True, help="Profile YAML to write."
)
@click.option(
    "--hardware",
    "hw_ref",
    default=None,
    help="Starting profile (peaks kept): shipped name or YAML path; default from the GPU name.",
)
@click.option(
    "--max-evaluations",
    type=click.IntRange(min=1),
    default=None,
    help="Cap on model evaluations per fit (a fit that hits it has not converged).",
)
@click.option(
    "--date",
    "fit_date",
    default=None,
    help="Date recorded as the fit's (YYYY-MM-DD; default today): re-fitting committed "
    "measurements with their original date reproduces the committed profile.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the fit as one JSON object.")
def calibrate_command(measurements, output, hw_ref, max_evaluations, fit_date, as_json):
    """Fit a hardware profile's efficiencies to operator measurements (never to step rows)."""
    if fit_date is not None:
        try:
            fit_date = datetime.date.fromisoformat(fit_date).isoformat()
        except ValueError:
            _fail(f"--date: not a YYYY-MM-DD date (got {fit_date!r})")
    try:
        meas = load_measurements(measurements)
    except MeasurementError as exc:
        _fail(str(exc))
    hw = _hardware(hw_ref, meas)
    try:
        fit = calibrate(
            meas,
            hw,
            max_nfev=max_evaluations,
            date=fit_date,
            source_dir=_display_path(Path(measurements)),
        )
    except MeasurementError as exc:
        _fail(str(exc))
    except CalibrationError as exc:
        kept = f"{output} left as it was" if output.exists() else f"{output} not written"
        _fail(f"{exc}; {kept}", code=1)
    profile = fit.profile
    try:  # calibrated only when the whole steps meet the targets on this GPU
        report = validate_steps(meas, profile) if "steps" in meas.tables else None
    except MeasurementError:
        report = None
    met = report is not None and _all_met(report)
    profile = profile.model_copy(update={"calibrated": met})
    header = (
        f"# {profile.name}: efficiencies fitted by servesim calibrate from "
        f"{_display_path(Path(measurements))} ({meas.gpu_name}).\n"
        f"# calibrated: {str(met).lower()} (validate-steps targets: median <= "
        f"{TARGET_MEDIAN_PCT:g} %, p90 <= {TARGET_P90_PCT:g} % per kind).\n"
    )
    output.write_text(profile_to_yaml(profile, header))
    if as_json:
        click.echo(
            json.dumps(
                {
                    "output": str(output),
                    "hardware": profile.name,
                    "calibrated": met,
                    "values": fit.values,
                    "residuals": fit.residuals,
                    "steps": report["summary"] if report else None,
                }
            )
        )
        return
    click.echo(f"fitted {profile.name} from {meas.gpu_name} -> {output}")
    click.echo(_residual_table(fit.residuals))
    if report:
        click.echo("")
        click.echo(_summary_table(report))
    click.echo(f"calibrated: {str(met).lower()}")


def _residual_table(residuals: dict) -> str:
    lines = [f"{'operator group':20s} {'rows':>5s} {'median %':>9s} {'p90 %':>7s} {'max %':>7s}"]
    for name, r in residuals.items():
        lines.append(
            f"{name:20s} {r['rows']:5d} {r['median_abs_pct']:9.1f} {r['p90_abs_pct']:7.1f} "
            f"{r['max_abs_pct']:7.1f}"
        )
    return "\n".join(lines)


def _all_met(report: dict) -> bool:
    """Targets met by every kind of the reference model's rows (the profile's ``calibrated``
    flag and the exit status); other models' rows are reported, not gating."""
    kinds = report["summary"].get(REFERENCE_STEP_MODEL, {})
    return bool(kinds) and all(s["meets_targets"] for s in kinds.values())


def _summary_table(report: dict) -> str:
    lines = [
        f"{'model':16s} {'steps':8s} {'rows':>5s} {'median %':>9s} {'p90 %':>7s} {'max %':>7s}"
        "  targets"
    ]
    for model, kinds in report["summary"].items():
        for kind, s in kinds.items():
            lines.append(
                f"{model:16s} {kind:8s} {s['rows']:5d} {s['median_abs_pct']:9.1f} "
                f"{s['p90_abs_pct']:7.1f} {s['max_abs_pct']:7.1f}  "
                f"{'met' if s['meets_targets'] else 'NOT met'}"
            )
    return "\n".join(lines)


@click.command("validate-steps")
@click.argument("measurements", type=click.Path(path_type=Path))
@click.option(
    "--hardware",
    "hw_ref",
    default=None,
    help="Profile to check: shipped name or YAML path; default from the GPU name.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with every row.")
@click.option("--worst", type=click.IntRange(min=0), default=5, show_default=True)
@click.option(
    "--routing",
    type=click.Choice(ROUTING_MODES),
    default="uniform",
    show_default=True,
    help="MoE rows: experts touched from the cost model's uniform-routing formula, or as "
    "measured in the step (checks the cost of the experts read, apart from the formula).",
)
def validate_steps_command(measurements, hw_ref, as_json, worst, routing):
    """Predicted vs measured whole steps: absolute % error per model and kind, worst rows."""
    try:
        meas = load_measurements(measurements, need_operators=False)
    except MeasurementError as exc:
        _fail(str(exc))
    hw = _hardware(hw_ref, meas)
    try:
        report = validate_steps(meas, hw, worst=worst, routing=routing)
    except MeasurementError as exc:
        _fail(str(exc))
    met = _all_met(report)
    try:  # the prediction band's check, where the profile keeps residual rows
        coverage = step_band_coverage(meas, hw)
    except BandError:  # none kept (an uncalibrated profile): no band to check
        coverage = None
    if coverage is not None:
        report["band_coverage"] = {k: v for k, v in coverage.items() if k != "rows"}
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(
            f"{hw.name} ({'calibrated' if hw.calibrated else 'uncalibrated'} profile) vs "
            f"{meas.gpu_name}: {len(report['rows'])} step rows"
        )
        click.echo(report["note"])
        click.echo(
            f"targets gate {REFERENCE_STEP_MODEL} (the profile's calibrated flag, the exit "
            f"status); MoE rows predicted with {report['routing']} routing"
        )
        click.echo(_summary_table(report))
        if report["worst"]:
            click.echo("\nworst rows:")
            for r in report["worst"]:
                click.echo(
                    f"  {r['model']:16s} {r['kind']:8s} {r['batch']:24s} "
                    f"measured {r['measured_seconds'] * 1e3:8.2f}"
                    f" ms  predicted {r['predicted_seconds'] * 1e3:8.2f} ms  "
                    f"{r['error_pct']:+6.1f} %"
                )
        if coverage is not None:
            lo, hi = coverage["band"]
            kinds = ", ".join(f"{k} {v:.0%}" for k, v in coverage["by_kind"].items())
            click.echo(
                f"\nprediction band (p{lo}-p{hi} of {coverage['draws']} cost models resampled from "
                f"operator residuals): covers {coverage['coverage']:.0%} of step rows ({kinds}; "
                f"nominal {(hi - lo) / 100:.0%}); median half-width "
                f"{coverage['median_half_width_pct']:.1f} %"
            )
    if not met:
        raise SystemExit(1)
