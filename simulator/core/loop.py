"""The Numba event loop: dispatch, vLLM-V1 scheduling and step completion for N replicas.

One heap of timed events drives every replica (see :mod:`simulator.core.heap`):

* ``EV_ARRIVAL`` — a request is dispatched: the router picks a replica, the request is checked
  against that replica's limits (rejected with a reason if it can never run) and joins the
  replica's FCFS waiting queue. An idle replica gets an ``EV_SCHEDULE`` at the same time.
* ``EV_SCHEDULE`` — the replica forms a batch the way vLLM V1's ``Scheduler.schedule()`` does
  (REFERENCE.md §1): running requests first, in admission order, each taking
  ``min(tokens it still needs, remaining token budget)``; when blocks run out the most recently
  admitted running request is preempted (recompute: its blocks go back to the free queue, it
  returns to the *head* of the waiting queue) until the allocation fits. Then, only if nothing
  was preempted in this step, waiting requests in FCFS order while the budget and
  ``max_num_seqs`` allow, each after a prefix-cache lookup, the last one possibly with a partial
  (chunked) prefill. Full blocks are committed to the prefix index when scheduled, as vLLM does.
  The step's duration comes from the cost model; an ``EV_STEP_END`` is scheduled.
* ``EV_STEP_END`` — every request whose computed tokens caught up with its known tokens emits
  one token (the first one ends its prefill: TTFT). Finished requests free their blocks
  (tail first) and release their children, which are dispatched ``wait_after_ready`` later.

No Python objects are touched, and per-sequence helpers receive only the few arrays they
use (each array handed to a jitted call costs a reference-count round trip). The loop can stop
after ``max_events`` and be resumed, which is how the Python side draws a progress bar.

Disaggregation adds ``EV_KV_DONE``: a prefill replica hands a request whose first token it
emitted to its decode replica, which allocates blocks (FIFO), moves the missing KV over its
link, and decodes on once the move completes; the prefill side holds its blocks until then.

A host KV tier adds ``EV_LOAD_DONE``: a request whose prefix hit reaches into blocks only the
host holds allocates GPU blocks for them, waits out the PCIe copy (``ST_LOADING``; the copy
engine of a replica serialises its copies) and then computes the rest; other requests' steps go
on meanwhile. Retention policies for tool gaps add ``EV_UNPIN`` (a session-TTL protection
expires) and ``EV_PREFETCH``/``EV_PREFETCH_DONE`` (offloaded blocks are copied back ahead of
the session's next request); see :func:`_retain`.
"""

from __future__ import annotations

import math

from numba import njit

from simulator.core.borrow import borrow
from simulator.core.heap import EventHeap, heap_pop, heap_push
from simulator.core.kvcache import (
    HN_RES,
    KN_FULL,
    KN_PART,
    KN_PMAX,
    KN_RES,
    KS_BLOCK_SIZE,
    KS_BLOCKS,
    KS_CACHING,
    KS_FREE,
    KS_HBLOCKS,
    KS_N_PINNED,
    KS_PIN_HEAD,
    KS_PIN_TAIL,
    NB_FIRST,
    NB_NUM,
    KVState,
    fifo_pop,
    fifo_push,
    host_store,
    host_touch_path,
    lookup_hit_blocks,
    lookup_tiered,
    max_extent,
    queued_blocks_in_prefix,
    take_from_queue,
)
from simulator.core.router import route, take_snapshot
from simulator.core.state import (
    CORE_DONE,
    CORE_ERR_HEAP_FULL,
    CORE_ERR_STUCK,
    CORE_PAUSED,
    EV_ARRIVAL,
    EV_KV_DONE,
    EV_LOAD_DONE,
    EV_PREFETCH,
    EV_PREFETCH_DONE,
    EV_SCHEDULE,
    EV_SNAPSHOT,
    EV_STEP_END,
    EV_UNPIN,
    G_CHUNK_HIST,
    G_DISAGG,
    G_ERROR,
    G_NUM_DONE,
    G_NUM_EVENTS,
    G_RR_NEXT,
    G_RR_NEXT_PREFILL,
    G_SEED,
    G_STEP_DROPPED,
    G_STEP_N,
    GF_LOCAL_PREFILL,
    GF_STALENESS,
    GF_WINDOW_SECONDS,
    HIST_BINS_PER_DECADE,
    HIST_MIN_SECONDS,
    HIST_NUM_BINS,
    REJECT_KV_CAPACITY,
    REJECT_MAX_MODEL_LEN,
    REJECT_PARENT,
    RET_LRU,
    RET_SESSION_TTL,
    ROLE_AGGREGATED,
    ROLE_DECODE,
    ROLE_PREFILL,
    RP_BUSY,
    RP_BUSY_SECONDS,
    RP_DECODE_TOKENS,
    RP_DRAFT_SECONDS,
    RP_H2D_BW,
    RP_H2D_FREE_AT,
    RP_H2D_SECONDS,
    RP_HOST_LOAD_BLOCKS,
    RP_HOST_LOADS,
    RP_KV_BYTES_TOKEN,
    RP_LINK_BW,
    RP_LINK_FREE_AT,
    RP_LINK_LATENCY,
    RP_MAX_BATCHED,
    RP_MAX_LEN,
    RP_MAX_SEQS,
    RP_N_HELD,
    RP_N_REMOTE,
    RP_N_RUNNING,
    RP_N_SCHED,
    RP_N_WAITING,
    RP_NUM_STEPS,
    RP_OUTSTANDING,
    RP_PEAK_RUNNING,
    RP_PEAK_USED,
    RP_PENDING_PREFILL,
    RP_PINS,
    RP_PINS_BROKEN,
    RP_PREEMPTIONS,
    RP_PREFETCH_BLOCKS,
    RP_PREFETCH_MARGIN,
    RP_PREFETCHES,
    RP_PREFILL_TOKENS,
    RP_RETENTION,
    RP_ROLE,
    RP_ROUTED,
    RP_RQ_HEAD,
    RP_RQ_TAIL,
    RP_SPEC_ACCEPTED,
    RP_SPEC_DECAY,
    RP_SPEC_DRAFT,
    RP_SPEC_K_STEP,
    RP_SPEC_ON,
    RP_SPEC_PROFILE,
    RP_SPEC_PROPOSED,
    RP_SPEC_VERIFIES,
    RP_STATE_BLOCKS,
    RP_STEP_START,
    RP_TTL,
    RP_WQ_HEAD,
    RP_WQ_TAIL,
    RP_XFER_BYTES_IN,
    RP_XFER_IN,
    RP_XFER_SECONDS,
    RQ_ARRIVAL,
    RQ_CACHED,
    RQ_CHUNKS,
    RQ_COMMITTED,
    RQ_COMPUTED,
    RQ_DECODE_REPLICA,
    RQ_FEXT,
    RQ_FINISH,
    RQ_FIRST_SCHED,
    RQ_FIRST_TOKEN,
    RQ_FPOS,
    RQ_HOST_HIT,
    RQ_LAST_TOKEN,
    RQ_LOAD_END,
    RQ_LOAD_START,
    RQ_MAX_GAP,
    RQ_NUM_TOKENS,
    RQ_OUT_DONE,
    RQ_PARENT_FAILED,
    RQ_PENDING,
    RQ_PINNED,
    RQ_PREEMPTIONS,
    RQ_PREFILL_REPLICA,
    RQ_PRIVATE,
    RQ_PRIVATE_P,
    RQ_READY,
    RQ_REJECT,
    RQ_REPLICA,
    RQ_RETAIN,
    RQ_SCHED_TOKENS,
    RQ_SPEC_ACCEPTED,
    RQ_SPEC_PROPOSED,
    RQ_STATUS,
    RQ_TABLE_LEN,
    RQ_WQ_NEXT,
    RQ_WQ_PREV,
    RQ_XFER_BYTES,
    RQ_XFER_END,
    RQ_XFER_QUEUED,
    RQ_XFER_START,
    SL_END,
    SL_NUM_DECODES,
    SL_NUM_SEQS,
    SL_NUM_WAITING,
    SL_PREFILL_TOKENS,
    SL_REPLICA,
    SL_START,
    SL_USED_BLOCKS,
    ST_DISPATCHING,
    ST_FINISHED,
    ST_LOADING,
    ST_PENDING,
    ST_REJECTED,
    ST_RELEASING,
    ST_RUNNING,
    ST_TRANSFERRING,
    ST_WAITING,
    WIN_NUM_BINS,
    Globals,
    Replicas,
    Requests,
)
from simulator.core.uniform import uniform
from simulator.costmodel import step_seconds
from simulator.workload.compiled import CompiledWorkload

