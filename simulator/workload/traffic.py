"""Traffic: when sessions start. The file (or generator) gives session *shapes*; traffic decides
how many sessions run and when each starts, as Veeksha's traffic schedulers do.

YAML (the ``traffic`` key of a ``kind: agentic`` or ``kind: trace`` workload), one of::

    traffic: {mode: rate, process: poisson, sessions_per_s: 0.18, duration_s: 300, wrap: true}
    traffic: {mode: rate, requests_per_s: 2.0, max_sessions: 200}   # normalised request rate rho
    traffic: {mode: concurrent, sessions: 3, max_sessions: 30}       # closed loop
    traffic: {mode: sequential, max_sessions: 5}                     # one session at a time
    traffic: {mode: trace, time_scale: 1.0}                          # the trace's own timestamps

* ``rate``: session starts form an arrival process (first at t = 0): ``poisson`` (exponential
  gaps), ``fixed`` (every ``1 / rate`` s) or ``gamma`` (gaps with coefficient of variation ``cv``).
  ``requests_per_s`` (rho) is converted to a session rate by dividing by the mean number of
  requests per session of the workload (after compaction), as Veeksha's capacity search does.
* ``concurrent``: a closed loop of ``sessions`` concurrent sessions, expressed statically as
  dependencies: the first ``sessions`` start at 0 (spread evenly over ``rampup_s``), and every
  root request of session ``i + sessions`` depends on every sink request of session ``i`` (no
  content inherited, its own ``wait_after_ready`` unchanged). ``sequential`` is ``sessions: 1``.
* ``trace``: each session starts at the time the trace recorded (Mooncake, Azure), multiplied by
  ``time_scale`` (0.5 replays twice as fast).

Limits (every mode): ``max_sessions`` and ``duration_s`` (no session starts at or after it;
``rate`` and ``trace`` only: closed-loop start times are only known once simulated; the run still
finishes every started session). ``wrap: true`` replays a trace in a loop until a limit is
reached: the first pass in file order, every later pass reshuffled (``shuffle: false`` keeps file
order; ``trace`` mode shifts each pass by the trace's span plus one mean gap). Without ``wrap``, a
trace runs each of its sessions at most once. A synthetic workload generates as many sessions as
the limits allow, so it needs ``max_sessions``, or ``duration_s`` with ``mode: rate``.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from simulator.workload.compiled import WorkloadError
from simulator.workload.graph import SessionGraph, add_dependencies, roots_and_sinks

__all__ = [
    "RateTraffic",
    "ConcurrentTraffic",
    "SequentialTraffic",
    "TraceTraffic",
    "Traffic",
    "SessionPlan",
    "plan_sessions",
    "closed_loop_edges",
    "apply_closed_loop",
]

_Pos = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _TrafficBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_sessions: Annotated[int, Field(ge=1)] | None = None
    duration_s: _Pos | None = None
    wrap: bool = False
    shuffle: bool = True


class RateTraffic(_TrafficBase):
    """Sessions arrive at ``sessions_per_s`` (or at ``requests_per_s`` / mean requests per session)."""

    mode: Literal["rate"] = "rate"
    process: Literal["poisson", "fixed", "gamma"] = "poisson"
    sessions_per_s: _Pos | None = None
    requests_per_s: _Pos | None = None
    cv: _Pos = 1.0

    @model_validator(mode="after")
    def _one_rate(self) -> RateTraffic:
        if (self.sessions_per_s is None) == (self.requests_per_s is None):
            raise ValueError("give exactly one of sessions_per_s and requests_per_s")
        return self


class ConcurrentTraffic(_TrafficBase):
    """A closed loop holding ``sessions`` sessions in flight."""

    mode: Literal["concurrent"] = "concurrent"
    sessions: Annotated[int, Field(ge=1)]
    rampup_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0


class SequentialTraffic(_TrafficBase):
    """One session at a time (a closed loop of 1)."""

    mode: Literal["sequential"] = "sequential"


class TraceTraffic(_TrafficBase):
    """The trace's own session arrival times, scaled by ``time_scale``."""

    mode: Literal["trace"] = "trace"
    time_scale: _Pos = 1.0


Traffic = Annotated[
    RateTraffic | ConcurrentTraffic | SequentialTraffic | TraceTraffic,
    Field(discriminator="mode"),
]


class SessionPlan:
    """Which sessions run and when: ``order`` indexes the available sessions (for a trace; for a
    synthetic workload it is ``arange(n)``), ``start`` is each one's start time (closed-loop
    sessions after the first ``concurrency`` start when their predecessor ends: 0 here)."""

    def __init__(self, order: np.ndarray, start: np.ndarray, concurrency: int) -> None:
        self.order = order
        self.start = start
        self.concurrency = concurrency

    @property
    def num_sessions(self) -> int:
        return int(self.order.shape[0])


def _arrivals(t: RateTraffic, rate: float, rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float64)
    if n <= 1:
        return out
    if t.process == "fixed":
        return np.arange(n, dtype=np.float64) / rate
    if t.process == "poisson":
        gaps = rng.exponential(1.0 / rate, size=n - 1)
    else:
        k = 1.0 / t.cv**2
        gaps = rng.gamma(k, 1.0 / (rate * k), size=n - 1)
    np.cumsum(gaps, out=out[1:])
    return out


def _arrivals_until(
    t: RateTraffic, rate: float, rng: np.random.Generator, duration: float, cap: int | None
) -> np.ndarray:
    """Arrival times before ``duration`` (at most ``cap``), drawn in growing batches."""
    guess = int(rate * duration * 1.2) + 16
    while True:
        n = guess if cap is None else min(guess, cap)
        times = _arrivals(t, rate, rng, n)
        if times[-1] >= duration or n == cap:
            return times[times < duration]
        guess *= 2


