"""Mooncake traces (JSONL, one request per line): reader.

Schema (../shared/data/mooncake/README.md): ``timestamp`` (ms from the trace start),
``input_length``, ``output_length``, ``hash_ids`` (ids of the prompt's 512-token blocks; equal ids
are equal content, so equal leading ids are a shared prefix; ``len(hash_ids)`` must be
``ceil(input_length / block_tokens)``).

Each row is a request in its own session, starting at ``timestamp / 1000`` s (``traffic: {mode:
trace}``). Its full blocks form a path in a prefix trie (the prefix forest of the session graph,
one node per distinct block, keyed by (parent block, hash id)); the rest of the prompt (the
partial last block, never shared) and the output are the request's own content. Rows are sorted
by timestamp (stable). Errors name the file, the line and the field.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simulator.textio import read_text
from simulator.workload.compiled import WorkloadError
from simulator.workload.graph import SessionGraph, make_graph
from simulator.workload.tracefile import get_int, get_number, json_rows

__all__ = ["read_mooncake"]


def read_mooncake(path: str | Path, block_tokens: int = 512) -> SessionGraph:
    """Read a Mooncake trace; every problem is a :class:`WorkloadError` naming file:line: field."""
    path = Path(path)
    src = str(path)
    if block_tokens < 1:
        raise WorkloadError(f"{src}: block_tokens must be >= 1 (got {block_tokens})")
    text = read_text(path, WorkloadError)
    times: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    prefix: list[int] = []
    trie: dict[tuple[int, int], int] = {}
    trie_parent: list[int] = []
    for where, row in json_rows(text, src):
        times.append(get_number(row, "timestamp", where) / 1000.0)
        inp = get_int(row, "input_length", where, minimum=1)
        prompt.append(inp)
        output.append(get_int(row, "output_length", where, minimum=1))
        ids = row.get("hash_ids")
        if not isinstance(ids, list):
            raise where.error("hash_ids", f"missing or not a list (got {ids!r})")
        want = -(-inp // block_tokens)
        if len(ids) != want:
            raise where.error(
                "hash_ids",
                f"{len(ids)} ids for input_length {inp} "
                f"(expected ceil({inp} / {block_tokens}) = {want})",
            )
        node = -1
        for h in ids[: inp // block_tokens]:
            if isinstance(h, bool) or not isinstance(h, int):
                raise where.error("hash_ids", f"ids must be integers (got {h!r})")
            key = (node, h)
            nxt = trie.get(key)
            if nxt is None:
                nxt = len(trie_parent)
                trie[key] = nxt
                trie_parent.append(node)
            node = nxt
        prefix.append(node)
    n = len(prompt)
    if n == 0:
        raise WorkloadError(f"{src}: no requests in the file")
    t = np.asarray(times, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    pre = np.asarray(prefix, dtype=np.int64)[order]
    k = len(trie_parent)
    inherited = np.zeros(n, dtype=np.int64)
    has = pre >= 0
    # trie depth = number of full blocks: the node of block j sits at depth j + 1
    depth = np.zeros(k, dtype=np.int64)
    tp = np.asarray(trie_parent, dtype=np.int64)
    for i in range(k):  # parents come first
        depth[i] = depth[tp[i]] + 1 if tp[i] >= 0 else 1
    inherited[has] = depth[pre[has]] * block_tokens
    return make_graph(
        session=np.arange(n, dtype=np.int64),
        fresh=np.asarray(prompt, dtype=np.int64)[order] - inherited,
        output=np.asarray(output, dtype=np.int64)[order],
        parents_start=np.zeros(n + 1, dtype=np.int64),
        parent_ids=np.zeros(0, dtype=np.int64),
        prefix=pre,
        prefix_parent=tp,
        prefix_tokens=np.full(k, block_tokens, dtype=np.int64),
        session_time=t[order] - t.min(),
        source=src,
    )
