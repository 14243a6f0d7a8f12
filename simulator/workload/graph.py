"""Session graphs: the workload model every generator and trace reader produces.

A :class:`SessionGraph` is a set of sessions, each a DAG of requests (struct of arrays, one row
per request, parents before children, sessions contiguous and in order). Per request:

* ``fresh`` input tokens (new content: user text, tool results, a subagent's task) and
  ``output`` tokens;
* ``parents`` (CSR): every request that must finish before this one is *ready*; it is then
  dispatched ``wait`` seconds later (tool latency, think time). A request without parents is
  ready ``offset`` seconds after its session starts;
* an optional ``history_parent`` (one of its parents): the prompt starts with the history
  parent's full conversation (its prompt + its output), or with its first ``history_tokens``
  tokens when that is given (a trace whose context was truncated);
* without a history parent, an optional ``prefix``: a node of the *prefix forest*, shared
  content such as an agent's scaffold (system prompt, tool definitions) or a trace's prefix
  trie. The prompt starts with the prefix node's whole path.

So ``prompt = inherited + fresh``, where ``inherited`` is the history or prefix length.

:func:`compile_graph` turns a graph plus session start times into the
:class:`~simulator.workload.compiled.CompiledWorkload` the core runs. Each request owns a
*segment* of content (its fresh input followed by its output) hanging below what it inherits;
segments and prefix nodes form a forest. The compiler

1. splits a node wherever something branches off inside it (a partial history, e.g. a truncated
   trace context), so that every branch point is a node boundary;
2. merges every node that has exactly one child with that child, so a chain of 130 agent turns
   is ONE content node and a request's path is as long as the number of branch points above it;
3. writes each request's path (root -> node holding its output) in CSR form.

After step 2, two requests end inside the same content node only if one inherits from the other
(a linear chain): two requests that inherit the same history, or diverge inside it, end in
different nodes. Work is O(requests + path nodes), in Numba.

:func:`apply_compaction` inserts summary requests where a chain would exceed a context limit;
:func:`select_sessions` and :func:`add_dependencies` are what traffic shaping is built from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from numba import njit

from simulator.workload.compiled import (
    CompiledWorkload,
    WorkloadError,
    children_from_parents,
    validate_compiled,
)

__all__ = [
    "SessionGraph",
    "KIND_REQUEST",
    "KIND_COMPACTION",
    "make_graph",
    "validate_graph",
    "graph_positions",
    "compile_graph",
    "apply_compaction",
    "select_sessions",
    "add_dependencies",
    "csr_from_edges",
    "topo_order",
    "session_bounds",
    "roots_and_sinks",
]

_I64 = np.int64
KIND_REQUEST = 0
KIND_COMPACTION = 1


@dataclass(frozen=True, eq=False)
class SessionGraph:
    """Sessions of dependent requests; ``R`` requests, ``K`` prefix nodes, ``S`` sessions."""

    # --- prefix forest (shared content: scaffolds, prefix tries), parents before children ---
    prefix_parent: np.ndarray  # int64[K], -1 for a root
    prefix_tokens: np.ndarray  # int64[K], > 0
    # --- requests, parents before children, sessions contiguous and numbered 0..S-1 ---
    session: np.ndarray  # int64[R], the unit traffic starts (a task with its subagents)
    subsession: np.ndarray  # int64[R], the agent instance (main agent or one subagent run)
    fresh: np.ndarray  # int64[R] >= 0, new input tokens
    output: np.ndarray  # int64[R] >= 1
    history_parent: np.ndarray  # int64[R], -1 = none
    history_tokens: np.ndarray  # int64[R], -1 = the history parent's whole conversation
    prefix: np.ndarray  # int64[R], prefix node for requests without history parent, -1 = none
    wait: np.ndarray  # float64[R], seconds from ready to dispatch
    offset: np.ndarray  # float64[R], ready time of a parentless request after session start
    parents_start: np.ndarray  # int64[R + 1]
    parent_ids: np.ndarray  # int64[E]
    kind: np.ndarray  # int8[R], KIND_REQUEST or KIND_COMPACTION
    session_time: np.ndarray | None = None  # float64[S], arrival of each session in a trace
    source: str = ""
    prefix_names: tuple[str, ...] = field(default=())

    @property
    def num_requests(self) -> int:
        return int(self.fresh.shape[0])

    @property
    def num_sessions(self) -> int:
        return int(self.session[-1]) + 1 if self.session.shape[0] else 0

    @property
    def num_prefix_nodes(self) -> int:
        return int(self.prefix_tokens.shape[0])


def make_graph(
    *,
    session: np.ndarray,
    fresh: np.ndarray,
    output: np.ndarray,
    parents_start: np.ndarray,
    parent_ids: np.ndarray,
    history_parent: np.ndarray | None = None,
    history_tokens: np.ndarray | None = None,
    prefix: np.ndarray | None = None,
    prefix_parent: np.ndarray | None = None,
    prefix_tokens: np.ndarray | None = None,
    subsession: np.ndarray | None = None,
    wait: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    kind: np.ndarray | None = None,
    session_time: np.ndarray | None = None,
    source: str = "",
    prefix_names: tuple[str, ...] = (),
) -> SessionGraph:
    """A :class:`SessionGraph` with defaults for the optional arrays (dtypes normalised)."""
    n = int(np.shape(fresh)[0])

    def ints(a, default):
        return np.full(n, default, dtype=_I64) if a is None else np.asarray(a, dtype=_I64)

    def floats(a):
        return np.zeros(n, dtype=np.float64) if a is None else np.asarray(a, dtype=np.float64)

    session = np.asarray(session, dtype=_I64)
    return SessionGraph(
        prefix_parent=np.zeros(0, _I64)
        if prefix_parent is None
        else np.asarray(prefix_parent, _I64),
        prefix_tokens=np.zeros(0, _I64)
        if prefix_tokens is None
        else np.asarray(prefix_tokens, _I64),
        session=session,
        subsession=session.copy() if subsession is None else np.asarray(subsession, dtype=_I64),
        fresh=np.asarray(fresh, dtype=_I64),
        output=np.asarray(output, dtype=_I64),
        history_parent=ints(history_parent, -1),
        history_tokens=ints(history_tokens, -1),
        prefix=ints(prefix, -1),
        wait=floats(wait),
        offset=floats(offset),
        parents_start=np.asarray(parents_start, dtype=_I64),
        parent_ids=np.asarray(parent_ids, dtype=_I64),
        kind=np.zeros(n, dtype=np.int8) if kind is None else np.asarray(kind, dtype=np.int8),
        session_time=None if session_time is None else np.asarray(session_time, dtype=np.float64),
        source=source,
        prefix_names=tuple(prefix_names),
    )


# --------------------------------------------------------------------------- CSR helpers


def csr_from_edges(n: int, child: np.ndarray, parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parents CSR of ``n`` requests from edge lists (edge order kept within a child)."""
    child = np.asarray(child, dtype=_I64)
    order = np.argsort(child, kind="stable")
    start = np.zeros(n + 1, dtype=_I64)
    np.cumsum(np.bincount(child, minlength=n), out=start[1:])
    return start, np.asarray(parent, dtype=_I64)[order]


