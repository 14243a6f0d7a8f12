"""SLO capacity search and fleet sizing; the study-file pieces sweeps share.

**SLOs.** A run is *healthy* when every SLO holds on its stable window
(:func:`simulator.steady.stable_summary`). An SLO is a string ``"METRIC OP VALUE [UNIT]"`` or a
mapping ``{metric, max | min}``::

    slos:
      - ttft_p95 <= 0.75 s
      - tbt_p95 <= 75 ms
      - error_rate <= 2 %
      - {metric: speed_p25, min: 20}        # tokens/s per request

Metrics: ``ttft_*``, ``tbt_*``, ``tpot_*``, ``e2e_*``, ``queue_time_*`` (``p50/p90/p95/p99/mean``,
seconds: ``s``, ``ms``, ``us``), ``speed_p5/p25/p50/p95`` and ``tokens_per_s_per_user``
(tokens/s), ``error_rate`` and ``prefix_cache_hit_rate`` (a fraction or ``%``),
``output_tokens_per_s``, ``output_tokens_per_s_per_gpu``.

**Load.** :func:`scale_load` sets a workload's load in one of :data:`LOAD_UNITS`:
``rate`` (the workload's own ``arrival.rate``), ``requests_per_s`` (alias ``rho``: the normalized
request rate, converted to a session rate with the workload's mean requests per session),
``sessions_per_s``. With ``duration_s`` the workload's size follows the load so that arrivals
span ``duration_s`` seconds at every load. Each workload kind has a scaler in
:data:`LOAD_SCALERS`; :func:`register_load_scaler` adds one for a new kind.

**Capacity search** (:func:`capacity_search`): evaluate ``low`` (unhealthy: say so, stop) and
``high`` (healthy: widen by doubling up to ``expand`` times), then bisect in log space until
``high / low - 1 <= tolerance``. Every probe of one search uses the same seed (common random
numbers: neighbouring loads see the same requests), so the result is a deterministic function of
the study file. Near the boundary (an SLO metric within ``near_boundary`` of its limit), the
probe is repeated with ``repeats - 1`` further seeds and decided by majority (a tie is
unhealthy); the trace says so. The SLO that *failed first* is the one violated at the lowest
failing load (the most violated one when several fail there).

**Fleet sizing** (:func:`fleet_search`): the fewest replicas (doubling, then bisection) that
keep a target load healthy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from simulator.config import Experiment, ExperimentError, parse_experiment
from simulator.workload.compile import format_validation_error

#: a grid axis: a list of values, or a mapping {name: value} (the names label the points)
GridAxis = list[Any] | dict[str, Any]

# ------------------------------------------------------------------------------------ errors


class StudyError(ValueError):
    """A problem in a study (capacity or sweep) file; one line naming file, field and value."""


# -------------------------------------------------------------------------------- SLO model

_SECONDS = ("ttft", "tbt", "tpot", "e2e", "queue_time", "tbc")
_STATS = ("p50", "p90", "p95", "p99", "mean")
SLO_METRICS: dict[str, str] = {f"{m}_{s}": "seconds" for m in _SECONDS for s in _STATS}
SLO_METRICS |= {f"speed_p{p}": "tokens/s" for p in (5, 25, 50, 95)}
SLO_METRICS |= {
    "tokens_per_s_per_user": "tokens/s",
    "output_tokens_per_s": "tokens/s",
    "output_tokens_per_s_per_gpu": "tokens/s",
    "requests_per_s": "1/s",
    "error_rate": "fraction",
    "prefix_cache_hit_rate": "fraction",
}
_UNIT_SCALE = {
    "seconds": {"s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "": 1.0},
    "fraction": {"%": 0.01, "": 1.0},
    "tokens/s": {"tok/s": 1.0, "tokens/s": 1.0, "": 1.0},
    "1/s": {"/s": 1.0, "": 1.0},
}
_SLO_RE = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*([a-z%/]*)\s*$")


def _parse_value(value: Any, kind: str, metric: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{metric}: expected a number (got {value!r})")
    if isinstance(value, int | float):
        return float(value)
    m = re.fullmatch(r"\s*([-+0-9.eE]+)\s*([a-z%/]*)\s*", str(value))
    if not m:
        raise ValueError(f"{metric}: cannot read {value!r} as a number with a unit")
    units = _UNIT_SCALE[kind]
    if m.group(2) not in units:
        allowed = ", ".join(u for u in units if u)
        raise ValueError(f"{metric}: unit {m.group(2)!r} is not one of {allowed}")
    return float(m.group(1)) * units[m.group(2)]


class SLO(BaseModel):
    """``metric op limit``: ``op`` is ``<=`` (an upper limit) or ``>=`` (a lower limit)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    metric: str
    op: Literal["<=", ">="]
    limit: float = Field(allow_inf_nan=False)

    @classmethod
    def parse(cls, item: Any) -> SLO:
        if isinstance(item, SLO):
            return item
        if isinstance(item, str):
            m = _SLO_RE.match(item)
            if not m:
                raise ValueError(
                    f"cannot read SLO {item!r}: write 'METRIC <= VALUE [UNIT]', e.g. "
                    "'ttft_p95 <= 0.75 s'"
                )
            metric, op, num, unit = m.groups()
            op = "<=" if op in ("<=", "<") else ">="
            raw: Any = f"{num} {unit}"
        elif isinstance(item, dict):
            extra = set(item) - {"metric", "max", "min"}
            if extra or "metric" not in item or (("max" in item) == ("min" in item)):
                raise ValueError(
                    "an SLO mapping has 'metric' and exactly one of 'max' or 'min' "
                    f"(got keys {sorted(item)})"
                )
            metric = str(item["metric"])
            op = "<=" if "max" in item else ">="
            raw = item["max"] if "max" in item else item["min"]
        else:
            raise ValueError(f"an SLO is a string or a mapping (got {item!r})")
        if metric not in SLO_METRICS:
            raise ValueError(
                f"unknown SLO metric {metric!r}; known: {', '.join(sorted(SLO_METRICS))}"
            )
        return cls(metric=metric, op=op, limit=_parse_value(raw, SLO_METRICS[metric], metric))

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {format_metric(self.metric, self.limit)}"

    def value(self, summary: dict) -> float:
        v = summary.get(self.metric, float("nan"))
        return float(v) if v is not None else float("nan")

    def holds(self, summary: dict) -> bool:
        v = self.value(summary)
        if math.isnan(v):
            return False  # nothing measured (e.g. no request finished): not healthy
        return v <= self.limit if self.op == "<=" else v >= self.limit

    def ratio(self, summary: dict) -> float:
        """How far along the limit the metric is: > 1 means violated (NaN: inf)."""
        v = self.value(summary)
        if math.isnan(v):
            return math.inf
        if self.op == "<=":
            return v / self.limit if self.limit > 0 else (math.inf if v > 0 else 0.0)
        return self.limit / v if v > 0 else math.inf


