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
that is already cached (vLLM's "last token is always recomputed" case, or two identical prompts
in one step), it references the cached copy and its own physical block returns to the free
queue at once, so one block per position is ever held, as in vLLM.

Host tier (REFERENCE.md §8; vLLM's OffloadingConnector, Dynamo KVBM G2). A replica may have a
pool of KV blocks in pinned host memory. ``host[rep, c, HN_RES]`` blocks of node ``c`` are held
there, again counted from the node's first block, so a node's host copy is a prefix too. When the
GPU evicts cached blocks of a node, the host receives the node's blocks up to the evicted ones
(the copy is asynchronous and overlaps compute, so it delays nothing; its bytes are counted).
The host pool is LRU over *nodes*: a ring of node ids (``hent``) in which each node with host
blocks has exactly one live entry; storing to or loading from a node moves it to the newest end,
and eviction shrinks the oldest node from its last block down. Path nodes are touched deepest
first, so a session's shallow (shared) nodes outlive its deep ones, as on the GPU.

All functions are ``@njit`` over the arrays of :class:`KVState`; units are blocks unless a name
says tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

# kvn[rep, node, col]
KN_RES = 0  # cached blocks of the node, from its first block
KN_FULL = 1  # running requests referencing all of the node
KN_PART = 2  # running requests referencing a prefix of it (their frontier is here)
KN_PMAX = 3  # largest extent (blocks) among the partial referencers
KN_NEWEST = 4  # newest free-queue run of the node (absolute run index), -1 if none
KN_NUM = 5
# ent[rep, slot, col]: free-queue runs; slot = absolute run index % capacity
EN_NODE = 0  # node id, or -1 for anonymous (uncached) free blocks
EN_LO = 1  # first block of the run (node-relative); a run with HI == LO is dead
EN_HI = 2  # one past its last block
EN_NEWER = 3  # next newer run of the same node, -1 if none
EN_OLDER = 4
EN_NUM = 5
# kvs[rep, col]
KS_HEAD = 0  # absolute index of the oldest run
KS_TAIL = 1  # one past the newest run
KS_FREE = 2  # blocks in the free queue (cached or not)
KS_BLOCKS = 3  # blocks in the pool
KS_EVICTED = 4  # cached blocks evicted so far
KS_CACHING = 5  # 1 = prefix caching on
KS_BLOCK_SIZE = 6  # tokens per block
KS_HBLOCKS = 7  # host-tier capacity in blocks (0 = no host tier)
KS_HUSED = 8  # host blocks holding content
KS_HHEAD = 9  # host LRU ring: absolute index of the oldest entry
KS_HTAIL = 10  # one past the newest
KS_HSTORED = 11  # blocks copied GPU -> host so far
KS_HEVICTED = 12  # blocks dropped from the host tier so far
KS_HPEAK = 13  # most host blocks in use at once
# session TTL: finished requests still referencing their blocks, oldest first; a list linked
# through the request table's queue links (the loop owns it; here for the partial rescans)
KS_PIN_HEAD = 14
KS_PIN_TAIL = 15
KS_N_PINNED = 16
KS_NUM = 17
# host[rep, node, col] (shape [1, 1, HN_NUM] when no replica has a host tier)
HN_RES = 0  # blocks of the node in host memory, from its first block
HN_SLOT = 1  # absolute index of its entry in the host ring, -1 if none
HN_NUM = 2
# node_blocks[node, col]
NB_FIRST = 0  # absolute index of the node's first full block
NB_NUM = 1  # full blocks owned by the node


class KVState(NamedTuple):
    kvn: np.ndarray  # int64[n_rep, N, KN_NUM]
    ent: np.ndarray  # int64[n_rep, cap, EN_NUM]
    kvs: np.ndarray  # int64[n_rep, KS_NUM]
    node_blocks: np.ndarray  # int64[N, 2]
    host: np.ndarray  # int64[n_rep, N, HN_NUM], or [1, 1, HN_NUM] without a host tier
    hent: np.ndarray  # int64[n_rep, host ring capacity]: node ids, -1 = dead entry


def make_kv_state(
    node_start_tokens: np.ndarray,
    node_num_tokens: np.ndarray,
    block_size: int,
    num_blocks: np.ndarray,
    caching: np.ndarray,
    host_blocks: np.ndarray | None = None,
) -> KVState:
    """Allocate the cache state of ``len(num_blocks)`` replicas, every block free.

    ``host_blocks[rep]``: host-tier capacity of each replica in blocks (0 = none, the default).
    """
    n_rep = int(num_blocks.shape[0])
    n_nodes = int(node_num_tokens.shape[0])
    node_blocks = np.empty((n_nodes, 2), dtype=np.int64)
    node_blocks[:, NB_FIRST] = node_start_tokens // block_size
    node_blocks[:, NB_NUM] = (node_start_tokens + node_num_tokens) // block_size - node_blocks[
        :, NB_FIRST
    ]
    cap = int(2 * int(num_blocks.max()) + 64)
    kvn = np.zeros((n_rep, n_nodes, KN_NUM), dtype=np.int64)
    kvn[:, :, KN_NEWEST] = -1
    ent = np.zeros((n_rep, cap, EN_NUM), dtype=np.int64)
    ent[:, :, EN_NODE] = -1
    ent[:, :, EN_NEWER] = -1
    ent[:, :, EN_OLDER] = -1
    kvs = np.zeros((n_rep, KS_NUM), dtype=np.int64)
    kvs[:, KS_PIN_HEAD] = -1
    kvs[:, KS_PIN_TAIL] = -1
    kvs[:, KS_BLOCKS] = num_blocks
    kvs[:, KS_CACHING] = caching
    kvs[:, KS_BLOCK_SIZE] = block_size
    if host_blocks is not None and int(np.max(host_blocks)) > 0:
        kvs[:, KS_HBLOCKS] = host_blocks
        host = np.zeros((n_rep, n_nodes, HN_NUM), dtype=np.int64)
        host[:, :, HN_SLOT] = -1
        hcap = 2 * min(n_nodes, int(np.max(host_blocks))) + 64
    else:
        host = np.zeros((1, 1, HN_NUM), dtype=np.int64)
        hcap = 1
    hent = np.full((n_rep, hcap), -1, dtype=np.int64)
    kv = KVState(kvn, ent, kvs, node_blocks, host, hent)
    for rep in range(n_rep):
        fifo_push(kv, rep, -1, 0, int(num_blocks[rep]))
    return kv