def _edge_children(parents_start: np.ndarray) -> np.ndarray:
    n = parents_start.shape[0] - 1
    return np.repeat(np.arange(n, dtype=_I64), np.diff(parents_start))


def session_bounds(g: SessionGraph) -> np.ndarray:
    """``int64[S + 1]``: session ``s`` holds requests ``bounds[s]:bounds[s + 1]``."""
    bounds = np.zeros(g.num_sessions + 1, dtype=_I64)
    np.cumsum(np.bincount(g.session, minlength=g.num_sessions), out=bounds[1:])
    return bounds


def roots_and_sinks(g: SessionGraph) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks: requests without parents, requests without children."""
    roots = np.diff(g.parents_start) == 0
    sinks = np.ones(g.num_requests, dtype=bool)
    sinks[g.parent_ids] = False
    return roots, sinks


@njit(cache=True)
def _heap_push(heap, size, v):
    i = size
    heap[i] = v
    while i > 0:
        p = (i - 1) >> 1
        if heap[p] <= heap[i]:
            break
        heap[p], heap[i] = heap[i], heap[p]
        i = p
    return size + 1


@njit(cache=True)
def _heap_pop(heap, size):
    top = heap[0]
    size -= 1
    heap[0] = heap[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        c = left
        if left + 1 < size and heap[left + 1] < heap[left]:
            c = left + 1
        if heap[i] <= heap[c]:
            break
        heap[i], heap[c] = heap[c], heap[i]
        i = c
    return top, size


@njit(cache=True)
def _topo(n, parents_start, children_start, child_ids):
    pending = np.empty(n, dtype=np.int64)
    heap = np.empty(n, dtype=np.int64)
    size = 0
    for r in range(n):
        pending[r] = parents_start[r + 1] - parents_start[r]
        if pending[r] == 0:
            size = _heap_push(heap, size, r)
    order = np.empty(n, dtype=np.int64)
    k = 0
    while size > 0:
        r, size = _heap_pop(heap, size)
        order[k] = r
        k += 1
        for j in range(children_start[r], children_start[r + 1]):
            c = child_ids[j]
            pending[c] -= 1
            if pending[c] == 0:
                size = _heap_push(heap, size, c)
    return order[:k]


def topo_order(n: int, parents_start: np.ndarray, parent_ids: np.ndarray) -> np.ndarray:
    """A topological order of ``n`` nodes, smallest index first among the ready ones.

    Returns fewer than ``n`` entries when there is a cycle (the missing nodes are on or below it).
    """
    cs, cid = children_from_parents(n, parents_start, parent_ids)
    return _topo(n, parents_start, cs, cid)


# --------------------------------------------------------------------------- validation


def validate_graph(g: SessionGraph, cross_session: bool = False) -> None:
    """Check the structural rules of a :class:`SessionGraph`; raise :class:`WorkloadError`.

    ``cross_session`` allows dependencies between sessions (closed-loop traffic adds them).
    """
    n = g.num_requests
    if n == 0:
        raise WorkloadError(f"{g.source or 'workload'}: no requests")
    for name in (
        "session",
        "subsession",
        "fresh",
        "output",
        "history_parent",
        "history_tokens",
        "prefix",
        "wait",
        "offset",
        "kind",
    ):
        if getattr(g, name).shape != (n,):
            raise WorkloadError(
                f"session graph: {name} has shape {getattr(g, name).shape}, not ({n},)"
            )
    ps = g.parents_start
    if (
        ps.shape != (n + 1,)
        or ps[0] != 0
        or ps[-1] != g.parent_ids.shape[0]
        or np.any(np.diff(ps) < 0)
    ):
        raise WorkloadError("session graph: parents_start is not a CSR offset array")
    sd = np.diff(g.session)
    if g.session[0] != 0 or np.any((sd != 0) & (sd != 1)):
        raise WorkloadError("session graph: sessions must be contiguous and numbered 0, 1, ...")
    child = _edge_children(ps)
    bad = np.flatnonzero((g.parent_ids < 0) | (g.parent_ids >= child))
    if bad.size:
        raise WorkloadError(
            f"request {child[bad[0]]}: parent {g.parent_ids[bad[0]]} does not come before it"
        )
    bad = np.flatnonzero(g.session[g.parent_ids] != g.session[child])
    if bad.size and not cross_session:
        raise WorkloadError(
            f"request {child[bad[0]]}: parent {g.parent_ids[bad[0]]} is in another session"
        )
    bad = np.flatnonzero(g.fresh < 0)
    if bad.size:
        raise WorkloadError(
            f"request {bad[0]}: fresh input tokens = {g.fresh[bad[0]]} (must be >= 0)"
        )
    bad = np.flatnonzero(g.output < 1)
    if bad.size:
        raise WorkloadError(f"request {bad[0]}: output tokens = {g.output[bad[0]]} (must be >= 1)")
    for name in ("wait", "offset"):
        arr = getattr(g, name)
        bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
        if bad.size:
            raise WorkloadError(f"request {bad[0]}: {name} = {arr[bad[0]]} (must be finite, >= 0)")
    hp = g.history_parent
    has = np.flatnonzero(hp >= 0)
    if has.size:
        # the history parent must be one of the parents
        is_hp_edge = g.parent_ids == hp[child]
        found = np.zeros(n, dtype=bool)
        found[child[is_hp_edge]] = True
        bad = has[~found[has]]
        if bad.size:
            raise WorkloadError(
                f"request {bad[0]}: history parent {hp[bad[0]]} is not one of its parents"
            )
    k = g.num_prefix_nodes
    if g.prefix_parent.shape != (k,):
        raise WorkloadError("session graph: prefix_parent and prefix_tokens differ in length")
    if k:
        bad = np.flatnonzero(g.prefix_parent >= np.arange(k))
        if bad.size:
            raise WorkloadError(f"prefix node {bad[0]}: its parent must come before it")
        bad = np.flatnonzero(g.prefix_tokens < 1)
        if bad.size:
            raise WorkloadError(
                f"prefix node {bad[0]}: {g.prefix_tokens[bad[0]]} tokens (must be >= 1)"
            )
    if np.any(g.prefix >= k):
        raise WorkloadError("session graph: a request refers to a prefix node that does not exist")
    if g.session_time is not None and g.session_time.shape != (g.num_sessions,):
        raise WorkloadError("session graph: session_time must have one entry per session")


# --------------------------------------------------------------------------- positions

ERR_NONE = 0
ERR_HISTORY_TOO_LONG = 1
ERR_EMPTY_PROMPT = 2


@njit(cache=True)
def _positions(prefix_parent, prefix_tokens, hp, htok, prefix, fresh, output):
    k = prefix_tokens.shape[0]
    n = fresh.shape[0]
    pend = np.empty(k, dtype=np.int64)
    for i in range(k):
        par = prefix_parent[i]
        pend[i] = prefix_tokens[i] + (pend[par] if par >= 0 else 0)
    inherit = np.empty(n, dtype=np.int64)
    end = np.empty(n, dtype=np.int64)
    for r in range(n):
        h = hp[r]
        if h >= 0:
            full = end[h]
            t = htok[r]
            if t < 0:
                t = full
            elif t > full:
                return pend, inherit, end, ERR_HISTORY_TOO_LONG, r
            inherit[r] = t
        elif prefix[r] >= 0:
            inherit[r] = pend[prefix[r]]
        else:
            inherit[r] = 0
        if inherit[r] + fresh[r] < 1:
            return pend, inherit, end, ERR_EMPTY_PROMPT, r
        end[r] = inherit[r] + fresh[r] + output[r]
    return pend, inherit, end, ERR_NONE, -1


def _checked_positions(g: SessionGraph):
    """``_positions`` of ``g``: (prefix end, inherited, end, request) per request; raises the
    :class:`WorkloadError` of an inconsistent history or an empty prompt."""
    pend, inherit, end, err, r = _positions(
        g.prefix_parent,
        g.prefix_tokens,
        g.history_parent,
        g.history_tokens,
        g.prefix,
        g.fresh,
        g.output,
    )
    if err == ERR_HISTORY_TOO_LONG:
        raise WorkloadError(
            f"request {r}: history_tokens = {g.history_tokens[r]} is longer than its history "
            f"parent's conversation ({end[g.history_parent[r]]} tokens)"
        )
    if err == ERR_EMPTY_PROMPT:
        raise WorkloadError(f"request {r}: empty prompt (no inherited content and no fresh input)")
    return pend, inherit, end


def graph_positions(g: SessionGraph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(inherited, prompt, end)`` tokens per request; ``end = prompt + output``."""
    _, inherit, end = _checked_positions(g)
    return inherit, inherit + g.fresh, end


