"""Grid sweeps over experiment fields x loads, a Parquet table, and the Pareto frontier.

A sweep file names a base experiment, a grid of dotted experiment fields (every combination is a
*configuration*), optional loads and seeds; every (configuration, load, seed) is one simulation,
judged on its stable window (:mod:`simulator.steady`)::

    name: pareto-chat
    experiment: ../quickstart.yaml     # path relative to this file, or an inline experiment
    set: {engine.max_model_len: 8192}  # overrides applied to every point (optional)
    grid:                              # dotted fields or aliases (simulator.search.FIELD_ALIASES)
      engine.tp: [1, 2]
      engine.weight_dtype: [bf16, fp8]
      engine.max_num_seqs: [64, 256, 1024]
    loads: {unit: rate, values: [2, 4, 8, 16], duration_s: 200}
                                       # or {unit, low, high, num, spacing: log|linear}
    seeds: [0]                         # default: the experiment's seed
    slos: [ttft_p95 <= 0.75 s, tbt_p95 <= 75 ms]   # optional: adds 'healthy'
    frontier: {x: tokens_per_s_per_user, y: output_tokens_per_s_per_gpu, healthy_only: true}
    figure: {x: engine.tp, lines: engine.weight_dtype, metrics: [ttft_p95, tbt_p95]}  # optional
    outputs: {dir: runs/pareto-chat}

``loads.per_replica: true`` makes every load value a load *per replica*: a configuration with
``n`` replicas (all groups, all roles) runs at ``n x value``, so fleets of different sizes see the
same load per replica (``offered_load`` in the table is the load applied to the whole fleet).
``figure`` draws ``lines.png``: one panel per metric against a grid axis (or ``load``), one line
per value of another axis (mean over seeds).

Output (``outputs.dir``): ``sweep.parquet`` (one row per point: the grid values, ``config`` (its
label), ``load``, ``seed``, ``num_gpus``, ``error`` for an impossible configuration, ``healthy``
and ``violations`` when SLOs are given, and every stable-window metric), ``frontier.csv`` (the
Pareto-optimal points, configurations named) and ``sweep.json`` (what ran, the frontier).

The frontier maximizes both axes: a point is on it when no other point has at least its ``x``
and at least its ``y``, one of them strictly more. The default axes are output tokens/s per GPU
(the fleet's efficiency) against the median per-request output speed in tokens/s (what one
user sees).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from simulator.config import Experiment, ExperimentError
from simulator.search import (
    OVERLAP_KS,
    RUN_COUNTERS,
    SLO_METRICS,
    GridAxis,
    LoadError,
    LoadUnit,
    PointTask,
    SLOItem,
    StudyError,
    _Model,
    apply_overrides,
    check_axes,
    check_slos,
    evaluate_point,
    grid_points,
    load_yaml_mapping,
    resolve_experiment,
    scale_load,
    validate_study,
)


class LoadAxis(_Model):
    unit: LoadUnit = "rate"
    values: list[float] | None = None
    low: float | None = Field(None, gt=0, allow_inf_nan=False)
    high: float | None = Field(None, gt=0, allow_inf_nan=False)
    num: int | None = Field(None, ge=1, le=10_000)
    spacing: Literal["log", "linear"] = "log"
    duration_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    per_replica: bool = Field(
        False, description="values are per replica: a point with n replicas runs at n x value"
    )

    @model_validator(mode="after")
    def _check(self) -> LoadAxis:
        if self.values is not None:
            if self.low is not None or self.high is not None or self.num is not None:
                raise ValueError("give either 'values' or 'low'/'high'/'num', not both")
            if not self.values:
                raise ValueError("loads.values is empty")
            if any(not (math.isfinite(v) and v > 0) for v in self.values):
                raise ValueError(f"every load must be a positive number (got {self.values})")
        elif self.low is None or self.high is None or self.num is None:
            raise ValueError("give 'values', or 'low', 'high' and 'num'")
        elif self.low > self.high:
            raise ValueError(f"low ({self.low:g}) is above high ({self.high:g})")
        return self

    def points(self) -> list[float]:
        if self.values is not None:
            return [float(v) for v in self.values]
        if self.num == 1:
            return [float(self.low)]
        if self.spacing == "log":
            return [float(v) for v in np.geomspace(self.low, self.high, self.num)]
        return [float(v) for v in np.linspace(self.low, self.high, self.num)]


class FrontierSpec(_Model):
    x: str = "tokens_per_s_per_user"
    y: str = "output_tokens_per_s_per_gpu"
    healthy_only: bool = True


#: columns of the sweep table a figure may draw besides the SLO metrics
TABLE_METRICS = set(SLO_METRICS) | {
    "gpu_cache_hit_rate", "host_cache_hit_rate", "concurrent_sessions", "num_preemptions",
    "mean_concurrent_decodes", "num_gpus", "wall_seconds", "run_num_requests",
} | {f"decode_overlap_ge{k}" for k in OVERLAP_KS} | {f"run_{k}" for k in RUN_COUNTERS}


class LinesFigure(_Model):
    """``lines.png``: each metric against ``x`` (a grid axis or ``load``), one line per value of
    ``lines`` (a grid axis; omitted: one line per configuration), means over seeds."""

    x: str
    lines: str | None = None
    metrics: list[str] = Field(min_length=1, max_length=12)
    x_log: bool = Field(False, description="logarithmic x axis")
    title: str | None = None

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in TABLE_METRICS]
        if unknown:
            raise ValueError(
                f"unknown metric {unknown[0]!r}; known: {', '.join(sorted(TABLE_METRICS))}"
            )
        return v


class SweepOutputs(_Model):
    dir: str | None = None
    save_requests: bool = Field(False, description="write each point's requests table")
    plots: bool = Field(True, description="draw the Pareto (and per-point) figures")


class SweepStudy(_Model):
    name: str = "sweep"
    experiment: Any
    set: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, GridAxis] = Field(default_factory=dict)
    loads: LoadAxis | None = None
    seeds: list[int] | None = Field(None, min_length=1)
    slos: list[SLOItem] = Field(default_factory=list)
    steady_state: bool = True
    frontier: FrontierSpec = Field(default_factory=FrontierSpec)
    figure: LinesFigure | None = None
    outputs: SweepOutputs = Field(default_factory=lambda: SweepOutputs())

    @field_validator("grid")
    @classmethod
    def _grid_axes(cls, v: dict[str, GridAxis]) -> dict[str, GridAxis]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"empty sweep grid: axis {key!r} has no values")
        return v


def load_sweep(path: str | Path) -> tuple[SweepStudy, Experiment]:
    path = Path(path)
    data = load_yaml_mapping(path)
    study = validate_study(SweepStudy, data, str(path))
    if not study.grid and study.loads is None:
        raise StudyError(f"{path}: grid: empty sweep grid (give grid axes or loads)")
    if study.figure is not None:
        axes = set(study.grid) | {"load", "offered_load"}
        for field_name in ("x", "lines"):
            value = getattr(study.figure, field_name)
            if value is not None and value not in axes:
                raise StudyError(
                    f"{path}: figure.{field_name}: {value!r} is not a grid axis or 'load' "
                    f"(axes: {', '.join(sorted(axes))})"
                )
    exp = resolve_experiment(study.experiment, path.parent, str(path))
    try:
        exp = apply_overrides(exp, study.set, f"{path}: set", path.parent)
        check_axes(exp, study.grid, f"{path}: grid", path.parent)
        if study.loads is not None:
            scale_load(
                exp.workload, study.loads.points()[0], study.loads.unit, study.loads.duration_s
            )
    except (ExperimentError, LoadError) as exc:
        raise StudyError(f"{path}: {exc}") from None
    return study, exp


def num_replicas(exp: Experiment) -> int:
    """Replicas of an experiment's cluster, every group and role counted."""
    return sum(group.count for group in exp.cluster.replicas)