@njit(cache=True)
def max_extent(kv, rep, c):
    """Blocks of node ``c`` (from its first) referenced by at least one running request."""
    if kv.kvn[rep, c, KN_FULL] > 0:
        return kv.node_blocks[c, NB_NUM]
    return kv.kvn[rep, c, KN_PMAX]


@njit(cache=True)
def _unlink(kv, rep, e):
    ent = kv.ent
    cap = ent.shape[1]
    s = e % cap
    node = ent[rep, s, EN_NODE]
    if node >= 0:
        newer = ent[rep, s, EN_NEWER]
        older = ent[rep, s, EN_OLDER]
        if newer != -1:
            ent[rep, newer % cap, EN_OLDER] = older
        else:
            kv.kvn[rep, node, KN_NEWEST] = older
        if older != -1:
            ent[rep, older % cap, EN_NEWER] = newer
    ent[rep, s, EN_LO] = ent[rep, s, EN_HI]


@njit(cache=True)
def _compact(kv, rep):
    """Squeeze dead runs out of the ring, keeping the queue order; O(ring capacity)."""
    ent = kv.ent
    cap = ent.shape[1]
    head = kv.kvs[rep, KS_HEAD]
    tail = kv.kvs[rep, KS_TAIL]
    live = 0
    for e in range(head, tail):
        s = e % cap
        if ent[rep, s, EN_HI] > ent[rep, s, EN_LO]:
            live += 1
    keep = np.empty((live, 3), dtype=np.int64)
    k = 0
    for e in range(head, tail):
        s = e % cap
        if ent[rep, s, EN_HI] > ent[rep, s, EN_LO]:
            keep[k, 0] = ent[rep, s, EN_NODE]
            keep[k, 1] = ent[rep, s, EN_LO]
            keep[k, 2] = ent[rep, s, EN_HI]
            if keep[k, 0] >= 0:
                kv.kvn[rep, keep[k, 0], KN_NEWEST] = -1
            k += 1
    for k in range(live):
        e = head + k
        s = e % cap
        node = keep[k, 0]
        ent[rep, s, EN_NODE] = node
        ent[rep, s, EN_LO] = keep[k, 1]
        ent[rep, s, EN_HI] = keep[k, 2]
        ent[rep, s, EN_NEWER] = -1
        ent[rep, s, EN_OLDER] = -1
        if node >= 0:
            older = kv.kvn[rep, node, KN_NEWEST]
            ent[rep, s, EN_OLDER] = older
            if older != -1:
                ent[rep, older % cap, EN_NEWER] = e
            kv.kvn[rep, node, KN_NEWEST] = e
    kv.kvs[rep, KS_TAIL] = head + live