# --------------------------------------------------------------------------- compiler kernels


@njit(cache=True)
def _attach(prefix_parent, prefix_tokens, pend, hp, inherit, prefix, fresh, output):
    """Raw forest (prefix nodes, then one segment per request) and the cuts inside nodes."""
    k = prefix_tokens.shape[0]
    n = fresh.shape[0]
    m = k + n
    start = np.empty(m, dtype=np.int64)
    length = np.empty(m, dtype=np.int64)
    parent = np.empty(m, dtype=np.int64)
    off = np.empty(m, dtype=np.int64)
    cut_node = np.empty(n, dtype=np.int64)
    cut_off = np.empty(n, dtype=np.int64)
    num_cuts = 0
    for i in range(k):
        start[i] = pend[i] - prefix_tokens[i]
        length[i] = prefix_tokens[i]
        par = prefix_parent[i]
        parent[i] = par
        off[i] = prefix_tokens[par] if par >= 0 else 0
    for r in range(n):
        x = k + r
        start[x] = inherit[r]
        length[x] = fresh[r] + output[r]
        h = hp[r]
        inh = inherit[r]
        if h >= 0 and inh > 0:
            y = k + h
            while start[y] >= inh:
                y = parent[y]
            o = inh - start[y]
            parent[x] = y
            off[x] = o
            if o < length[y]:
                cut_node[num_cuts] = y
                cut_off[num_cuts] = o
                num_cuts += 1
        elif h < 0 and prefix[r] >= 0:
            parent[x] = prefix[r]
            off[x] = prefix_tokens[prefix[r]]
        else:
            parent[x] = -1
            off[x] = 0
    return start, length, parent, off, cut_node[:num_cuts], cut_off[:num_cuts]