#: an SLO field item: a string or a mapping, parsed by :meth:`SLO.parse`
SLOItem = Annotated[SLO, BeforeValidator(SLO.parse)]


def format_metric(metric: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    kind = SLO_METRICS.get(metric, "")
    if kind == "seconds":
        if abs(value) < 1e-3:
            return f"{value * 1e6:.0f} us"
        return f"{value * 1e3:.1f} ms" if abs(value) < 1 else f"{value:.3f} s"
    if kind == "fraction":
        return f"{value * 100:.2f} %"
    if kind == "tokens/s":
        return f"{value:,.1f} tok/s"
    return f"{value:.4g}"


def check_slos(slos: list[SLO], summary: dict) -> list[str]:
    """The SLOs (as text) that ``summary`` violates."""
    return [str(s) for s in slos if not s.holds(summary)]


# ------------------------------------------------------------------------------ load scaling

LOAD_UNITS = ("rate", "requests_per_s", "rho", "sessions_per_s", "concurrent_sessions")
LoadUnit = Literal["rate", "requests_per_s", "rho", "sessions_per_s", "concurrent_sessions"]
LOAD_UNIT_TEXT = {
    "rate": "arrival rate",
    "requests_per_s": "requests/s",
    "rho": "requests/s",
    "sessions_per_s": "sessions/s",
    "concurrent_sessions": "concurrent sessions",
}


class LoadError(ValueError):
    """A load that cannot be applied to a workload (kind or arrival process unsupported)."""


def _with_arrival_rate(spec, rate: float, count_field: str, duration_s: float | None):
    arrival = spec.arrival
    if getattr(arrival, "process", None) not in ("poisson", "fixed"):
        raise LoadError(
            f"workload arrival.process {getattr(arrival, 'process', None)!r} has no rate to scale; "
            "use poisson or fixed arrivals"
        )
    update: dict[str, Any] = {"arrival": arrival.model_copy(update={"rate": float(rate)})}
    if duration_s is not None:
        update[count_field] = max(int(round(rate * duration_s)), 1)
    return spec.model_copy(update=update)


def _scale_requests(spec, unit: str, value: float, duration_s: float | None):
    if unit == "concurrent_sessions":
        raise LoadError(
            "workload kind 'requests' has open-loop arrivals: "
            "load unit 'concurrent_sessions' needs a closed-loop arrival"
        )
    # one request per session: every unit but concurrency is the arrival rate
    return _with_arrival_rate(spec, value, "num_requests", duration_s)


def _scale_sessions(spec, unit: str, value: float, duration_s: float | None):
    if unit == "concurrent_sessions":
        raise LoadError(
            "workload kind 'sessions' has open-loop session arrivals: "
            "load unit 'concurrent_sessions' needs a closed-loop arrival"
        )
    if unit in ("requests_per_s", "rho"):
        value = value / requests_per_session(spec)
    return _with_arrival_rate(spec, value, "num_sessions", duration_s)


def _scale_traffic(spec, unit: str, value: float, duration_s: float | None):
    """Kinds whose sessions start under a ``traffic`` model (``agentic``, ``trace``)."""
    old = spec.traffic.model_dump() if spec.traffic is not None else {}
    mode = old.get("mode")
    keep = {k: old[k] for k in ("wrap", "shuffle", "max_sessions", "duration_s") if k in old}
    if unit == "concurrent_sessions":
        sessions = max(int(round(value)), 1)
        new = keep | {
            "mode": "concurrent",
            "sessions": sessions,
            "rampup_s": old.get("rampup_s", 0.0) if mode == "concurrent" else 0.0,
        }
        if mode == "concurrent" and old.get("max_sessions"):
            # as many "generations" of sessions at every concurrency
            new["max_sessions"] = max(
                int(round(old["max_sessions"] * sessions / old["sessions"])), sessions
            )
        new.pop("duration_s", None)  # closed-loop runs are sized by max_sessions
    else:
        new = keep | {"mode": "rate"}
        if mode == "rate":
            new |= {"process": old.get("process", "poisson"), "cv": old.get("cv", 1.0)}
        if unit in ("requests_per_s", "rho") or (
            unit == "rate" and mode == "rate" and old.get("requests_per_s") is not None
        ):
            new["requests_per_s"] = float(value)
        else:
            new["sessions_per_s"] = float(value)
        if duration_s is not None:
            new["duration_s"] = float(duration_s)
            new.pop("max_sessions", None)
    data = spec.model_dump() | {"traffic": new}
    try:
        return type(spec).model_validate(data)
    except ValidationError as err:
        raise LoadError(format_validation_error("workload", err, data)) from None


#: kind -> scaler(spec, unit, value, duration_s) returning a new spec. Add new kinds here.
LOAD_SCALERS: dict[str, Callable[..., Any]] = {
    "requests": _scale_requests,
    "sessions": _scale_sessions,
    "agentic": _scale_traffic,
    "trace": _scale_traffic,
}


def register_load_scaler(kind: str, fn: Callable[..., Any]) -> None:
    """Teach :func:`scale_load` a workload kind: ``fn(spec, unit, value, duration_s) -> spec``."""
    LOAD_SCALERS[kind] = fn


def scale_load(workload_spec, value: float, unit: str = "rate", duration_s: float | None = None):
    """A copy of ``workload_spec`` carrying load ``value`` in ``unit`` (see :data:`LOAD_UNITS`).

    ``duration_s`` also resizes the workload (requests or sessions) so that its arrivals span
    ``duration_s`` seconds at this load.
    """
    if unit not in LOAD_UNITS:
        raise LoadError(f"unknown load unit {unit!r}; known: {', '.join(LOAD_UNITS)}")
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise LoadError(f"load must be a positive number (got {value!r})")
    kind = getattr(workload_spec, "kind", None)
    scaler = LOAD_SCALERS.get(kind)
    if scaler is None:
        raise LoadError(
            f"workload kind {kind!r} has no load scaler (known: {', '.join(sorted(LOAD_SCALERS))});"
            " add one with simulator.search.register_load_scaler"
        )
    return scaler(workload_spec, unit, float(value), duration_s)


_RPS_CACHE: dict[str, float] = {}


def requests_per_session(spec, seed: int = 0) -> float:
    """Mean requests per session of a workload, counted on a compiled sample of it."""
    from simulator.workload.compile import compile_workload

    if getattr(spec, "kind", None) == "requests":
        return 1.0
    key = spec.model_dump_json()
    if key not in _RPS_CACHE:
        sample = spec
        if hasattr(spec, "num_sessions"):
            sample = spec.model_copy(update={"num_sessions": max(spec.num_sessions, 500)})
        wl = compile_workload(sample, seed)
        sessions = len(np.unique(wl.req_session))
        _RPS_CACHE[key] = wl.num_requests / max(sessions, 1)
    return _RPS_CACHE[key]


def with_load(
    exp: Experiment, value: float, unit: str, duration_s: float | None = None
) -> Experiment:
    return exp.model_copy(update={"workload": scale_load(exp.workload, value, unit, duration_s)})


# ----------------------------------------------------------------------- experiment overrides

#: short names for common grid axes
FIELD_ALIASES = {
    "gpu": "hardware",
    "tp": "engine.tp",
    "weight_dtype": "engine.weight_dtype",
    "kv_dtype": "engine.kv_dtype",
    "max_num_seqs": "engine.max_num_seqs",
    "max_num_batched_tokens": "engine.max_num_batched_tokens",
    "prefix_caching": "engine.enable_prefix_caching",
    "replicas": "cluster.replicas.0.count",
    "router": "cluster.router",
}


def _set_path(data: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = _child(node, part, path)
        if nxt is None:
            nxt = {}
            _assign(node, part, nxt, path)
        elif not isinstance(nxt, dict | list):
            raise StudyError(f"{'.'.join(parts[: i + 1])} is not a mapping or a list")
        node = nxt
    _assign(node, parts[-1], value, path)


def _child(node: Any, part: str, path: str) -> Any:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise StudyError(f"{path}: {part!r} is not an index of a list of {len(node)}")
        return node[int(part)]
    if part not in node:
        raise StudyError(f"no such field {part!r}")
    return node[part]


def _assign(node: Any, part: str, value: Any, path: str) -> None:
    if isinstance(node, list):
        _child(node, part, path)
        node[int(part)] = value
    else:
        node[part] = value


def apply_overrides(
    exp: Experiment, overrides: dict[str, Any], source: str = "<study>", base: Path | None = None
) -> Experiment:
    """``exp`` with dotted fields set (``engine.tp: 2``, ``workload.arrival.rate: 3``, aliases
    from :data:`FIELD_ALIASES`); the result is validated like an experiment file."""
    if not overrides:
        return exp
    data = exp.model_dump(mode="json")
    for key, value in overrides.items():
        path = FIELD_ALIASES.get(key, key)
        try:
            _set_path(data, path, value)
        except StudyError as exc:
            raise StudyError(f"{source}: {key}: {exc} (got {value!r})") from None
    return parse_experiment(data, f"{source} ({_label(overrides)})", base)


def _label(overrides: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt_value(v)}" for k, v in overrides.items())


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict | list):
        return yaml.safe_dump(v, default_flow_style=True).strip()
    return str(v)


# ----------------------------------------------------------------------------- study files


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoadRange(_Model):
    """The load axis of a capacity search."""

    unit: LoadUnit = "rate"
    low: float = Field(gt=0, allow_inf_nan=False)
    high: float = Field(gt=0, allow_inf_nan=False)
    duration_s: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="arrivals span this many seconds at every load (workload resized); "
        "omit to keep the workload's own size",
    )


