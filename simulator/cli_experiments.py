"""``servesim capacity | sweep | plot | trace``: experiments on top of ``simulate``.

User errors (bad study file, unknown SLO metric, empty grid, unreachable scheduler) print one
line and exit 2. ``capacity`` exits 1 when the lower end of the load range is already
unhealthy (there is no capacity to report), 0 otherwise.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click
import pandas as pd

from simulator.config import ExperimentError
from simulator.executor import ExecutorError, TaskRunner
from simulator.search import (
    LOAD_UNIT_TEXT,
    SLO,
    CapacityResult,
    CapacityTask,
    StudyError,
    apply_overrides,
    capacity_search,
    fleet_search,
    format_metric,
    grid_points,
    load_capacity_study,
    run_capacity_task,
)

_SHOWN = (
    "ttft_p95",
    "ttft_p99",
    "tbt_p95",
    "tbt_p99",
    "e2e_p95",
    "error_rate",
    "output_tokens_per_s_per_gpu",
    "tokens_per_s_per_user",
    "prefix_cache_hit_rate",
)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _runner_options(f):
    f = click.option(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="run on a Dask distributed scheduler (e.g. tcp://host:8786)",
    )(f)
    f = click.option(
        "--workers",
        type=int,
        default=None,
        help="local worker processes (default: all cores; 1 = this process)",
    )(f)
    f = click.option(
        "--progress/--no-progress",
        default=None,
        help="force the progress bar on/off (default: on for a terminal)",
    )(f)
    return f


def _make_runner(scheduler, workers, progress) -> TaskRunner:
    try:
        return TaskRunner(scheduler=scheduler, workers=workers, progress=progress)
    except ExecutorError as exc:
        _fail(str(exc))
        raise  # unreachable


def _json_default(v):
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return str(v)


# ----------------------------------------------------------------------------- capacity
def _print_capacity(res: CapacityResult, slos: list[SLO], unit_text: str) -> None:
    if res.status == "low_unhealthy":
        p = res.probes[0]
        click.echo(
            f"NO HEALTHY LOAD: the lower end {p.load:g} {unit_text} already fails "
            f"{'; '.join(p.violations)}"
        )
    elif res.status == "high_healthy":
        click.echo(
            f"max healthy load: >= {res.max_healthy_load:.4g} {unit_text} "
            "(the whole range is healthy)"
        )
    else:
        click.echo(f"max healthy load:   {res.max_healthy_load:.4g} {unit_text}")
        click.echo(
            f"first failing load: {res.first_failing_load:.4g} {unit_text} "
            f"(fails {'; '.join(res.violations_at_failing)})"
        )
    if res.failed_first:
        click.echo(f"SLO that failed first: {res.failed_first}")
    cols = [
        ("healthy", res.healthy_metrics, res.max_healthy_load),
        ("failing", res.failing_metrics, res.first_failing_load),
    ]
    if res.status == "low_unhealthy":
        cols = [("lower end", res.probes[0].metrics, res.probes[0].load)]
    cols = [c for c in cols if c[1]]
    if cols:
        click.echo(f"{'metric':<30}" + "".join(f"{f'{n} @ {x:.4g}':>24}" for n, _, x in cols))
        keys = list(dict.fromkeys([s.metric for s in slos] + list(_SHOWN)))
        for k in keys:
            click.echo(
                f"{k:<30}" + "".join(f"{format_metric(k, m.get(k)):>24}" for _, m, _ in cols)
            )
        w = cols[0][1]
        state = "stable" if w.get("stable") else "never stabilized"
        click.echo(f"(judged on [{w['window_start']:.0f} s, {w['window_end']:.0f} s): {state})")
    click.echo("search trace:")
    table = res.trace_table(slos)
    for s in slos:
        table[s.metric] = table[s.metric].map(lambda v, m=s.metric: format_metric(m, v))
    table["load"] = table["load"].map(lambda v: f"{v:.4g}")
    click.echo(table.drop(columns=["violations"]).to_string(index=False))
    for note in res.notes:
        click.echo(f"note: {note}")
    click.echo(f"{len(res.probes)} probes in {res.wall_seconds:.1f} s")


@click.command("capacity")
@click.argument("study_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="write capacity.json and capacity_trace.csv here (default: outputs.dir)",
)
@_runner_options
def capacity_command(
    study_file: Path, as_json: bool, out_dir: Path | None, scheduler, workers, progress
) -> None:
    """Find the highest load that stays healthy under the SLOs of STUDY_FILE (YAML)."""
    try:
        study, exp = load_capacity_study(study_file)
    except (StudyError, ExperimentError) as exc:
        _fail(str(exc))
        return
    unit_text = LOAD_UNIT_TEXT[study.load.unit]
    runner = _make_runner(scheduler, workers, progress)
    target = out_dir or (Path(study.outputs["dir"]) if "dir" in study.outputs else None)
    with runner:
        if not as_json:
            click.echo(
                f"capacity study {study.name}: {exp.model} on {exp.hardware}, load in "
                f"{unit_text}, SLOs: {', '.join(str(s) for s in study.slos)}; "
                f"{'stable window' if study.steady_state else 'whole run'}; "
                f"running on {runner.description}"
            )
        try:
            if study.fleet is not None:
                _run_fleet(study, exp, runner, as_json, target)
                return
            if study.grid:
                _run_capacity_grid(study, exp, runner, as_json, target, study_file)
                return
            res = capacity_search(
                exp, study.load, study.slos, study.search, study.steady_state, runner, study.name
            )
        except (StudyError, ExperimentError) as exc:
            _fail(str(exc))
            return
    if target is not None:
        target.mkdir(parents=True, exist_ok=True)
        (target / "capacity.json").write_text(
            json.dumps(res.to_json(), indent=2, default=_json_default)
        )
        res.trace_table(study.slos).to_csv(target / "capacity_trace.csv", index=False)
    if as_json:
        click.echo(json.dumps(res.to_json(), default=_json_default))
    else:
        _print_capacity(res, study.slos, unit_text)
        if target is not None:
            click.echo(f"results written to {target}/")
    if res.status == "low_unhealthy":
        sys.exit(1)


def _run_capacity_grid(study, exp, runner, as_json, target, source) -> None:
    combos = grid_points(study.grid)
    tasks = [
        CapacityTask(
            apply_overrides(exp, c.values, str(source), Path(source).parent),
            study.load,
            tuple(study.slos),
            study.search,
            study.steady_state,
            c.label,
        )
        for c in combos
    ]
    results = runner.map(run_capacity_task, tasks, label=f"capacity {study.name}")
    rows, full = [], []
    for combo, res in zip(combos, results, strict=True):
        row = {"config": combo.label, **combo.names}
        if isinstance(res, dict):
            row |= {"status": "error", "error": res["error"]}
        else:
            row |= {
                "status": res.status,
                "max_healthy_load": res.max_healthy_load,
                "first_failing_load": res.first_failing_load,
                "failed_first": res.failed_first,
                "probes": len(res.probes),
            }
            for k in ("ttft_p95", "tbt_p95", "output_tokens_per_s_per_gpu", "concurrent_sessions"):
                row[f"{k}_at_max"] = (res.healthy_metrics or {}).get(k)
            full.append({"config": combo.label, **res.to_json()})
        rows.append(row)
    table = pd.DataFrame(rows)
    if target is not None:
        target.mkdir(parents=True, exist_ok=True)
        table.to_csv(target / "capacity_grid.csv", index=False)
        (target / "capacity.json").write_text(json.dumps(full, indent=2, default=_json_default))
    if as_json:
        click.echo(json.dumps(rows, default=_json_default))
        return
    shown = table.copy()
    if "concurrent_sessions_at_max" in shown:
        shown["concurrent_sessions_at_max"] = shown["concurrent_sessions_at_max"].map(
            lambda v: "-" if v is None or pd.isna(v) else f"{v:.1f}"
        )
    for k in ("max_healthy_load", "first_failing_load"):
        if k in shown:
            shown[k] = shown[k].map(lambda v: "-" if v is None or pd.isna(v) else f"{v:.4g}")
    cols = [
        c
        for c in (
            "config",
            "status",
            "max_healthy_load",
            "first_failing_load",
            "failed_first",
            "concurrent_sessions_at_max",
            "probes",
            "error",
        )
        if c in shown
    ]
    click.echo(shown[cols].to_string(index=False))


def _run_fleet(study, exp, runner, as_json, target) -> None:
    f = study.fleet
    res = fleet_search(
        exp,
        f.target_load,
        study.load.unit,
        study.slos,
        study.load.duration_s,
        f.max_replicas,
        study.steady_state,
        runner,
    )
    if target is not None:
        target.mkdir(parents=True, exist_ok=True)
        (target / "fleet.json").write_text(
            json.dumps(res.to_json(), indent=2, default=_json_default)
        )
    if as_json:
        click.echo(json.dumps(res.to_json(), default=_json_default))
        return
    unit_text = LOAD_UNIT_TEXT[study.load.unit]
    if res.status == "found":
        click.echo(
            f"fleet for {f.target_load:g} {unit_text}: {res.replicas} replica(s) = "
            f"{res.gpus} GPU(s) ({res.gpus_per_replica} per replica)"
        )
    else:
        click.echo(f"no fleet up to {f.max_replicas} replicas holds {f.target_load:g} {unit_text}")
    click.echo(pd.DataFrame(res.probes).to_string(index=False))
    for note in res.notes:
        click.echo(f"note: {note}")


# -------------------------------------------------------------------------------- sweep
@click.command("sweep")
@click.argument("sweep_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="output directory (default: outputs.dir, else runs/NAME)",
)
@click.option("--json", "as_json", is_flag=True, help="print the frontier as one JSON object")
@_runner_options
def sweep_command(
    sweep_file: Path, out_dir: Path | None, as_json: bool, scheduler, workers, progress
) -> None:
    """Simulate every grid point x load of SWEEP_FILE; write sweep.parquet and the frontier."""
    from simulator.sweep import load_sweep, timed_sweep, write_sweep

    try:
        study, exp = load_sweep(sweep_file)
    except (StudyError, ExperimentError) as exc:
        _fail(str(exc))
        return
    runner = _make_runner(scheduler, workers, progress)
    with runner:
        if not as_json:
            n_cfg = len(grid_points(study.grid))
            n_load = len(study.loads.points()) if study.loads else 1
            n_seed = len(study.seeds or [exp.seed])
            click.echo(
                f"sweep {study.name}: {n_cfg} configurations x {n_load} loads x "
                f"{n_seed} seeds = {n_cfg * n_load * n_seed} runs on {runner.description}"
            )
        try:
            requests: list = []
            df, frontier, wall = timed_sweep(
                study, exp, runner, str(sweep_file), sweep_file.parent, requests
            )
        except StudyError as exc:
            _fail(str(exc))
            return
    target = out_dir or Path(study.outputs.dir or f"runs/{study.name}")
    figures = write_sweep(df, frontier, study, target, wall, requests)
    x, y = study.frontier.x, study.frontier.y
    if as_json:
        click.echo(
            json.dumps(
                {
                    "points": len(df),
                    "wall_seconds": wall,
                    "frontier": [
                        {"config": r["config"], "load": r["load"], x: r[x], y: r[y]}
                        for _, r in frontier.iterrows()
                    ],
                },
                default=_json_default,
            )
        )
        return
    errors = df[df["error"] != ""]
    click.echo(f"{len(df)} runs in {wall:.1f} s ({len(df) / max(wall, 1e-9):.1f} runs/s)")
    if len(errors):
        click.echo(
            f"{len(errors)} runs could not be simulated, e.g. {errors['config'].iloc[0]}: "
            f"{errors['error'].iloc[0]}"
        )
    if "healthy" in df:
        click.echo(f"healthy under the SLOs: {int(df['healthy'].sum())} of {len(df)}")
    click.echo(f"Pareto frontier ({y} vs {x}), {len(frontier)} points:")
    if len(frontier):
        shown = frontier[["config", "load", x, y]].copy()
        click.echo(shown.to_string(index=False, float_format=lambda v: f"{v:,.4g}"))
    if len(df) <= 24:
        click.echo("runs (stable window):" if study.steady_state else "runs (whole load period):")
        click.echo(_points_table(df).to_string(index=False))
    click.echo(f"results written to {target}/ (sweep.parquet, frontier.csv, sweep.json)")
    for path in figures:
        click.echo(f"  figure: {path}")


_TABLE = {
    "ttft_p50": "TTFT p50",
    "ttft_p99": "TTFT p99",
    "tbt_p99": "TBT p99",
    "e2e_p95": "E2E p95",
    "prefix_cache_hit_rate": "hit rate",
    "decode_overlap_ge2": "dec>=2",
    "decode_overlap_ge8": "dec>=8",
    "output_tokens_per_s_per_gpu": "tok/s/GPU",
    "tokens_per_s_per_user": "tok/s/user",
    "concurrent_sessions": "sessions",
}


def _points_table(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"config": df["config"], "load": df["load"]})
    for key, name in _TABLE.items():
        if key not in df:
            continue
        if key.startswith(("ttft", "tbt", "e2e")):
            out[name] = df[key].map(lambda v, k=key: format_metric(k, v))
        elif key.startswith(("prefix", "decode")):
            out[name] = df[key].map(lambda v: "-" if pd.isna(v) else f"{v:.1%}")
        else:
            out[name] = df[key].map(lambda v: "-" if pd.isna(v) else f"{v:,.1f}")
    if "healthy" in df:
        out["healthy"] = df["healthy"]
    if (df["error"] != "").any():
        out["error"] = df["error"].str.slice(0, 60)
    return out


# --------------------------------------------------------------------------------- plot
@click.command("plot")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="where to write the PNGs (default: RUN_DIR/plots)",
)
def plot_command(run_dir: Path, out_dir: Path | None) -> None:
    """Draw the figures of a run, sweep or capacity directory as PNGs."""
    from simulator.plots import PlotError, plot_directory

    try:
        written, skipped = plot_directory(run_dir, out_dir or run_dir / "plots")
    except PlotError as exc:
        _fail(str(exc))
        return
    for path in written:
        click.echo(f"wrote {path}")
    for why in skipped:
        click.echo(f"skipped: {why}")


# -------------------------------------------------------------------------------- trace
@click.command("trace")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="trace JSON to write (default: SOURCE_DIR/trace.json)",
)
@click.option("--start", type=float, default=None, help="first second to include")
@click.option("--end", type=float, default=None, help="last second to include")
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    default=1_000_000,
    show_default=True,
    help="keep at most this many steps (the earliest)",
)
def trace_command(source: Path, out_file: Path | None, start, end, max_steps) -> None:
    """Export a run's engine steps as Chrome/Perfetto trace JSON (open in ui.perfetto.dev).

    SOURCE is a run directory with steps.parquet (``outputs.step_log: true``) or an experiment
    YAML, which is simulated with the step log on.
    """
    from simulator.trace_export import TraceError, export_trace, steps_from_source

    try:
        steps, replicas, default_out = steps_from_source(source)
        target = out_file or default_out
        n = export_trace(
            steps, target, replicas=replicas, start=start, end=end, max_steps=max_steps
        )
    except (TraceError, ExperimentError) as exc:
        _fail(str(exc))
        return
    click.echo(f"wrote {target}: {n:,} steps (open it in https://ui.perfetto.dev)")