def sweep_tasks(
    study: SweepStudy, exp: Experiment, source: str = "<sweep>", base: Path | None = None
) -> tuple[list[dict], list[PointTask | None]]:
    """The points of a sweep (grid values, load, seed, label) and their tasks. A configuration
    the experiment model rejects gets task ``None`` and its error in the point."""
    seeds = study.seeds or [exp.seed]
    loads = study.loads.points() if study.loads is not None else [None]
    unit = study.loads.unit if study.loads is not None else "rate"
    duration = study.loads.duration_s if study.loads is not None else None
    keep = study.outputs.save_requests
    per_replica = study.loads is not None and study.loads.per_replica
    meta, tasks = [], []
    for cid, point in enumerate(grid_points(study.grid)):
        error = ""
        try:
            cexp = apply_overrides(exp, point.values, source, base)
        except (ExperimentError, StudyError) as exc:
            cexp, error = None, str(exc).splitlines()[0]
        for load in loads:
            offered = load
            if per_replica and cexp is not None and load is not None:
                offered = load * num_replicas(cexp)
            for seed in seeds:
                meta.append(
                    {
                        "config_id": cid,
                        "config": point.label,
                        **point.names,
                        "load": load,
                        "offered_load": offered,
                        "load_unit": unit,
                        "seed": seed,
                        "error": error,
                    }
                )
                tasks.append(
                    None
                    if cexp is None
                    else PointTask(cexp, offered, unit, duration, seed, study.steady_state, keep)
                )
    return meta, tasks