class SearchOptions(_Model):
    tolerance: float = Field(0.05, gt=0, le=1, description="stop when high/low - 1 <= this")
    max_probes: int = Field(24, ge=2, le=200)
    probes_per_round: int = Field(1, ge=1, le=64, description="loads evaluated in parallel")
    repeats: int = Field(3, ge=1, le=15, description="seeds per probe near the boundary")
    near_boundary: float = Field(
        0.1, ge=0, le=1, description="a metric within this fraction of its limit is 'near'"
    )
    expand: int = Field(3, ge=0, le=10, description="doublings of 'high' while it is healthy")


class FleetOptions(_Model):
    target_load: float = Field(gt=0, allow_inf_nan=False)
    max_replicas: int = Field(64, ge=1, le=4096)


class CapacityStudy(_Model):
    name: str = "capacity"
    experiment: Any  # path (relative to the study file) or inline mapping; resolved on load
    set: dict[str, Any] = Field(default_factory=dict, description="dotted field overrides")
    grid: dict[str, GridAxis] = Field(
        default_factory=dict, description="one search per combination (dotted fields)"
    )
    load: LoadRange
    slos: list[SLOItem] = Field(min_length=1)
    search: SearchOptions = Field(default_factory=SearchOptions)
    fleet: FleetOptions | None = None
    steady_state: bool = True
    seed: int | None = Field(None, ge=0)
    outputs: dict[str, str] = Field(default_factory=dict)

    @field_validator("grid")
    @classmethod
    def _grid_nonempty(cls, v: dict[str, GridAxis]) -> dict[str, GridAxis]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"grid axis {key!r} has no values")
        return v


