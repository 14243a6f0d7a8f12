"""Shared plumbing of the trace readers: strict field checks and rows -> :class:`SessionGraph`.

Every reader error is a :class:`~simulator.workload.compiled.WorkloadError` whose message starts
with ``FILE:LINE:`` (or ``FILE:`` plus a JSON path) and names the field, so the CLI can print it
as one line and exit with code 2. Nothing is returned half-loaded.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from simulator.workload.compiled import WorkloadError
from simulator.workload.graph import SessionGraph, csr_from_edges, make_graph, topo_order

__all__ = ["Where", "get_int", "get_number", "rows_to_graph"]


class Where:
    """Where a row came from, for error messages: ``file:line`` or ``file: nodes[3]``."""

    def __init__(self, path: str, line: int | None = None, item: str | None = None) -> None:
        self.path = path
        self.line = line
        self.item = item

    def __str__(self) -> str:
        text = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{text}: {self.item}" if self.item else text

    def error(self, field: str | None, message: str) -> WorkloadError:
        head = f"{self}: {field}: " if field else f"{self}: "
        return WorkloadError(head + message)


def json_rows(text: str, source: str):
    """``(Where, row)`` for every non-blank line of a JSONL text; a line that is not a JSON
    object raises an error naming ``source`` and the line."""
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = Where(source, lineno)
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            raise where.error(None, f"invalid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(row, dict):
            raise where.error(None, f"expected a JSON object, got {type(row).__name__}")
        yield where, row


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


MAX_TRACE_INT = 10**12  # beyond any token count or id a trace can mean; keeps int64 safe


def get_int(
    obj: dict,
    key: str,
    where: Where,
    *,
    minimum: int | None = 0,
    required: bool = True,
    field: str | None = None,
    default: int | None = None,
) -> int | None:
    """An integer field (an integral float such as ``500.0`` is accepted; ``true`` is not)."""
    name = field or key
    if key not in obj or obj[key] is None:
        if required:
            raise where.error(name, "missing (required)")
        return default
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise where.error(name, f"must be an integer (got {_short(v)})")
    if isinstance(v, float):
        if not math.isfinite(v) or v != int(v):
            raise where.error(name, f"must be an integer (got {_short(v)})")
        v = int(v)
    if minimum is not None and v < minimum:
        raise where.error(name, f"must be >= {minimum} (got {v})")
    if v > MAX_TRACE_INT:
        raise where.error(name, f"must be <= {MAX_TRACE_INT:,} (got {_short(v)})")
    return v


def get_number(
    obj: dict,
    key: str,
    where: Where,
    *,
    minimum: float | None = 0.0,
    required: bool = True,
    field: str | None = None,
    default: float = 0.0,
    nan_as_default: bool = False,
) -> float:
    """A finite number (``null`` -> ``default`` unless required)."""
    name = field or key
    if key not in obj or obj[key] is None:
        if required:
            raise where.error(name, "missing (required)")
        return default
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise where.error(name, f"must be a number (got {_short(v)})")
    v = float(v)
    if math.isnan(v) and nan_as_default:
        return default
    if not math.isfinite(v):
        raise where.error(name, f"must be finite (got {v})")
    if minimum is not None and v < minimum:
        raise where.error(name, f"must be >= {minimum:g} (got {v:g})")
    return v


def rows_to_graph(
    *,
    source: str,
    session_key: list,
    parents: list[list[int]],
    history_parent: list[int],
    fresh: list[int] | np.ndarray,
    output: list[int] | np.ndarray,
    wait: list[float] | np.ndarray,
    describe_row,
    subsession: list[int] | np.ndarray | None = None,
    history_tokens: list[int] | np.ndarray | None = None,
    prefix: list[int] | np.ndarray | None = None,
    prefix_parent: np.ndarray | None = None,
    prefix_tokens: np.ndarray | None = None,
    prefix_names: tuple[str, ...] = (),
    session_time: dict | None = None,
) -> tuple[SessionGraph, np.ndarray]:
    """Order rows session by session (sessions by first appearance), parents before children
    (file order among the ready rows), and build the graph.

    ``parents`` and ``history_parent`` hold row indices. ``describe_row(i)`` names row ``i`` in a
    cycle error. Returns the graph and ``row_of``: the row index of every request.
    """
    n = len(session_key)
    if n == 0:
        raise WorkloadError(f"{source}: no requests in the file")
    keys: dict = {}
    sess = np.fromiter(
        (keys.setdefault(k, len(keys)) for k in session_key), dtype=np.int64, count=n
    )
    # rank rows session-major, file order inside a session
    rank_of_row = np.empty(n, dtype=np.int64)
    rank_of_row[np.argsort(sess, kind="stable")] = np.arange(n, dtype=np.int64)
    counts = np.fromiter((len(p) for p in parents), dtype=np.int64, count=n)
    par_rows = np.fromiter((q for p in parents for q in p), dtype=np.int64, count=int(counts.sum()))
    child_rows = np.repeat(np.arange(n, dtype=np.int64), counts)
    ps, pid = csr_from_edges(n, rank_of_row[child_rows], rank_of_row[par_rows])
    order = topo_order(n, ps, pid)  # ranks in topological order
    row_by_rank = np.empty(n, dtype=np.int64)
    row_by_rank[rank_of_row] = np.arange(n, dtype=np.int64)
    if order.shape[0] < n:
        _raise_cycle(n, order, row_by_rank, parents, rank_of_row, describe_row, source)
    row_of = row_by_rank[order]
    new_of_row = np.empty(n, dtype=np.int64)
    new_of_row[row_of] = np.arange(n, dtype=np.int64)
    ps2, pid2 = csr_from_edges(n, new_of_row[child_rows], new_of_row[par_rows])
    hp_rows = np.asarray(history_parent, dtype=np.int64)
    hp = np.where(hp_rows >= 0, new_of_row[np.maximum(hp_rows, 0)], -1)[row_of]
    sess_sorted = sess[row_of]
    # sessions are numbered by first appearance, and rows come out grouped by session
    st = None
    if session_time is not None:
        st = np.array([session_time[k] for k in keys], dtype=np.float64)

    def pick(a, dtype):
        return None if a is None else np.asarray(a, dtype=dtype)[row_of]

    g = make_graph(
        session=sess_sorted,
        subsession=pick(subsession, np.int64),
        fresh=np.asarray(fresh, dtype=np.int64)[row_of],
        output=np.asarray(output, dtype=np.int64)[row_of],
        parents_start=ps2,
        parent_ids=pid2,
        history_parent=hp,
        history_tokens=pick(history_tokens, np.int64),
        prefix=pick(prefix, np.int64),
        prefix_parent=prefix_parent,
        prefix_tokens=prefix_tokens,
        wait=np.asarray(wait, dtype=np.float64)[row_of],
        session_time=st,
        source=source,
        prefix_names=prefix_names,
    )
    return g, row_of


def _raise_cycle(n, order, row_by_rank, parents, rank_of_row, describe_row, source) -> None:
    done = np.zeros(n, dtype=bool)
    done[row_by_rank[order]] = True
    stuck = [i for i in range(n) if not done[i]]
    # walk up through unfinished parents until a row repeats: that row is on a cycle
    row = min(stuck, key=lambda i: rank_of_row[i])
    seen: dict[int, int] = {}
    path: list[int] = []
    while row not in seen:
        seen[row] = len(path)
        path.append(row)
        row = next(p for p in parents[row] if not done[p])
    cycle = path[seen[row] :]
    cycle.reverse()  # parent -> child order
    chain = " -> ".join(describe_row(i) for i in cycle + [cycle[0]])
    raise WorkloadError(f"{source}: dependency cycle: {chain}")