@njit(cache=True)
def fifo_push(kv, rep, node, lo, hi):
    """Append blocks ``lo..hi-1`` of ``node`` (or ``hi - lo`` anonymous blocks) to the tail."""
    count = hi - lo
    if count <= 0:
        return
    ent = kv.ent
    kvs = kv.kvs
    kvs[rep, KS_FREE] += count
    cap = ent.shape[1]
    tail = kvs[rep, KS_TAIL]
    if tail > kvs[rep, KS_HEAD]:
        last = (tail - 1) % cap
        if ent[rep, last, EN_HI] > ent[rep, last, EN_LO] and ent[rep, last, EN_NODE] == node:
            if node < 0:
                ent[rep, last, EN_HI] += count
                return
            if ent[rep, last, EN_LO] == hi:
                ent[rep, last, EN_LO] = lo
                return
    if tail - kvs[rep, KS_HEAD] >= cap:
        _compact(kv, rep)
        tail = kvs[rep, KS_TAIL]
    s = tail % cap
    ent[rep, s, EN_NODE] = node
    ent[rep, s, EN_LO] = lo
    ent[rep, s, EN_HI] = hi
    ent[rep, s, EN_NEWER] = -1
    ent[rep, s, EN_OLDER] = -1
    if node >= 0:
        older = kv.kvn[rep, node, KN_NEWEST]
        ent[rep, s, EN_OLDER] = older
        if older != -1:
            ent[rep, older % cap, EN_NEWER] = tail
        kv.kvn[rep, node, KN_NEWEST] = tail
    kvs[rep, KS_TAIL] = tail + 1


@njit(cache=True)
def fifo_pop(kv, rep, count):
    """Take ``count`` blocks from the head of the free queue, evicting cached content.

    The caller has checked ``count <= free``. Returns the number of cached blocks evicted.
    """
    ent = kv.ent
    kvs = kv.kvs
    cap = ent.shape[1]
    evicted = 0
    while count > 0:
        head = kvs[rep, KS_HEAD]
        s = head % cap
        avail = ent[rep, s, EN_HI] - ent[rep, s, EN_LO]
        if avail <= 0:
            kvs[rep, KS_HEAD] = head + 1
            continue
        take = count if count < avail else avail
        node = ent[rep, s, EN_NODE]
        if node >= 0:
            if kvs[rep, KS_HBLOCKS] > 0:
                host_store(kv, rep, node, ent[rep, s, EN_HI])
            kv.kvn[rep, node, KN_RES] -= take
            evicted += take
        ent[rep, s, EN_HI] -= take
        kvs[rep, KS_FREE] -= take
        count -= take
        if ent[rep, s, EN_HI] == ent[rep, s, EN_LO]:
            _unlink(kv, rep, head)
            kvs[rep, KS_HEAD] = head + 1
    kvs[rep, KS_EVICTED] += evicted
    return evicted


@njit(cache=True)
def take_from_queue(kv, rep, c, upto):
    """Blocks below ``upto`` of node ``c`` become referenced: remove them from the free queue."""
    ent = kv.ent
    cap = ent.shape[1]
    e = kv.kvn[rep, c, KN_NEWEST]
    removed = 0
    while e != -1:
        s = e % cap
        lo = ent[rep, s, EN_LO]
        hi = ent[rep, s, EN_HI]
        if lo >= upto:
            break
        if hi <= upto:
            removed += hi - lo
            older = ent[rep, s, EN_OLDER]
            _unlink(kv, rep, e)
            e = older
        else:
            removed += upto - lo
            ent[rep, s, EN_LO] = upto
            break
    kv.kvs[rep, KS_FREE] -= removed


@njit(cache=True)
def lookup_hit_blocks(kv, path_nodes, path_start, path_end, rep, num_tokens):
    """Longest run of cached blocks at the head of a sequence of ``num_tokens`` tokens.

    Capped at ``num_tokens - 1`` tokens as vLLM does (the last token is always computed).
    Returns the number of blocks; O(nodes on the path).
    """
    cap = (num_tokens - 1) // kv.kvs[rep, KS_BLOCK_SIZE]
    hits = 0
    for j in range(path_start, path_end):
        c = path_nodes[j]
        fb = kv.node_blocks[c, NB_FIRST]
        if fb >= cap:
            break
        want = cap - fb
        nb = kv.node_blocks[c, NB_NUM]
        if want > nb:
            want = nb
        have = kv.kvn[rep, c, KN_RES]
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
        fb = kv.node_blocks[c, NB_FIRST]
        if fb >= num_blocks:
            break
        target = num_blocks - fb
        nb = kv.node_blocks[c, NB_NUM]
        if target > nb:
            target = nb
        res = kv.kvn[rep, c, KN_RES]
        if target > res:
            target = res
        m = max_extent(kv, rep, c)
        if target > m:
            total += target - m
    return total


# ----------------------------------------------------------------------------------------------
# host tier