# ----------------------------------------------------------------------------------------------
# block references of one request (see kvcache.py for the data structure)


@njit(cache=True)
def _drop_partial(kv, rqi, running, n_running, path_nodes, rep, c, ext, r):
    """Request ``r`` stops being a partial referencer of node ``c`` at extent ``ext``."""
    kvn = kv.kvn
    kvn[rep, c, KN_PART] -= 1
    if kvn[rep, c, KN_PART] == 0:
        kvn[rep, c, KN_PMAX] = 0
    elif ext > 0 and ext >= kvn[rep, c, KN_PMAX]:
        m = 0
        for i in range(n_running):
            q = running[rep, i]
            if q != r and path_nodes[rqi[q, RQ_FPOS]] == c and rqi[q, RQ_FEXT] > m:
                m = rqi[q, RQ_FEXT]
        q = kv.kvs[rep, KS_PIN_HEAD]  # finished requests protected by a session TTL
        while q != -1:
            if q != r and path_nodes[rqi[q, RQ_FPOS]] == c and rqi[q, RQ_FEXT] > m:
                m = rqi[q, RQ_FEXT]
            q = rqi[q, RQ_WQ_NEXT]
        kvn[rep, c, KN_PMAX] = m


@njit(cache=True, inline="always")
def _advance(kv, rqi, running, n_running, path_nodes, req_path_start, rep, r, new_committed,
             computed):
    """Reference the first ``new_committed`` blocks of ``r``'s sequence.

    ``computed``: the blocks past the cached prefix were computed by ``r`` (they become cached
    content) rather than found in the cache (a prefix hit). O(nodes crossed).
    """
    kvn = kv.kvn
    j = rqi[r, RQ_FPOS]
    last = req_path_start[r + 1] - 1
    ext = rqi[r, RQ_FEXT]
    while True:
        c = path_nodes[j]
        fb = kv.node_blocks[c, NB_FIRST]
        nb = kv.node_blocks[c, NB_NUM]
        target = new_committed - fb
        if target > nb:
            target = nb
        moving_on = j < last and new_committed >= fb + nb
        ext_before = ext
        if target > ext:
            old_max = max_extent(kv, rep, c)
            if target > old_max and kvn[rep, c, KN_RES] > old_max:
                take_from_queue(kv, rep, c, target)
            res = kvn[rep, c, KN_RES]
            if computed:
                # blocks r recomputed that are cached already: r uses the cached copy and its
                # own copy goes straight back to the free queue (uncached)
                dup = (target if target < res else res) - ext
                if dup > 0:
                    rqi[r, RQ_PRIVATE] -= dup
                    fifo_push(kv, rep, -1, 0, dup)
                if target > res:
                    rqi[r, RQ_PRIVATE] -= target - (res if res > ext else ext)
                    kvn[rep, c, KN_RES] = target
            if not moving_on and target > kvn[rep, c, KN_PMAX]:
                kvn[rep, c, KN_PMAX] = target
            ext = target
        if not moving_on:
            break
        _drop_partial(kv, rqi, running, n_running, path_nodes, rep, c, ext_before, r)
        kvn[rep, c, KN_FULL] += 1
        j += 1
        ext = 0
        kvn[rep, path_nodes[j], KN_PART] += 1
    rqi[r, RQ_FPOS] = j
    rqi[r, RQ_FEXT] = ext
    rqi[r, RQ_COMMITTED] = new_committed


@njit(cache=True)
def _release(kv, rqi, running, n_running, path_nodes, req_path_start, rep, r):
    """Free every block of ``r``: private ones first, then its path from the tail up."""
    if rqi[r, RQ_PRIVATE] > 0:
        fifo_push(kv, rep, -1, 0, rqi[r, RQ_PRIVATE])
    _release_path(kv, rqi, running, n_running, path_nodes, req_path_start, rep, r)
    rqi[r, RQ_PRIVATE] = 0
    rqi[r, RQ_TABLE_LEN] = 0
    rqi[r, RQ_COMMITTED] = 0
    rqi[r, RQ_FEXT] = 0


@njit(cache=True)
def _release_path(kv, rqi, running, n_running, path_nodes, req_path_start, rep, r):
    """Drop ``r``'s references to cached blocks on ``rep``, deepest node first."""
    kvn = kv.kvn
    if kv.kvs[rep, KS_CACHING] == 1:
        j = rqi[r, RQ_FPOS]
        c = path_nodes[j]
        old = max_extent(kv, rep, c)
        _drop_partial(kv, rqi, running, n_running, path_nodes, rep, c, rqi[r, RQ_FEXT], r)
        new = max_extent(kv, rep, c)
        if new < old:
            fifo_push(kv, rep, c, new, old)
        for jj in range(j - 1, req_path_start[r] - 1, -1):
            c = path_nodes[jj]
            old = max_extent(kv, rep, c)
            kvn[rep, c, KN_FULL] -= 1
            new = max_extent(kv, rep, c)
            if new < old:
                fifo_push(kv, rep, c, new, old)


# ----------------------------------------------------------------------------------------------
# retention across tool gaps (session TTL, offload-and-prefetch) and the host tier


@njit(cache=True)
def _unlink_from(rqi, rpi, rep, r, head, tail, count):
    """Remove ``r`` from anywhere in one of ``rep``'s request queues (see :func:`_push_back`)."""
    prev = rqi[r, RQ_WQ_PREV]
    nxt = rqi[r, RQ_WQ_NEXT]
    if prev != -1:
        rqi[prev, RQ_WQ_NEXT] = nxt
    else:
        rpi[rep, head] = nxt
    if nxt != -1:
        rqi[nxt, RQ_WQ_PREV] = prev
    else:
        rpi[rep, tail] = prev
    rqi[r, RQ_WQ_NEXT] = -1
    rqi[r, RQ_WQ_PREV] = -1
    rpi[rep, count] -= 1


@njit(cache=True)
def _pin(kv, rqi, rep, r):
    """Session TTL: ``r`` finished; free its private blocks but keep its references to the
    cached blocks of its sequence (they stay out of the free queue, so nothing evicts them).
    ``r`` joins the replica's list of protections (``KS_PIN_*``, oldest first)."""
    if rqi[r, RQ_PRIVATE] > 0:
        fifo_push(kv, rep, -1, 0, rqi[r, RQ_PRIVATE])
    rqi[r, RQ_PRIVATE] = 0
    rqi[r, RQ_TABLE_LEN] = 0
    rqi[r, RQ_PINNED] = 1
    _push_back(rqi, kv.kvs, rep, r, KS_PIN_HEAD, KS_PIN_TAIL, KS_N_PINNED)


@njit(cache=True)
def _unpin(kv, rqi, rpi, running, path_nodes, req_path_start, r):
    """End ``r``'s protection: its blocks join the free queue, deepest first, as at a finish."""
    rep = rqi[r, RQ_REPLICA]
    _unlink_from(rqi, kv.kvs, rep, r, KS_PIN_HEAD, KS_PIN_TAIL, KS_N_PINNED)
    _release_path(kv, rqi, running, rpi[rep, RP_N_RUNNING], path_nodes, req_path_start, rep, r)
    rqi[r, RQ_COMMITTED] = 0
    rqi[r, RQ_FEXT] = 0
    rqi[r, RQ_PINNED] = 0


