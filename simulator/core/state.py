"""Struct-of-arrays state of a simulation: the contract between Python and the Numba loop.

Everything here is a NamedTuple of numpy arrays, built in Python before the core runs (all
validation happens there) and read back afterwards. Scalars that the core updates are
length-1 arrays. Units: seconds, tokens, blocks, as each name says.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Event kinds.
EV_ARRIVAL = 0  # a request is dispatched to the cluster (payload: request id)
EV_SCHEDULE = 1  # a replica forms its next batch (payload: replica id)
EV_STEP_END = 2  # a replica's step finishes (payload: replica id)

# Request status.
ST_PENDING = 0  # parents not finished yet
ST_DISPATCHING = 1  # ready; its arrival event is scheduled
ST_WAITING = 2  # in a replica's waiting queue
ST_RUNNING = 3
ST_FINISHED = 4
ST_REJECTED = 5

# Rejection reasons.
REJECT_NONE = 0
REJECT_MAX_MODEL_LEN = 1  # prompt + output tokens > max_model_len
REJECT_KV_CAPACITY = 2  # prompt + output would not fit in the whole KV cache
REJECT_PARENT = 3  # a parent request was rejected, so this one can never be built
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
ROUTER_CODES = {
    "round_robin": ROUTE_ROUND_ROBIN,
    "least_outstanding": ROUTE_LEAST_OUTSTANDING,
    "session_affinity": ROUTE_SESSION_AFFINITY,
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


class RequestState(NamedTuple):
    status: np.ndarray  # int64[R]
    reject_reason: np.ndarray  # int64[R]
    pending_parents: np.ndarray  # int64[R]
    parent_failed: np.ndarray  # int64[R]
    replica: np.ndarray  # int64[R], -1 until dispatched
    ready_time: np.ndarray  # float64[R], s: all parents finished (or arrival of a root)
    arrival_time: np.ndarray  # float64[R], s: dispatched to the cluster (ready + wait)
    first_scheduled_time: np.ndarray  # float64[R], s
    first_token_time: np.ndarray  # float64[R], s
    finish_time: np.ndarray  # float64[R], s
    last_token_time: np.ndarray  # float64[R], s
    num_tokens: np.ndarray  # int64[R], prompt + outputs emitted so far
    num_output_done: np.ndarray  # int64[R]
    num_computed: np.ndarray  # int64[R], tokens whose KV is computed (vLLM num_computed_tokens)
    num_cached_tokens: np.ndarray  # int64[R], prefix hit at first scheduling, -1 before
    num_scheduled_tokens: np.ndarray  # int64[R], all tokens ever scheduled (incl. recompute)
    num_preemptions: np.ndarray  # int64[R]
    max_token_gap: np.ndarray  # float64[R], s, largest gap between two tokens
    # block bookkeeping (see kvcache.py)
    table_len: np.ndarray  # int64[R], blocks in the request's block table
    private_blocks: np.ndarray  # int64[R], physical blocks held that are not shared cache
    committed_blocks: np.ndarray  # int64[R], leading full blocks referenced in the cache
    frontier_pos: np.ndarray  # int64[R], index into path_nodes of the node being filled
    frontier_ext: np.ndarray  # int64[R], blocks of that node referenced
    wq_next: np.ndarray  # int64[R], waiting-queue links, -1 = none
    wq_prev: np.ndarray  # int64[R]


class ReplicaState(NamedTuple):
    cost_params: np.ndarray  # float64[n_rep, P], cost-model parameters of each replica
    max_num_batched_tokens: np.ndarray  # int64[n_rep]
    max_num_seqs: np.ndarray  # int64[n_rep]
    max_model_len: np.ndarray  # int64[n_rep]
    state_blocks_per_seq: np.ndarray  # int64[n_rep], blocks for recurrent state (hybrid models)
    running: np.ndarray  # int64[n_rep, max seqs], in admission order
    n_running: np.ndarray  # int64[n_rep]
    wq_head: np.ndarray  # int64[n_rep]
    wq_tail: np.ndarray  # int64[n_rep]
    n_waiting: np.ndarray  # int64[n_rep]
    busy: np.ndarray  # int64[n_rep], 1 while a schedule or step event is pending
    scheduled: np.ndarray  # int64[n_rep, max seqs], requests in the step in flight
    scheduled_new: np.ndarray  # int64[n_rep, max seqs], tokens each computes in it
    n_scheduled: np.ndarray  # int64[n_rep]
    step_start: np.ndarray  # float64[n_rep], s
    # statistics
    num_steps: np.ndarray  # int64[n_rep]
    busy_seconds: np.ndarray  # float64[n_rep]
    prefill_tokens: np.ndarray  # int64[n_rep], tokens computed in chunks of > 1 or first pass
    decode_tokens: np.ndarray  # int64[n_rep]
    num_preemptions: np.ndarray  # int64[n_rep]
    peak_used_blocks: np.ndarray  # int64[n_rep], max of (pool - free queue)
    peak_running: np.ndarray  # int64[n_rep]
    outstanding: np.ndarray  # int64[n_rep], dispatched and not finished


class GlobalState(NamedTuple):
    now: np.ndarray  # float64[1], s
    router: np.ndarray  # int64[1], router policy code
    rr_next: np.ndarray  # int64[1]
    num_done: np.ndarray  # int64[1], finished + rejected
    num_events: np.ndarray  # int64[1]
    error_payload: np.ndarray  # int64[1]
    gap_hist: np.ndarray  # int64[HIST_NUM_BINS], gaps between successive tokens
    new_tokens: np.ndarray  # int64[max seqs], scratch for the cost model
    context_tokens: np.ndarray  # int64[max seqs], scratch for the cost model


def make_request_state(num_requests: int) -> RequestState:
    r = num_requests

    def i64(fill: int = 0) -> np.ndarray:
        return np.full(r, fill, dtype=np.int64)

    def f64() -> np.ndarray:
        return np.full(r, np.nan, dtype=np.float64)

    return RequestState(
        status=i64(), reject_reason=i64(), pending_parents=i64(), parent_failed=i64(),
        replica=i64(-1), ready_time=f64(), arrival_time=f64(), first_scheduled_time=f64(),
        first_token_time=f64(), finish_time=f64(), last_token_time=f64(), num_tokens=i64(),
        num_output_done=i64(), num_computed=i64(), num_cached_tokens=i64(-1),
        num_scheduled_tokens=i64(), num_preemptions=i64(),
        max_token_gap=np.zeros(r, dtype=np.float64), table_len=i64(), private_blocks=i64(),
        committed_blocks=i64(), frontier_pos=i64(), frontier_ext=i64(), wq_next=i64(-1),
        wq_prev=i64(-1),
    )


def make_replica_state(
    cost_params: np.ndarray,
    max_num_batched_tokens: np.ndarray,
    max_num_seqs: np.ndarray,
    max_model_len: np.ndarray,
    state_blocks_per_seq: np.ndarray,
) -> ReplicaState:
    n = int(cost_params.shape[0])
    width = int(max_num_seqs.max())

    def i64() -> np.ndarray:
        return np.zeros(n, dtype=np.int64)

    return ReplicaState(
        cost_params=np.ascontiguousarray(cost_params, dtype=np.float64),
        max_num_batched_tokens=max_num_batched_tokens.astype(np.int64),
        max_num_seqs=max_num_seqs.astype(np.int64),
        max_model_len=max_model_len.astype(np.int64),
        state_blocks_per_seq=state_blocks_per_seq.astype(np.int64),
        running=np.full((n, width), -1, dtype=np.int64), n_running=i64(),
        wq_head=np.full(n, -1, dtype=np.int64), wq_tail=np.full(n, -1, dtype=np.int64),
        n_waiting=i64(), busy=i64(),
        scheduled=np.full((n, width), -1, dtype=np.int64),
        scheduled_new=np.zeros((n, width), dtype=np.int64), n_scheduled=i64(),
        step_start=np.zeros(n, dtype=np.float64), num_steps=i64(),
        busy_seconds=np.zeros(n, dtype=np.float64), prefill_tokens=i64(), decode_tokens=i64(),
        num_preemptions=i64(), peak_used_blocks=i64(), peak_running=i64(), outstanding=i64(),
    )


def make_global_state(router: int, max_num_seqs: int) -> GlobalState:
    return GlobalState(
        now=np.zeros(1, dtype=np.float64),
        router=np.array([router], dtype=np.int64),
        rr_next=np.zeros(1, dtype=np.int64),
        num_done=np.zeros(1, dtype=np.int64),
        num_events=np.zeros(1, dtype=np.int64),
        error_payload=np.zeros(1, dtype=np.int64),
        gap_hist=np.zeros(HIST_NUM_BINS, dtype=np.int64),
        new_tokens=np.zeros(max_num_seqs, dtype=np.int64),
        context_tokens=np.zeros(max_num_seqs, dtype=np.int64),
    )


def hist_bin_edges() -> np.ndarray:
    """Edges (seconds) of the regular bins; bin 0 is underflow, the last is overflow."""
    n = HIST_BINS_PER_DECADE * HIST_DECADES
    return HIST_MIN_SECONDS * 10.0 ** (np.arange(n + 1) / HIST_BINS_PER_DECADE)