@njit(cache=True)
def _find(sorted_vals, lo, hi, v):
    """Index of ``v`` in ``sorted_vals[lo:hi]`` (it is there), by bisection."""
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if sorted_vals[mid] <= v:
            lo = mid
        else:
            hi = mid
    return lo


@njit(cache=True)
def _build_tree(start, length, parent, off, cut_start, cut_off, k, n):
    """Split raw nodes at their cuts, merge single-child chains, and write request paths."""
    m = start.shape[0]
    num_pieces = m + cut_off.shape[0]
    p_start = np.empty(num_pieces, dtype=np.int64)
    p_len = np.empty(num_pieces, dtype=np.int64)
    p_parent = np.empty(num_pieces, dtype=np.int64)
    last_piece = np.empty(m, dtype=np.int64)
    for x in range(m):
        c0 = cut_start[x]
        c1 = cut_start[x + 1]
        base = x + c0
        prev = 0
        for j in range(c1 - c0 + 1):
            p = base + j
            stop = cut_off[c0 + j] if j < c1 - c0 else length[x]
            p_start[p] = start[x] + prev
            p_len[p] = stop - prev
            prev = stop
            if j > 0:
                p_parent[p] = p - 1
            else:
                y = parent[x]
                if y < 0:
                    p_parent[p] = -1
                else:
                    o = off[x]
                    d0 = cut_start[y]
                    d1 = cut_start[y + 1]
                    if d1 == d0 or o >= length[y]:
                        p_parent[p] = y + d1  # the last piece of y
                    else:
                        p_parent[p] = y + d0 + _find(cut_off, d0, d1, o) - d0
        last_piece[x] = base + c1 - c0
    # merge every piece whose parent has exactly one child into that parent
    num_children = np.zeros(num_pieces, dtype=np.int64)
    for p in range(num_pieces):
        if p_parent[p] >= 0:
            num_children[p_parent[p]] += 1
    comp = np.empty(num_pieces, dtype=np.int64)
    c_parent = np.empty(num_pieces, dtype=np.int64)
    c_start = np.empty(num_pieces, dtype=np.int64)
    c_len = np.empty(num_pieces, dtype=np.int64)
    c_depth = np.empty(num_pieces, dtype=np.int64)
    nc = 0
    for p in range(num_pieces):
        q = p_parent[p]
        if q >= 0 and num_children[q] == 1:
            c = comp[q]
            comp[p] = c
            c_len[c] += p_len[p]
        else:
            c = nc
            nc += 1
            comp[p] = c
            c_start[c] = p_start[p]
            c_len[c] = p_len[p]
            if q >= 0:
                c_parent[c] = comp[q]
                c_depth[c] = c_depth[comp[q]] + 1
            else:
                c_parent[c] = -1
                c_depth[c] = 1
    req_node = np.empty(n, dtype=np.int64)
    path_start = np.zeros(n + 1, dtype=np.int64)
    for r in range(n):
        c = comp[last_piece[k + r]]
        req_node[r] = c
        path_start[r + 1] = path_start[r] + c_depth[c]
    path_nodes = np.empty(path_start[n], dtype=np.int64)
    for r in range(n):
        c = req_node[r]
        j = path_start[r + 1] - 1
        while c >= 0:
            path_nodes[j] = c
            j -= 1
            c = c_parent[c]
    return c_parent[:nc].copy(), c_start[:nc].copy(), c_len[:nc].copy(), path_start, path_nodes


