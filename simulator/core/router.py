"""Request -> replica routing policies, inside the Numba core.

Each policy is a short function of the cluster as the router sees it at dispatch time. Load
figures (outstanding requests, waiting queue, KV blocks in use, in-flight prompt tokens) are
live, or a snapshot refreshed every ``staleness_s`` seconds; prefix overlap is always read live
(Dynamo's router follows KV events as they are published). Ties are broken uniformly at random
with counter-based draws, so a seed fixes every decision.

* ``round_robin``: replicas in turn.
* ``random``: uniform.
* ``least_outstanding``: fewest dispatched-but-unfinished requests.
* ``least_kv_usage``: lowest fraction of KV blocks held by running requests.
* ``power_of_two``: two distinct replicas drawn at random, the one with fewer outstanding.
* ``session_affinity``: a session's requests go where its previous request went (its KV is
  there); when that replica's outstanding load exceeds ``affinity_overload_factor`` x (cluster
  mean + 1), the request goes to the least-loaded replica, which becomes the session's home.
* ``kv_aware`` (NVIDIA Dynamo, REFERENCE.md §3): per replica
  ``cost = prefill_load_scale * max(prefill_blocks - overlap_score_credit * overlap_blocks, 0)
  + decode_blocks`` with ``prefill_blocks = (in-flight prompt tokens + this prompt) / block``,
  ``overlap_blocks`` the request's cached prefix there and ``decode_blocks`` the blocks in use.
  Temperature 0: the lowest cost; T > 0: ``p_i ~ exp(-(c_i - c_min) / ((c_max - c_min) T))``.
* ``weighted_scorer`` (llm-d, REFERENCE.md §4): ``w_prefix * matched/total blocks +
  w_queue * (maxQ - q) / (maxQ - minQ) + w_kv * (1 - kv usage)``, highest wins; defaults 3/2/2.
"""

from __future__ import annotations

import math

from numba import njit

from simulator.core.kvcache import (
    KS_BLOCK_SIZE,
    KS_BLOCKS,
    KS_CACHING,
    KS_FREE,
    lookup_hit_blocks,
)
from simulator.core.state import (
    G_ROUTER,
    G_SEED,
    GF_AFFINITY_FACTOR,
    GF_OVERLAP_CREDIT,
    GF_PREFILL_SCALE,
    GF_STALENESS,
    GF_TEMPERATURE,
    GF_W_KV,
    GF_W_PREFIX,
    GF_W_QUEUE,
    ROUTE_KV_AWARE,
    ROUTE_LEAST_KV,
    ROUTE_LEAST_OUTSTANDING,
    ROUTE_POWER_OF_TWO,
    ROUTE_RANDOM,
    ROUTE_SESSION_AFFINITY,
    ROUTE_WEIGHTED,
    RP_N_WAITING,
    RP_OUTSTANDING,
    RP_PENDING_PREFILL,
    RP_SNAP_OUTSTANDING,
    RP_SNAP_PENDING,
    RP_SNAP_USED,
    RP_SNAP_WAITING,
)
from simulator.core.uniform import uniform

SALT_ROUTE = 0x2F0


@njit(cache=True, inline="always")
def _used(kv, rpi, rep, stale):
    if stale:
        return rpi[rep, RP_SNAP_USED]
    return kv.kvs[rep, KS_BLOCKS] - kv.kvs[rep, KS_FREE]


@njit(cache=True, inline="always")
def _outstanding(rpi, rep, stale):
    return rpi[rep, RP_SNAP_OUTSTANDING] if stale else rpi[rep, RP_OUTSTANDING]


@njit(cache=True)
def take_snapshot(kv, rpi):
    """Refresh the router's view of every replica's load."""
    for rep in range(rpi.shape[0]):
        rpi[rep, RP_SNAP_OUTSTANDING] = rpi[rep, RP_OUTSTANDING]
        rpi[rep, RP_SNAP_WAITING] = rpi[rep, RP_N_WAITING]
        rpi[rep, RP_SNAP_USED] = kv.kvs[rep, KS_BLOCKS] - kv.kvs[rep, KS_FREE]
        rpi[rep, RP_SNAP_PENDING] = rpi[rep, RP_PENDING_PREFILL]


@njit(cache=True)
def _argbest(score, cand, n, seed, r, lowest):
    """Candidate with the lowest (or highest) score; ties broken by a counter-based draw."""
    best = 0
    ties = 1
    for k in range(1, n):
        better = score[k] < score[best] if lowest else score[k] > score[best]
        if better:
            best = k
            ties = 1
        elif score[k] == score[best]:
            ties += 1
            if uniform(seed, r, SALT_ROUTE + ties, k) * ties < 1.0:
                best = k
    return cand[best]


