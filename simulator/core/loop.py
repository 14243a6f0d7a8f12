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

No Python objects are touched; the loop can stop after ``max_events`` and be resumed, which is
how the Python side draws a progress bar.
"""

from __future__ import annotations

import math

from numba import njit

from simulator.core.heap import heap_pop, heap_push
from simulator.core.kvcache import (
    fifo_pop,
    fifo_push,
    lookup_hit_blocks,
    max_extent,
    queued_blocks_in_prefix,
    take_from_queue,
)
from simulator.core.state import (
    CORE_DONE,
    CORE_ERR_HEAP_FULL,
    CORE_ERR_STUCK,
    CORE_PAUSED,
    EV_ARRIVAL,
    EV_SCHEDULE,
    EV_STEP_END,
    HIST_BINS_PER_DECADE,
    HIST_MIN_SECONDS,
    HIST_NUM_BINS,
    REJECT_KV_CAPACITY,
    REJECT_MAX_MODEL_LEN,
    REJECT_PARENT,
    ROUTE_LEAST_OUTSTANDING,
    ROUTE_SESSION_AFFINITY,
    ST_DISPATCHING,
    ST_FINISHED,
    ST_PENDING,
    ST_REJECTED,
    ST_RUNNING,
    ST_WAITING,
)
from simulator.costmodel import step_seconds

# ----------------------------------------------------------------------------------------------
# block references of one request (see kvcache.py for the data structure)


@njit(cache=True, inline="always")
def _drop_partial(kv, rq, rp, wl, rep, c, ext, r):
    """Request ``r`` stops being a partial referencer of node ``c`` at extent ``ext``."""
    kv.part_refs[rep, c] -= 1
    if kv.part_refs[rep, c] == 0:
        kv.part_max[rep, c] = 0
    elif ext > 0 and ext >= kv.part_max[rep, c]:
        m = 0
        for i in range(rp.n_running[rep]):
            q = rp.running[rep, i]
            if q != r and wl.path_nodes[rq.frontier_pos[q]] == c and rq.frontier_ext[q] > m:
                m = rq.frontier_ext[q]
        kv.part_max[rep, c] = m


@njit(cache=True)
def _attach(kv, rq, wl, rep, r):
    rq.frontier_pos[r] = wl.req_path_start[r]
    rq.frontier_ext[r] = 0
    rq.committed_blocks[r] = 0
    kv.part_refs[rep, wl.path_nodes[rq.frontier_pos[r]]] += 1


@njit(cache=True, inline="always")
def _advance(kv, rq, rp, wl, rep, r, new_committed, computed):
    """Reference the first ``new_committed`` blocks of ``r``'s sequence.

    ``computed``: the blocks past the cached prefix were computed by ``r`` (they become cached
    content) rather than found in the cache (a prefix hit).
    """
    if new_committed <= rq.committed_blocks[r]:
        return
    j = rq.frontier_pos[r]
    last = wl.req_path_start[r + 1] - 1
    ext = rq.frontier_ext[r]
    while True:
        c = wl.path_nodes[j]
        fb = kv.node_first_block[c]
        nb = kv.node_num_blocks[c]
        target = new_committed - fb
        if target > nb:
            target = nb
        moving_on = j < last and new_committed >= fb + nb
        ext_before = ext
        if target > ext:
            old_max = max_extent(kv, rep, c)
            if target > old_max and kv.resident[rep, c] > old_max:
                take_from_queue(kv, rep, c, target)
            res = kv.resident[rep, c]
            if computed and target > res:
                rq.private_blocks[r] -= target - (res if res > ext else ext)
                kv.resident[rep, c] = target
            if not moving_on and target > kv.part_max[rep, c]:
                kv.part_max[rep, c] = target
            ext = target
        if not moving_on:
            break
        _drop_partial(kv, rq, rp, wl, rep, c, ext_before, r)
        kv.full_refs[rep, c] += 1
        j += 1
        ext = 0
        kv.part_refs[rep, wl.path_nodes[j]] += 1
    rq.frontier_pos[r] = j
    rq.frontier_ext[r] = ext
    rq.committed_blocks[r] = new_committed


@njit(cache=True)
def _release(kv, rq, rp, wl, rep, r):
    """Free every block of ``r``: private ones first, then its path from the tail up."""
    if rq.private_blocks[r] > 0:
        fifo_push(kv, rep, -1, 0, rq.private_blocks[r])
    if kv.caching[rep] == 1:
        j = rq.frontier_pos[r]
        c = wl.path_nodes[j]
        old = max_extent(kv, rep, c)
        _drop_partial(kv, rq, rp, wl, rep, c, rq.frontier_ext[r], r)
        new = max_extent(kv, rep, c)
        if new < old:
            fifo_push(kv, rep, c, new, old)
        start = wl.req_path_start[r]
        for jj in range(j - 1, start - 1, -1):
            c = wl.path_nodes[jj]
            old = max_extent(kv, rep, c)
            kv.full_refs[rep, c] -= 1
            new = max_extent(kv, rep, c)
            if new < old:
                fifo_push(kv, rep, c, new, old)
    rq.private_blocks[r] = 0
    rq.table_len[r] = 0
    rq.committed_blocks[r] = 0
    rq.frontier_ext[r] = 0


# ----------------------------------------------------------------------------------------------
# queues


@njit(cache=True)
def _wq_push_back(rq, rp, rep, r):
    rq.wq_next[r] = -1
    rq.wq_prev[r] = rp.wq_tail[rep]
    if rp.wq_tail[rep] != -1:
        rq.wq_next[rp.wq_tail[rep]] = r
    else:
        rp.wq_head[rep] = r
    rp.wq_tail[rep] = r
    rp.n_waiting[rep] += 1


@njit(cache=True)
def _wq_push_front(rq, rp, rep, r):
    rq.wq_prev[r] = -1
    rq.wq_next[r] = rp.wq_head[rep]
    if rp.wq_head[rep] != -1:
        rq.wq_prev[rp.wq_head[rep]] = r
    else:
        rp.wq_tail[rep] = r
    rp.wq_head[rep] = r
    rp.n_waiting[rep] += 1


@njit(cache=True)
def _wq_pop_front(rq, rp, rep):
    r = rp.wq_head[rep]
    nxt = rq.wq_next[r]
    rp.wq_head[rep] = nxt
    if nxt != -1:
        rq.wq_prev[nxt] = -1
    else:
        rp.wq_tail[rep] = -1
    rq.wq_next[r] = -1
    rp.n_waiting[rep] -= 1
    return r


# ----------------------------------------------------------------------------------------------
# scheduling


@njit(cache=True)
def _preempt(kv, rq, rp, wl, rep, victim):
    _release(kv, rq, rp, wl, rep, victim)
    rq.num_computed[victim] = 0
    rq.num_preemptions[victim] += 1
    rp.num_preemptions[rep] += 1
    rq.status[victim] = ST_WAITING
    _wq_push_front(rq, rp, rep, victim)


@njit(cache=True)
def _schedule(kv, rq, rp, wl, g, rep, now):
    """Form one batch on replica ``rep`` (vLLM V1 order). Returns the number scheduled."""
    bs = kv.block_size[0]
    budget = rp.max_num_batched_tokens[rep]
    max_len = rp.max_model_len[rep]
    caching = kv.caching[rep] == 1
    n_sched = 0
    preempted = False
    # 1. running requests, in admission order
    i = 0
    while i < rp.n_running[rep] and budget > 0:
        r = rp.running[rep, i]
        n = rq.num_tokens[r] - rq.num_computed[r]
        if n > budget:
            n = budget
        if n > max_len - 1 - rq.num_computed[r]:
            n = max_len - 1 - rq.num_computed[r]
        if n <= 0:
            i += 1
            continue
        need = (rq.num_computed[r] + n + bs - 1) // bs - rq.table_len[r]
        self_preempted = False
        while need > kv.num_free[rep]:
            last = rp.n_running[rep] - 1
            victim = rp.running[rep, last]
            rp.running[rep, last] = -1
            rp.n_running[rep] = last
            _preempt(kv, rq, rp, wl, rep, victim)
            preempted = True
            if victim == r:
                self_preempted = True
                break
        if self_preempted:
            break
        if need > 0:
            fifo_pop(kv, rep, need)
            rq.private_blocks[r] += need
            rq.table_len[r] += need
        rp.scheduled[rep, n_sched] = r
        rp.scheduled_new[rep, n_sched] = n
        g.new_tokens[n_sched] = n
        g.context_tokens[n_sched] = rq.num_computed[r]
        n_sched += 1
        rq.num_computed[r] += n
        rq.num_scheduled_tokens[r] += n
        budget -= n
        if caching:
            full = rq.num_computed[r]
            if full > rq.num_tokens[r]:
                full = rq.num_tokens[r]
            _advance(kv, rq, rp, wl, rep, r, full // bs, True)
        i += 1
    # 2. waiting requests, FCFS, only if nothing was preempted in this step
    if not preempted:
        while (
            rp.wq_head[rep] != -1 and budget > 0 and rp.n_running[rep] < rp.max_num_seqs[rep]
        ):
            r = rp.wq_head[rep]
            ps = wl.req_path_start[r]
            pe = wl.req_path_start[r + 1]
            hits = 0
            if caching:
                hits = lookup_hit_blocks(kv, wl.path_nodes, ps, pe, rep, rq.num_tokens[r])
            computed = hits * bs
            n = rq.num_tokens[r] - computed
            if n > budget:
                n = budget
            new_blocks = (computed + n + bs - 1) // bs - hits
            extra = rp.state_blocks_per_seq[rep]
            touched = 0
            if hits > 0:
                touched = queued_blocks_in_prefix(kv, wl.path_nodes, ps, pe, rep, hits)
            if new_blocks + extra + touched > kv.num_free[rep]:
                break
            _wq_pop_front(rq, rp, rep)
            if caching:
                _attach(kv, rq, wl, rep, r)
                _advance(kv, rq, rp, wl, rep, r, hits, False)
            rq.table_len[r] = hits
            take = new_blocks + extra
            if take > 0:
                fifo_pop(kv, rep, take)
            rq.private_blocks[r] += take
            rq.table_len[r] += new_blocks
            rq.num_computed[r] = computed
            if rq.num_cached_tokens[r] < 0:
                rq.num_cached_tokens[r] = computed
                rq.first_scheduled_time[r] = now
            rq.status[r] = ST_RUNNING
            rp.running[rep, rp.n_running[rep]] = r
            rp.n_running[rep] += 1
            rp.scheduled[rep, n_sched] = r
            rp.scheduled_new[rep, n_sched] = n
            g.new_tokens[n_sched] = n
            g.context_tokens[n_sched] = computed
            n_sched += 1
            rq.num_computed[r] = computed + n
            rq.num_scheduled_tokens[r] += n
            budget -= n
            if caching:
                full = rq.num_computed[r]
                if full > rq.num_tokens[r]:
                    full = rq.num_tokens[r]
                _advance(kv, rq, rp, wl, rep, r, full // bs, True)
    rp.n_scheduled[rep] = n_sched
    return n_sched


# ----------------------------------------------------------------------------------------------
# events


@njit(cache=True, inline="always")
def _record_gap(g, rq, r, gap):
    if gap > rq.max_token_gap[r]:
        rq.max_token_gap[r] = gap
    if gap < HIST_MIN_SECONDS:
        b = 0
    else:
        b = 1 + int(math.floor(math.log10(gap / HIST_MIN_SECONDS) * HIST_BINS_PER_DECADE))
        if b > HIST_NUM_BINS - 1:
            b = HIST_NUM_BINS - 1
    g.gap_hist[b] += 1


@njit(cache=True)
def _release_children(rq, wl, heap, r, now, failed):
    """``r`` is done (finished, or rejected if ``failed``); dispatch children that are ready."""
    ok = True
    for k in range(wl.req_children_start[r], wl.req_children_start[r + 1]):
        ch = wl.child_ids[k]
        if failed:
            rq.parent_failed[ch] = 1
        rq.pending_parents[ch] -= 1
        if rq.pending_parents[ch] == 0:
            rq.ready_time[ch] = now
            rq.arrival_time[ch] = now + wl.req_wait_after_ready[ch]
            rq.status[ch] = ST_DISPATCHING
            if not heap_push(heap, rq.arrival_time[ch], EV_ARRIVAL, ch):
                ok = False
    return ok


@njit(cache=True)
def _route(rq, rp, wl, g, r):
    n_rep = rp.n_running.shape[0]
    if n_rep == 1:
        return 0
    policy = g.router[0]
    if policy == ROUTE_LEAST_OUTSTANDING:
        best = 0
        for k in range(1, n_rep):
            if rp.outstanding[k] < rp.outstanding[best]:
                best = k
        return best
    if policy == ROUTE_SESSION_AFFINITY:
        return wl.req_session[r] % n_rep
    rep = g.rr_next[0] % n_rep
    g.rr_next[0] += 1
    return rep


@njit(cache=True)
def _reject(rq, wl, heap, g, r, reason, now):
    rq.status[r] = ST_REJECTED
    rq.reject_reason[r] = reason
    g.num_done[0] += 1
    return _release_children(rq, wl, heap, r, now, True)


@njit(cache=True)
def _on_arrival(kv, rq, rp, wl, g, heap, r, now):
    if rq.parent_failed[r] == 1:
        return _reject(rq, wl, heap, g, r, REJECT_PARENT, now)
    rep = _route(rq, rp, wl, g, r)
    rq.replica[r] = rep
    total = wl.req_prompt_tokens[r] + wl.req_output_tokens[r]
    if total > rp.max_model_len[rep]:
        return _reject(rq, wl, heap, g, r, REJECT_MAX_MODEL_LEN, now)
    bs = kv.block_size[0]
    if (total + bs - 1) // bs + rp.state_blocks_per_seq[rep] > kv.num_blocks[rep]:
        return _reject(rq, wl, heap, g, r, REJECT_KV_CAPACITY, now)
    rq.status[r] = ST_WAITING
    rq.num_tokens[r] = wl.req_prompt_tokens[r]
    rp.outstanding[rep] += 1
    _wq_push_back(rq, rp, rep, r)
    if rp.busy[rep] == 0:
        rp.busy[rep] = 1
        return heap_push(heap, now, EV_SCHEDULE, rep)
    return True


@njit(cache=True)
def _on_schedule(kv, rq, rp, wl, g, heap, rep, now):
    n = _schedule(kv, rq, rp, wl, g, rep, now)
    if n == 0:
        rp.busy[rep] = 0
        if rp.n_running[rep] > 0 or rp.n_waiting[rep] > 0:
            g.error_payload[0] = rep
            return CORE_ERR_STUCK
        return CORE_DONE
    used = kv.num_blocks[rep] - kv.num_free[rep]
    if used > rp.peak_used_blocks[rep]:
        rp.peak_used_blocks[rep] = used
    if rp.n_running[rep] > rp.peak_running[rep]:
        rp.peak_running[rep] = rp.n_running[rep]
    seconds = step_seconds(rp.cost_params[rep], g.new_tokens, g.context_tokens, n)
    rp.step_start[rep] = now
    rp.num_steps[rep] += 1
    rp.busy_seconds[rep] += seconds
    if not heap_push(heap, now + seconds, EV_STEP_END, rep):
        return CORE_ERR_HEAP_FULL
    return CORE_DONE


@njit(cache=True)
def _on_step_end(kv, rq, rp, wl, g, heap, rep, now):
    n_done = 0
    ok = True
    for k in range(rp.n_scheduled[rep]):
        r = rp.scheduled[rep, k]
        n_new = rp.scheduled_new[rep, k]
        if n_new == 1 and rq.num_output_done[r] > 0:
            rp.decode_tokens[rep] += 1
        else:
            rp.prefill_tokens[rep] += n_new
        if rq.num_computed[r] < rq.num_tokens[r]:
            continue  # a prefill chunk that does not finish the prompt: no token yet
        rq.num_output_done[r] += 1
        rq.num_tokens[r] += 1
        if rq.num_output_done[r] == 1:
            rq.first_token_time[r] = now
        else:
            _record_gap(g, rq, r, now - rq.last_token_time[r])
        rq.last_token_time[r] = now
        if rq.num_output_done[r] >= wl.req_output_tokens[r]:
            rq.status[r] = ST_FINISHED
            rq.finish_time[r] = now
            n_done += 1
    if n_done > 0:
        # remove finished requests from the running list, keeping the order of the rest;
        # release each while the others are still listed (part_max rescans need them)
        w = 0
        n_run = rp.n_running[rep]
        for k in range(n_run):
            r = rp.running[rep, k]
            if rq.status[r] == ST_FINISHED:
                _release(kv, rq, rp, wl, rep, r)
                rq.status[r] = -ST_FINISHED  # mark as released
            else:
                rp.running[rep, w] = r
                w += 1
        for k in range(w, n_run):
            rp.running[rep, k] = -1
        rp.n_running[rep] = w
        for k in range(rp.n_scheduled[rep]):
            r = rp.scheduled[rep, k]
            if rq.status[r] == -ST_FINISHED:
                rq.status[r] = ST_FINISHED
                rp.outstanding[rep] -= 1
                g.num_done[0] += 1
                if not _release_children(rq, wl, heap, r, now, False):
                    ok = False
    rp.n_scheduled[rep] = 0
    if not ok:
        return CORE_ERR_HEAP_FULL
    if not heap_push(heap, now, EV_SCHEDULE, rep):
        return CORE_ERR_HEAP_FULL
    return CORE_DONE


@njit(cache=True)
def init_events(rq, wl, heap):
    """Queue the arrival of every request without parents; set pending-parent counts."""
    for r in range(wl.req_prompt_tokens.shape[0]):
        n_par = wl.req_parents_start[r + 1] - wl.req_parents_start[r]
        rq.pending_parents[r] = n_par
        rq.status[r] = ST_PENDING
        if n_par == 0:
            rq.ready_time[r] = wl.req_arrival_time[r]
            rq.arrival_time[r] = wl.req_arrival_time[r] + wl.req_wait_after_ready[r]
            rq.status[r] = ST_DISPATCHING
            if not heap_push(heap, rq.arrival_time[r], EV_ARRIVAL, r):
                return False
    return True


@njit(cache=True)
def run_events(kv, rq, rp, wl, g, heap, max_events):
    """Process up to ``max_events`` events. Returns CORE_DONE, CORE_PAUSED or an error code."""
    count = 0
    while heap.size[0] > 0:
        if count >= max_events:
            return CORE_PAUSED
        now, kind, payload = heap_pop(heap)
        g.now[0] = now
        count += 1
        g.num_events[0] += 1
        if kind == EV_ARRIVAL:
            if not _on_arrival(kv, rq, rp, wl, g, heap, payload, now):
                return CORE_ERR_HEAP_FULL
        elif kind == EV_SCHEDULE:
            status = _on_schedule(kv, rq, rp, wl, g, heap, payload, now)
            if status != CORE_DONE:
                return status
        else:
            status = _on_step_end(kv, rq, rp, wl, g, heap, payload, now)
            if status != CORE_DONE:
                return status
    return CORE_DONE
