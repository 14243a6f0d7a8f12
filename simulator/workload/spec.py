"""The YAML-facing synthetic workload spec (pydantic v2; frozen, unknown keys rejected).

A spec is a mapping discriminated on ``kind``: ``requests`` and ``sessions`` (below), ``agentic``
(synthetic agent session graphs, :mod:`simulator.workload.agentic`) and ``trace`` (a trace file
under a traffic model, :mod:`simulator.workload.trace`). docs/workloads.md has the full schemas.

``kind: requests`` -- independent requests::

    kind: requests
    num_requests: 1000
    arrival: {process: poisson, rate: 5.0}      # requests/s; or {process: burst}
    shared_prefix_tokens: 0                     # system prompt shared by every request
    prompt_tokens: {dist: lognormal, mean: 1000, sigma: 0.8}   # private part, after the prefix
    output_tokens: {dist: lognormal, mean: 250, sigma: 0.8}

A request's prompt is ``shared_prefix_tokens + prompt_tokens`` (``prompt_tokens`` is the part
after the shared prefix, as for sessions).

``kind: sessions`` -- linear multi-turn sessions (each turn's prompt is the previous turn's prompt
plus its output plus fresh input)::

    kind: sessions
    num_sessions: 200
    arrival: {process: poisson, rate: 0.5}      # sessions/s
    shared_prefix_tokens: 2000
    turns: {dist: uniform, low: 4, high: 12}
    first_prompt_tokens: {dist: lognormal, mean: 300, sigma: 0.7}  # turn 1, after the prefix
    fresh_input_tokens: {dist: lognormal, mean: 300, sigma: 0.7}   # turns 2, 3, ...
    output_tokens: {dist: lognormal, mean: 250, sigma: 0.7}
    wait_after_ready: {dist: exponential, mean: 2.0}   # s from a response's end to the next turn
    max_context_tokens: 32768                   # optional

Arrival processes (the first arrival is at t = 0 for all of them):

- ``poisson``: exponential gaps of mean ``1 / rate``;
- ``fixed``: one arrival every ``1 / rate`` seconds;
- ``burst``: everything at t = 0.

``max_context_tokens`` ends a session's chain before the first turn whose prompt + output would
exceed it (the later turns are dropped; a session whose first turn already exceeds it is dropped
entirely). ``kind: agentic`` compacts the history and starts a new chain instead.

Distributions (``Dist`` for counts, ``TimeDist`` for seconds) are described in
:mod:`simulator.workload.distributions`; a bare number means a fixed value.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, model_validator

from simulator.workload.agentic import AgenticWorkload
from simulator.workload.distributions import Dist, FixedTime, TimeDist
from simulator.workload.trace import TraceWorkload

__all__ = [
    "PoissonArrival",
    "FixedRateArrival",
    "BurstArrival",
    "Arrival",
    "RequestsWorkload",
    "SessionsWorkload",
    "AgenticWorkload",
    "TraceWorkload",
    "WorkloadSpec",
    "WORKLOAD_SPEC_ADAPTER",
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    # where the spec was read from; compile errors name it
    _source: str = PrivateAttr("")

    def __eq__(self, other: object) -> bool:
        """Equal fields make equal specs, whichever file they were read from."""
        if type(self) is not type(other):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.__dict__.items())))


class PoissonArrival(_Model):
    """Poisson arrivals at ``rate`` per second (first at t = 0)."""

    process: Literal["poisson"] = "poisson"
    rate: Annotated[float, Field(gt=0, allow_inf_nan=False)]


class FixedRateArrival(_Model):
    """Evenly spaced arrivals, ``1 / rate`` seconds apart (first at t = 0)."""

    process: Literal["fixed"] = "fixed"
    rate: Annotated[float, Field(gt=0, allow_inf_nan=False)]


class BurstArrival(_Model):
    """Everything arrives at t = 0."""

    process: Literal["burst"] = "burst"


Arrival = Annotated[
    PoissonArrival | FixedRateArrival | BurstArrival, Field(discriminator="process")
]


class RequestsWorkload(_Model):
    """Independent single-turn requests."""

    kind: Literal["requests"] = "requests"
    description: str = ""
    num_requests: Annotated[int, Field(ge=1, le=100_000_000)]
    arrival: Arrival
    prompt_tokens: Dist  # the private part of the prompt, after the shared prefix
    output_tokens: Dist
    shared_prefix_tokens: Annotated[int, Field(ge=0)] = 0


class SessionsWorkload(_Model):
    """Linear multi-turn sessions (one chain of dependent requests per session)."""

    kind: Literal["sessions"] = "sessions"
    description: str = ""
    num_sessions: Annotated[int, Field(ge=1, le=100_000_000)]
    arrival: Arrival
    turns: Dist
    first_prompt_tokens: Dist  # fresh input of turn 1, after the shared prefix
    fresh_input_tokens: Dist  # fresh input of turns 2, 3, ...
    output_tokens: Dist
    wait_after_ready: TimeDist = FixedTime(value=0.0)
    shared_prefix_tokens: Annotated[int, Field(ge=0)] = 0
    max_context_tokens: Annotated[int, Field(ge=2)] | None = None

    @model_validator(mode="after")
    def _check_context(self) -> SessionsWorkload:
        limit = self.max_context_tokens
        if limit is not None and limit < self.shared_prefix_tokens + 2:
            raise ValueError(
                f"max_context_tokens ({limit}) leaves no room after the shared prefix "
                f"({self.shared_prefix_tokens} tokens) for one input and one output token"
            )
        return self


#: A workload spec, as read from YAML (``kind: agentic`` and ``kind: trace`` are described in
#: :mod:`simulator.workload.agentic` and :mod:`simulator.workload.trace`).
WorkloadSpec = Annotated[
    RequestsWorkload | SessionsWorkload | AgenticWorkload | TraceWorkload,
    Field(discriminator="kind"),
]

#: Validates a plain mapping (e.g. parsed YAML) into a :data:`WorkloadSpec`.
WORKLOAD_SPEC_ADAPTER: TypeAdapter[
    RequestsWorkload | SessionsWorkload | AgenticWorkload | TraceWorkload
] = TypeAdapter(WorkloadSpec)