@njit(cache=True)
def _unpin_oldest(kv, rqi, rpi, running, wl, rep):
    """Blocks are short: drop the oldest protection on ``rep`` (protection never starves work)."""
    _unpin(kv, rqi, rpi, running, wl.path_nodes, wl.req_path_start, kv.kvs[rep, KS_PIN_HEAD])
    rpi[rep, RP_PINS_BROKEN] += 1


@njit(cache=True)
def _unpin_parents(kv, rqi, rpi, running, wl, r):
    """``r`` was admitted (its prefix is referenced now): its parents' protections end."""
    for k in range(wl.req_parents_start[r], wl.req_parents_start[r + 1]):
        par = wl.parent_ids[k]
        if rqi[par, RQ_PINNED] == 1:
            _unpin(kv, rqi, rpi, running, wl.path_nodes, wl.req_path_start, par)


@njit(cache=True)
def _store_path(kv, rqi, path_nodes, req_path_start, rep, r):
    """Offload-and-prefetch: copy ``r``'s committed blocks to the host tier, deepest first."""
    j = rqi[r, RQ_FPOS]
    for jj in range(j, req_path_start[r] - 1, -1):
        c = path_nodes[jj]
        upto = kv.node_blocks[c, NB_NUM] if jj < j else rqi[r, RQ_FEXT]
        if upto > 0:
            host_store(kv, rep, c, upto)


@njit(cache=True)
def _h2d_copy(rpf, rep, num_blocks, bs, now):
    """Reserve the replica's host -> GPU copy engine for ``num_blocks`` blocks; copies are
    serialised. Returns ``(start, end)`` in seconds."""
    nbytes = num_blocks * bs * rpf[rep, RP_KV_BYTES_TOKEN]
    start = now if now > rpf[rep, RP_H2D_FREE_AT] else rpf[rep, RP_H2D_FREE_AT]
    busy = nbytes / rpf[rep, RP_H2D_BW]
    rpf[rep, RP_H2D_FREE_AT] = start + busy
    rpf[rep, RP_H2D_SECONDS] += busy
    return start, start + busy


@njit(cache=True)
def _prefetch_missing(kv, rqi, wl, rep, r):
    """Blocks of ``r``'s retained prefix that the host tier holds and the GPU does not."""
    retain = rqi[r, RQ_RETAIN]
    missing = 0
    for j in range(wl.req_path_start[r], wl.req_path_start[r + 1]):
        c = wl.path_nodes[j]
        fb = kv.node_blocks[c, NB_FIRST]
        if fb >= retain:
            break
        target = retain - fb
        if target > kv.node_blocks[c, NB_NUM]:
            target = kv.node_blocks[c, NB_NUM]
        want = kv.host[rep, c, HN_RES]
        if want > target:
            want = target
        if want > kv.kvn[rep, c, KN_RES]:
            missing += want - kv.kvn[rep, c, KN_RES]
    return missing


@njit(cache=True)
def _on_prefetch(kv, q, p, wl, heap, r, now):
    """The tool is about to return: start copying ``r``'s offloaded blocks back to the GPU."""
    rep = q.rqi[r, RQ_REPLICA]
    missing = _prefetch_missing(kv, q.rqi, wl, rep, r)
    if missing == 0:
        return True
    _, end = _h2d_copy(p.rpf, rep, missing, kv.kvs[rep, KS_BLOCK_SIZE], now)
    return heap_push(heap, end, EV_PREFETCH_DONE, r)


@njit(cache=True)
def _on_prefetch_done(kv, q, p, wl, r):
    """Prefetched blocks are in GPU memory: they become cached (unreferenced, most recently
    used), taking free blocks from the head of the free queue as any allocation does."""
    rqi = q.rqi
    rep = rqi[r, RQ_REPLICA]
    retain = rqi[r, RQ_RETAIN]
    kvn = kv.kvn
    kvs = kv.kvs
    pushed = 0
    added = 0
    ps = wl.req_path_start[r]
    for jj in range(wl.req_path_start[r + 1] - 1, ps - 1, -1):
        c = wl.path_nodes[jj]
        fb = kv.node_blocks[c, NB_FIRST]
        if fb >= retain:
            continue
        target = retain - fb
        if target > kv.node_blocks[c, NB_NUM]:
            target = kv.node_blocks[c, NB_NUM]
        want = kv.host[rep, c, HN_RES]
        if want > target:
            want = target
        res = kvn[rep, c, KN_RES]
        if want <= res:
            continue
        m = max_extent(kv, rep, c)
        if res > m:
            take_from_queue(kv, rep, c, res)  # lifted out so the allocation cannot evict them
        add = want - res
        room = kvs[rep, KS_FREE] - pushed
        if add > room:
            add = room if room > 0 else 0
        if add > 0:
            fifo_pop(kv, rep, add)
            kvn[rep, c, KN_RES] = res + add
            added += add
        if kvn[rep, c, KN_RES] > m:
            fifo_push(kv, rep, c, m, kvn[rep, c, KN_RES])
            pushed += kvn[rep, c, KN_RES] - m
    host_touch_path(kv, wl.path_nodes, ps, wl.req_path_start[r + 1], rep, retain)
    if added > 0:
        p.rpi[rep, RP_PREFETCHES] += 1
        p.rpi[rep, RP_PREFETCH_BLOCKS] += added


@njit(cache=True)
def _on_load_done(kv, q, p, wl, heap, r, now):
    """A host-tier load finished: the loaded blocks become cached content, ``r`` computes on."""
    rqi = q.rqi
    rpi = p.rpi
    rep = rqi[r, RQ_REPLICA]
    rqi[r, RQ_STATUS] = ST_RUNNING
    rpi[rep, RP_N_HELD] -= 1
    blocks = rqi[r, RQ_COMPUTED] // kv.kvs[rep, KS_BLOCK_SIZE]
    if blocks > rqi[r, RQ_COMMITTED]:
        _advance(kv, rqi, p.running, rpi[rep, RP_N_RUNNING], wl.path_nodes, wl.req_path_start,
                 rep, r, blocks, True)
    if rpi[rep, RP_BUSY] == 0:
        rpi[rep, RP_BUSY] = 1
        return heap_push(heap, now, EV_SCHEDULE, rep)
    return True


@njit(cache=True)
def _retain(kv, q, p, wl, heap, rep, r, n_run, now):
    """``r`` finished on ``rep``: release its blocks under the replica's retention policy.

    * LRU: everything goes back to the free queue (tail first).
    * Session TTL: if ``r`` has children, the nodes it fully covers stay referenced until a
      child is admitted, ``RP_TTL`` seconds pass, or blocks run short (oldest protection first).
    * Offload-and-prefetch: if ``r``'s children will wait (a tool call), its blocks are copied to
      the host tier and released; a prefetch is queued so that the copy back finishes
      ``RP_PREFETCH_MARGIN`` seconds before the child is due (its wait is known from the trace).

    Returns False if the event heap overflowed.
    """
    rqi = q.rqi
    rpi = p.rpi
    policy = rpi[rep, RP_RETENTION]
    cs = wl.req_children_start[r]
    ce = wl.req_children_start[r + 1]
    if policy == RET_LRU or ce == cs or kv.kvs[rep, KS_CACHING] == 0:
        _release(kv, rqi, p.running, n_run, wl.path_nodes, wl.req_path_start, rep, r)
        return True
    if policy == RET_SESSION_TTL:
        if rqi[r, RQ_COMMITTED] == 0:  # no full block cached: nothing to protect
            _release(kv, rqi, p.running, n_run, wl.path_nodes, wl.req_path_start, rep, r)
            return True
        _pin(kv, rqi, rep, r)
        rpi[rep, RP_PINS] += 1
        return heap_push(heap, now + p.rpf[rep, RP_TTL], EV_UNPIN, r)
    # offload-and-prefetch: the soonest child that this request is the last parent of
    wait = -1.0
    for k in range(cs, ce):
        ch = wl.child_ids[k]
        if rqi[ch, RQ_PENDING] == 1:
            w = wl.req_wait_after_ready[ch]
            if wait < 0.0 or w < wait:
                wait = w
    retain = rqi[r, RQ_COMMITTED]
    if wait > 0.0 and retain > 0 and kv.kvs[rep, KS_HBLOCKS] > 0:
        rqi[r, RQ_RETAIN] = retain
        _store_path(kv, rqi, wl.path_nodes, wl.req_path_start, rep, r)
        _release(kv, rqi, p.running, n_run, wl.path_nodes, wl.req_path_start, rep, r)
        lead = retain * kv.kvs[rep, KS_BLOCK_SIZE] * p.rpf[rep, RP_KV_BYTES_TOKEN] / p.rpf[
            rep, RP_H2D_BW]
        due = now + wait - lead - p.rpf[rep, RP_PREFETCH_MARGIN]
        return heap_push(heap, due if due > now else now, EV_PREFETCH, r)
    _release(kv, rqi, p.running, n_run, wl.path_nodes, wl.req_path_start, rep, r)
    return True


