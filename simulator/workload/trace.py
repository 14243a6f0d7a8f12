"""``kind: trace``: replay a trace file under a traffic model; format detection; trace loading.

YAML::

    kind: trace
    format: veeksha            # veeksha | openclaw | mooncake | azure (default: from the file)
    path: traces/dag15.jsonl   # relative: to the workload file's directory, then the CWD
    traffic: {mode: rate, process: poisson, sessions_per_s: 0.18, duration_s: 300, wrap: true}
    compaction: {context_limit: 100000, prompt_tokens: 200, summary_tokens: 2000}   # optional
    history: full              # openclaw only: full | measured
    scaffold: observed         # openclaw only: observed | none
    block_tokens: 512          # mooncake only: tokens per hash id

``traffic`` defaults to ``{mode: trace}`` for traces with arrival times (mooncake, azure) and to
``{mode: sequential}`` (every session once, one at a time) for the others.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from simulator.workload.azure import read_azure
from simulator.workload.compaction import Compaction, compact
from simulator.workload.compiled import WorkloadError
from simulator.workload.graph import KIND_REQUEST, SessionGraph, select_sessions, session_bounds
from simulator.workload.mooncake import read_mooncake
from simulator.workload.openclaw import read_openclaw
from simulator.workload.traffic import (
    SequentialTraffic,
    TraceTraffic,
    Traffic,
    apply_closed_loop,
    plan_sessions,
)
from simulator.workload.veeksha import read_veeksha

__all__ = [
    "FORMATS",
    "TraceWorkload",
    "detect_format",
    "load_trace",
    "resolve_path",
    "trace_graph",
    "empirical_values",
]

FORMATS = ("veeksha", "openclaw", "mooncake", "azure")
TIMED_FORMATS = ("mooncake", "azure")


class TraceWorkload(BaseModel):
    """Replay a trace file (Veeksha, OpenClaw, Mooncake, Azure) under a traffic model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["trace"] = "trace"
    description: str = ""
    format: Literal[FORMATS] | None = None  # type: ignore[valid-type]
    path: str
    traffic: Traffic | None = None
    compaction: Compaction | None = None
    history: Literal["full", "measured"] | None = None
    scaffold: Literal["observed", "none"] | None = None
    block_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check_options(self) -> TraceWorkload:
        fmt = self.format
        if fmt is not None:
            if fmt != "openclaw":
                for key in ("history", "scaffold"):
                    if getattr(self, key) is not None:
                        raise ValueError(f"{key}: only for format openclaw (format is {fmt})")
            if fmt != "mooncake" and self.block_tokens is not None:
                raise ValueError(f"block_tokens: only for format mooncake (format is {fmt})")
        return self

    def options(self) -> tuple[tuple[str, Any], ...]:
        """The reader options that apply to this format, as a hashable tuple."""
        fmt = self.format
        if fmt == "openclaw":
            return (("history", self.history or "full"), ("scaffold", self.scaffold or "observed"))
        if fmt == "mooncake":
            return (("block_tokens", self.block_tokens or 512),)
        return ()

    def effective_traffic(self):
        if self.traffic is not None:
            return self.traffic
        return TraceTraffic() if self.format in TIMED_FORMATS else SequentialTraffic()


def detect_format(path: str | Path) -> str:
    """The trace format of ``path``, from its extension and, for JSONL, its first row."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return "azure"
    if suffix == ".json":
        return "openclaw"
    if suffix in (".jsonl", ".ndjson"):
        try:
            with open(p) as fh:
                for line in fh:
                    if line.strip():
                        row = json.loads(line)
                        if isinstance(row, dict) and "hash_ids" in row:
                            return "mooncake"
                        return "veeksha"
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return "veeksha"  # the reader reports the problem with its line
        raise WorkloadError(f"{p}: empty file")
    raise WorkloadError(
        f"{p}: cannot tell the trace format from the extension {suffix!r} "
        f"(use .jsonl, .json or .csv, or name the format: {', '.join(FORMATS)})"
    )


def resolve_path(path: str, base_dir: str | Path | None) -> Path:
    """``path`` itself if absolute; else the first that exists of ``base_dir/path`` and
    ``CWD/path`` (``base_dir/path`` if neither does, for the error message)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    candidates = ([Path(base_dir) / p] if base_dir is not None else []) + [p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    return candidates[0]


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime_ns: int, size: int, fmt: str, options: tuple) -> SessionGraph:
    opts = dict(options)
    if fmt == "veeksha":
        return read_veeksha(path)
    if fmt == "openclaw":
        return read_openclaw(path, **opts)
    if fmt == "mooncake":
        return read_mooncake(path, **opts)
    if fmt == "azure":
        return read_azure(path)
    raise WorkloadError(f"{path}: unknown trace format {fmt!r} (one of {', '.join(FORMATS)})")


def load_trace(path: str | Path, fmt: str | None = None, options: tuple = ()) -> SessionGraph:
    """Read a trace file into a :class:`SessionGraph` (cached per path, mtime and options).

    The returned graph is shared between callers: treat its arrays as read-only.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as err:
        raise WorkloadError(f"{p}: cannot read: {err.strerror or err}") from None
    fmt = fmt or detect_format(p)
    return _load_cached(str(p), st.st_mtime_ns, st.st_size, fmt, tuple(options))


def trace_graph(spec: TraceWorkload, seed: int) -> tuple[SessionGraph, np.ndarray]:
    """The graph a trace workload runs (sessions selected by traffic, compaction and closed-loop
    dependencies applied) and its session start times."""
    fmt = spec.format or detect_format(spec.path)
    spec = spec.model_copy(update={"format": fmt})
    base = load_trace(spec.path, fmt, spec.options())
    traffic_rng, compact_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)
    )
    base = compact(base, spec.compaction, compact_rng)
    plan = plan_sessions(
        spec.effective_traffic(),
        traffic_rng,
        available=base.num_sessions,
        mean_requests=base.num_requests / base.num_sessions,
        session_time=base.session_time,
        where=f"{spec.path}: traffic",
    )
    if plan.num_sessions == base.num_sessions and np.array_equal(
        plan.order, np.arange(plan.num_sessions)
    ):
        g = base
    else:
        g = select_sessions(base, plan.order)
    return apply_closed_loop(g, plan.concurrency), plan.start


def empirical_values(
    path: str, field: str, fmt: str | None, base_dir: str | Path | None
) -> np.ndarray:
    """Values of ``field`` read from a trace (for ``{dist: empirical, trace: ...}``)."""
    p = resolve_path(path, base_dir)
    g = load_trace(p, fmt)
    has_parents = np.diff(g.parents_start) > 0
    normal = g.kind == KIND_REQUEST
    if field == "fresh_input":
        vals = g.fresh[(g.history_parent >= 0) & normal]
    elif field == "first_input":
        vals = g.fresh[(g.history_parent < 0) & normal]
    elif field == "output":
        vals = g.output[normal]
    elif field == "wait_after_ready":
        vals = g.wait[has_parents & normal]
    elif field == "requests_per_session":
        vals = np.diff(session_bounds(g))
    else:  # pragma: no cover - validated by the caller
        raise WorkloadError(f"unknown empirical field {field!r}")
    if vals.size == 0:
        raise WorkloadError(f"{p}: no values for field {field!r}")
    return np.asarray(vals, dtype=np.float64)
