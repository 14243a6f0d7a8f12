"""Veeksha session traces (JSONL, one request per line): reader and writer.

Schema (../shared/data/veeksha_traces/README.md): required ``session_id``, ``input_length``,
``new_input_length``, ``output_length``; optional ``session_context`` with all four of
``node_id`` (int), ``parent_nodes`` (list of ints or null), ``history_parent`` (int or null, one of
the parents) and ``wait_after_ready`` (seconds; null or NaN = 0). Other keys (``node_id``,
``cacheable_history_tokens``, ``workload``...) are ignored, except that a top-level ``node_id``
must agree with ``session_context.node_id``.

* With ``session_context``: a node is ready when all its parents finished and is dispatched
  ``wait_after_ready`` later; its prompt is the history parent's prompt + output followed by
  ``new_input_length`` fresh tokens (``input_length`` is informational, as in Veeksha).
* Without it (legacy linear form): the rows of a session chain in file order, or by ``turn_idx``
  when every row has one; each row's history parent is the previous row, its wait the optional
  ``wait_after_previous_response_s``.
* A session must use one form for all its rows.

Prefixes are never shared across sessions (Veeksha makes every root's first page unique).
Errors name the file, the line and the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from simulator.textio import read_text
from simulator.workload.compiled import WorkloadError
from simulator.workload.graph import SessionGraph, graph_positions, session_bounds
from simulator.workload.tracefile import Where, get_int, get_number, json_rows, rows_to_graph

__all__ = ["read_veeksha", "write_veeksha"]

_CONTEXT_KEYS = ("node_id", "parent_nodes", "history_parent", "wait_after_ready")


def _session_key(row: dict, where: Where):
    if "session_id" not in row or row["session_id"] is None:
        raise where.error("session_id", "missing (required)")
    v = row["session_id"]
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise where.error("session_id", f"must be an integer or a string (got {v!r})")
    return v


def _node_int(value, where: Where, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
        raise where.error(field, f"must be an integer node id (got {value!r})")
    return value


def read_veeksha(path: str | Path) -> SessionGraph:
    """Read a Veeksha trace; every problem is a :class:`WorkloadError` naming file:line: field."""
    path = Path(path)
    src = str(path)
    text = read_text(path, WorkloadError)
    lines: list[int] = []
    session_key: list = []
    fresh: list[int] = []
    output: list[int] = []
    ctx: list[dict | None] = []
    legacy_wait: list[float] = []
    turn_idx: list[int | None] = []
    for where, row in json_rows(text, src):
        session_key.append(_session_key(row, where))
        get_int(row, "input_length", where, minimum=0)
        fresh.append(get_int(row, "new_input_length", where, minimum=0))
        output.append(get_int(row, "output_length", where, minimum=1))
        c = row.get("session_context")
        if c is not None:
            if not isinstance(c, dict):
                raise where.error("session_context", f"must be an object (got {c!r})")
            for key in _CONTEXT_KEYS:
                if key not in c:
                    raise where.error(f"session_context.{key}", "missing (required in a context)")
            node = _node_int(c["node_id"], where, "session_context.node_id")
            if "node_id" in row and row["node_id"] is not None:
                top = _node_int(row["node_id"], where, "node_id")
                if top != node:
                    raise where.error(
                        "node_id", f"{top} differs from session_context.node_id ({node})"
                    )
            pn = c["parent_nodes"]
            if pn is None:
                pn = []
            if not isinstance(pn, list):
                raise where.error("session_context.parent_nodes", f"must be a list (got {pn!r})")
            pn = [_node_int(p, where, "session_context.parent_nodes") for p in pn]
            if len(set(pn)) != len(pn):
                raise where.error("session_context.parent_nodes", f"duplicate parent in {pn}")
            hp = c["history_parent"]
            if hp is not None:
                hp = _node_int(hp, where, "session_context.history_parent")
                if hp not in pn:
                    raise where.error(
                        "session_context.history_parent",
                        f"{hp} is not one of parent_nodes {pn}",
                    )
            wait = get_number(
                c,
                "wait_after_ready",
                where,
                required=False,
                field="session_context.wait_after_ready",
                nan_as_default=True,
            )
            ctx.append({"node": node, "parents": pn, "hp": hp, "wait": wait})
        else:
            ctx.append(None)
        legacy_wait.append(
            get_number(
                row, "wait_after_previous_response_s", where, required=False, nan_as_default=True
            )
        )
        turn_idx.append(get_int(row, "turn_idx", where, required=False, minimum=0))
        lines.append(where.line)
    n = len(lines)
    if n == 0:
        raise WorkloadError(f"{src}: no requests in the file")

    # group rows by session (order of first appearance)
    rows_of: dict = {}
    for i, k in enumerate(session_key):
        rows_of.setdefault(k, []).append(i)
    parents: list[list[int]] = [[] for _ in range(n)]
    history: list[int] = [-1] * n
    wait: list[float] = [0.0] * n
    node_label: list[str] = [""] * n
    for key, rows in rows_of.items():
        first_has = ctx[rows[0]] is not None
        for i in rows:
            if (ctx[i] is not None) != first_has:
                raise Where(src, lines[i]).error(
                    "session_context",
                    f"session {key!r} mixes rows with and without session_context "
                    f"(line {lines[rows[0]]} {'has' if first_has else 'has none'})",
                )
        if first_has:
            row_of_node: dict[int, int] = {}
            for i in rows:
                node = ctx[i]["node"]
                if node in row_of_node:
                    raise Where(src, lines[i]).error(
                        "session_context.node_id",
                        f"duplicate node_id {node} in session {key!r} "
                        f"(first on line {lines[row_of_node[node]]})",
                    )
                row_of_node[node] = i
            for i in rows:
                c = ctx[i]
                for p in c["parents"]:
                    if p not in row_of_node:
                        raise Where(src, lines[i]).error(
                            "session_context.parent_nodes",
                            f"unknown parent node {p} (no such node_id in session {key!r})",
                        )
                    if p == c["node"]:
                        raise Where(src, lines[i]).error(
                            "session_context.parent_nodes", f"node {p} is its own parent"
                        )
                parents[i] = [row_of_node[p] for p in c["parents"]]
                history[i] = row_of_node[c["hp"]] if c["hp"] is not None else -1
                wait[i] = c["wait"]
                node_label[i] = f"session {key!r} node {c['node']} (line {lines[i]})"
        else:
            if all(turn_idx[i] is not None for i in rows):
                seen: dict[int, int] = {}
                for i in rows:
                    if turn_idx[i] in seen:
                        raise Where(src, lines[i]).error(
                            "turn_idx",
                            f"duplicate turn_idx {turn_idx[i]} in session {key!r} "
                            f"(first on line {lines[seen[turn_idx[i]]]})",
                        )
                    seen[turn_idx[i]] = i
                rows = sorted(rows, key=lambda i: turn_idx[i])
            for a, b in zip(rows[:-1], rows[1:], strict=True):
                parents[b] = [a]
                history[b] = a
                wait[b] = legacy_wait[b]
            for i in rows:
                node_label[i] = f"session {key!r} line {lines[i]}"

    g, _ = rows_to_graph(
        source=src,
        session_key=session_key,
        parents=parents,
        history_parent=history,
        fresh=fresh,
        output=output,
        wait=wait,
        describe_row=lambda i: node_label[i],
    )
    return g


def write_veeksha(g: SessionGraph, path: str | Path) -> None:
    """Write ``g`` as a Veeksha trace with ``session_context`` on every row.

    Veeksha has no shared prefixes and no partial history: a request's prefix tokens are written
    as fresh input of its root, and a partial history as the full history. Dependencies between
    sessions (closed-loop traffic) are left out: traffic is not part of a trace.
    """
    inherited, prompt, _ = graph_positions(g)
    bounds = session_bounds(g)
    ps, pid = g.parents_start, g.parent_ids
    hp = g.history_parent
    fresh = g.fresh + np.where(hp < 0, inherited, 0)
    with open(path, "w") as fh:
        for s in range(g.num_sessions):
            lo = int(bounds[s])
            for r in range(lo, int(bounds[s + 1])):
                node = r - lo
                hist = int(hp[r] - lo) if hp[r] >= 0 else None
                row = {
                    "session_id": s,
                    "node_id": node,
                    "input_length": int(prompt[r]) if hp[r] >= 0 else int(fresh[r]),
                    "new_input_length": int(fresh[r]),
                    "output_length": int(g.output[r]),
                    "cacheable_history_tokens": int(inherited[r]) if hp[r] >= 0 else 0,
                    "session_context": {
                        "node_id": node,
                        "parent_nodes": [int(p - lo) for p in pid[ps[r] : ps[r + 1]] if p >= lo],
                        "history_parent": hist,
                        "wait_after_ready": float(g.wait[r]),
                    },
                }
                fh.write(json.dumps(row) + "\n")