def compile_graph(
    g: SessionGraph, session_start: np.ndarray | None = None, *, validate: bool = True
) -> CompiledWorkload:
    """Compile ``g`` into a :class:`CompiledWorkload`.

    ``session_start[s]`` (seconds) is when session ``s`` starts: its parentless requests are ready
    at ``session_start + offset``. Default: ``g.session_time``, or 0 for every session.
    """
    if validate:
        validate_graph(g, cross_session=True)
    if session_start is None:
        session_start = g.session_time if g.session_time is not None else np.zeros(g.num_sessions)
    session_start = np.asarray(session_start, dtype=np.float64)
    if session_start.shape != (g.num_sessions,):
        raise WorkloadError(
            f"session_start has {session_start.shape[0]} entries for {g.num_sessions} sessions"
        )
    n = g.num_requests
    k = g.num_prefix_nodes
    pend, inherit, end = _checked_positions(g)
    start, length, parent, off, cut_node, cut_off = _attach(
        g.prefix_parent,
        g.prefix_tokens,
        pend,
        g.history_parent,
        inherit,
        g.prefix,
        g.fresh,
        g.output,
    )
    m = k + n
    if cut_node.shape[0]:
        order = np.lexsort((cut_off, cut_node))
        cut_node, cut_off = cut_node[order], cut_off[order]
        keep = np.ones(cut_node.shape[0], dtype=bool)
        keep[1:] = (np.diff(cut_node) != 0) | (np.diff(cut_off) != 0)
        cut_node, cut_off = cut_node[keep], cut_off[keep]
    cut_start = np.zeros(m + 1, dtype=_I64)
    np.cumsum(np.bincount(cut_node, minlength=m), out=cut_start[1:])
    node_parent, node_start, node_len, path_start, path_nodes = _build_tree(
        start, length, parent, off, cut_start, np.ascontiguousarray(cut_off, dtype=_I64), k, n
    )
    roots = np.diff(g.parents_start) == 0
    arrival = np.zeros(n, dtype=np.float64)
    arrival[roots] = session_start[g.session[roots]] + g.offset[roots]
    children_start, child_ids = children_from_parents(n, g.parents_start, g.parent_ids)
    wl = CompiledWorkload(
        node_parent=node_parent,
        node_start_tokens=node_start,
        node_num_tokens=node_len,
        req_session=g.session.copy(),
        req_prompt_tokens=inherit + g.fresh,
        req_output_tokens=g.output.copy(),
        req_arrival_time=arrival,
        req_wait_after_ready=g.wait.copy(),
        req_path_start=path_start,
        path_nodes=path_nodes,
        req_parents_start=g.parents_start.copy(),
        parent_ids=g.parent_ids.copy(),
        req_children_start=children_start,
        child_ids=child_ids,
    )
    if validate:
        validate_compiled(wl)
    return wl


