"""Struct-of-arrays state of a simulation: the contract between Python and the Numba loop.

State lives in a handful of 2-D arrays whose columns are named by the integer constants below
(``rqi[r, RQ_NUM_TOKENS]`` is request ``r``'s token count). Few, wide arrays rather than many
narrow ones: every array handed to a jitted function costs a reference-count round trip, and a
request's fields sit together in one cache line. Everything is built in Python before the core
runs (all validation happens there) and read back afterwards. Units: seconds, tokens, blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Event kinds.
EV_ARRIVAL = 0  # a request is dispatched to the cluster (payload: request id)
EV_SCHEDULE = 1  # a replica forms its next batch (payload: replica id)
EV_STEP_END = 2  # a replica's step finishes (payload: replica id)
EV_SNAPSHOT = 3  # the router refreshes its (stale) view of replica load
EV_KV_DONE = 4  # a prefill->decode KV transfer completes (payload: request id)
EV_LOAD_DONE = 5  # a host-tier KV load into GPU memory completes (payload: request id)
EV_UNPIN = 6  # session TTL: a finished request's protected blocks expire (payload: request id)
EV_PREFETCH = 7  # offload-and-prefetch: start loading a session back from host (payload: request)
EV_PREFETCH_DONE = 8  # ... the prefetched blocks are in GPU memory (payload: request id)

# Replica roles and router pools.
ROLE_AGGREGATED = 0
ROLE_PREFILL = 1
ROLE_DECODE = 2
ROLE_CODES = {"aggregated": ROLE_AGGREGATED, "prefill": ROLE_PREFILL, "decode": ROLE_DECODE}

# Request status.
ST_PENDING = 0  # parents not finished yet
ST_DISPATCHING = 1  # ready; its arrival event is scheduled
ST_WAITING = 2  # in a replica's waiting queue
ST_RUNNING = 3
ST_FINISHED = 4
ST_REJECTED = 5
ST_RELEASING = 6  # finished in the current step, blocks not yet released
ST_TRANSFERRING = 7  # prefill done on a prefill replica; its KV is moving to a decode replica
ST_LOADING = 8  # admitted; its prefix hit is being copied from the host tier (not schedulable)

# KV retention policies for tool gaps (engine.retention.policy)
RET_LRU = 0  # plain LRU: a finished request's blocks join the free queue
RET_SESSION_TTL = 1  # keep them referenced until the session's next request is admitted, <= T s
RET_OFFLOAD_PREFETCH = 2  # copy them to the host tier at once; load back before the tool returns
RETENTION_CODES = {
    "lru": RET_LRU, "session_ttl": RET_SESSION_TTL, "offload_prefetch": RET_OFFLOAD_PREFETCH,
}

# Rejection reasons.
REJECT_NONE = 0
REJECT_MAX_MODEL_LEN = 1
REJECT_KV_CAPACITY = 2
REJECT_PARENT = 3
REJECT_REASONS = {
    REJECT_NONE: "",
    REJECT_MAX_MODEL_LEN: "prompt + output exceeds max_model_len",
    REJECT_KV_CAPACITY: "prompt + output exceeds the replica's KV cache capacity",
    REJECT_PARENT: "a parent request was rejected",
}

# Router policies.
ROUTE_ROUND_ROBIN = 0
ROUTE_LEAST_OUTSTANDING = 1
ROUTE_SESSION_AFFINITY = 2
ROUTE_RANDOM = 3
ROUTE_LEAST_KV = 4
ROUTE_POWER_OF_TWO = 5
ROUTE_KV_AWARE = 6
ROUTE_WEIGHTED = 7
ROUTER_CODES = {
    "round_robin": ROUTE_ROUND_ROBIN,
    "least_outstanding": ROUTE_LEAST_OUTSTANDING,
    "session_affinity": ROUTE_SESSION_AFFINITY,
    "random": ROUTE_RANDOM,
    "least_kv_usage": ROUTE_LEAST_KV,
    "power_of_two": ROUTE_POWER_OF_TWO,
    "kv_aware": ROUTE_KV_AWARE,
    "weighted_scorer": ROUTE_WEIGHTED,
}

# Core status codes returned by the loop.
CORE_DONE = 0
CORE_PAUSED = 1
CORE_ERR_HEAP_FULL = -1
CORE_ERR_STUCK = -2

# Token-gap histogram: log-spaced bins, 200 per decade from 1e-5 s to 1e3 s.
HIST_MIN_SECONDS = 1e-5
HIST_BINS_PER_DECADE = 200
HIST_DECADES = 8
HIST_NUM_BINS = HIST_BINS_PER_DECADE * HIST_DECADES + 2  # + underflow and overflow

# --- request integer columns: rqi[r, col] ---
RQ_STATUS = 0
RQ_REJECT = 1
RQ_PENDING = 2  # parents not finished yet
RQ_PARENT_FAILED = 3
RQ_REPLICA = 4  # -1 until dispatched
RQ_NUM_TOKENS = 5  # prompt + outputs emitted so far
RQ_OUT_DONE = 6  # outputs emitted
RQ_COMPUTED = 7  # tokens whose KV is computed (vLLM num_computed_tokens)
RQ_CACHED = 8  # prefix hit (tokens) at first scheduling, -1 before
RQ_SCHED_TOKENS = 9  # all tokens ever scheduled, recompute included
RQ_PREEMPTIONS = 10
RQ_TABLE_LEN = 11  # blocks in the request's block table
RQ_PRIVATE = 12  # physical blocks held that are not shared cache content
RQ_COMMITTED = 13  # leading full blocks referenced in the prefix index
RQ_FPOS = 14  # index into path_nodes of the node being filled (the frontier)
RQ_FEXT = 15  # blocks of the frontier node referenced
RQ_WQ_NEXT = 16  # waiting-queue links, -1 = none
RQ_WQ_PREV = 17
RQ_SPEC_PROPOSED = 18  # draft tokens proposed for it
RQ_SPEC_ACCEPTED = 19  # draft tokens accepted
RQ_CHUNKS = 20  # token emissions (a speculative step emits several tokens in one chunk)
RQ_DECODE_REPLICA = 21  # disaggregation: the decode replica chosen at dispatch, -1 if none
RQ_PREFILL_REPLICA = 22  # disaggregation: where the prompt was computed, -1 if local
RQ_PRIVATE_P = 23  # disaggregation: private blocks still held on the prefill replica
RQ_HOST_HIT = 24  # tokens of the first prefix hit that were loaded from the host tier
RQ_PINNED = 25  # 1 while session TTL protects its blocks after it finished (on RQ_REPLICA)
RQ_RETAIN = 26  # blocks of its sequence committed when it finished (retention policies)
RQ_NUM_INT = 27

# --- request float columns: rqf[r, col], seconds ---
RQ_READY = 0  # all parents finished (a root: its arrival time)
RQ_ARRIVAL = 1  # dispatched to the cluster (ready + wait_after_ready)
RQ_FIRST_SCHED = 2
RQ_FIRST_TOKEN = 3
RQ_FINISH = 4
RQ_LAST_TOKEN = 5
RQ_MAX_GAP = 6  # largest gap between two of its tokens
RQ_XFER_QUEUED = 7  # prefill done, waiting for the decode replica's blocks
RQ_XFER_START = 8  # KV transfer starts (blocks allocated on the decode replica, link free)
RQ_XFER_END = 9
RQ_XFER_BYTES = 10  # bytes moved (only what the decode replica did not have cached)
RQ_LOAD_START = 11  # host-tier load of its first admission: copy starts (PCIe free)
RQ_LOAD_END = 12  # ... and completes
RQ_NUM_FLOAT = 13

# --- replica integer columns: rpi[rep, col] ---
RP_MAX_BATCHED = 0  # max_num_batched_tokens
RP_MAX_SEQS = 1
RP_MAX_LEN = 2  # max_model_len
RP_STATE_BLOCKS = 3  # blocks of recurrent state per running sequence (hybrid models)
RP_N_RUNNING = 4
RP_WQ_HEAD = 5
RP_WQ_TAIL = 6
RP_N_WAITING = 7
RP_BUSY = 8  # 1 while a schedule or step event is pending
RP_N_SCHED = 9  # requests in the step in flight
RP_NUM_STEPS = 10
RP_PREFILL_TOKENS = 11
RP_DECODE_TOKENS = 12
RP_PREEMPTIONS = 13
RP_PEAK_USED = 14  # max of (pool - free queue) blocks
RP_PEAK_RUNNING = 15
RP_OUTSTANDING = 16  # dispatched, not finished
RP_SPEC_ON = 17  # 1 = speculative decoding
RP_SPEC_PROFILE = 18  # row of spec_alpha holding this replica's per-request acceptance
RP_SPEC_PROPOSED = 19  # draft tokens proposed
RP_SPEC_ACCEPTED = 20  # draft tokens accepted
RP_SPEC_VERIFIES = 21  # (request, step) pairs that verified drafts
RP_SPEC_K_STEP = 22  # k chosen for the step in flight
RP_SPEC_DRAFT = 23  # 1 = draft passes cost GPU time (not n-gram lookup)
RP_PENDING_PREFILL = 24  # prompt tokens of dispatched requests that have no first token yet
RP_SNAP_OUTSTANDING = 25  # the router's last snapshot of RP_OUTSTANDING (staleness > 0)
RP_SNAP_WAITING = 26  # ... of RP_N_WAITING
RP_SNAP_USED = 27  # ... of KV blocks in use
RP_SNAP_PENDING = 28  # ... of RP_PENDING_PREFILL
RP_ROUTED = 29  # requests routed here
RP_ROLE = 30  # ROLE_AGGREGATED, ROLE_PREFILL or ROLE_DECODE
RP_RQ_HEAD = 31  # decode replicas: queue of prefilled requests waiting for blocks (FIFO)
RP_RQ_TAIL = 32
RP_N_REMOTE = 33
RP_XFER_IN = 34  # KV transfers received
RP_N_HELD = 35  # running-list entries that are transfers in flight (not schedulable)
RP_PINS = 36  # session-TTL protections started (the list itself: kvcache KS_PIN_*)
RP_PINS_BROKEN = 37  # protections dropped early because the blocks were needed
RP_HOST_LOADS = 38  # admissions that loaded part of their prefix from the host tier
RP_HOST_LOAD_BLOCKS = 39
RP_PREFETCHES = 40  # offload-and-prefetch loads that brought blocks back
RP_PREFETCH_BLOCKS = 41
RP_RETENTION = 42  # RET_* policy
RP_NUM_INT = 43

# --- replica float columns: rpf[rep, col], seconds ---
RP_STEP_START = 0
RP_BUSY_SECONDS = 1
RP_SPEC_DECAY = 2  # acceptance of draft position i = alpha * decay**i
RP_DRAFT_SECONDS = 3  # seconds of draft passes (included in busy seconds)
RP_LINK_FREE_AT = 4  # decode replicas: when the inbound KV link is next free (s)
RP_LINK_BW = 5  # inbound KV link bandwidth (bytes/s)
RP_LINK_LATENCY = 6  # per-transfer latency (s)
RP_KV_BYTES_TOKEN = 7  # KV bytes per token of the model, all TP ranks together
RP_XFER_BYTES_IN = 8
RP_XFER_SECONDS = 9  # link busy time
RP_H2D_BW = 10  # host -> GPU bandwidth of the replica, all its GPUs together (bytes/s)
RP_H2D_FREE_AT = 11  # when its host -> GPU copies are next free (s); loads are serialised
RP_H2D_SECONDS = 12  # busy time of host -> GPU copies (loads and prefetches)
RP_TTL = 13  # session TTL: longest protection (s)
RP_PREFETCH_MARGIN = 14  # offload-and-prefetch: start this much earlier than the estimate (s)
RP_NUM_FLOAT = 15

# --- global scalars ---
G_ROUTER = 0
G_RR_NEXT = 1
G_NUM_DONE = 2  # finished + rejected
G_NUM_EVENTS = 3
G_ERROR = 4
G_STEP_N = 5  # steps recorded in the step log
G_STEP_DROPPED = 6  # steps not recorded because the log was full
G_SEED = 7  # seed of the counter-based draws (speculative acceptance)
G_CHUNK_HIST = 8  # 1 = record the per-chunk gap histogram (some replica speculates)
G_RR_NEXT_PREFILL = 9  # round-robin counter of the prefill pool
G_DISAGG = 10  # 1 = the cluster has prefill and decode pools
G_NUM_INT = 11
GF_WINDOW_SECONDS = 0  # width of the time windows of the windowed gap histograms
GF_TEMPERATURE = 1  # kv_aware: softmax temperature over costs (0 = argmin)
GF_OVERLAP_CREDIT = 2  # kv_aware: blocks of prefill credited per cached block
GF_PREFILL_SCALE = 3  # kv_aware: weight of prefill blocks against decode blocks
GF_W_PREFIX = 4  # weighted_scorer weights
GF_W_QUEUE = 5
GF_W_KV = 6
GF_AFFINITY_FACTOR = 7  # session_affinity: leave home when its load > factor x (mean + 1)
GF_STALENESS = 8  # seconds between the router's load snapshots (0 = live)
GF_LOCAL_PREFILL = 9  # disaggregation: prefill on the decode replica below this many tokens
GF_NUM = 10

# --- step log columns: step_log[i, col] (times in seconds) ---
SL_REPLICA = 0
SL_START = 1
SL_END = 2
SL_NUM_SEQS = 3
SL_NUM_DECODES = 4  # sequences computing one token after their first output
SL_PREFILL_TOKENS = 5  # tokens of the other sequences (prefill chunks, recompute)
SL_USED_BLOCKS = 6  # KV blocks held by running requests after scheduling
SL_NUM_WAITING = 7  # requests left in the waiting queue
SL_NUM = 8

# Windowed token-gap histograms: coarser bins (40 per decade, <= 3 % error), one row per window.
WIN_BINS_PER_DECADE = 40
WIN_NUM_BINS = WIN_BINS_PER_DECADE * HIST_DECADES + 2


class Requests(NamedTuple):
    rqi: np.ndarray  # int64[R, RQ_NUM_INT]
    rqf: np.ndarray  # float64[R, RQ_NUM_FLOAT]


class Replicas(NamedTuple):
    rpi: np.ndarray  # int64[n_rep, RP_NUM_INT]
    rpf: np.ndarray  # float64[n_rep, RP_NUM_FLOAT]
    running: np.ndarray  # int64[n_rep, max seqs], in admission order
    scheduled: np.ndarray  # int64[n_rep, max seqs], requests in the step in flight
    scheduled_new: np.ndarray  # int64[n_rep, max seqs], tokens each computes in it
    cost_params: np.ndarray  # float64[n_rep, P], cost-model parameters of each replica
    decode_seconds_by_count: np.ndarray  # float64[n_rep, max seqs + 1], step time by #decodes
    scheduled_drafts: np.ndarray  # int64[n_rep, max seqs], draft tokens each verifies
    spec_alpha: np.ndarray  # float64[n_profiles, R], per-request acceptance probability
    spec_k_table: np.ndarray  # int64[n_rep, 8, 2], rows (max running, k)
    draft_params: np.ndarray  # float64[n_rep, P], cost parameters of one draft pass


class Globals(NamedTuple):
    gi: np.ndarray  # int64[G_NUM_INT]
    gf: np.ndarray  # float64[GF_NUM]
    now: np.ndarray  # float64[1], s
    gap_hist: np.ndarray  # int64[HIST_NUM_BINS], gaps between successive tokens (per token)
    chunk_gap_hist: np.ndarray  # int64[HIST_NUM_BINS], gaps between successive token chunks
    gap_hist_win: np.ndarray  # int64[num windows, WIN_NUM_BINS]; the last row takes the rest
    step_log: np.ndarray  # float64[capacity, SL_NUM]; capacity 0 = not recorded
    session_home: np.ndarray  # int64[2, num sessions], a session's replica per pool, -1
    route_scratch: np.ndarray  # float64[n_rep], per-candidate scores while routing
    pool_members: np.ndarray  # int64[3, n_rep]: replicas by role (row ROLE_*)
    pool_sizes: np.ndarray  # int64[3]
    new_tokens: np.ndarray  # int64[max seqs], scratch for the cost model
    context_tokens: np.ndarray  # int64[max seqs], scratch for the cost model


def make_requests(num_requests: int) -> Requests:
    rqi = np.zeros((num_requests, RQ_NUM_INT), dtype=np.int64)
    rqi[:, RQ_REPLICA] = -1
    rqi[:, RQ_CACHED] = -1
    rqi[:, RQ_WQ_NEXT] = -1
    rqi[:, RQ_WQ_PREV] = -1
    rqi[:, RQ_DECODE_REPLICA] = -1
    rqi[:, RQ_PREFILL_REPLICA] = -1
    rqf = np.full((num_requests, RQ_NUM_FLOAT), np.nan, dtype=np.float64)
    rqf[:, RQ_MAX_GAP] = 0.0
    rqf[:, RQ_XFER_BYTES] = 0.0
    return Requests(rqi, rqf)


def make_replicas(
    cost_params: np.ndarray,
    max_num_batched_tokens: np.ndarray,
    max_num_seqs: np.ndarray,
    max_model_len: np.ndarray,
    state_blocks_per_seq: np.ndarray,
    spec_on: np.ndarray | None = None,
    spec_profile: np.ndarray | None = None,
    spec_decay: np.ndarray | None = None,
    spec_draft: np.ndarray | None = None,
    spec_alpha: np.ndarray | None = None,
    spec_k_table: np.ndarray | None = None,
    draft_params: np.ndarray | None = None,
) -> Replicas:
    """Replica state; the ``spec_*`` arrays default to "no speculative decoding"."""
    n = int(cost_params.shape[0])
    width = int(max_num_seqs.max())
    rpi = np.zeros((n, RP_NUM_INT), dtype=np.int64)
    rpi[:, RP_MAX_BATCHED] = max_num_batched_tokens
    rpi[:, RP_MAX_SEQS] = max_num_seqs
    rpi[:, RP_MAX_LEN] = max_model_len
    rpi[:, RP_STATE_BLOCKS] = state_blocks_per_seq
    rpi[:, RP_WQ_HEAD] = -1
    rpi[:, RP_WQ_TAIL] = -1
    rpi[:, RP_RQ_HEAD] = -1
    rpi[:, RP_RQ_TAIL] = -1
    rpf = np.zeros((n, RP_NUM_FLOAT), dtype=np.float64)
    rpf[:, RP_SPEC_DECAY] = 1.0
    if spec_on is not None:
        rpi[:, RP_SPEC_ON] = spec_on
        rpi[:, RP_SPEC_PROFILE] = spec_profile
        rpf[:, RP_SPEC_DECAY] = spec_decay
        rpi[:, RP_SPEC_DRAFT] = spec_draft
    return Replicas(
        rpi=rpi,
        rpf=rpf,
        running=np.full((n, width), -1, dtype=np.int64),
        scheduled=np.full((n, width), -1, dtype=np.int64),
        scheduled_new=np.zeros((n, width), dtype=np.int64),
        cost_params=np.ascontiguousarray(cost_params, dtype=np.float64),
        decode_seconds_by_count=np.zeros((n, width + 1), dtype=np.float64),
        scheduled_drafts=np.zeros((n, width), dtype=np.int64),
        spec_alpha=np.zeros((1, 1), dtype=np.float64) if spec_alpha is None else spec_alpha,
        spec_k_table=np.zeros((n, 8, 2), dtype=np.int64) if spec_k_table is None
        else spec_k_table,
        draft_params=np.zeros_like(cost_params, dtype=np.float64) if draft_params is None
        else np.ascontiguousarray(draft_params, dtype=np.float64),
    )


def make_globals(
    router: int,
    max_num_seqs: int,
    window_seconds: float = 10.0,
    num_windows: int = 1000,
    step_log_capacity: int = 0,
    seed: int = 0,
    num_sessions: int = 1,
    router_params: dict[int, float] | None = None,
    num_replicas: int = 1,
    roles: np.ndarray | None = None,
) -> Globals:
    gi = np.zeros(G_NUM_INT, dtype=np.int64)
    gi[G_ROUTER] = router
    gi[G_SEED] = seed
    gf = np.zeros(GF_NUM, dtype=np.float64)
    gf[GF_WINDOW_SECONDS] = window_seconds
    roles = np.zeros(num_replicas, dtype=np.int64) if roles is None else roles
    pools = (np.zeros((3, max(num_replicas, 1)), dtype=np.int64), np.zeros(3, dtype=np.int64))
    for role in range(3):
        members = np.flatnonzero(roles == role)
        pools[0][role, : members.size] = members
        pools[1][role] = members.size
    gi[G_DISAGG] = int(pools[1][ROLE_PREFILL] > 0)
    for col, value in (router_params or {}).items():
        gf[col] = value
    return Globals(
        gi=gi,
        gf=gf,
        now=np.zeros(1, dtype=np.float64),
        gap_hist=np.zeros(HIST_NUM_BINS, dtype=np.int64),
        chunk_gap_hist=np.zeros(HIST_NUM_BINS, dtype=np.int64),
        gap_hist_win=np.zeros((max(num_windows, 1), WIN_NUM_BINS), dtype=np.int64),
        step_log=np.zeros((max(step_log_capacity, 0), SL_NUM), dtype=np.float64),
        session_home=np.full((2, max(num_sessions, 1)), -1, dtype=np.int64),
        route_scratch=np.zeros(max(num_replicas, 1), dtype=np.float64),
        pool_members=pools[0],
        pool_sizes=pools[1],
        new_tokens=np.zeros(max_num_seqs, dtype=np.int64),
        context_tokens=np.zeros(max_num_seqs, dtype=np.int64),
    )


def hist_bin_edges() -> np.ndarray:
    """Edges (seconds) of the regular bins; bin 0 is underflow, the last is overflow."""
    n = HIST_BINS_PER_DECADE * HIST_DECADES
    return HIST_MIN_SECONDS * 10.0 ** (np.arange(n + 1) / HIST_BINS_PER_DECADE)