def run_sweep(
    study: SweepStudy,
    exp: Experiment,
    runner=None,
    source: str = "<sweep>",
    base: Path | None = None,
    requests_out: list | None = None,
) -> pd.DataFrame:
    """Simulate every point; one row per point (see the module docstring). With
    ``outputs.save_requests``, each point's requests table is appended to ``requests_out``
    (``(row index, DataFrame)``)."""
    from simulator.executor import TaskRunner

    meta, tasks = sweep_tasks(study, exp, source, base)
    own = runner is None
    runner = runner or TaskRunner()
    try:
        live = [i for i, t in enumerate(tasks) if t is not None]
        results = runner.map(evaluate_point, [tasks[i] for i in live], label=f"sweep {study.name}")
    finally:
        if own:
            runner.close()
    summaries: list[dict] = [{} for _ in tasks]
    for i, s in zip(live, results, strict=True):
        summaries[i] = s
    rows = []
    for i, (m, s) in enumerate(zip(meta, summaries, strict=True)):
        row = dict(m)
        if "error" in s:
            row["error"] = s.pop("error")
        reqs = s.pop("requests", None)
        if reqs is not None and requests_out is not None:
            requests_out.append((i, reqs))
        row |= s
        if study.slos and not row["error"]:
            bad = check_slos(study.slos, s)
            row["healthy"], row["violations"] = not bad, "; ".join(bad)
        elif study.slos:
            row["healthy"], row["violations"] = False, "configuration error"
        rows.append(row)
    df = pd.DataFrame(rows)
    for key in study.grid:  # parquet wants one type per column
        if key in df and df[key].map(type).nunique() > 1:
            df[key] = df[key].map(str)
    return df


def pareto_frontier(
    df: pd.DataFrame,
    x: str = "tokens_per_s_per_user",
    y: str = "output_tokens_per_s_per_gpu",
    healthy_only: bool = True,
) -> pd.DataFrame:
    """The rows of ``df`` not dominated in (``x``, ``y``), both maximized; sorted by ``x``."""
    if x not in df or y not in df:
        missing = x if x not in df else y
        raise StudyError(f"frontier: no column {missing!r} in the sweep table")
    ok = np.isfinite(df[x].astype(float)) & np.isfinite(df[y].astype(float))
    if "error" in df:
        ok &= df["error"].fillna("") == ""
    if healthy_only and "healthy" in df:
        ok &= df["healthy"].fillna(False).astype(bool)
    cand = df[ok].sort_values([x, y], ascending=[False, False], kind="stable")
    keep, best_y = [], -math.inf
    for idx, yv in zip(cand.index, cand[y].astype(float), strict=True):
        if yv > best_y:
            keep.append(idx)
            best_y = yv
    return df.loc[keep].sort_values(x, kind="stable")


def write_sweep(
    df: pd.DataFrame,
    frontier: pd.DataFrame,
    study: SweepStudy,
    out_dir: Path,
    wall_seconds: float,
    requests: list | None = None,
) -> list[Path]:
    """Write the table, the frontier, the metadata, per-point requests and figures; returns the
    figures written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out_dir / "sweep.parquet", index=False)
    frontier.to_csv(out_dir / "frontier.csv", index=False)
    x, y = study.frontier.x, study.frontier.y
    meta = {
        "name": study.name,
        "points": int(len(df)),
        "configs": int(df["config_id"].nunique()),
        "errors": int((df["error"] != "").sum()),
        "wall_seconds": wall_seconds,
        "figure": study.figure.model_dump() if study.figure is not None else None,
        "frontier": {
            "x": x,
            "y": y,
            "points": [
                {"config": r["config"], "load": r["load"], x: r[x], y: r[y]}
                for _, r in frontier.iterrows()
            ],
        },
    }
    (out_dir / "sweep.json").write_text(json.dumps(meta, indent=2, default=_json_default))
    for i, reqs in requests or []:
        (out_dir / "requests").mkdir(exist_ok=True)
        reqs.to_parquet(out_dir / "requests" / f"point_{i:04d}.parquet", index=False)
    if not study.outputs.plots:
        return []
    from simulator.plots import plot_directory

    written, _ = plot_directory(out_dir, out_dir / "plots")
    return written


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def sweep_points_per_second(df: pd.DataFrame, wall_seconds: float) -> float:
    return len(df) / wall_seconds if wall_seconds > 0 else float("nan")


def timed_sweep(
    study: SweepStudy,
    exp: Experiment,
    runner=None,
    source: str = "<sweep>",
    base: Path | None = None,
    requests_out: list | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    t0 = time.perf_counter()
    df = run_sweep(study, exp, runner, source, base, requests_out)
    wall = time.perf_counter() - t0
    frontier = pareto_frontier(
        df, study.frontier.x, study.frontier.y, study.frontier.healthy_only and bool(study.slos)
    )
    return df, frontier, wall
