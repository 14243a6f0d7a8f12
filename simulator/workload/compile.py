"""Compile a synthetic :data:`WorkloadSpec` into a :class:`CompiledWorkload`; load specs from YAML.

Compilation is deterministic: one ``np.random.default_rng(seed)`` and a fixed draw order, so a
(spec, seed) pair fixes every array bit for bit. It is vectorised (numpy only, no Python loop per
request or per session).

Draw order, ``kind: requests`` (``R = num_requests``):

1. arrival gaps: ``R - 1`` exponential draws for ``poisson``, none for ``fixed`` / ``burst``;
2. ``prompt_tokens``: ``R`` draws; 3. ``output_tokens``: ``R`` draws.

Draw order, ``kind: sessions`` (``S = num_sessions``, ``T`` = total turns drawn):

1. session arrival gaps (as above, ``S - 1``); 2. ``turns``: ``S``;
3. ``first_prompt_tokens``: ``S``; 4. ``fresh_input_tokens``: ``T - S`` (turns 2, 3, ... in
   session-major order); 5. ``output_tokens``: ``T``; 6. ``wait_after_ready``: ``T - S``.

Every draw happens before ``max_context_tokens`` truncates the chains, so the limit never changes
the tokens of the turns it keeps. (A ``fixed`` distribution draws nothing.)

Content tree (see :mod:`simulator.workload.compiled`): with ``shared_prefix_tokens > 0``, node 0
is the shared prefix, a root shared by every request. ``requests``: request ``r`` owns one node
(its private prompt part followed by its output), path ``[prefix, own]`` or ``[own]``.
``sessions``: session ``s`` owns one node holding its whole conversation (fresh input 1,
output 1, fresh input 2, ...); every turn's path is ``[prefix, session node]``. Requests are in
session-major order, so turn ``k``'s parent (turn ``k - 1``) is the request just before it.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from simulator.textio import parse_yaml, read_text
from simulator.workload.agentic import AgenticWorkload, agentic_graph
from simulator.workload.compiled import (
    CompiledWorkload,
    WorkloadError,
    children_from_parents,
    validate_compiled,
)
from simulator.workload.distributions import sample_counts, sample_times
from simulator.workload.graph import SessionGraph, compile_graph
from simulator.workload.spec import (
    WORKLOAD_SPEC_ADAPTER,
    Arrival,
    BurstArrival,
    FixedRateArrival,
    PoissonArrival,
    RequestsWorkload,
    SessionsWorkload,
    WorkloadSpec,
)
from simulator.workload.trace import TraceWorkload, detect_format, resolve_path, trace_graph

__all__ = [
    "compile_workload",
    "load_workload_spec",
    "parse_workload_spec",
    "arrival_times",
    "workload_graph",
]

_I64 = np.int64


def arrival_times(arrival: Arrival, rng: np.random.Generator, n: int) -> np.ndarray:
    """Arrival times (float64, seconds, non-decreasing) of ``n`` arrivals; the first is at 0."""
    if isinstance(arrival, BurstArrival):
        return np.zeros(n, dtype=np.float64)
    if isinstance(arrival, FixedRateArrival):
        return np.arange(n, dtype=np.float64) / arrival.rate
    if isinstance(arrival, PoissonArrival):
        out = np.zeros(n, dtype=np.float64)
        if n > 1:
            np.cumsum(rng.exponential(1.0 / arrival.rate, size=n - 1), out=out[1:])
        return out
    raise TypeError(f"unknown arrival process {arrival!r}")  # pragma: no cover


def _tree(shared: int, own_tokens: np.ndarray, owner: np.ndarray):
    """Nodes (optional shared prefix + one node per owner) and the CSR paths of the requests.

    ``own_tokens[i]`` is the length of owner ``i``'s node; ``owner[r]`` the owner of request ``r``.
    """
    num_own = own_tokens.shape[0]
    num_req = owner.shape[0]
    if shared > 0:
        node_parent = np.zeros(num_own + 1, dtype=_I64)
        node_parent[0] = -1
        node_start = np.full(num_own + 1, shared, dtype=_I64)
        node_start[0] = 0
        node_num = np.empty(num_own + 1, dtype=_I64)
        node_num[0] = shared
        node_num[1:] = own_tokens
        path_start = np.arange(0, 2 * num_req + 1, 2, dtype=_I64)
        path_nodes = np.zeros(2 * num_req, dtype=_I64)
        path_nodes[1::2] = owner + 1
    else:
        node_parent = np.full(num_own, -1, dtype=_I64)
        node_start = np.zeros(num_own, dtype=_I64)
        node_num = own_tokens.astype(_I64, copy=True)
        path_start = np.arange(num_req + 1, dtype=_I64)
        path_nodes = owner.astype(_I64, copy=True)
    return node_parent, node_start, node_num, path_start, path_nodes


def _compile_requests(spec: RequestsWorkload, rng: np.random.Generator) -> CompiledWorkload:
    n = spec.num_requests
    arrival = arrival_times(spec.arrival, rng, n)
    private = sample_counts(spec.prompt_tokens, rng, n)
    output = sample_counts(spec.output_tokens, rng, n)
    shared = spec.shared_prefix_tokens
    ids = np.arange(n, dtype=_I64)
    node_parent, node_start, node_num, path_start, path_nodes = _tree(shared, private + output, ids)
    parents_start = np.zeros(n + 1, dtype=_I64)
    parent_ids = np.zeros(0, dtype=_I64)
    children_start, child_ids = children_from_parents(n, parents_start, parent_ids)
    return CompiledWorkload(
        node_parent=node_parent,
        node_start_tokens=node_start,
        node_num_tokens=node_num,
        req_session=ids,
        req_prompt_tokens=private + shared,
        req_output_tokens=output,
        req_arrival_time=arrival,
        req_wait_after_ready=np.zeros(n, dtype=np.float64),
        req_path_start=path_start,
        path_nodes=path_nodes,
        req_parents_start=parents_start,
        parent_ids=parent_ids,
        req_children_start=children_start,
        child_ids=child_ids,
    )


def _compile_sessions(spec: SessionsWorkload, rng: np.random.Generator) -> CompiledWorkload:
    num_sessions = spec.num_sessions
    session_arrival = arrival_times(spec.arrival, rng, num_sessions)
    turns = sample_counts(spec.turns, rng, num_sessions)
    total = int(turns.sum())
    first_start = np.zeros(num_sessions, dtype=_I64)  # index of each session's first turn
    np.cumsum(turns[:-1], out=first_start[1:])
    is_first = np.zeros(total, dtype=bool)
    is_first[first_start] = True

    fresh = np.empty(total, dtype=_I64)
    fresh[first_start] = sample_counts(spec.first_prompt_tokens, rng, num_sessions)
    fresh[~is_first] = sample_counts(spec.fresh_input_tokens, rng, total - num_sessions)
    output = sample_counts(spec.output_tokens, rng, total)
    wait = np.zeros(total, dtype=np.float64)
    wait[~is_first] = sample_times(spec.wait_after_ready, rng, total - num_sessions)

    session = np.repeat(np.arange(num_sessions, dtype=_I64), turns)
    # conversation tokens before each turn, within its session (exclusive cumsum per session)
    step = fresh + output
    before = np.cumsum(step) - step
    before -= before[first_start][session]
    shared = spec.shared_prefix_tokens
    prompt = shared + before + fresh
    arrival = np.zeros(total, dtype=np.float64)
    arrival[first_start] = session_arrival

    if spec.max_context_tokens is not None:
        # prompt + output grows strictly along a chain, so `keep` is a prefix of each session
        keep = prompt + output <= spec.max_context_tokens
        if not keep.all():
            session, prompt, output = session[keep], prompt[keep], output[keep]
            arrival, wait, is_first = arrival[keep], wait[keep], is_first[keep]
            if session.shape[0] == 0:
                raise WorkloadError(
                    f"max_context_tokens = {spec.max_context_tokens}: every session's first "
                    "turn exceeds it, so the workload has no requests"
                )
            # renumber the surviving sessions densely, in order
            session = np.cumsum(is_first, dtype=_I64) - 1

    num_req = session.shape[0]
    first = np.flatnonzero(is_first)
    last = np.empty_like(first)
    last[:-1] = first[1:] - 1
    last[-1] = num_req - 1
    conversation = prompt[last] + output[last] - shared  # tokens of each session's node
    node_parent, node_start, node_num, path_start, path_nodes = _tree(shared, conversation, session)
    parents_start = np.zeros(num_req + 1, dtype=_I64)
    np.cumsum(~is_first, out=parents_start[1:])
    parent_ids = np.flatnonzero(~is_first).astype(_I64) - 1
    children_start, child_ids = children_from_parents(num_req, parents_start, parent_ids)
    return CompiledWorkload(
        node_parent=node_parent,
        node_start_tokens=node_start,
        node_num_tokens=node_num,
        req_session=session,
        req_prompt_tokens=prompt,
        req_output_tokens=output,
        req_arrival_time=arrival,
        req_wait_after_ready=wait,
        req_path_start=path_start,
        path_nodes=path_nodes,
        req_parents_start=parents_start,
        parent_ids=parent_ids,
        req_children_start=children_start,
        child_ids=child_ids,
    )


def workload_graph(spec: WorkloadSpec, seed: int) -> tuple[SessionGraph, np.ndarray]:
    """The session graph of an ``agentic`` or ``trace`` spec (traffic applied) and its session
    start times."""
    if isinstance(spec, AgenticWorkload):
        return agentic_graph(spec, seed)
    if isinstance(spec, TraceWorkload):
        return trace_graph(spec, seed)
    raise TypeError(f"{type(spec).__name__} is not compiled through a session graph")


def compile_workload(spec: WorkloadSpec, seed: int) -> CompiledWorkload:
    """Compile ``spec`` deterministically for ``seed``; validated before it is returned.

    ``requests`` and ``sessions`` use ``np.random.default_rng(seed)`` (draw order above);
    ``agentic`` and ``trace`` build a :class:`~simulator.workload.graph.SessionGraph` from
    independent streams spawned from ``seed`` and compile it.
    """
    try:
        return _compile(spec, seed)
    except WorkloadError as err:
        source = getattr(spec, "_source", "")
        if source and not str(err).startswith(source):
            raise WorkloadError(f"{source}: {err}") from None
        raise


def _compile(spec: WorkloadSpec, seed: int) -> CompiledWorkload:
    rng = np.random.default_rng(seed)
    if isinstance(spec, RequestsWorkload):
        wl = _compile_requests(spec, rng)
    elif isinstance(spec, SessionsWorkload):
        wl = _compile_sessions(spec, rng)
    elif isinstance(spec, AgenticWorkload | TraceWorkload):
        g, start = workload_graph(spec, seed)
        return compile_graph(g, start)
    else:
        raise TypeError(f"not a workload spec: {type(spec).__name__}")
    validate_compiled(wl)
    return wl


# --------------------------------------------------------------------------- loading from YAML


def _field_path(loc: tuple[Any, ...], data: Any) -> list[str]:
    """The user's field path for a pydantic error location.

    Pydantic puts the tag of a discriminated union (``sessions``, ``lognormal``...) and validator
    names into the location; walk the input alongside and keep only real keys and indices.
    """
    parts: list[str] = []
    cur = data
    for i, item in enumerate(loc):
        if not isinstance(cur, dict | list):
            break  # a scalar written for a mapping (the `X` shorthand for `{dist: fixed, value: X}`)
        if isinstance(cur, dict) and item in cur:
            parts.append(str(item))
            cur = cur[item]
        elif isinstance(cur, list) and isinstance(item, int) and 0 <= item < len(cur):
            parts.append(str(item))
            cur = cur[item]
        elif isinstance(cur, dict) and (item in cur.values() or "[" in str(item)):
            continue  # a union tag or a validator name
        else:
            parts.extend(str(x) for x in loc[i:])  # a missing field: name it as pydantic does
            break
    return parts


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 6
_REPR.maxlevel = 3


def _short_repr(value: Any, limit: int = 80) -> str:
    """A bounded repr: huge or deeply nested values (YAML alias bombs) are never expanded."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_validation_error(source: str, err: ValidationError, data: Any) -> str:
    """One line per error: ``source: field.path: message (got value)``."""
    lines = []
    for e in err.errors(include_url=False):
        parts = _field_path(tuple(e["loc"]), data)
        msg = e["msg"].removeprefix("Value error, ")
        got = f" (got {_short_repr(e['input'])})"
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            key = str(e.get("ctx", {}).get("discriminator", "")).strip("'")
            parts.append(key)
            inp = e["input"]
            got = f" (got {_short_repr(inp.get(key))})" if isinstance(inp, dict) else got
            if e["type"] == "union_tag_not_found":
                msg, got = f"missing '{key}' (it says which variant this is)", ""
        elif e["type"] == "missing":
            got = ""
        field = ".".join(parts) or "<top level>"
        lines.append(f"{source}: {field}: {msg}{got}")
    return "\n".join(lines)