# --------------------------------------------------------------------------- compaction


@njit(cache=True)
def _compaction_kernel(pend, hp, htok, prefix, fresh, output, limit, summary):
    n = fresh.shape[0]
    end = np.empty(n, dtype=np.int64)
    chain_prefix = np.empty(n, dtype=np.int64)
    flag = np.zeros(n, dtype=np.bool_)
    for r in range(n):
        h = hp[r]
        chain_prefix[r] = chain_prefix[h] if h >= 0 else prefix[r]
        if h >= 0:
            inh = end[h] if htok[r] < 0 else htok[r]
        elif prefix[r] >= 0:
            inh = pend[prefix[r]]
        else:
            inh = 0
        f = fresh[r]
        if h >= 0 and limit[r] > 0 and inh + f + output[r] > limit[r]:
            flag[r] = True
            cp = chain_prefix[r]
            inh = pend[cp] if cp >= 0 else 0
            f = summary[r] + fresh[r]
        end[r] = inh + f + output[r]
    return flag, chain_prefix


def apply_compaction(
    g: SessionGraph,
    context_limit: np.ndarray,
    prompt_tokens: np.ndarray,
    summary_tokens: np.ndarray,
) -> SessionGraph:
    """Insert a compaction request before every request that would overflow its context limit.

    For request ``r`` with history parent ``h``: if ``inherited + fresh + output`` would exceed
    ``context_limit[r]`` (0 = no limit), a compaction request ``k`` is inserted just before it:
    ``k`` inherits ``h``'s history, adds ``prompt_tokens[r]`` fresh tokens (the "summarise"
    instruction), outputs ``summary_tokens[r]`` tokens, takes over ``r``'s parents and wait,
    and is marked :data:`KIND_COMPACTION`. ``r`` then restarts its chain: no history parent,
    the chain's scaffold (the prefix its first request started from) as prefix, fresh input =
    summary + its own fresh input, one parent (``k``) and no wait. The old prefix is no longer
    reused. ``k`` itself may exceed the limit by its instruction and summary tokens.
    """
    validate_graph(g)
    n = g.num_requests
    pend, _, _ = _checked_positions(g)
    limit = np.broadcast_to(np.asarray(context_limit, dtype=_I64), (n,))
    summary = np.broadcast_to(np.asarray(summary_tokens, dtype=_I64), (n,))
    cprompt = np.broadcast_to(np.asarray(prompt_tokens, dtype=_I64), (n,))
    if np.any(summary < 1):
        raise WorkloadError("compaction: summary tokens must be >= 1")
    flag, chain_prefix = _compaction_kernel(
        pend,
        g.history_parent,
        g.history_tokens,
        g.prefix,
        g.fresh,
        g.output,
        np.ascontiguousarray(limit),
        np.ascontiguousarray(summary),
    )
    num_flag = int(flag.sum())
    if num_flag == 0:
        return g
    new_id = np.arange(n, dtype=_I64) + np.cumsum(flag)
    total = n + num_flag
    fl = np.flatnonzero(flag)
    kid = new_id[fl] - 1  # the compaction request inserted before each flagged request

    def spread(a, fill):
        out = np.empty(total, dtype=a.dtype)
        out[new_id] = a
        out[kid] = fill
        return out

    hp_old = g.history_parent
    hp_mapped = np.where(hp_old >= 0, new_id[np.maximum(hp_old, 0)], -1)
    history_parent = spread(hp_mapped, hp_mapped[fl])
    history_parent[new_id[fl]] = -1
    history_tokens = spread(g.history_tokens, g.history_tokens[fl])
    history_tokens[new_id[fl]] = -1
    prefix = spread(g.prefix, -1)
    prefix[new_id[fl]] = chain_prefix[fl]
    fresh = spread(g.fresh, cprompt[fl])
    fresh[new_id[fl]] = summary[fl] + g.fresh[fl]
    output = spread(g.output, summary[fl])
    wait = spread(g.wait, g.wait[fl])
    wait[new_id[fl]] = 0.0
    offset = spread(g.offset, g.offset[fl])
    offset[new_id[fl]] = 0.0
    kind = spread(g.kind, np.int8(KIND_COMPACTION))
    # edges: r's old parents move to k; r gets the single parent k
    child_old = _edge_children(g.parents_start)
    slot = np.where(flag[child_old], new_id[child_old] - 1, new_id[child_old])
    edge_child = np.concatenate([slot, new_id[fl]])
    edge_parent = np.concatenate([new_id[g.parent_ids], kid])
    parents_start, parent_ids = csr_from_edges(total, edge_child, edge_parent)
    return replace(
        g,
        session=spread(g.session, g.session[fl]),
        subsession=spread(g.subsession, g.subsession[fl]),
        fresh=fresh,
        output=output,
        history_parent=history_parent,
        history_tokens=history_tokens,
        prefix=prefix,
        wait=wait,
        offset=offset,
        parents_start=parents_start,
        parent_ids=parent_ids,
        kind=kind,
    )