@njit(cache=True, inline="always")
def _gap_bin(gap):
    """Histogram bin of a token gap of ``gap`` seconds."""
    if gap < HIST_MIN_SECONDS:
        return 0
    b = 1 + int(math.floor(math.log10(gap / HIST_MIN_SECONDS) * HIST_BINS_PER_DECADE))
    if b > HIST_NUM_BINS - 1:
        b = HIST_NUM_BINS - 1
    return b


@njit(cache=True, inline="always")
def _coarse_bin(b):
    """Windowed-histogram bin (40 per decade) of a fine bin (200 per decade)."""
    if b == 0:
        return 0
    if b >= HIST_NUM_BINS - 1:
        return WIN_NUM_BINS - 1
    return (b - 1) // 5 + 1


@njit(cache=True, inline="always")
def _k_for_batch(k_table, rep, n_running):
    """Draft length for a replica running ``n_running`` requests (dynamic-k table)."""
    for i in range(k_table.shape[1]):
        if n_running <= k_table[rep, i, 0]:
            return k_table[rep, i, 1]
    return k_table[rep, k_table.shape[1] - 1, 1]


# ----------------------------------------------------------------------------------------------
# waiting queue: a doubly-linked list through the request table, one per replica


@njit(cache=True)
def _push_back(rqi, rpi, rep, r, head, tail, count):
    """Append ``r`` to one of ``rep``'s request queues, a doubly-linked list through the request
    table (``head``/``tail``/``count``: its columns of ``rpi``). A request is in one queue at a
    time: the waiting queue, or a decode replica's queue of prefilled requests."""
    last = rpi[rep, tail]
    rqi[r, RQ_WQ_NEXT] = -1
    rqi[r, RQ_WQ_PREV] = last
    if last != -1:
        rqi[last, RQ_WQ_NEXT] = r
    else:
        rpi[rep, head] = r
    rpi[rep, tail] = r
    rpi[rep, count] += 1


@njit(cache=True)
def _pop_front(rqi, rpi, rep, head, tail, count):
    """Remove and return the first request of one of ``rep``'s queues."""
    r = rpi[rep, head]
    nxt = rqi[r, RQ_WQ_NEXT]
    rpi[rep, head] = nxt
    if nxt != -1:
        rqi[nxt, RQ_WQ_PREV] = -1
    else:
        rpi[rep, tail] = -1
    rqi[r, RQ_WQ_NEXT] = -1
    rpi[rep, count] -= 1
    return r


@njit(cache=True)
def _wq_push_front(rqi, rpi, rep, r):
    head = rpi[rep, RP_WQ_HEAD]
    rqi[r, RQ_WQ_PREV] = -1
    rqi[r, RQ_WQ_NEXT] = head
    if head != -1:
        rqi[head, RQ_WQ_PREV] = r
    else:
        rpi[rep, RP_WQ_TAIL] = r
    rpi[rep, RP_WQ_HEAD] = r
    rpi[rep, RP_N_WAITING] += 1


@njit(cache=True)
def _remove_running(running, rpi, rep, r):
    """Take ``r`` out of ``rep``'s running list, keeping the order of the others."""
    n = rpi[rep, RP_N_RUNNING]
    w = 0
    for k in range(n):
        q = running[rep, k]
        if q != r:
            running[rep, w] = q
            w += 1
    for k in range(w, n):
        running[rep, k] = -1
    rpi[rep, RP_N_RUNNING] = w


