"""Workload statistics: the shape of a session graph and its token and timing distributions.

:func:`graph_stats` summarises a :class:`~simulator.workload.graph.SessionGraph` (and, for the
cache figure, its compiled form) as one flat-ish dict (``servesim workload stats``):

* ``requests``, ``sessions`` (traffic units), ``agent_runs`` (main agents + subagents),
  ``compactions``;
* ``requests_per_session``, ``depth`` (longest dependency chain, in requests, per session) and
  ``width`` (most requests at one depth, per session), ``fan_in`` / ``fan_out`` (parents /
  children per request; dependencies between sessions added by closed-loop traffic are ignored);
* ``fresh_input`` (all requests), ``first_input`` (requests without a history parent),
  ``history_input`` (requests with one), ``output``, ``prompt``, ``context`` (prompt + output);
* ``history_overlap``: inherited tokens / prompt, for requests with a history parent;
* ``wait_after_ready`` (s), over requests with parents;
* ``max_context``, token totals and ``cacheable_tokens``: prompt tokens that an infinite,
  token-granular prefix cache could serve (content already produced by an earlier request, in
  request order), with ``cacheable_fraction`` of all prompt tokens. Block rounding and vLLM's
  "last token is always computed" make real hit rates a little lower.

Distributions are given as ``{count, mean, min, p25, p50, p90, p95, p99, max}``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from simulator.workload.compiled import CompiledWorkload
from simulator.workload.graph import (
    KIND_REQUEST,
    SessionGraph,
    compile_graph,
    graph_positions,
    session_bounds,
)

__all__ = ["describe", "graph_stats", "request_depths", "cacheable_tokens", "format_stats"]

PCTS = (25, 50, 90, 95, 99)


def describe(values: np.ndarray) -> dict[str, float]:
    """``{count, mean, min, p25, p50, p90, p95, p99, max}`` of ``values`` (NaN-free)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    out: dict[str, float] = {"count": int(v.size)}
    if v.size == 0:
        return out
    out["mean"] = float(v.mean())
    out["min"] = float(v.min())
    for p, x in zip(PCTS, np.percentile(v, PCTS), strict=True):
        out[f"p{p}"] = float(x)
    out["max"] = float(v.max())
    return out


@njit(cache=True)
def _depths(parents_start, parent_ids, session):
    n = parents_start.shape[0] - 1
    depth = np.ones(n, dtype=np.int64)
    for r in range(n):
        for j in range(parents_start[r], parents_start[r + 1]):
            p = parent_ids[j]
            if session[p] == session[r] and depth[p] + 1 > depth[r]:
                depth[r] = depth[p] + 1
    return depth


def request_depths(g: SessionGraph) -> np.ndarray:
    """Depth of every request: 1 for a root, 1 + the deepest parent otherwise (same session)."""
    return _depths(g.parents_start, g.parent_ids, g.session)


@njit(cache=True)
def _cacheable(node_start, node_len, path_start, path_nodes, prompt, output):
    cov = np.zeros(node_len.shape[0], dtype=np.int64)
    total = 0
    for r in range(prompt.shape[0]):
        p = prompt[r]
        hit = 0
        for j in range(path_start[r], path_start[r + 1]):
            c = path_nodes[j]
            ns = node_start[c]
            need = min(p, ns + node_len[c])
            if need <= ns:
                break
            have = ns + cov[c]
            if have >= need:
                hit = need
            else:
                if have > hit:
                    hit = have
                break
        total += hit
        end = p + output[r]
        for j in range(path_start[r], path_start[r + 1]):
            c = path_nodes[j]
            ext = min(end, node_start[c] + node_len[c]) - node_start[c]
            if ext > cov[c]:
                cov[c] = ext
    return total


def cacheable_tokens(wl: CompiledWorkload) -> int:
    """Prompt tokens an infinite token-granular prefix cache could serve, in request order."""
    return int(
        _cacheable(
            wl.node_start_tokens,
            wl.node_num_tokens,
            wl.req_path_start,
            wl.path_nodes,
            wl.req_prompt_tokens,
            wl.req_output_tokens,
        )
    )


