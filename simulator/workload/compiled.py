"""The compiled workload: the struct-of-arrays contract between workload code and the core.

A workload (synthetic spec or trace) is compiled once into a :class:`CompiledWorkload`.
Nothing in it is a Python object the Numba core cannot read: every field is a numpy array.

Content model
-------------
Prompt content is described by a *content tree*, not by token ids. A content node is a run
of tokens with a fixed identity (a scaffold such as a system prompt, the growing conversation
of one session, one request's private prompt and output...). Node ``c`` covers the absolute
token positions ``[node_start_tokens[c], node_start_tokens[c] + node_num_tokens[c])`` of every
sequence whose path passes through it. A child node always starts where its parent ends
(``node_start_tokens[child] == node_start_tokens[parent] + node_num_tokens[parent]``), so a
request's token sequence (prompt followed by its output) is the concatenation of the nodes on
its *path*, read from the root; its last node may extend beyond the request (a session's
conversation node also holds the later turns).

Two requests share a KV block exactly when the block's tokens come from the same path prefix;
so a prefix cache keyed by (node, block index) sees the reuse that token hashing would see.

Dependencies
------------
A request with no parents is ready at ``req_arrival_time``. A request with parents becomes
ready when the last of them finishes, and is dispatched ``req_wait_after_ready`` seconds later
(tool latency, user think time). Parents are stored in CSR form: the parents of request ``r``
are ``parent_ids[req_parents_start[r]:req_parents_start[r + 1]]``; children likewise.

Units: tokens are counts of tokens, times are seconds from the start of the simulation.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class CompiledWorkload(NamedTuple):
    """Struct-of-arrays workload. ``R`` requests, ``N`` content nodes."""

    # --- content tree (N nodes) ---
    node_parent: np.ndarray  # int64[N], -1 for a root
    node_start_tokens: np.ndarray  # int64[N], absolute token position where the node begins
    node_num_tokens: np.ndarray  # int64[N], tokens in the node (> 0)
    # --- requests (R) ---
    req_session: np.ndarray  # int64[R], session id (a request alone is its own session)
    req_prompt_tokens: np.ndarray  # int64[R], prompt length in tokens (>= 1)
    req_output_tokens: np.ndarray  # int64[R], tokens to generate (>= 1)
    req_arrival_time: np.ndarray  # float64[R], ready time in seconds for requests without parents
    req_wait_after_ready: np.ndarray  # float64[R], seconds from last parent finishing to dispatch
    req_path_start: np.ndarray  # int64[R + 1], CSR offsets into path_nodes
    path_nodes: np.ndarray  # int64[P], node ids from the root down to the node holding the output
    req_parents_start: np.ndarray  # int64[R + 1], CSR offsets into parent_ids
    parent_ids: np.ndarray  # int64[E]
    req_children_start: np.ndarray  # int64[R + 1], CSR offsets into child_ids
    child_ids: np.ndarray  # int64[E]

    @property
    def num_requests(self) -> int:
        return int(self.req_prompt_tokens.shape[0])

    @property
    def num_nodes(self) -> int:
        return int(self.node_num_tokens.shape[0])


def children_from_parents(
    num_requests: int, req_parents_start: np.ndarray, parent_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Invert a parents CSR into a children CSR (children listed in increasing id order)."""
    num_edges = parent_ids.shape[0]
    child_of_edge = np.repeat(np.arange(num_requests, dtype=np.int64), np.diff(req_parents_start))
    order = np.lexsort((child_of_edge, parent_ids))
    counts = (
        np.bincount(parent_ids, minlength=num_requests)
        if num_edges
        else np.zeros(num_requests, dtype=np.int64)
    )
    start = np.zeros(num_requests + 1, dtype=np.int64)
    np.cumsum(counts, out=start[1:])
    return start, child_of_edge[order].astype(np.int64)


class WorkloadError(ValueError):
    """A workload that cannot be simulated; the message names the request or node."""