@njit(cache=True)
def _start_transfers(kv, q, p, wl, heap, rep, now):
    """Decode replica ``rep``: give blocks to prefilled requests, FIFO, and start their KV moves.

    The blocks the replica already caches are hits; only the rest of the prompt's KV crosses the
    link, whose transfers are serialised (latency + bytes / bandwidth). The request joins the
    running list as a transfer in flight (not schedulable) until ``EV_KV_DONE``.
    """
    rqi = q.rqi
    rqf = q.rqf
    rpi = p.rpi
    rpf = p.rpf
    kvs = kv.kvs
    bs = kvs[rep, KS_BLOCK_SIZE]
    path_nodes = wl.path_nodes
    caching = kvs[rep, KS_CACHING] == 1
    while rpi[rep, RP_RQ_HEAD] != -1 and rpi[rep, RP_N_RUNNING] < rpi[rep, RP_MAX_SEQS]:
        r = rpi[rep, RP_RQ_HEAD]
        ps = wl.req_path_start[r]
        pe = wl.req_path_start[r + 1]
        prompt = wl.req_prompt_tokens[r]
        hits = 0
        if caching:
            hits = lookup_hit_blocks(kv, path_nodes, ps, pe, rep, prompt + 1)
        table = (prompt + bs - 1) // bs
        need = table - hits + rpi[rep, RP_STATE_BLOCKS]
        touched = 0
        if hits > 0:
            touched = queued_blocks_in_prefix(kv, path_nodes, ps, pe, rep, hits)
        if need + touched > kvs[rep, KS_FREE]:
            if kvs[rep, KS_PIN_HEAD] != -1:
                _unpin_oldest(kv, rqi, rpi, p.running, wl, rep)
                continue
            return True
        _pop_front(rqi, rpi, rep, RP_RQ_HEAD, RP_RQ_TAIL, RP_N_REMOTE)
        n_run = rpi[rep, RP_N_RUNNING]
        if caching:
            rqi[r, RQ_FPOS] = ps
            rqi[r, RQ_FEXT] = 0
            rqi[r, RQ_COMMITTED] = 0
            kv.kvn[rep, path_nodes[ps], KN_PART] += 1
            if hits > 0:
                _advance(kv, rqi, p.running, n_run, path_nodes, wl.req_path_start, rep, r, hits,
                         False)
        if need > 0:
            fifo_pop(kv, rep, need)
        rqi[r, RQ_PRIVATE] = need
        rqi[r, RQ_TABLE_LEN] = table
        if caching and prompt // bs > rqi[r, RQ_COMMITTED]:
            _advance(kv, rqi, p.running, n_run, path_nodes, wl.req_path_start, rep, r,
                     prompt // bs, True)
        p.running[rep, n_run] = r
        rpi[rep, RP_N_RUNNING] = n_run + 1
        _unpin_parents(kv, rqi, rpi, p.running, wl, r)
        rpi[rep, RP_N_HELD] += 1
        nbytes = (prompt - hits * bs) * rpf[rep, RP_KV_BYTES_TOKEN]
        start = now if now > rpf[rep, RP_LINK_FREE_AT] else rpf[rep, RP_LINK_FREE_AT]
        busy = nbytes / rpf[rep, RP_LINK_BW]
        rpf[rep, RP_LINK_FREE_AT] = start + busy
        rpf[rep, RP_XFER_SECONDS] += busy
        rpf[rep, RP_XFER_BYTES_IN] += nbytes
        rpi[rep, RP_XFER_IN] += 1
        rqf[r, RQ_XFER_START] = start
        rqf[r, RQ_XFER_END] = start + busy + rpf[rep, RP_LINK_LATENCY]
        rqf[r, RQ_XFER_BYTES] = nbytes
        if not heap_push(heap, rqf[r, RQ_XFER_END], EV_KV_DONE, r):
            return False
    return True


@njit(cache=True)
def _on_kv_done(kv, q, p, wl, heap, r, now):
    """The KV of ``r`` reached its decode replica: free it on the prefill side, decode on."""
    rqi = q.rqi
    rpi = p.rpi
    src = rqi[r, RQ_PREFILL_REPLICA]
    dst = rqi[r, RQ_DECODE_REPLICA]
    if rqi[r, RQ_PRIVATE_P] > 0:
        fifo_push(kv, src, -1, 0, rqi[r, RQ_PRIVATE_P])
        rqi[r, RQ_PRIVATE_P] = 0
    _release_path(kv, rqi, p.running, rpi[src, RP_N_RUNNING], wl.path_nodes, wl.req_path_start,
                  src, r)
    _remove_running(p.running, rpi, src, r)
    rpi[src, RP_N_HELD] -= 1
    rpi[src, RP_OUTSTANDING] -= 1
    rpi[dst, RP_N_HELD] -= 1
    rqi[r, RQ_STATUS] = ST_RUNNING
    rqi[r, RQ_REPLICA] = dst
    ok = True
    for rep in (src, dst):
        if rpi[rep, RP_BUSY] == 0:
            rpi[rep, RP_BUSY] = 1
            if not heap_push(heap, now, EV_SCHEDULE, rep):
                ok = False
    return ok


# ----------------------------------------------------------------------------------------------
# scheduling


@njit(cache=True, inline="always")
def _schedule(kv, q, p, wl, g, heap, rep, now):
    """Form one batch on replica ``rep`` (vLLM V1 order). Returns the number scheduled, or -1
    if the event heap overflowed.

    With a host tier, a waiting request whose prefix hit extends into host-only blocks is
    admitted without computing: it allocates the blocks, waits (``ST_LOADING``) for the copy
    over PCIe, serialised per replica, and meanwhile takes no part in steps (vLLM's
    ``WAITING_FOR_REMOTE_KVS``, REFERENCE.md §8). Protected (session-TTL) blocks are released,
    oldest first, before any running request is preempted or a waiting one is held back.
    """
    rqi = q.rqi
    rpi = p.rpi
    running = p.running
    path_nodes = wl.path_nodes
    path_start = wl.req_path_start
    kvs = kv.kvs
    bs = kvs[rep, KS_BLOCK_SIZE]
    budget = rpi[rep, RP_MAX_BATCHED]
    max_len = rpi[rep, RP_MAX_LEN]
    caching = kvs[rep, KS_CACHING] == 1
    host_tier = caching and kvs[rep, KS_HBLOCKS] > 0
    out_target = wl.req_output_tokens
    k_spec = 0
    if rpi[rep, RP_SPEC_ON] == 1:
        k_spec = _k_for_batch(p.spec_k_table, rep, rpi[rep, RP_N_RUNNING])
    rpi[rep, RP_SPEC_K_STEP] = k_spec
    n_sched = 0
    preempted = False
    # 1. running requests, in admission order
    i = 0
    while i < rpi[rep, RP_N_RUNNING] and budget > 0:
        r = running[rep, i]
        if rqi[r, RQ_STATUS] == ST_TRANSFERRING or rqi[r, RQ_STATUS] == ST_LOADING:
            i += 1
            continue
        computed = rqi[r, RQ_COMPUTED]
        n = rqi[r, RQ_NUM_TOKENS] - computed
        drafts = 0
        if k_spec > 0 and n == 1 and rqi[r, RQ_OUT_DONE] > 0:
            # a decode verifies up to k drafts, never more than the output still to come
            drafts = out_target[r] - rqi[r, RQ_OUT_DONE] - 1
            if drafts > k_spec:
                drafts = k_spec
            n = 1 + drafts
        if n > budget:
            n = budget
        if n > max_len - 1 - computed:
            n = max_len - 1 - computed
        if n <= 0:
            i += 1
            continue
        if drafts > n - 1:
            drafts = n - 1
        need = (computed + n + bs - 1) // bs - rqi[r, RQ_TABLE_LEN]
        self_preempted = False
        while need > kvs[rep, KS_FREE] and kvs[rep, KS_PIN_HEAD] != -1:
            _unpin_oldest(kv, rqi, rpi, p.running, wl, rep)
        while need > kvs[rep, KS_FREE]:
            # the newest running request is the victim (transfers and loads in flight are not
            # preemptible)
            last = rpi[rep, RP_N_RUNNING] - 1
            while (rqi[running[rep, last], RQ_STATUS] == ST_TRANSFERRING
                   or rqi[running[rep, last], RQ_STATUS] == ST_LOADING):
                last -= 1
            victim = running[rep, last]
            _remove_running(running, rpi, rep, victim)
            _release(kv, rqi, running, rpi[rep, RP_N_RUNNING], path_nodes, path_start, rep,
                     victim)
            rqi[victim, RQ_COMPUTED] = 0
            rqi[victim, RQ_PREEMPTIONS] += 1
            rpi[rep, RP_PREEMPTIONS] += 1
            rqi[victim, RQ_STATUS] = ST_WAITING
            _wq_push_front(rqi, rpi, rep, victim)
            preempted = True
            if victim == r:
                self_preempted = True
                break
        if self_preempted:
            break
        if need > 0:
            fifo_pop(kv, rep, need)
            rqi[r, RQ_PRIVATE] += need
            rqi[r, RQ_TABLE_LEN] += need
        p.scheduled[rep, n_sched] = r
        p.scheduled_new[rep, n_sched] = n
        p.scheduled_drafts[rep, n_sched] = drafts
        g.new_tokens[n_sched] = n
        g.context_tokens[n_sched] = computed
        n_sched += 1
        computed += n
        rqi[r, RQ_COMPUTED] = computed
        rqi[r, RQ_SCHED_TOKENS] += n
        budget -= n
        if caching:
            full = computed if computed < rqi[r, RQ_NUM_TOKENS] else rqi[r, RQ_NUM_TOKENS]
            if full // bs > rqi[r, RQ_COMMITTED]:
                _advance(kv, rqi, running, rpi[rep, RP_N_RUNNING], path_nodes, path_start, rep,
                         r, full // bs, True)
        i += 1
    # 2. waiting requests, FCFS, only if nothing was preempted in this step
    if not preempted:
        while (
            rpi[rep, RP_WQ_HEAD] != -1
            and budget > 0
            and rpi[rep, RP_N_RUNNING] < rpi[rep, RP_MAX_SEQS]
        ):
            r = rpi[rep, RP_WQ_HEAD]
            ps = path_start[r]
            pe = path_start[r + 1]
            num_tokens = rqi[r, RQ_NUM_TOKENS]
            hits = 0
            all_hits = 0
            host_only = 0
            if caching:
                hits = lookup_hit_blocks(kv, path_nodes, ps, pe, rep, num_tokens)
                if host_tier:
                    all_hits, host_only = lookup_tiered(kv, path_nodes, ps, pe, rep, num_tokens)
            loading = all_hits > hits
            if loading:
                computed = all_hits * bs
                n = 0
                new_blocks = all_hits - hits
            else:
                computed = hits * bs
                n = num_tokens - computed
                if n > budget:
                    n = budget
                new_blocks = (computed + n + bs - 1) // bs - hits
            extra = rpi[rep, RP_STATE_BLOCKS]
            touched = 0
            if hits > 0:
                touched = queued_blocks_in_prefix(kv, path_nodes, ps, pe, rep, hits)
            if new_blocks + extra + touched > kvs[rep, KS_FREE]:
                if kvs[rep, KS_PIN_HEAD] != -1:
                    _unpin_oldest(kv, rqi, rpi, p.running, wl, rep)
                    continue
                break
            _pop_front(rqi, rpi, rep, RP_WQ_HEAD, RP_WQ_TAIL, RP_N_WAITING)
            n_run = rpi[rep, RP_N_RUNNING]
            if caching:
                rqi[r, RQ_FPOS] = ps
                rqi[r, RQ_FEXT] = 0
                rqi[r, RQ_COMMITTED] = 0
                kv.kvn[rep, path_nodes[ps], KN_PART] += 1
                if hits > 0:
                    _advance(kv, rqi, running, n_run, path_nodes, path_start, rep, r, hits,
                             False)
            take = new_blocks + extra
            if take > 0:
                fifo_pop(kv, rep, take)
            rqi[r, RQ_PRIVATE] += take
            rqi[r, RQ_TABLE_LEN] = hits + new_blocks
            running[rep, n_run] = r
            rpi[rep, RP_N_RUNNING] = n_run + 1
            first = rqi[r, RQ_CACHED] < 0
            if first:
                rqi[r, RQ_CACHED] = computed
                q.rqf[r, RQ_FIRST_SCHED] = now
                if rqi[r, RQ_DECODE_REPLICA] < 0:
                    # after r is listed as running: the parents' released extents are rescanned
                    # against the running requests, r among them
                    _unpin_parents(kv, rqi, rpi, p.running, wl, r)
            if loading:
                rqi[r, RQ_STATUS] = ST_LOADING
                rqi[r, RQ_COMPUTED] = computed
                rpi[rep, RP_N_HELD] += 1
                rpi[rep, RP_HOST_LOADS] += 1
                rpi[rep, RP_HOST_LOAD_BLOCKS] += host_only
                host_touch_path(kv, path_nodes, ps, pe, rep, all_hits)
                start, end = _h2d_copy(p.rpf, rep, host_only, bs, now)
                if first:
                    rqi[r, RQ_HOST_HIT] = host_only * bs
                    q.rqf[r, RQ_LOAD_START] = start
                    q.rqf[r, RQ_LOAD_END] = end
                if not heap_push(heap, end, EV_LOAD_DONE, r):
                    return -1
                continue
            rqi[r, RQ_STATUS] = ST_RUNNING
            p.scheduled[rep, n_sched] = r
            p.scheduled_new[rep, n_sched] = n
            p.scheduled_drafts[rep, n_sched] = 0
            g.new_tokens[n_sched] = n
            g.context_tokens[n_sched] = computed
            n_sched += 1
            computed += n
            rqi[r, RQ_COMPUTED] = computed
            rqi[r, RQ_SCHED_TOKENS] += n
            budget -= n
            if caching:
                full = computed if computed < num_tokens else num_tokens
                if full // bs > rqi[r, RQ_COMMITTED]:
                    _advance(kv, rqi, running, n_run + 1, path_nodes, path_start, rep, r,
                             full // bs, True)
    rpi[rep, RP_N_SCHED] = n_sched
    return n_sched


# ----------------------------------------------------------------------------------------------
# events


@njit(cache=True, inline="always")
def _release_children(q, wl, heap, r, now, failed):
    """``r`` is done (finished, or rejected if ``failed``); dispatch children that are ready."""
    rqi = q.rqi
    rqf = q.rqf
    ok = True
    for k in range(wl.req_children_start[r], wl.req_children_start[r + 1]):
        ch = wl.child_ids[k]
        if failed:
            rqi[ch, RQ_PARENT_FAILED] = 1
        rqi[ch, RQ_PENDING] -= 1
        if rqi[ch, RQ_PENDING] == 0:
            rqf[ch, RQ_READY] = now
            rqf[ch, RQ_ARRIVAL] = now + wl.req_wait_after_ready[ch]
            rqi[ch, RQ_STATUS] = ST_DISPATCHING
            if not heap_push(heap, rqf[ch, RQ_ARRIVAL], EV_ARRIVAL, ch):
                ok = False
    return ok


@njit(cache=True)
def _reject(q, wl, heap, g, r, reason, now):
    q.rqi[r, RQ_STATUS] = ST_REJECTED
    q.rqi[r, RQ_REJECT] = reason
    g.gi[G_NUM_DONE] += 1
    return _release_children(q, wl, heap, r, now, True)


@njit(cache=True, inline="always")
def _on_arrival(kv, q, p, wl, g, heap, r, now):
    rqi = q.rqi
    rpi = p.rpi
    if rqi[r, RQ_PARENT_FAILED] == 1:
        return _reject(q, wl, heap, g, r, REJECT_PARENT, now)
    prompt = wl.req_prompt_tokens[r]
    total = prompt + wl.req_output_tokens[r]
    ps = wl.req_path_start[r]
    pe = wl.req_path_start[r + 1]
    session = wl.req_session[r]
    if g.gi[G_DISAGG] == 0:
        rep = route(kv, rpi, g.gi, g.gf, g.session_home[0], wl.path_nodes, ps, pe, prompt,
                    session, r, g.route_scratch, g.pool_members[ROLE_AGGREGATED],
                    g.pool_sizes[ROLE_AGGREGATED], G_RR_NEXT)
        dst = -1
    else:
        # disaggregated: pick the decode replica, then prefill there (short uncached part) or
        # on a prefill replica
        dst = route(kv, rpi, g.gi, g.gf, g.session_home[0], wl.path_nodes, ps, pe, prompt,
                    session, r, g.route_scratch, g.pool_members[ROLE_DECODE],
                    g.pool_sizes[ROLE_DECODE], G_RR_NEXT)
        rep = dst
        local = wl.req_output_tokens[r] == 1
        if not local and g.gf[GF_LOCAL_PREFILL] > 0.0:
            hits = 0
            if kv.kvs[dst, KS_CACHING] == 1:
                hits = lookup_hit_blocks(kv, wl.path_nodes, ps, pe, dst, prompt)
            local = prompt - hits * kv.kvs[dst, KS_BLOCK_SIZE] < g.gf[GF_LOCAL_PREFILL]
        if not local or wl.req_output_tokens[r] == 1:
            rep = route(kv, rpi, g.gi, g.gf, g.session_home[1], wl.path_nodes, ps, pe, prompt,
                        session, r, g.route_scratch, g.pool_members[ROLE_PREFILL],
                        g.pool_sizes[ROLE_PREFILL], G_RR_NEXT_PREFILL)
        if rep == dst or wl.req_output_tokens[r] == 1:
            dst = -1
    rqi[r, RQ_REPLICA] = rep
    rpi[rep, RP_ROUTED] += 1
    bs = kv.kvs[rep, KS_BLOCK_SIZE]
    for target in (rep, dst):
        if target < 0:
            continue
        if total > rpi[target, RP_MAX_LEN]:
            return _reject(q, wl, heap, g, r, REJECT_MAX_MODEL_LEN, now)
        # the last output token's KV is never computed: prompt + output - 1 tokens need blocks
        tokens = total - 1 if target == dst or dst < 0 else prompt
        if (tokens + bs - 1) // bs + rpi[target, RP_STATE_BLOCKS] > kv.kvs[target, KS_BLOCKS]:
            return _reject(q, wl, heap, g, r, REJECT_KV_CAPACITY, now)
    if dst >= 0:
        rqi[r, RQ_PREFILL_REPLICA] = rep
        rqi[r, RQ_DECODE_REPLICA] = dst
        rpi[dst, RP_OUTSTANDING] += 1
    rqi[r, RQ_STATUS] = ST_WAITING
    rqi[r, RQ_NUM_TOKENS] = prompt
    rpi[rep, RP_OUTSTANDING] += 1
    rpi[rep, RP_PENDING_PREFILL] += prompt
    _push_back(rqi, rpi, rep, r, RP_WQ_HEAD, RP_WQ_TAIL, RP_N_WAITING)
    if rpi[rep, RP_BUSY] == 0:
        rpi[rep, RP_BUSY] = 1
        return heap_push(heap, now, EV_SCHEDULE, rep)
    return True


@njit(cache=True, inline="always")
def _on_schedule(kv, q, p, wl, g, heap, rep, now):
    rpi = p.rpi
    if rpi[rep, RP_RQ_HEAD] != -1:
        if not _start_transfers(kv, q, p, wl, heap, rep, now):
            return CORE_ERR_HEAP_FULL
    n = _schedule(kv, q, p, wl, g, heap, rep, now)
    if n < 0:
        return CORE_ERR_HEAP_FULL
    if n == 0:
        rpi[rep, RP_BUSY] = 0
        # with KV transfers in flight the replica is woken when they complete
        stuck = rpi[rep, RP_N_RUNNING] > 0 or rpi[rep, RP_N_WAITING] > 0
        if stuck and rpi[rep, RP_N_HELD] == 0:
            g.gi[G_ERROR] = rep
            return CORE_ERR_STUCK
        return CORE_DONE
    used = kv.kvs[rep, KS_BLOCKS] - kv.kvs[rep, KS_FREE]
    if used > rpi[rep, RP_PEAK_USED]:
        rpi[rep, RP_PEAK_USED] = used
    if rpi[rep, RP_N_RUNNING] > rpi[rep, RP_PEAK_RUNNING]:
        rpi[rep, RP_PEAK_RUNNING] = rpi[rep, RP_N_RUNNING]
    seconds = step_seconds(p.cost_params[rep], g.new_tokens, g.context_tokens, n)
    rqi = q.rqi
    decodes = 0
    prefill_tokens = 0
    for k in range(n):
        own = g.new_tokens[k] - p.scheduled_drafts[rep, k]
        if own == 1 and rqi[p.scheduled[rep, k], RQ_OUT_DONE] > 0:
            decodes += 1
        else:
            prefill_tokens += g.new_tokens[k]
    k_spec = rpi[rep, RP_SPEC_K_STEP]
    if k_spec > 0 and rpi[rep, RP_SPEC_DRAFT] == 1:
        # the drafter proposes k tokens for every sequence that emits a token in this step
        m = 0
        for k in range(n):
            r = p.scheduled[rep, k]
            if rqi[r, RQ_COMPUTED] >= rqi[r, RQ_NUM_TOKENS]:
                g.new_tokens[m] = 1
                g.context_tokens[m] = rqi[r, RQ_NUM_TOKENS]
                m += 1
        if m > 0:
            draft = k_spec * step_seconds(p.draft_params[rep], g.new_tokens, g.context_tokens, m)
            p.rpf[rep, RP_DRAFT_SECONDS] += draft
            seconds += draft
    p.rpf[rep, RP_STEP_START] = now
    p.rpf[rep, RP_BUSY_SECONDS] += seconds
    rpi[rep, RP_NUM_STEPS] += 1
    if decodes > 0:
        p.decode_seconds_by_count[rep, decodes] += seconds
    cap = g.step_log.shape[0]
    if cap > 0:
        i = g.gi[G_STEP_N]
        if i < cap:
            log = g.step_log
            log[i, SL_REPLICA] = rep
            log[i, SL_START] = now
            log[i, SL_END] = now + seconds
            log[i, SL_NUM_SEQS] = n
            log[i, SL_NUM_DECODES] = decodes
            log[i, SL_PREFILL_TOKENS] = prefill_tokens
            log[i, SL_USED_BLOCKS] = used
            log[i, SL_NUM_WAITING] = rpi[rep, RP_N_WAITING]
            g.gi[G_STEP_N] = i + 1
        else:
            g.gi[G_STEP_DROPPED] += 1
    if not heap_push(heap, now + seconds, EV_STEP_END, rep):
        return CORE_ERR_HEAP_FULL
    return CORE_DONE


@njit(cache=True, inline="always")
def _on_step_end(kv, q, p, wl, g, heap, rep, now):
    rqi = q.rqi
    rqf = q.rqf
    rpi = p.rpi
    running = p.running
    out_target = wl.req_output_tokens
    gap_hist = g.gap_hist
    n_done = 0
    ok = True
    n_sched = rpi[rep, RP_N_SCHED]
    # most decodes in a step got their previous token at the previous step's end: one bin
    step_start = p.rpf[rep, RP_STEP_START]
    common_gap = now - step_start
    common_bin = _gap_bin(common_gap)
    win = int(now / g.gf[GF_WINDOW_SECONDS])
    if win >= g.gap_hist_win.shape[0]:
        win = g.gap_hist_win.shape[0] - 1
    win_hist = g.gap_hist_win[win]
    chunk_hist = g.chunk_gap_hist
    common_coarse = _coarse_bin(common_bin)
    spec_on = rpi[rep, RP_SPEC_ON] == 1
    record_chunks = g.gi[G_CHUNK_HIST] == 1
    seed = g.gi[G_SEED]
    decay = p.rpf[rep, RP_SPEC_DECAY]
    alpha_row = p.spec_alpha[rpi[rep, RP_SPEC_PROFILE]]
    for k in range(n_sched):
        r = p.scheduled[rep, k]
        n_new = p.scheduled_new[rep, k]
        drafts = p.scheduled_drafts[rep, k]
        if n_new - drafts == 1 and rqi[r, RQ_OUT_DONE] > 0:
            rpi[rep, RP_DECODE_TOKENS] += 1
        else:
            rpi[rep, RP_PREFILL_TOKENS] += n_new
        if rqi[r, RQ_COMPUTED] < rqi[r, RQ_NUM_TOKENS]:
            continue  # a prefill chunk that does not finish the prompt: no token yet
        m = 1  # tokens emitted together
        if spec_on:
            rqi[r, RQ_CHUNKS] += 1
        if drafts > 0:
            # accept the drafts up to the first rejection; roll back the rejected positions
            accepted = 0
            alpha = alpha_row[r]
            pos = rqi[r, RQ_OUT_DONE]
            while accepted < drafts:
                if uniform(seed, r, pos, accepted) < alpha * decay**accepted:
                    accepted += 1
                else:
                    break
            rqi[r, RQ_COMPUTED] -= drafts - accepted
            rqi[r, RQ_SPEC_PROPOSED] += drafts
            rqi[r, RQ_SPEC_ACCEPTED] += accepted
            rpi[rep, RP_SPEC_PROPOSED] += drafts
            rpi[rep, RP_SPEC_ACCEPTED] += accepted
            rpi[rep, RP_SPEC_VERIFIES] += 1
            m = accepted + 1
        done = rqi[r, RQ_OUT_DONE] + m
        rqi[r, RQ_OUT_DONE] = done
        rqi[r, RQ_NUM_TOKENS] += m
        if done == m:
            rqf[r, RQ_FIRST_TOKEN] = now
            rpi[rep, RP_PENDING_PREFILL] -= wl.req_prompt_tokens[r]
        else:
            last = rqf[r, RQ_LAST_TOKEN]
            if last == step_start:
                gap = common_gap
                chunk_bin = common_bin
                coarse = common_coarse
            else:
                gap = now - last
                chunk_bin = _gap_bin(gap)
                coarse = _coarse_bin(chunk_bin)
            if record_chunks:  # without speculation chunks are tokens: copied after the run
                chunk_hist[chunk_bin] += 1
            if m == 1:
                gap_hist[chunk_bin] += 1
                win_hist[coarse] += 1
            else:
                # per-token view: the chunk's gap shared by the tokens it carries
                b = _gap_bin(gap / m)
                gap_hist[b] += m
                win_hist[_coarse_bin(b)] += m
            if gap > rqf[r, RQ_MAX_GAP]:
                rqf[r, RQ_MAX_GAP] = gap
        rqf[r, RQ_LAST_TOKEN] = now
        if done == m and done < out_target[r] and rpi[rep, RP_ROLE] == ROLE_PREFILL:
            # prefill replica: hand the request to its decode replica; keep the KV until moved
            dst = rqi[r, RQ_DECODE_REPLICA]
            rqi[r, RQ_STATUS] = ST_TRANSFERRING
            rqi[r, RQ_PRIVATE_P] = rqi[r, RQ_PRIVATE]
            rqi[r, RQ_PRIVATE] = 0
            rpi[rep, RP_N_HELD] += 1
            rqf[r, RQ_XFER_QUEUED] = now
            _push_back(rqi, rpi, dst, r, RP_RQ_HEAD, RP_RQ_TAIL, RP_N_REMOTE)
            if rpi[dst, RP_BUSY] == 0:
                rpi[dst, RP_BUSY] = 1
                if not heap_push(heap, now, EV_SCHEDULE, dst):
                    ok = False
            continue
        if done >= out_target[r]:
            rqi[r, RQ_STATUS] = ST_RELEASING
            rqf[r, RQ_FINISH] = now
            n_done += 1
    if n_done > 0:
        # drop finished requests from the running list, keeping the others' order; release
        # each while the rest are still listed (partial-extent rescans look at them)
        w = 0
        n_run = rpi[rep, RP_N_RUNNING]
        for k in range(n_run):
            r = running[rep, k]
            if rqi[r, RQ_STATUS] == ST_RELEASING:
                if not _retain(kv, q, p, wl, heap, rep, r, n_run, now):
                    ok = False
                rqi[r, RQ_STATUS] = ST_FINISHED
                rpi[rep, RP_OUTSTANDING] -= 1
                g.gi[G_NUM_DONE] += 1
            else:
                running[rep, w] = r
                w += 1
        for k in range(w, n_run):
            running[rep, k] = -1
        rpi[rep, RP_N_RUNNING] = w
        for k in range(n_sched):
            r = p.scheduled[rep, k]
            if rqi[r, RQ_STATUS] == ST_FINISHED:
                if not _release_children(q, wl, heap, r, now, False):
                    ok = False
    rpi[rep, RP_N_SCHED] = 0
    if not ok:
        return CORE_ERR_HEAP_FULL
    return CORE_DONE


@njit(cache=True)
def init_events(q, wl, heap, staleness):
    """Queue the arrival of every request without parents; set pending-parent counts.

    With ``staleness > 0`` the router's load snapshots start at t = 0.
    """
    rqi = q.rqi
    rqf = q.rqf
    if staleness > 0.0 and not heap_push(heap, 0.0, EV_SNAPSHOT, 0):
        return False
    for r in range(wl.req_prompt_tokens.shape[0]):
        n_par = wl.req_parents_start[r + 1] - wl.req_parents_start[r]
        rqi[r, RQ_PENDING] = n_par
        rqi[r, RQ_STATUS] = ST_PENDING
        if n_par == 0:
            rqf[r, RQ_READY] = wl.req_arrival_time[r]
            rqf[r, RQ_ARRIVAL] = wl.req_arrival_time[r] + wl.req_wait_after_ready[r]
            rqi[r, RQ_STATUS] = ST_DISPATCHING
            if not heap_push(heap, rqf[r, RQ_ARRIVAL], EV_ARRIVAL, r):
                return False
    return True


@njit(cache=True)
def run_events(kv, q, p, wl, g, heap, max_events):
    """Process up to ``max_events`` events. Returns CORE_DONE, CORE_PAUSED or an error code.

    The loop runs on borrowed views of the state (:mod:`simulator.core.borrow`): the caller's
    arrays stay alive for the whole call, and no reference counting happens per event.
    """
    return _run_events(
        KVState(borrow(kv.kvn), borrow(kv.ent), borrow(kv.kvs), borrow(kv.node_blocks),
                borrow(kv.host), borrow(kv.hent)),
        Requests(borrow(q.rqi), borrow(q.rqf)),
        Replicas(borrow(p.rpi), borrow(p.rpf), borrow(p.running), borrow(p.scheduled),
                 borrow(p.scheduled_new), borrow(p.cost_params),
                 borrow(p.decode_seconds_by_count), borrow(p.scheduled_drafts),
                 borrow(p.spec_alpha), borrow(p.spec_k_table), borrow(p.draft_params)),
        CompiledWorkload(borrow(wl.node_parent), borrow(wl.node_start_tokens),
                         borrow(wl.node_num_tokens), borrow(wl.req_session),
                         borrow(wl.req_prompt_tokens), borrow(wl.req_output_tokens),
                         borrow(wl.req_arrival_time), borrow(wl.req_wait_after_ready),
                         borrow(wl.req_path_start), borrow(wl.path_nodes),
                         borrow(wl.req_parents_start), borrow(wl.parent_ids),
                         borrow(wl.req_children_start), borrow(wl.child_ids)),
        Globals(borrow(g.gi), borrow(g.gf), borrow(g.now), borrow(g.gap_hist),
                borrow(g.chunk_gap_hist), borrow(g.gap_hist_win), borrow(g.step_log),
                borrow(g.session_home), borrow(g.route_scratch), borrow(g.pool_members),
                borrow(g.pool_sizes), borrow(g.new_tokens), borrow(g.context_tokens)),
        EventHeap(borrow(heap.time), borrow(heap.seq), borrow(heap.kind), borrow(heap.payload),
                  borrow(heap.size), borrow(heap.next_seq)),
        max_events,
    )


@njit(cache=True)
def _run_events(kv, q, p, wl, g, heap, max_events):
    count = 0
    while heap.size[0] > 0:
        if count >= max_events:
            return CORE_PAUSED
        now, kind, payload = heap_pop(heap)
        g.now[0] = now
        count += 1
        g.gi[G_NUM_EVENTS] += 1
        if kind == EV_ARRIVAL:
            if not _on_arrival(kv, q, p, wl, g, heap, payload, now):
                return CORE_ERR_HEAP_FULL
        elif kind == EV_SCHEDULE:
            status = _on_schedule(kv, q, p, wl, g, heap, payload, now)
            if status != CORE_DONE:
                return status
        elif kind == EV_KV_DONE:
            if not _on_kv_done(kv, q, p, wl, heap, payload, now):
                return CORE_ERR_HEAP_FULL
        elif kind == EV_LOAD_DONE:
            if not _on_load_done(kv, q, p, wl, heap, payload, now):
                return CORE_ERR_HEAP_FULL
        elif kind == EV_UNPIN:
            if q.rqi[payload, RQ_PINNED] == 1:
                _unpin(kv, q.rqi, p.rpi, p.running, wl.path_nodes, wl.req_path_start, payload)
        elif kind == EV_PREFETCH:
            if not _on_prefetch(kv, q, p, wl, heap, payload, now):
                return CORE_ERR_HEAP_FULL
        elif kind == EV_PREFETCH_DONE:
            _on_prefetch_done(kv, q, p, wl, payload)
        elif kind == EV_SNAPSHOT:
            take_snapshot(kv, p.rpi)
            if heap.size[0] > 0 and not heap_push(heap, now + g.gf[GF_STALENESS], EV_SNAPSHOT, 0):
                return CORE_ERR_HEAP_FULL
        else:
            status = _on_step_end(kv, q, p, wl, g, heap, payload, now)
            if status != CORE_DONE:
                return status
            # the next batch forms now; events due at this same instant (a child dispatched
            # with no wait, say) go first, so then the schedule waits its turn as an event
            if heap.size[0] > 0 and heap.time[0] <= now:
                if not heap_push(heap, now, EV_SCHEDULE, payload):
                    return CORE_ERR_HEAP_FULL
            else:
                status = _on_schedule(kv, q, p, wl, g, heap, payload, now)
                if status != CORE_DONE:
                    return status
    return CORE_DONE