@njit(cache=True)
def route(kv, rpi, gi, gf, session_home, path_nodes, path_start, path_end, num_tokens,
          session, r, scratch, cand, n, rr_col):
    """The replica for request ``r`` among the ``n`` candidates ``cand[:n]``.

    ``num_tokens``: its prompt length; ``session_home``: the pool's row of session homes;
    ``rr_col``: the column of ``gi`` holding the pool's round-robin counter.
    """
    if n == 1:
        return cand[0]
    policy = gi[G_ROUTER]
    seed = gi[G_SEED] + 7919 * rr_col
    stale = gf[GF_STALENESS] > 0.0
    if policy == ROUTE_RANDOM:
        return cand[min(int(uniform(seed, r, SALT_ROUTE, 0) * n), n - 1)]
    if policy == ROUTE_LEAST_OUTSTANDING:
        for k in range(n):
            scratch[k] = _outstanding(rpi, cand[k], stale)
        return _argbest(scratch, cand, n, seed, r, True)
    if policy == ROUTE_LEAST_KV:
        for k in range(n):
            scratch[k] = _used(kv, rpi, cand[k], stale) / kv.kvs[cand[k], KS_BLOCKS]
        return _argbest(scratch, cand, n, seed, r, True)
    if policy == ROUTE_POWER_OF_TWO:
        a = min(int(uniform(seed, r, SALT_ROUTE, 1) * n), n - 1)
        b = min(int(uniform(seed, r, SALT_ROUTE, 2) * (n - 1)), n - 2)
        if b >= a:
            b += 1
        ra = cand[a]
        rb = cand[b]
        return ra if _outstanding(rpi, ra, stale) <= _outstanding(rpi, rb, stale) else rb
    if policy == ROUTE_SESSION_AFFINITY:
        home = session_home[session]
        total = 0
        for k in range(n):
            total += _outstanding(rpi, cand[k], stale)
        mean = total / n
        if home < 0 or _outstanding(rpi, home, stale) > gf[GF_AFFINITY_FACTOR] * (mean + 1.0):
            for k in range(n):
                scratch[k] = _outstanding(rpi, cand[k], stale)
            home = _argbest(scratch, cand, n, seed, r, True)
        session_home[session] = home
        return home
    if policy == ROUTE_KV_AWARE:
        scale = gf[GF_PREFILL_SCALE]
        credit = gf[GF_OVERLAP_CREDIT]
        cmin = 1e300
        cmax = -1e300
        for k in range(n):
            rep = cand[k]
            overlap = 0
            if kv.kvs[rep, KS_CACHING] == 1:
                overlap = lookup_hit_blocks(kv, path_nodes, path_start, path_end, rep, num_tokens)
            pending = rpi[rep, RP_SNAP_PENDING] if stale else rpi[rep, RP_PENDING_PREFILL]
            adj = (pending + num_tokens) / kv.kvs[rep, KS_BLOCK_SIZE] - credit * overlap
            if adj < 0.0:
                adj = 0.0
            cost = scale * adj + _used(kv, rpi, rep, stale)
            scratch[k] = cost
            cmin = min(cmin, cost)
            cmax = max(cmax, cost)
        temp = gf[GF_TEMPERATURE]
        if temp <= 0.0 or cmax == cmin:
            return _argbest(scratch, cand, n, seed, r, True)
        total = 0.0
        for k in range(n):
            scratch[k] = math.exp(-(scratch[k] - cmin) / ((cmax - cmin) * temp))
            total += scratch[k]
        u = uniform(seed, r, SALT_ROUTE, 3) * total
        acc = 0.0
        for k in range(n):
            acc += scratch[k]
            if u < acc:
                return cand[k]
        return cand[n - 1]
    if policy == ROUTE_WEIGHTED:
        qmin = 1 << 62
        qmax = -1
        for k in range(n):
            rep = cand[k]
            qk = rpi[rep, RP_SNAP_WAITING] if stale else rpi[rep, RP_N_WAITING]
            qmin = min(qmin, qk)
            qmax = max(qmax, qk)
        for k in range(n):
            rep = cand[k]
            prefix = 0.0
            if kv.kvs[rep, KS_CACHING] == 1:
                total_blocks = max((num_tokens - 1) // kv.kvs[rep, KS_BLOCK_SIZE], 1)
                hits = lookup_hit_blocks(kv, path_nodes, path_start, path_end, rep, num_tokens)
                prefix = hits / total_blocks
            qk = rpi[rep, RP_SNAP_WAITING] if stale else rpi[rep, RP_N_WAITING]
            queue = 1.0 if qmax == qmin else (qmax - qk) / (qmax - qmin)
            usage = _used(kv, rpi, rep, stale) / kv.kvs[rep, KS_BLOCKS]
            scratch[k] = gf[GF_W_PREFIX] * prefix + gf[GF_W_QUEUE] * queue + gf[GF_W_KV] * (
                1.0 - usage
            )
        return _argbest(scratch, cand, n, seed, r, False)
    k = gi[rr_col] % n
    gi[rr_col] += 1
    return cand[k]