def _wrap_order(available: int, n: int, shuffle: bool, rng: np.random.Generator) -> np.ndarray:
    passes = [np.arange(available, dtype=np.int64)]
    total = available
    while total < n:
        passes.append(rng.permutation(available) if shuffle else np.arange(available))
        total += available
    return np.concatenate(passes)[:n].astype(np.int64)


def plan_sessions(
    traffic: RateTraffic | ConcurrentTraffic | SequentialTraffic | TraceTraffic,
    rng: np.random.Generator,
    *,
    available: int | None,
    mean_requests: float,
    session_time: np.ndarray | None = None,
    where: str = "traffic",
) -> SessionPlan:
    """Decide the sessions to run and their start times.

    ``available`` is the number of sessions of a trace (``None`` for a generator, which makes as
    many as asked); ``mean_requests`` the mean requests per session (for ``requests_per_s``);
    ``session_time`` the trace's own arrival times (``mode: trace``).
    """
    t = traffic
    synthetic = available is None
    if synthetic and t.wrap:
        raise WorkloadError(f"{where}: wrap: only a trace can be replayed in a loop")
    cap = t.max_sessions
    if not synthetic and not t.wrap:
        cap = available if cap is None else min(cap, available)
    if t.wrap and cap is None and t.duration_s is None:
        raise WorkloadError(f"{where}: wrap: true needs max_sessions or duration_s")

    if isinstance(t, RateTraffic):
        rate = t.sessions_per_s
        if rate is None:
            if not mean_requests > 0:
                raise WorkloadError(f"{where}: requests_per_s: the workload has no requests")
            rate = t.requests_per_s / mean_requests
        if t.duration_s is not None:
            start = _arrivals_until(t, rate, rng, t.duration_s, cap)
        elif cap is not None:
            start = _arrivals(t, rate, rng, cap)
        else:
            raise WorkloadError(f"{where}: a generated workload needs max_sessions or duration_s")
        n = start.shape[0]
        conc = 0
    elif isinstance(t, ConcurrentTraffic | SequentialTraffic):
        if t.duration_s is not None:
            raise WorkloadError(
                f"{where}: duration_s: closed-loop session starts depend on the simulation; "
                "limit the run with max_sessions (or use mode: rate)"
            )
        if cap is None:
            raise WorkloadError(f"{where}: a generated workload needs max_sessions")
        n = cap
        conc = t.sessions if isinstance(t, ConcurrentTraffic) else 1
        start = np.zeros(n, dtype=np.float64)
        ramp = t.rampup_s if isinstance(t, ConcurrentTraffic) else 0.0
        first = min(conc, n)
        start[:first] = np.arange(first, dtype=np.float64) * (ramp / conc)
    elif isinstance(t, TraceTraffic):
        if session_time is None:
            raise WorkloadError(
                f"{where}: mode: trace needs a trace with arrival times (mooncake, azure)"
            )
        base = np.asarray(session_time, dtype=np.float64) * t.time_scale
        base = base - base.min()
        span = float(base.max())
        step = span + (span / max(base.shape[0] - 1, 1) if base.shape[0] > 1 else 1.0)
        want = cap
        if t.duration_s is not None:
            passes = max(1, math.ceil(t.duration_s / step)) if t.wrap else 1
            total = passes * base.shape[0]
            want = total if want is None else min(want, total)
        assert want is not None
        reps = -(-want // base.shape[0])
        order = np.tile(np.arange(base.shape[0], dtype=np.int64), reps)[:want]
        start = (np.tile(base, reps) + np.repeat(np.arange(reps) * step, base.shape[0]))[:want]
        if t.duration_s is not None:
            keep = start < t.duration_s
            order, start = order[keep], start[keep]
        if order.shape[0] == 0:
            raise WorkloadError(f"{where}: duration_s: no session starts before it")
        return SessionPlan(order, start, 0)
    else:  # pragma: no cover
        raise TypeError(f"unknown traffic {t!r}")

    if n == 0:
        raise WorkloadError(f"{where}: no session starts within the limits")
    if synthetic:
        order = np.arange(n, dtype=np.int64)
    elif t.wrap:
        order = _wrap_order(available, n, t.shuffle, rng)
    else:
        order = np.arange(n, dtype=np.int64)
    return SessionPlan(order, start, conc)


def closed_loop_edges(g: SessionGraph, concurrency: int) -> tuple[np.ndarray, np.ndarray]:
    """Edges ``(child, parent)``: roots of session ``i + C`` after every sink of session ``i``."""
    roots, sinks = roots_and_sinks(g)
    root_ids = np.flatnonzero(roots)
    sink_ids = np.flatnonzero(sinks)  # sorted, so grouped by session
    num_s = g.num_sessions
    sink_start = np.zeros(num_s + 1, dtype=np.int64)
    np.cumsum(np.bincount(g.session[sink_ids], minlength=num_s), out=sink_start[1:])
    root_ids = root_ids[g.session[root_ids] >= concurrency]
    prev = g.session[root_ids] - concurrency
    counts = sink_start[prev + 1] - sink_start[prev]
    child = np.repeat(root_ids, counts)
    first = np.repeat(sink_start[prev], counts)
    within = np.arange(child.shape[0], dtype=np.int64) - np.repeat(
        np.cumsum(counts) - counts, counts
    )
    return child.astype(np.int64), sink_ids[first + within].astype(np.int64)


def apply_closed_loop(g: SessionGraph, concurrency: int) -> SessionGraph:
    """``g`` with the closed-loop dependencies of :func:`closed_loop_edges` (0 = none)."""
    if concurrency <= 0 or g.num_sessions <= concurrency:
        return g
    child, parent = closed_loop_edges(g, concurrency)
    return add_dependencies(g, child, parent)