def load_yaml_mapping(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise StudyError(f"{path}: file not found") from None
    except OSError as exc:
        raise StudyError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise StudyError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise StudyError(f"{path}: expected a mapping at the top level (got {type(data).__name__})")
    return data


def resolve_experiment(value: Any, base: Path, source: str) -> Experiment:
    """The ``experiment:`` of a study: a path relative to the study file, or a mapping."""
    from simulator.config import load_experiment

    try:
        if isinstance(value, str):
            for cand in (base / value, Path(value)):
                if cand.is_file():
                    return load_experiment(cand)
            raise StudyError(f"{source}: experiment: file not found (got {value!r})")
        if isinstance(value, dict):
            return parse_experiment(value, f"{source}: experiment", base)
    except ExperimentError as exc:
        raise StudyError(str(exc)) from None
    raise StudyError(f"{source}: experiment: expected a file path or a mapping (got {value!r})")


def validate_study(model: type[BaseModel], data: dict, source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise StudyError(format_validation_error(source, err, data)) from None


@dataclass(frozen=True)
class GridPoint:
    """One combination of a grid: the field ``values`` to set and the ``names`` to show (a
    mapping axis ``{name: value}`` shows its names, a list axis its values)."""

    values: dict[str, Any]
    names: dict[str, Any]

    @property
    def label(self) -> str:
        return _label(self.names) or "base"


def axis_items(values: GridAxis) -> list[tuple[Any, Any]]:
    """(name, value) pairs of a grid axis."""
    if isinstance(values, dict):
        return [(str(k), v) for k, v in values.items()]
    return [(v, v) for v in values]


def grid_points(grid: dict[str, GridAxis]) -> list[GridPoint]:
    """Every combination of the grid's axes, in a fixed order (first axis slowest)."""
    points = [GridPoint({}, {})]
    for key, axis in grid.items():
        points = [
            GridPoint(p.values | {key: v}, p.names | {key: n})
            for p in points
            for n, v in axis_items(axis)
        ]
    return points


def check_axes(exp: Experiment, grid: dict[str, GridAxis], source: str, base: Path | None) -> None:
    """Every value of every axis must make a valid experiment on its own (a typo in a field
    name fails the study here; a combination that cannot run is reported per point)."""
    for key, axis in grid.items():
        for _, value in axis_items(axis):
            try:
                apply_overrides(exp, {key: value}, source, base)
            except ExperimentError as exc:
                raise StudyError(str(exc).splitlines()[0]) from None


def load_capacity_study(path: str | Path) -> tuple[CapacityStudy, Experiment]:
    path = Path(path)
    data = load_yaml_mapping(path)
    study = validate_study(CapacityStudy, data, str(path))
    exp = resolve_experiment(study.experiment, path.parent, str(path))
    if study.load.low >= study.load.high:
        raise StudyError(
            f"{path}: load: low ({study.load.low:g}) must be below high ({study.load.high:g})"
        )
    try:
        exp = apply_overrides(exp, study.set, f"{path}: set", path.parent)
        check_axes(exp, study.grid, f"{path}: grid", path.parent)
        if study.seed is not None:
            exp = exp.model_copy(update={"seed": study.seed})
        scale_load(exp.workload, study.load.low, study.load.unit, study.load.duration_s)
    except (ExperimentError, LoadError) as exc:
        raise StudyError(f"{path}: {exc}") from None
    return study, exp


# ------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class PointTask:
    """One simulation: an experiment at a load, judged on its stable window."""

    exp: Experiment
    load: float | None
    unit: str
    duration_s: float | None
    seed: int
    steady: bool = True
    keep_requests: bool = False


#: decode overlap reported per point: share of decode-active time with >= k concurrent decodes
OVERLAP_KS = (2, 4, 8, 16, 32)


def decode_overlap_shares(decode_seconds_by_count: np.ndarray) -> dict[str, float]:
    """``decode_overlap_ge{k}`` (whole run, all replicas) and the time-weighted mean number of
    concurrent decodes while any decode runs."""
    by_k = np.asarray(decode_seconds_by_count, dtype=np.float64)
    by_k = by_k.sum(axis=0) if by_k.ndim == 2 else by_k
    out = {f"decode_overlap_ge{k}": float("nan") for k in OVERLAP_KS}
    out["mean_concurrent_decodes"] = float("nan")
    if by_k.size < 2 or by_k[1:].sum() <= 0:
        return out
    total = by_k[1:].sum()
    for k in OVERLAP_KS:
        out[f"decode_overlap_ge{k}"] = float(by_k[k:].sum() / total) if k < by_k.size else 0.0
    out["mean_concurrent_decodes"] = float((np.arange(by_k.size) * by_k)[1:].sum() / total)
    return out


#: whole-run counters a sweep row carries as ``run_<name>`` (the tier and retention at work)
RUN_COUNTERS = ("num_evicted_blocks", "num_host_loads", "num_prefetches", "num_pins",
                "num_pins_broken")


def evaluate_point(task: PointTask) -> dict:
    """Simulate one point; returns its stable-window summary (or ``error`` for a bad config)."""
    import warnings

    from simulator.simulate import simulate
    from simulator.steady import SteadyStateWarning, stable_summary

    try:
        exp = task.exp
        if task.load is not None:
            exp = with_load(exp, task.load, task.unit, task.duration_s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SteadyStateWarning)
            result = simulate(exp, seed=task.seed, progress=False)
            s = stable_summary(result, steady=task.steady, warn=False)
    except (ExperimentError, LoadError, ValueError) as exc:
        return {"error": str(exc).splitlines()[0]}
    s["wall_seconds"] = result.wall_seconds
    s["run_num_requests"] = int(len(result.requests))
    whole = result.summary()
    for key in RUN_COUNTERS:
        s[f"run_{key}"] = whole.get(key, 0)
    s |= decode_overlap_shares(result.decode_seconds_by_count)
    if task.keep_requests:
        s["requests"] = result.requests
    return s


@dataclass
class Probe:
    index: int
    load: float
    healthy: bool
    seeds: list[int]
    healthy_seeds: int
    metrics: dict  # the first seed's stable summary, metrics replaced by medians when repeated
    violations: list[str]
    note: str = ""


@dataclass
class CapacityResult:
    status: Literal["found", "low_unhealthy", "high_healthy", "error"]
    unit: str
    slos: list[str]
    max_healthy_load: float | None
    first_failing_load: float | None
    failed_first: str | None
    violations_at_failing: list[str]
    healthy_metrics: dict | None
    failing_metrics: dict | None
    probes: list[Probe]
    notes: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0

    def trace_table(self, slos: list[SLO] | None = None) -> pd.DataFrame:
        rows = []
        for p in self.probes:
            row = {
                "probe": p.index,
                "load": p.load,
                "healthy": p.healthy,
                "seeds": len(p.seeds),
                "healthy_seeds": p.healthy_seeds,
            }
            for s in slos or []:
                row[s.metric] = p.metrics.get(s.metric, float("nan"))
            row["stable"] = p.metrics.get("stable")
            row["violations"] = "; ".join(p.violations)
            row["note"] = p.note
            rows.append(row)
        return pd.DataFrame(rows)

    def to_json(self) -> dict:
        d = asdict(self)
        d["probes"] = [asdict(p) for p in self.probes]
        return d


def _median_metrics(summaries: list[dict]) -> dict:
    out = dict(summaries[0])
    for key, v in summaries[0].items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            vals = [s.get(key, float("nan")) for s in summaries]
            out[key] = float(np.median(vals))
    return out


class _Evaluator:
    """Runs probes (with repeats near the boundary) through a TaskRunner."""

    def __init__(
        self,
        exp: Experiment,
        study_load: LoadRange,
        slos: list[SLO],
        opts: SearchOptions,
        steady: bool,
        runner,
        label: str,
    ):
        self.exp, self.load, self.slos, self.opts = exp, study_load, slos, opts
        self.steady, self.runner, self.label = steady, runner, label
        self.seed = exp.seed
        self.probes: list[Probe] = []

    def _task(self, load: float, seed: int) -> PointTask:
        return PointTask(self.exp, load, self.load.unit, self.load.duration_s, seed, self.steady)

    def _near(self, summary: dict) -> list[str]:
        m = self.opts.near_boundary
        return [s.metric for s in self.slos if abs(s.ratio(summary) - 1.0) <= m]

    def evaluate(self, loads: list[float], round_note: str = "") -> list[Probe]:
        first = self.runner.map(
            evaluate_point,
            [self._task(x, self.seed) for x in loads],
            label=f"{self.label}: probing",
        )
        for s in first:
            if "error" in s:
                raise StudyError(s["error"])
        extra_seeds = [self.seed + k for k in range(1, self.opts.repeats)]
        repeat_idx = [i for i, s in enumerate(first) if extra_seeds and self._near(s)]
        tasks = [self._task(loads[i], sd) for i in repeat_idx for sd in extra_seeds]
        more = self.runner.map(evaluate_point, tasks, label=f"{self.label}: repeats")
        probes = []
        for i, (load, s) in enumerate(zip(loads, first, strict=True)):
            summaries = [s]
            note = round_note
            if i in repeat_idx:
                k = repeat_idx.index(i)
                n = len(extra_seeds)
                summaries += more[k * n : (k + 1) * n]
                near = ", ".join(self._near(s))
            oks = [not check_slos(self.slos, x) for x in summaries]
            n_ok = sum(oks)
            healthy = n_ok * 2 > len(oks)
            metrics = _median_metrics(summaries) if len(summaries) > 1 else s
            if len(summaries) > 1:
                note = (f"{note}; " if note else "") + (
                    f"near the boundary ({near}): repeated with {len(summaries)} seeds, "
                    f"{n_ok} healthy -> {'healthy' if healthy else 'unhealthy'} by majority"
                )
            violations = check_slos(self.slos, metrics) if not healthy else []
            if not healthy and not violations:  # majority unhealthy, medians on the line
                violations = sorted({v for x in summaries for v in check_slos(self.slos, x)})
            probe = Probe(
                len(self.probes) + 1,
                float(load),
                healthy,
                [self.seed] + (extra_seeds if len(summaries) > 1 else []),
                n_ok,
                metrics,
                violations,
                note,
            )
            self.probes.append(probe)
            probes.append(probe)
        return probes


def _first_failed(slos: list[SLO], probe: Probe) -> str | None:
    if not probe.violations:
        return None
    worst = max(
        (s for s in slos if str(s) in probe.violations),
        key=lambda s: s.ratio(probe.metrics),
        default=None,
    )
    return str(worst) if worst is not None else probe.violations[0]


def capacity_search(
    exp: Experiment,
    load: LoadRange,
    slos: list[SLO],
    opts: SearchOptions | None = None,
    steady: bool = True,
    runner=None,
    label: str = "capacity",
) -> CapacityResult:
    """Highest healthy load in [load.low, load.high] (see the module docstring)."""
    import time

    from simulator.executor import TaskRunner

    opts = opts or SearchOptions()
    slos = [SLO.parse(s) for s in slos]
    own = runner is None
    runner = runner or TaskRunner(workers=1)
    t0 = time.perf_counter()
    try:
        ev = _Evaluator(exp, load, slos, opts, steady, runner, label)
        notes: list[str] = []
        if load.unit == "concurrent_sessions":
            load = load.model_copy(
                update={
                    "low": float(max(round(load.low), 1)),
                    "high": float(max(round(load.high), 2)),
                }
            )
        lo_p, hi_p = ev.evaluate([load.low, load.high], "range ends")
        if not lo_p.healthy:
            notes.append(
                f"the lower end {load.low:g} is already unhealthy "
                f"({'; '.join(lo_p.violations)}): no healthy load in the range"
            )
            return _finish(ev, "low_unhealthy", None, lo_p, slos, load, notes, t0)
        expansions = 0
        while hi_p.healthy and expansions < opts.expand and len(ev.probes) < opts.max_probes:
            lo_p = hi_p
            new_high = hi_p.load * 2
            notes.append(f"the upper end {hi_p.load:g} is healthy: widened to {new_high:g}")
            (hi_p,) = ev.evaluate([new_high], "widen")
            expansions += 1
        if hi_p.healthy:
            notes.append(f"still healthy at {hi_p.load:g}: capacity is at least that")
            return _finish(ev, "high_healthy", hi_p, None, slos, load, notes, t0)
        k = opts.probes_per_round
        integer = load.unit == "concurrent_sessions"

        def open_bracket() -> bool:
            if integer:
                return hi_p.load - lo_p.load > 1
            return hi_p.load / lo_p.load - 1 > opts.tolerance

        while open_bracket() and len(ev.probes) + k <= opts.max_probes:
            ratio = hi_p.load / lo_p.load
            loads = [lo_p.load * ratio ** (i / (k + 1)) for i in range(1, k + 1)]
            if integer:
                inner = range(int(lo_p.load) + 1, int(hi_p.load))
                loads = sorted({min(max(round(x), inner[0]), inner[-1]) for x in loads})
            probes = ev.evaluate(loads, "bisect" if k == 1 else f"{k + 1}-section")
            for p in probes:  # lowest unhealthy bounds from above, highest healthy below it
                if not p.healthy and p.load < hi_p.load:
                    hi_p = p
            for p in probes:
                if p.healthy and lo_p.load < p.load < hi_p.load:
                    lo_p = p
            bad = [p for p in probes if p.healthy and p.load > hi_p.load]
            if bad:
                notes.append(
                    f"non-monotone near the boundary: {bad[0].load:.4g} healthy above "
                    f"unhealthy {hi_p.load:.4g}; kept the lower bracket"
                )
        if open_bracket():
            notes.append(
                f"stopped after {len(ev.probes)} probes (max_probes) with the bracket "
                f"[{lo_p.load:.4g}, {hi_p.load:.4g}] wider than the tolerance"
            )
        return _finish(ev, "found", lo_p, hi_p, slos, load, notes, t0)
    finally:
        if own:
            runner.close()


def _finish(
    ev: _Evaluator,
    status,
    healthy: Probe | None,
    failing: Probe | None,
    slos: list[SLO],
    load: LoadRange,
    notes: list[str],
    t0: float,
) -> CapacityResult:
    import time

    unhealthy = [p for p in ev.probes if not p.healthy]
    first_fail = min(unhealthy, key=lambda p: p.load) if unhealthy else None
    failed_first = _first_failed(slos, first_fail) if first_fail else None
    unstable = [p for p in ev.probes if p.healthy and p.metrics.get("stable") is False]
    if unstable:
        notes.append(
            f"{len(unstable)} healthy probe(s) never reached a steady state "
            f"(e.g. load {unstable[0].load:.4g}); judged on the second half of the load"
        )
    return CapacityResult(
        status=status,
        unit=load.unit,
        slos=[str(s) for s in slos],
        max_healthy_load=healthy.load if healthy else None,
        first_failing_load=failing.load if failing else None,
        failed_first=failed_first,
        violations_at_failing=failing.violations if failing else [],
        healthy_metrics=healthy.metrics if healthy else None,
        failing_metrics=failing.metrics if failing else None,
        probes=ev.probes,
        notes=notes,
        wall_seconds=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------- fleet sizing


@dataclass
class FleetResult:
    status: Literal["found", "not_found"]
    target_load: float
    unit: str
    replicas: int | None
    gpus: int | None
    gpus_per_replica: int
    probes: list[dict]
    metrics: dict | None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def fleet_search(
    exp: Experiment,
    target_load: float,
    unit: str,
    slos: list[SLO],
    duration_s: float | None = None,
    max_replicas: int = 64,
    steady: bool = True,
    runner=None,
) -> FleetResult:
    """Fewest replicas (of the experiment's single replica group) healthy at ``target_load``."""
    from simulator.executor import TaskRunner

    slos = [SLO.parse(s) for s in slos]
    if len(exp.cluster.replicas) != 1:
        raise StudyError(
            f"fleet sizing needs a cluster with one replica group (got {len(exp.cluster.replicas)})"
        )
    own = runner is None
    runner = runner or TaskRunner(workers=1)
    loaded = with_load(exp, target_load, unit, duration_s)
    group = exp.cluster.replicas[0]
    tp = int((group.engine or {}).get("tp", exp.engine.tp))
    probes: list[dict] = []
    cache: dict[int, dict] = {}

    def run(counts: list[int]) -> None:
        todo = [n for n in counts if n not in cache]
        tasks = [
            PointTask(
                apply_overrides(loaded, {"replicas": n}), None, unit, duration_s, exp.seed, steady
            )
            for n in todo
        ]
        for n, s in zip(todo, runner.map(evaluate_point, tasks, label="fleet"), strict=True):
            if "error" in s:
                raise StudyError(s["error"])
            cache[n] = s
            probes.append(
                {
                    "replicas": n,
                    "gpus": n * tp,
                    "healthy": not check_slos(slos, s),
                    "violations": check_slos(slos, s),
                    **{sl.metric: s.get(sl.metric) for sl in slos},
                }
            )

    try:
        n, lo = 1, 0  # lo: largest known unhealthy count
        while True:
            run([n])
            if not check_slos(slos, cache[n]):
                break
            lo = n
            if n >= max_replicas:
                return FleetResult(
                    "not_found",
                    target_load,
                    unit,
                    None,
                    None,
                    tp,
                    probes,
                    None,
                    [f"unhealthy even with max_replicas={max_replicas}"],
                )
            n = min(n * 2, max_replicas)
        hi = n
        while hi - lo > 1:
            mid = (lo + hi) // 2
            run([mid])
            if check_slos(slos, cache[mid]):
                lo = mid
            else:
                hi = mid
        return FleetResult("found", target_load, unit, hi, hi * tp, tp, probes, cache[hi])
    finally:
        if own:
            runner.close()


@dataclass(frozen=True)
class CapacityTask:
    """A whole capacity search, run in one worker (capacity studies with a grid)."""

    exp: Experiment
    load: LoadRange
    slos: tuple[SLO, ...]
    opts: SearchOptions
    steady: bool
    label: str


def run_capacity_task(task: CapacityTask) -> CapacityResult | dict:
    from simulator.executor import TaskRunner

    try:
        with TaskRunner(workers=1, progress=False) as runner:
            return capacity_search(
                task.exp, task.load, list(task.slos), task.opts, task.steady, runner, task.label
            )
    except (StudyError, ExperimentError, LoadError) as exc:
        return {"error": str(exc).splitlines()[0]}