# --------------------------------------------------------------------------- traffic helpers


def select_sessions(g: SessionGraph, order: np.ndarray) -> SessionGraph:
    """The sessions ``order[0], order[1], ...`` (repeats allowed) as a new graph, in that order.

    Session ``j`` of the result is a copy of session ``order[j]``; subsessions are renumbered
    so that copies stay distinct. ``session_time`` follows the selection.
    """
    order = np.asarray(order, dtype=_I64)
    if order.shape[0] == 0:
        raise WorkloadError("no sessions selected")
    bounds = session_bounds(g)
    lo, hi = bounds[order], bounds[order + 1]
    counts = hi - lo
    new_lo = np.zeros(order.shape[0], dtype=_I64)
    np.cumsum(counts[:-1], out=new_lo[1:])
    total = int(counts.sum())
    copy = np.repeat(np.arange(order.shape[0], dtype=_I64), counts)
    delta = np.repeat(new_lo - lo, counts)
    idx = np.arange(total, dtype=_I64) - delta  # old index of every new request
    pc = np.diff(g.parents_start)[idx]
    parents_start = np.zeros(total + 1, dtype=_I64)
    np.cumsum(pc, out=parents_start[1:])
    # gather each new request's parents from its old CSR slice
    edge_req = np.repeat(np.arange(total, dtype=_I64), pc)
    within = np.arange(parents_start[-1], dtype=_I64) - parents_start[edge_req]
    parent_ids = g.parent_ids[g.parents_start[idx[edge_req]] + within] + delta[edge_req]
    hp = g.history_parent[idx]
    hp = np.where(hp >= 0, hp + delta, -1)
    sub = g.subsession[idx]
    _, sub = np.unique(copy * (int(g.subsession.max()) + 1) + sub, return_inverse=True)
    return replace(
        g,
        session=copy,
        subsession=sub.astype(_I64),
        fresh=g.fresh[idx],
        output=g.output[idx],
        history_parent=hp,
        history_tokens=g.history_tokens[idx],
        prefix=g.prefix[idx],
        wait=g.wait[idx],
        offset=g.offset[idx],
        parents_start=parents_start,
        parent_ids=parent_ids,
        kind=g.kind[idx],
        session_time=None if g.session_time is None else g.session_time[order],
    )


def add_dependencies(g: SessionGraph, child: np.ndarray, parent: np.ndarray) -> SessionGraph:
    """Add dependency edges (no content inherited), possibly across sessions (``parent < child``).

    Apply it last: the other graph transforms assume dependencies stay inside sessions.
    """
    child = np.asarray(child, dtype=_I64)
    parent = np.asarray(parent, dtype=_I64)
    if np.any(parent >= child):
        raise WorkloadError("add_dependencies: every parent must come before its child")
    old_child = _edge_children(g.parents_start)
    start, ids = csr_from_edges(
        g.num_requests, np.concatenate([old_child, child]), np.concatenate([g.parent_ids, parent])
    )
    return replace(g, parents_start=start, parent_ids=ids)