def validate_compiled(wl: CompiledWorkload) -> None:
    """Check every invariant the core relies on; raise :class:`WorkloadError` naming the culprit.

    Vectorised: cost is linear in the array sizes, with no per-token work.
    """
    n_req = wl.num_requests
    n_nodes = wl.num_nodes
    int_fields = (
        "node_parent",
        "node_start_tokens",
        "node_num_tokens",
        "req_session",
        "req_prompt_tokens",
        "req_output_tokens",
        "req_path_start",
        "path_nodes",
        "req_parents_start",
        "parent_ids",
        "req_children_start",
        "child_ids",
    )
    for name in int_fields:
        arr = getattr(wl, name)
        if arr.dtype != np.int64 or arr.ndim != 1:
            raise WorkloadError(f"{name}: expected a 1-D int64 array, got {arr.dtype} {arr.shape}")
    for name in ("req_arrival_time", "req_wait_after_ready"):
        arr = getattr(wl, name)
        if arr.dtype != np.float64 or arr.shape != (n_req,):
            raise WorkloadError(f"{name}: expected float64[{n_req}], got {arr.dtype} {arr.shape}")
        bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
        if bad.size:
            raise WorkloadError(
                f"request {bad[0]}: {name} = {float(arr[bad[0]])!r} (must be finite, >= 0)"
            )
    if n_req == 0:
        raise WorkloadError("the workload has no requests")
    for name, arr in (
        ("req_prompt_tokens", wl.req_prompt_tokens),
        ("req_output_tokens", wl.req_output_tokens),
    ):
        bad = np.flatnonzero(arr < 1)
        if bad.size:
            raise WorkloadError(f"request {bad[0]}: {name} = {arr[bad[0]]} (must be >= 1)")
    bad = np.flatnonzero(wl.node_num_tokens < 1)
    if bad.size:
        raise WorkloadError(
            f"content node {bad[0]}: node_num_tokens = {wl.node_num_tokens[bad[0]]} (must be >= 1)"
        )
    roots = wl.node_parent < 0
    parent = np.where(roots, 0, wl.node_parent)
    if np.any(wl.node_parent >= n_nodes):
        raise WorkloadError("node_parent refers to a node that does not exist")
    expected_start = np.where(roots, 0, wl.node_start_tokens[parent] + wl.node_num_tokens[parent])
    bad = np.flatnonzero(wl.node_start_tokens != expected_start)
    if bad.size:
        raise WorkloadError(
            f"content node {bad[0]}: starts at token {wl.node_start_tokens[bad[0]]}, "
            f"but its parent ends at {expected_start[bad[0]]}"
        )
    for name, start, ids in (
        ("req_path_start", wl.req_path_start, wl.path_nodes),
        ("req_parents_start", wl.req_parents_start, wl.parent_ids),
        ("req_children_start", wl.req_children_start, wl.child_ids),
    ):
        if (
            start.shape != (n_req + 1,)
            or start[0] != 0
            or start[-1] != ids.shape[0]
            or np.any(np.diff(start) < 0)
        ):
            raise WorkloadError(f"{name}: not a valid CSR offset array for {n_req} requests")
    path_len = np.diff(wl.req_path_start)
    bad = np.flatnonzero(path_len < 1)
    if bad.size:
        raise WorkloadError(f"request {bad[0]}: empty content path")
    if np.any((wl.path_nodes < 0) | (wl.path_nodes >= n_nodes)):
        raise WorkloadError("path_nodes refers to a node that does not exist")
    # consecutive path nodes must be parent -> child, the first a root
    first = wl.path_nodes[wl.req_path_start[:-1]]
    bad = np.flatnonzero(wl.node_parent[first] != -1)
    if bad.size:
        raise WorkloadError(f"request {bad[0]}: content path does not start at a root node")
    is_first = np.zeros(wl.path_nodes.shape[0], dtype=bool)
    is_first[wl.req_path_start[:-1]] = True
    prev = np.roll(wl.path_nodes, 1)
    bad = np.flatnonzero(~is_first & (wl.node_parent[wl.path_nodes] != prev))
    if bad.size:
        req = int(np.searchsorted(wl.req_path_start, bad[0], side="right") - 1)
        raise WorkloadError(f"request {req}: content path is not a parent-to-child chain")
    last = wl.path_nodes[wl.req_path_start[1:] - 1]
    path_end = wl.node_start_tokens[last] + wl.node_num_tokens[last]
    total = wl.req_prompt_tokens + wl.req_output_tokens
    bad = np.flatnonzero((total > path_end) | (total <= wl.node_start_tokens[last]))
    if bad.size:
        r = bad[0]
        raise WorkloadError(
            f"request {r}: prompt + output = {total[r]} tokens does not end inside the last node "
            f"of its content path (tokens {wl.node_start_tokens[last[r]]}..{path_end[r]})"
        )
    if np.any((wl.parent_ids < 0) | (wl.parent_ids >= n_req)):
        raise WorkloadError("parent_ids refers to a request that does not exist")
    child = np.repeat(np.arange(n_req), np.diff(wl.req_parents_start))
    bad = np.flatnonzero(wl.parent_ids >= child)
    if bad.size:
        raise WorkloadError(
            f"request {child[bad[0]]}: parent {wl.parent_ids[bad[0]]} does not come before it "
            "(requests must be topologically ordered; a cycle cannot be)"
        )
