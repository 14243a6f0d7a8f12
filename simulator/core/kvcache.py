"""Paged KV cache of one or more replicas: block pool, content-keyed prefix index, LRU eviction.

This is vLLM V1's block manager (``block_pool.py``, ``kv_cache_manager.py``; REFERENCE.md §1)
re-expressed on *runs* of blocks so that no operation walks a prompt block by block:

* Content. Block ``i`` of a sequence is identified by the content node (see
  :mod:`simulator.workload.compiled`) that holds its last token and its index; node ``c`` owns
  the absolute block indices ``[first_block[c], first_block[c] + num_blocks[c])``. Only full
  blocks are ever cached (vLLM hashes full blocks only).
* Residency. ``resident[rep, c]`` blocks of node ``c`` are cached on replica ``rep``, counted from
  the node's first block. LRU with vLLM's tail-first freeing always evicts a block before its
  prefix, so the cached part of a node is a prefix of it.
* References. Running requests reference the blocks they hold. Per node we keep how many
  requests reference all of it (``full_refs``) and the largest extent of those that reference
  only a prefix (``part_max``). Blocks ``[max_extent, resident)`` of a node are unreferenced.
* Free queue. vLLM keeps free blocks in one LRU queue: allocation pops the head (evicting the
  block's cached content, if any); a finished request appends its blocks to the tail in reverse
  order, so its last block goes first; a prefix hit takes a block out of the queue. Here the
  queue holds *runs*: ``(node, lo, hi)`` for cached blocks ``lo..hi-1`` of a node, or an
  anonymous run of uncached free blocks (node ``-1``). Each node's runs form a stack (newest
  run = lowest blocks) so a hit removes them from the bottom in O(runs) and eviction takes the
  top of the oldest run. Work per request is O(content nodes on its path), not O(blocks).

Deliberate simplification (documented in docs/semantics.md): when a request recomputes a block
that another request already cached (vLLM's "last token is always recomputed" case, or two
identical prompts in one step), it references the cached copy and keeps its own physical block
as private until it finishes, instead of keeping two hashed copies.

All functions are ``@njit`` over the arrays of :class:`KVState`; units are blocks unless a name
says tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit


class KVState(NamedTuple):
    block_size: np.ndarray  # int64[1], tokens per block
    node_first_block: np.ndarray  # int64[N]
    node_num_blocks: np.ndarray  # int64[N] full blocks owned by the node
    resident: np.ndarray  # int64[n_rep, N]
    full_refs: np.ndarray  # int64[n_rep, N]
    part_refs: np.ndarray  # int64[n_rep, N]
    part_max: np.ndarray  # int64[n_rep, N]
    node_newest: np.ndarray  # int64[n_rep, N] newest free-queue run of the node, -1 if none
    ent_node: np.ndarray  # int64[n_rep, cap]
    ent_lo: np.ndarray  # int64[n_rep, cap]
    ent_hi: np.ndarray  # int64[n_rep, cap]; a run with hi == lo is dead
    ent_newer: np.ndarray  # int64[n_rep, cap]
    ent_older: np.ndarray  # int64[n_rep, cap]
    fifo_head: np.ndarray  # int64[n_rep] absolute run index (slot = index % cap)
    fifo_tail: np.ndarray  # int64[n_rep]
    num_free: np.ndarray  # int64[n_rep] blocks in the free queue (cached or not)
    num_blocks: np.ndarray  # int64[n_rep] blocks in the pool
    num_evicted: np.ndarray  # int64[n_rep] cached blocks evicted so far
    caching: np.ndarray  # int64[n_rep] 1 = prefix caching on


def make_kv_state(
    node_start_tokens: np.ndarray,
    node_num_tokens: np.ndarray,
    block_size: int,
    num_blocks: np.ndarray,
    caching: np.ndarray,
) -> KVState:
    """Allocate the cache state of ``len(num_blocks)`` replicas, every block free."""
    n_rep = int(num_blocks.shape[0])
    n_nodes = int(node_num_tokens.shape[0])
    first = node_start_tokens // block_size
    nblocks = (node_start_tokens + node_num_tokens) // block_size - first
    cap = int(2 * int(num_blocks.max()) + 64)
    zeros = lambda: np.zeros((n_rep, n_nodes), dtype=np.int64)  # noqa: E731
    kv = KVState(
        block_size=np.array([block_size], dtype=np.int64),
        node_first_block=first.astype(np.int64),
        node_num_blocks=nblocks.astype(np.int64),
        resident=zeros(),
        full_refs=zeros(),
        part_refs=zeros(),
        part_max=zeros(),
        node_newest=np.full((n_rep, n_nodes), -1, dtype=np.int64),
        ent_node=np.full((n_rep, cap), -1, dtype=np.int64),
        ent_lo=np.zeros((n_rep, cap), dtype=np.int64),
        ent_hi=np.zeros((n_rep, cap), dtype=np.int64),
        ent_newer=np.full((n_rep, cap), -1, dtype=np.int64),
        ent_older=np.full((n_rep, cap), -1, dtype=np.int64),
        fifo_head=np.zeros(n_rep, dtype=np.int64),
        fifo_tail=np.zeros(n_rep, dtype=np.int64),
        num_free=np.zeros(n_rep, dtype=np.int64),
        num_blocks=num_blocks.astype(np.int64).copy(),
        num_evicted=np.zeros(n_rep, dtype=np.int64),
        caching=caching.astype(np.int64).copy(),
    )
    for rep in range(n_rep):
        fifo_push(kv, rep, -1, 0, int(num_blocks[rep]))
    return kv


@njit(cache=True, inline="always")
def max_extent(kv, rep, c):
    """Blocks of node ``c`` (from its first) referenced by at least one running request."""
    if kv.full_refs[rep, c] > 0:
        return kv.node_num_blocks[c]
    return kv.part_max[rep, c]


@njit(cache=True)
def _unlink(kv, rep, e):
    cap = kv.ent_node.shape[1]
    s = e % cap
    node = kv.ent_node[rep, s]
    if node >= 0:
        newer = kv.ent_newer[rep, s]
        older = kv.ent_older[rep, s]
        if newer != -1:
            kv.ent_older[rep, newer % cap] = older
        else:
            kv.node_newest[rep, node] = older
        if older != -1:
            kv.ent_newer[rep, older % cap] = newer
    kv.ent_lo[rep, s] = kv.ent_hi[rep, s]


@njit(cache=True)
def _compact(kv, rep):
    """Squeeze dead runs out of the ring, keeping the queue order; O(ring capacity)."""
    cap = kv.ent_node.shape[1]
    head = kv.fifo_head[rep]
    tail = kv.fifo_tail[rep]
    live = 0
    for e in range(head, tail):
        s = e % cap
        if kv.ent_hi[rep, s] > kv.ent_lo[rep, s]:
            live += 1
    nodes = np.empty(live, dtype=np.int64)
    los = np.empty(live, dtype=np.int64)
    his = np.empty(live, dtype=np.int64)
    k = 0
    for e in range(head, tail):
        s = e % cap
        if kv.ent_hi[rep, s] > kv.ent_lo[rep, s]:
            nodes[k] = kv.ent_node[rep, s]
            los[k] = kv.ent_lo[rep, s]
            his[k] = kv.ent_hi[rep, s]
            if nodes[k] >= 0:
                kv.node_newest[rep, nodes[k]] = -1
            k += 1
    for k in range(live):
        e = head + k
        s = e % cap
        node = nodes[k]
        kv.ent_node[rep, s] = node
        kv.ent_lo[rep, s] = los[k]
        kv.ent_hi[rep, s] = his[k]
        kv.ent_newer[rep, s] = -1
        kv.ent_older[rep, s] = -1
        if node >= 0:
            older = kv.node_newest[rep, node]
            kv.ent_older[rep, s] = older
            if older != -1:
                kv.ent_newer[rep, older % cap] = e
            kv.node_newest[rep, node] = e
    kv.fifo_tail[rep] = head + live


@njit(cache=True)
def fifo_push(kv, rep, node, lo, hi):
    """Append blocks ``lo..hi-1`` of ``node`` (or ``hi - lo`` anonymous blocks) to the tail."""
    count = hi - lo
    if count <= 0:
        return
    kv.num_free[rep] += count
    cap = kv.ent_node.shape[1]
    tail = kv.fifo_tail[rep]
    if tail > kv.fifo_head[rep]:
        last = (tail - 1) % cap
        if kv.ent_hi[rep, last] > kv.ent_lo[rep, last] and kv.ent_node[rep, last] == node:
            if node < 0:
                kv.ent_hi[rep, last] += count
                return
            if kv.ent_lo[rep, last] == hi:
                kv.ent_lo[rep, last] = lo
                return
    if tail - kv.fifo_head[rep] >= cap:
        _compact(kv, rep)
        tail = kv.fifo_tail[rep]
    s = tail % cap
    kv.ent_node[rep, s] = node
    kv.ent_lo[rep, s] = lo
    kv.ent_hi[rep, s] = hi
    kv.ent_newer[rep, s] = -1
    kv.ent_older[rep, s] = -1
    if node >= 0:
        older = kv.node_newest[rep, node]
        kv.ent_older[rep, s] = older
        if older != -1:
            kv.ent_newer[rep, older % cap] = tail
        kv.node_newest[rep, node] = tail
    kv.fifo_tail[rep] = tail + 1


@njit(cache=True)
def fifo_pop(kv, rep, count):
    """Take ``count`` blocks from the head of the free queue, evicting cached content.

    The caller has checked ``count <= num_free``. Returns the number of cached blocks evicted.
    """
    cap = kv.ent_node.shape[1]
    evicted = 0
    while count > 0:
        head = kv.fifo_head[rep]
        s = head % cap
        avail = kv.ent_hi[rep, s] - kv.ent_lo[rep, s]
        if avail <= 0:
            kv.fifo_head[rep] = head + 1
            continue
        take = count if count < avail else avail
        node = kv.ent_node[rep, s]
        if node >= 0:
            kv.resident[rep, node] -= take
            evicted += take
        kv.ent_hi[rep, s] -= take
        kv.num_free[rep] -= take
        count -= take
        if kv.ent_hi[rep, s] == kv.ent_lo[rep, s]:
            _unlink(kv, rep, head)
            kv.fifo_head[rep] = head + 1
    kv.num_evicted[rep] += evicted
    return evicted


@njit(cache=True)
def take_from_queue(kv, rep, c, upto):
    """Blocks below ``upto`` of node ``c`` become referenced: remove them from the free queue."""
    cap = kv.ent_node.shape[1]
    e = kv.node_newest[rep, c]
    removed = 0
    while e != -1:
        s = e % cap
        lo = kv.ent_lo[rep, s]
        hi = kv.ent_hi[rep, s]
        if lo >= upto:
            break
        if hi <= upto:
            removed += hi - lo
            older = kv.ent_older[rep, s]
            _unlink(kv, rep, e)
            e = older
        else:
            removed += upto - lo
            kv.ent_lo[rep, s] = upto
            break
    kv.num_free[rep] -= removed


@njit(cache=True)
def lookup_hit_blocks(kv, path_nodes, path_start, path_end, rep, num_tokens):
    """Longest run of cached blocks at the head of a sequence of ``num_tokens`` tokens.

    Capped at ``num_tokens - 1`` tokens as vLLM does (the last token is always computed).
    Returns the number of blocks; O(nodes on the path).
    """
    bs = kv.block_size[0]
    cap = (num_tokens - 1) // bs
    hits = 0
    for j in range(path_start, path_end):
        c = path_nodes[j]
        fb = kv.node_first_block[c]
        if fb >= cap:
            break
        nb = kv.node_num_blocks[c]
        want = cap - fb
        if want > nb:
            want = nb
        have = kv.resident[rep, c]
        if have > want:
            have = want
        hits = fb + have
        if have < want:
            break
    return hits


@njit(cache=True)
def queued_blocks_in_prefix(kv, path_nodes, path_start, path_end, rep, num_blocks):
    """How many of the first ``num_blocks`` blocks sit in the free queue (a hit would take them)."""
    total = 0
    for j in range(path_start, path_end):
        c = path_nodes[j]
        fb = kv.node_first_block[c]
        if fb >= num_blocks:
            break
        target = num_blocks - fb
        nb = kv.node_num_blocks[c]
        if target > nb:
            target = nb
        res = kv.resident[rep, c]
        if target > res:
            target = res
        m = max_extent(kv, rep, c)
        if target > m:
            total += target - m
    return total