@njit(cache=True)
def _host_compact(kv, rep):
    """Squeeze dead entries out of the host ring, keeping the LRU order; O(ring capacity)."""
    hent = kv.hent
    cap = hent.shape[1]
    head = kv.kvs[rep, KS_HHEAD]
    tail = kv.kvs[rep, KS_HTAIL]
    w = head
    for e in range(head, tail):
        c = hent[rep, e % cap]
        if c >= 0:
            hent[rep, w % cap] = c
            kv.host[rep, c, HN_SLOT] = w
            w += 1
    for e in range(w, tail):
        hent[rep, e % cap] = -1
    kv.kvs[rep, KS_HTAIL] = w


@njit(cache=True)
def host_touch(kv, rep, c):
    """Make node ``c`` (which has host blocks) the most recently used of the host tier."""
    hent = kv.hent
    cap = hent.shape[1]
    slot = kv.host[rep, c, HN_SLOT]
    tail = kv.kvs[rep, KS_HTAIL]
    if slot >= 0 and slot == tail - 1:
        return  # the newest already
    if slot >= 0:
        hent[rep, slot % cap] = -1
    if tail - kv.kvs[rep, KS_HHEAD] >= cap:
        _host_compact(kv, rep)
        tail = kv.kvs[rep, KS_HTAIL]
    hent[rep, tail % cap] = c
    kv.host[rep, c, HN_SLOT] = tail
    kv.kvs[rep, KS_HTAIL] = tail + 1


@njit(cache=True)
def host_evict(kv, rep, count):
    """Drop ``count`` blocks from the host tier, least recently used node first, deepest block
    of a node first."""
    hent = kv.hent
    cap = hent.shape[1]
    kvs = kv.kvs
    while count > 0 and kvs[rep, KS_HHEAD] < kvs[rep, KS_HTAIL]:
        head = kvs[rep, KS_HHEAD]
        c = hent[rep, head % cap]
        if c < 0:
            kvs[rep, KS_HHEAD] = head + 1
            continue
        have = kv.host[rep, c, HN_RES]
        take = count if count < have else have
        kv.host[rep, c, HN_RES] = have - take
        kvs[rep, KS_HUSED] -= take
        kvs[rep, KS_HEVICTED] += take
        count -= take
        if have == take:
            hent[rep, head % cap] = -1
            kv.host[rep, c, HN_SLOT] = -1
            kvs[rep, KS_HHEAD] = head + 1


@njit(cache=True)
def host_store(kv, rep, c, upto):
    """Copy blocks ``0..upto-1`` of node ``c`` to the host tier (those not there yet) and mark
    the node most recently used; the tier then evicts down to its capacity. Returns the blocks
    copied."""
    kvs = kv.kvs
    have = kv.host[rep, c, HN_RES]
    added = upto - have
    if added > 0:
        kv.host[rep, c, HN_RES] = upto
        kvs[rep, KS_HUSED] += added
        kvs[rep, KS_HSTORED] += added
    else:
        added = 0
    if kv.host[rep, c, HN_RES] > 0:
        host_touch(kv, rep, c)
    over = kvs[rep, KS_HUSED] - kvs[rep, KS_HBLOCKS]
    if over > 0:
        host_evict(kv, rep, over)
    if kvs[rep, KS_HUSED] > kvs[rep, KS_HPEAK]:
        kvs[rep, KS_HPEAK] = kvs[rep, KS_HUSED]
    return added


@njit(cache=True)
def lookup_tiered(kv, path_nodes, path_start, path_end, rep, num_tokens):
    """Prefix hit across GPU and host: ``(hit blocks, of which only the host holds)``.

    A block counts if either tier holds it; the hit ends at the first block neither holds and
    is capped at ``num_tokens - 1`` tokens, as :func:`lookup_hit_blocks`. O(nodes on the path).
    """
    cap = (num_tokens - 1) // kv.kvs[rep, KS_BLOCK_SIZE]
    hits = 0
    host_only = 0
    for j in range(path_start, path_end):
        c = path_nodes[j]
        fb = kv.node_blocks[c, NB_FIRST]
        if fb >= cap:
            break
        want = cap - fb
        nb = kv.node_blocks[c, NB_NUM]
        if want > nb:
            want = nb
        gpu = kv.kvn[rep, c, KN_RES]
        if gpu > want:
            gpu = want
        have = kv.host[rep, c, HN_RES]
        if have > want:
            have = want
        if have > gpu:
            host_only += have - gpu
        else:
            have = gpu
        hits = fb + have
        if have < want:
            break
    return hits, host_only


@njit(cache=True)
def host_touch_path(kv, path_nodes, path_start, path_end, rep, num_blocks):
    """Mark the nodes holding the first ``num_blocks`` blocks of a path as recently used in the
    host tier, deepest first."""
    for j in range(path_end - 1, path_start - 1, -1):
        c = path_nodes[j]
        if kv.node_blocks[c, NB_FIRST] < num_blocks and kv.host[rep, c, HN_RES] > 0:
            host_touch(kv, rep, c)