def graph_stats(g: SessionGraph, wl: CompiledWorkload | None = None) -> dict:
    """Statistics of ``g`` (see the module docstring); ``wl`` is ``g`` compiled (made if absent)."""
    if wl is None:
        wl = compile_graph(g)
    n = g.num_requests
    inherited, prompt, end = graph_positions(g)
    bounds = session_bounds(g)
    child = np.repeat(np.arange(n), np.diff(g.parents_start))
    same = g.session[g.parent_ids] == g.session[child]
    fan_in = np.bincount(child[same], minlength=n)
    fan_out = np.bincount(g.parent_ids[same], minlength=n)
    depth = request_depths(g)
    sess_depth = np.maximum.reduceat(depth, bounds[:-1])
    key = g.session * (int(depth.max()) + 1) + depth
    _, level_counts = np.unique(key, return_counts=True)
    level_session = np.unique(key) // (int(depth.max()) + 1)
    width = np.zeros(g.num_sessions, dtype=np.int64)
    np.maximum.at(width, level_session, level_counts)
    has_hp = g.history_parent >= 0
    normal = g.kind == KIND_REQUEST
    has_par = fan_in > 0
    total_prompt = int(prompt.sum())
    cache = cacheable_tokens(wl)
    runs = len(np.unique(g.subsession))
    return {
        "source": g.source,
        "requests": n,
        "sessions": g.num_sessions,
        "agent_runs": runs,
        "compactions": int((g.kind != KIND_REQUEST).sum()),
        "requests_per_session": describe(np.diff(bounds)),
        "depth": describe(sess_depth),
        "width": describe(width),
        "fan_in": describe(fan_in) | {"max": int(fan_in.max())},
        "fan_out": describe(fan_out) | {"max": int(fan_out.max())},
        "fresh_input": describe(g.fresh[normal]),
        "first_input": describe(g.fresh[normal & ~has_hp]),
        "history_input": describe(g.fresh[normal & has_hp]),
        "output": describe(g.output[normal]),
        "prompt": describe(prompt),
        "context": describe(end),
        "history_overlap": describe(inherited[has_hp] / prompt[has_hp]),
        "wait_after_ready": describe(g.wait[has_par]),
        "max_context": int(end.max()),
        "total_prompt_tokens": total_prompt,
        "total_output_tokens": int(g.output.sum()),
        "total_fresh_tokens": int(g.fresh.sum()),
        "cacheable_tokens": cache,
        "cacheable_fraction": cache / total_prompt if total_prompt else 0.0,
        "content_nodes": wl.num_nodes,
        "mean_path_nodes": float(wl.path_nodes.shape[0] / n),
    }


def _fmt(x: float) -> str:
    if x == int(x) and abs(x) < 1e15:
        return f"{int(x):,}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.4g}"


def format_stats(s: dict) -> str:
    """A human-readable table of :func:`graph_stats`."""
    lines = [
        f"source: {s['source']}",
        f"requests: {s['requests']:,}   sessions: {s['sessions']:,}   agent runs: "
        f"{s['agent_runs']:,}   compactions: {s['compactions']:,}",
        f"{'':<22}{'mean':>10}{'p25':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}",
    ]
    for key in (
        "requests_per_session",
        "depth",
        "width",
        "fan_in",
        "fan_out",
        "fresh_input",
        "first_input",
        "history_input",
        "output",
        "prompt",
        "context",
        "history_overlap",
        "wait_after_ready",
    ):
        d = s[key]
        if not d.get("count"):
            lines.append(f"{key:<22}{'-':>10}")
            continue
        row = "".join(f"{_fmt(d[k]):>10}" for k in ("mean", "p25", "p50", "p90", "p99", "max"))
        lines.append(f"{key:<22}{row}")
    lines.append(
        f"max context: {s['max_context']:,} tokens   prompt tokens: {s['total_prompt_tokens']:,}"
        f"   output tokens: {s['total_output_tokens']:,}"
    )
    lines.append(
        f"cacheable under an infinite cache: {s['cacheable_tokens']:,} prompt tokens "
        f"({s['cacheable_fraction'] * 100:.1f}%)   content nodes: {s['content_nodes']:,}"
    )
    return "\n".join(lines)