def _infer_base_dir(source: str) -> Path | None:
    """The directory of the file named by ``source`` (``file`` or ``file: field...``), if any."""
    for cand in (source, source.split(": ", 1)[0]):
        try:
            p = Path(cand)
            if p.is_file():
                return p.resolve().parent
        except (OSError, ValueError):
            continue
    return None


def parse_workload_spec(
    data: Any, source: str = "<workload>", base_dir: str | Path | None = None
) -> WorkloadSpec:
    """Validate a parsed mapping into a spec; errors become :class:`WorkloadError`.

    Relative file paths inside the spec (a trace's ``path``, an empirical distribution's
    ``trace``) are resolved against ``base_dir`` (the workload file's directory), then the CWD.
    Without ``base_dir``, the directory of the file named by ``source`` is used when ``source``
    names one (``"dir/exp.yaml"`` or ``"dir/exp.yaml: workload"``). A trace is read and checked
    here, so a bad trace is reported when the spec is loaded.
    """
    if not isinstance(data, dict):
        raise WorkloadError(
            f"{source}: a workload spec must be a mapping with a 'kind' key "
            f"(got {_short_repr(data)})"
        )
    if base_dir is None:
        base_dir = _infer_base_dir(source)
    try:
        spec = WORKLOAD_SPEC_ADAPTER.validate_python(data, context={"base_dir": base_dir})
    except ValidationError as err:
        raise WorkloadError(format_validation_error(source, err, data)) from None
    except WorkloadError as err:  # raised while reading a file named by the spec
        raise WorkloadError(f"{source}: {err}") from None
    if isinstance(spec, TraceWorkload):
        path = resolve_path(spec.path, base_dir)
        if not path.is_file():
            raise WorkloadError(f"{source}: path: trace file not found: {spec.path!r}")
        try:
            fmt = spec.format or detect_format(path)
            spec = TraceWorkload.model_validate(
                spec.model_dump() | {"path": str(path), "format": fmt}
            )
        except ValidationError as err:
            raise WorkloadError(format_validation_error(source, err, data)) from None
        try:
            trace_graph(spec, 0)  # read and check the trace (cached for the compile)
        except WorkloadError as err:
            raise WorkloadError(f"{source}: {err}") from None
    spec._source = source
    return spec


def load_workload_spec(path: str | Path) -> WorkloadSpec:
    """Read a YAML workload spec; every problem is a :class:`WorkloadError` naming file and field."""
    path = Path(path)
    data = parse_yaml(read_text(path, WorkloadError), path, WorkloadError)
    return parse_workload_spec(data, str(path), path.resolve().parent)
