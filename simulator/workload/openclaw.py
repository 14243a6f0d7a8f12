"""OpenClaw telemetry DAGs (JSON: ``nodes``, ``edges``, ``sessions``, ``stats``): reader.

Schema: ../shared/data/openclaw/README.md. Per node: ``id`` (unique), ``session_id``,
``session_key`` ("agent:main:main" or "agent:main:subagent:<uuid>"), ``usage{input, output,
cache_read}``, ``new_tokens{total}``, ``wait_after_ready_ms`` (null for roots). Per edge: ``from``,
``to``, ``type`` (``sequential`` | ``subagent_spawn`` | ``subagent_result``), ``is_history_parent``.

Mapping to the session graph:

* a request per node; ``output = usage.output``; parents = the edges into it; at most one of them
  may be the history parent; ``wait = wait_after_ready_ms / 1000`` (null = 0);
* a traffic *session* is a connected run (the main agent with every subagent it spawned); each
  OpenClaw session (main or subagent) is a *subsession*;
* ``history: full`` (default): ``fresh = new_tokens.total``, so a prompt is its history parent's
  whole conversation + fresh (the Veeksha convention). ``history: measured``: prompts are the
  provider's ``usage.input + usage.cache_read``; a request inherits
  ``clip(prompt - new_tokens.total, 0, parent conversation)`` tokens of its history parent's
  conversation and the rest is fresh (contexts that the agent truncated branch off inside the
  parent's content);
* ``scaffold: observed`` (default): requests without a history parent (main and subagent roots)
  start from a shared scaffold whose length is what the provider served from cache for them:
  a common part (the smallest ``cache_read`` over these roots) and, below it, one part per agent
  kind (main / subagent: the median ``cache_read`` of that kind's roots). ``scaffold: none``
  keeps all their input fresh.

Errors name the file, the node or edge (``nodes[12] (id ...)``; with the line of its ``"id"``
when the file is pretty-printed one key per line), and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np

from simulator.textio import read_text
from simulator.workload.compiled import WorkloadError
from simulator.workload.graph import SessionGraph
from simulator.workload.tracefile import Where, get_int, get_number, rows_to_graph

__all__ = ["read_openclaw"]

_EDGE_TYPES = ("sequential", "subagent_spawn", "subagent_result")


def _line_index(text: str, key: str, count: int) -> list[int] | None:
    """Line numbers of ``"key":`` occurrences, if there is exactly one per item."""
    pattern = re.compile(r'^\s*"' + re.escape(key) + r'"\s*:', re.MULTILINE)
    starts = [m.start() for m in pattern.finditer(text)]
    if len(starts) != count:
        return None
    lines = []
    line = 1
    pos = 0
    for s in starts:
        line += text.count("\n", pos, s)
        pos = s
        lines.append(line)
    return lines


class _Find:
    def __init__(self, parent: list[int]) -> None:
        self.parent = parent

    def __call__(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x


def read_openclaw(
    path: str | Path,
    history: Literal["full", "measured"] = "full",
    scaffold: Literal["observed", "none"] = "observed",
) -> SessionGraph:
    """Read an OpenClaw DAG JSON file; every problem is a :class:`WorkloadError`."""
    path = Path(path)
    src = str(path)
    text = read_text(path, WorkloadError)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise WorkloadError(
            f"{src}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})"
        ) from None
    if not isinstance(data, dict):
        raise WorkloadError(f"{src}: expected a JSON object with 'nodes' and 'edges'")
    nodes, edges = data.get("nodes"), data.get("edges")
    if not isinstance(nodes, list):
        raise WorkloadError(f"{src}: nodes: missing or not a list")
    if not isinstance(edges, list):
        raise WorkloadError(f"{src}: edges: missing or not a list")
    node_lines = _line_index(text, "id", len(nodes))
    edge_lines = _line_index(text, "from", len(edges))

    def nwhere(i: int, node_id=None) -> Where:
        label = f"nodes[{i}]" + (f" (id {node_id})" if node_id is not None else "")
        return Where(src, node_lines[i] if node_lines else None, label)

    n = len(nodes)
    index: dict[str, int] = {}
    sess_name: list[str] = []
    is_sub: list[bool] = []
    output: list[int] = []
    new_total: list[int] = []
    measured: list[int] = []
    cache_read: list[int] = []
    wait: list[float] = []
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise nwhere(i).error(None, "must be an object")
        nid = node.get("id")
        if not isinstance(nid, str) or not nid:
            raise nwhere(i).error("id", f"missing or not a string (got {nid!r})")
        w = nwhere(i, nid)
        if nid in index:
            raise w.error("id", f"duplicate node id (first at nodes[{index[nid]}])")
        index[nid] = i
        sid = node.get("session_id")
        if not isinstance(sid, str) or not sid:
            raise w.error("session_id", f"missing or not a string (got {sid!r})")
        sess_name.append(sid)
        key = node.get("session_key") or ""
        is_sub.append(":subagent:" in str(key))
        usage = node.get("usage")
        if not isinstance(usage, dict):
            raise w.error("usage", "missing or not an object")
        output.append(get_int(usage, "output", w, minimum=1, field="usage.output"))
        nt = node.get("new_tokens")
        if not isinstance(nt, dict):
            raise w.error("new_tokens", "missing or not an object")
        new_total.append(get_int(nt, "total", w, minimum=0, field="new_tokens.total"))
        req = history == "measured" or scaffold == "observed"
        inp = get_int(usage, "input", w, minimum=0, field="usage.input", required=req, default=0)
        cr = get_int(
            usage, "cache_read", w, minimum=0, field="usage.cache_read", required=req, default=0
        )
        measured.append(inp + cr)
        cache_read.append(cr)
        wait.append(get_number(node, "wait_after_ready_ms", w, required=False) / 1000.0)

    parents: list[list[int]] = [[] for _ in range(n)]
    hist = [-1] * n
    seen_edges: dict[tuple[int, int], int] = {}
    for j, e in enumerate(edges):
        w = Where(src, edge_lines[j] if edge_lines else None, f"edges[{j}]")
        if not isinstance(e, dict):
            raise w.error(None, "must be an object")
        ends = []
        for key in ("from", "to"):
            v = e.get(key)
            if v not in index:
                raise w.error(key, f"unknown node id {v!r}")
            ends.append(index[v])
        a, b = ends
        if a == b:
            raise w.error("to", f"node {e['to']!r} is its own parent")
        etype = e.get("type")
        if etype not in _EDGE_TYPES:
            raise w.error("type", f"must be one of {', '.join(_EDGE_TYPES)} (got {etype!r})")
        ih = e.get("is_history_parent", False)
        if not isinstance(ih, bool):
            raise w.error("is_history_parent", f"must be true or false (got {ih!r})")
        if (a, b) in seen_edges:
            raise w.error(
                None,
                f"duplicate edge {e['from']} -> {e['to']} (first at edges[{seen_edges[(a, b)]}])",
            )
        seen_edges[(a, b)] = j
        parents[b].append(a)
        if ih:
            if hist[b] >= 0:
                raise w.error(
                    "is_history_parent",
                    f"node {e['to']!r} has two history parents "
                    f"({nodes[hist[b]]['id']!r} and {e['from']!r})",
                )
            hist[b] = a

    # traffic sessions: connected runs (union-find over edges)
    uf = _Find(list(range(n)))
    for b in range(n):
        for a in parents[b]:
            ra, rb = uf(a), uf(b)
            if ra != rb:
                uf.parent[max(ra, rb)] = min(ra, rb)
    component = [uf(i) for i in range(n)]
    sub_ids: dict[str, int] = {}
    subsession = [sub_ids.setdefault(s, len(sub_ids)) for s in sess_name]

    # scaffold: shared prefix nodes for requests without a history parent
    roots = [i for i in range(n) if hist[i] < 0]
    prefix = [-1] * n
    prefix_parent: list[int] = []
    prefix_tokens: list[int] = []
    names: list[str] = []
    scaffold_len = [0] * n
    if scaffold == "observed" and roots:
        common = min(cache_read[i] for i in roots)
        node_of_kind: dict[bool, tuple[int, int]] = {}
        base = -1
        if common > 0:
            prefix_parent.append(-1)
            prefix_tokens.append(common)
            names.append("scaffold:common")
            base = 0
        for kind in (False, True):
            members = [i for i in roots if is_sub[i] == kind]
            if not members:
                continue
            med = int(np.median([cache_read[i] for i in members]))
            if med > common:
                prefix_parent.append(base)
                prefix_tokens.append(med - common)
                names.append("scaffold:subagent" if kind else "scaffold:main")
                node_of_kind[kind] = (len(prefix_tokens) - 1, med)
            elif base >= 0:
                node_of_kind[kind] = (base, common)
        for i in roots:
            avail = measured[i] if history == "measured" else new_total[i]
            node, length = node_of_kind.get(is_sub[i], (-1, 0))
            if length > avail or length == 0:  # too short for the kind's scaffold: common only
                node, length = (base, common) if 0 < common <= avail else (-1, 0)
            prefix[i] = node
            scaffold_len[i] = length

    g, row_of = rows_to_graph(
        source=src,
        session_key=component,
        parents=parents,
        history_parent=hist,
        fresh=[0] * n,  # set below, once the rows are in topological order
        output=output,
        wait=wait,
        describe_row=lambda i: f"{nodes[i]['id']}",
        subsession=subsession,
        prefix=prefix,
        prefix_parent=np.asarray(prefix_parent, dtype=np.int64),
        prefix_tokens=np.asarray(prefix_tokens, dtype=np.int64),
        prefix_names=tuple(names),
    )
    out = np.asarray(output, dtype=np.int64)[row_of]
    newt = np.asarray(new_total, dtype=np.int64)[row_of]
    scl = np.asarray(scaffold_len, dtype=np.int64)[row_of]
    hp = g.history_parent
    fresh = np.empty(n, dtype=np.int64)
    htok = np.full(n, -1, dtype=np.int64)
    if history == "full":
        fresh[:] = np.where(hp < 0, newt - scl, newt)
    else:
        meas = np.asarray(measured, dtype=np.int64)[row_of]
        end = np.empty(n, dtype=np.int64)
        for r in range(n):  # rows are topological: a history parent's end is known
            if hp[r] < 0:
                fresh[r] = meas[r] - scl[r]
                end[r] = meas[r] + out[r]
                if meas[r] < 1:
                    raise nwhere(int(row_of[r]), nodes[row_of[r]]["id"]).error(
                        "usage", "input + cache_read is 0: no prompt"
                    )
                continue
            full = end[hp[r]]
            inherit = min(max(int(meas[r] - newt[r]), 0), int(full))
            htok[r] = inherit if inherit < full else -1
            fresh[r] = max(int(meas[r]) - inherit, 0)
            end[r] = inherit + fresh[r] + out[r]
    return replace(g, fresh=fresh, history_tokens=htok)
