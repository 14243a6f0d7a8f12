"""Conservation invariants, checked after a run (``servesim run --check``) and by the tests.

* every request finished or was rejected with a reason; finished ones emitted exactly their
  output tokens;
* tokens are conserved: a request never preempted scheduled exactly
  ``prompt - cached + output - 1`` tokens (each output token but the last is fed back once),
  plus the draft tokens it verified and rejected;
* times are ordered: ready <= arrival <= scheduled <= first token <= finish;
* children are dispatched exactly ``wait_after_ready`` after their last parent finished;
* KV blocks are conserved: at the end every block is back in the free queue, and during a run
  ``free + referenced + private == pool`` (:func:`check_kv`); a host tier never holds more than
  its capacity and its LRU ring lists exactly the nodes with host blocks;
* reference counts are what the requests say (with the workload): each node's count of requests
  that reference all of it, of those whose frontier is in it, and their largest extent, are
  recomputed from every referencing request's own path and frontier (:func:`check_references`).
"""

from __future__ import annotations

import numpy as np

from simulator.core.kvcache import (
    EN_HI,
    EN_LO,
    EN_NODE,
    HN_RES,
    HN_SLOT,
    KN_FULL,
    KN_PART,
    KN_PMAX,
    KN_RES,
    KS_BLOCKS,
    KS_CACHING,
    KS_FREE,
    KS_HBLOCKS,
    KS_HEAD,
    KS_HUSED,
    KS_TAIL,
    NB_NUM,
    KVState,
)
from simulator.core.state import (
    RQ_DECODE_REPLICA,
    RQ_FEXT,
    RQ_FPOS,
    RQ_PINNED,
    RQ_PREFILL_REPLICA,
    RQ_PRIVATE,
    RQ_PRIVATE_P,
    RQ_REPLICA,
    RQ_STATUS,
    RQ_XFER_START,
    ST_LOADING,
    ST_RUNNING,
    ST_TRANSFERRING,
)


class InvariantError(AssertionError):
    """A conservation invariant failed during a run (a simulator bug, never a user error)."""


def check_result(result) -> list[str]:
    """Return a list of violated invariants (empty when all hold)."""
    problems: list[str] = []
    df = result.requests
    unfinished = df[df["status"] == "unfinished"]
    if len(unfinished):
        problems.append(f"{len(unfinished)} requests neither finished nor rejected "
                        f"(first: {int(unfinished['request_id'].iloc[0])})")
    rej = df[df["status"] == "rejected"]
    if (rej["reject_reason"] == "").any():
        problems.append("a rejected request has no reason")
    fin = df[df["status"] == "finished"]
    wl_out = fin["output_tokens"].to_numpy()
    expected_out = result_expected_outputs(result, fin)
    bad = np.flatnonzero(wl_out != expected_out)
    if bad.size:
        problems.append(f"request {int(fin['request_id'].iloc[bad[0]])} emitted {wl_out[bad[0]]} "
                        f"tokens, expected {expected_out[bad[0]]}")
    clean = fin[fin["preemptions"] == 0]
    rejected_drafts = clean["spec_proposed"] - clean["spec_accepted"]
    expect = (clean["prompt_tokens"] - clean["cached_tokens"] + clean["output_tokens"] - 1
              + rejected_drafts)
    bad = np.flatnonzero(clean["scheduled_tokens"].to_numpy() != expect.to_numpy())
    if bad.size:
        row = clean.iloc[bad[0]]
        problems.append(f"request {int(row['request_id'])}: scheduled {int(row['scheduled_tokens'])}"
                        f" tokens, expected {int(expect.iloc[bad[0]])}")
    seq = ["ready_time", "arrival_time", "scheduled_time", "first_token_time", "finish_time"]
    for a, b in zip(seq, seq[1:], strict=False):
        bad = np.flatnonzero(fin[a].to_numpy() > fin[b].to_numpy())
        if bad.size:
            problems.append(f"request {int(fin['request_id'].iloc[bad[0]])}: {a} > {b}")
    free_end = result.replicas["free_blocks_at_end"].to_numpy()
    pool = result.replicas["num_blocks"].to_numpy()
    bad = np.flatnonzero(free_end != pool)
    if bad.size:
        problems.append(f"replica {bad[0]}: {pool[bad[0]] - free_end[bad[0]]} blocks still held at "
                        "the end")
    return problems


def result_expected_outputs(result, fin) -> np.ndarray:
    return result.expected_output_tokens[fin["request_id"].to_numpy()]


def check_references(kv: KVState, q, wl) -> list[str]:
    """Each node's reference counts (``KN_FULL``, ``KN_PART``, ``KN_PMAX``) recomputed from the
    requests that hold references: running or loading ones on their replica, finished ones a
    session TTL protects, and a request whose KV is moving on its prefill replica and, once the
    move started, on its decode replica. A request references every node of its path before its
    frontier (``RQ_FPOS``) in full and ``RQ_FEXT`` blocks of the frontier node."""
    problems: list[str] = []
    n_rep, n_nodes = kv.kvn.shape[0], kv.kvn.shape[1]
    full = np.zeros((n_rep, n_nodes), dtype=np.int64)
    part = np.zeros((n_rep, n_nodes), dtype=np.int64)
    pmax = np.zeros((n_rep, n_nodes), dtype=np.int64)
    rqi, rqf = q.rqi, q.rqf
    status = rqi[:, RQ_STATUS]
    active = np.flatnonzero((status == ST_RUNNING) | (status == ST_LOADING)
                            | (status == ST_TRANSFERRING) | (rqi[:, RQ_PINNED] == 1))
    for r in active:
        reps = [int(rqi[r, RQ_REPLICA])]
        if status[r] == ST_TRANSFERRING:
            reps = [int(rqi[r, RQ_PREFILL_REPLICA])]
            if not np.isnan(rqf[r, RQ_XFER_START]):
                reps.append(int(rqi[r, RQ_DECODE_REPLICA]))
        start, fpos, fext = int(wl.req_path_start[r]), int(rqi[r, RQ_FPOS]), int(rqi[r, RQ_FEXT])
        for rep in reps:
            if kv.kvs[rep, KS_CACHING] != 1:
                continue
            for j in range(start, fpos):
                full[rep, wl.path_nodes[j]] += 1
            c = wl.path_nodes[fpos]
            part[rep, c] += 1
            pmax[rep, c] = max(pmax[rep, c], fext)
    for name, col, want in (("full", KN_FULL, full), ("partial", KN_PART, part),
                            ("largest partial extent", KN_PMAX, pmax)):
        bad = np.argwhere(kv.kvn[:, :, col] != want)
        if bad.size:
            rep, c = (int(x) for x in bad[0])
            problems.append(f"replica {rep}: node {c} records {int(kv.kvn[rep, c, col])} as its "
                            f"{name} references, its requests say {int(want[rep, c])}")
    return problems


def check_kv(kv: KVState, q, wl=None) -> list[str]:
    """Block conservation and free-queue consistency at an arbitrary point of a run.

    For every replica: free-queue blocks + blocks referenced by running requests + private
    blocks of requests == pool size; each node's queued runs cover exactly its cached but
    unreferenced blocks; reference counts are never negative. With the workload ``wl``, also
    :func:`check_references`.
    """
    problems: list[str] = []
    if wl is not None:
        problems += check_references(kv, q, wl)
    n_rep = kv.kvs.shape[0]
    cap = kv.ent.shape[1]
    nb = kv.node_blocks[:, NB_NUM]
    for rep in range(n_rep):
        kvn = kv.kvn[rep]
        res = kvn[:, KN_RES]
        maxext = np.where(kvn[:, KN_FULL] > 0, nb, kvn[:, KN_PMAX])
        if np.any(kvn[:, KN_FULL] < 0) or np.any(kvn[:, KN_PART] < 0):
            problems.append(f"replica {rep}: negative reference count")
        if np.any(maxext > res):
            c = int(np.flatnonzero(maxext > res)[0])
            problems.append(f"replica {rep}: node {c} references {maxext[c]} blocks but only "
                            f"{res[c]} are cached")
        if np.any(res > nb) or np.any(res < 0):
            problems.append(f"replica {rep}: cached block count out of range")
        # a request whose KV is moving holds private blocks on both sides: RQ_PRIVATE on its
        # decode replica, RQ_PRIVATE_P on its prefill replica
        rqi = q.rqi
        owner = np.where(rqi[:, RQ_STATUS] == ST_TRANSFERRING, rqi[:, RQ_DECODE_REPLICA],
                         rqi[:, RQ_REPLICA])
        private = int(rqi[owner == rep, RQ_PRIVATE].sum())
        private += int(rqi[rqi[:, RQ_PREFILL_REPLICA] == rep, RQ_PRIVATE_P].sum())
        free = int(kv.kvs[rep, KS_FREE])
        pool = int(kv.kvs[rep, KS_BLOCKS])
        total = free + int(maxext.sum()) + private
        if total != pool:
            problems.append(f"replica {rep}: free {free} + referenced {int(maxext.sum())} + "
                            f"private {private} = {total} != pool {pool}")
        queued = np.zeros_like(res)
        anon = 0
        for e in range(int(kv.kvs[rep, KS_HEAD]), int(kv.kvs[rep, KS_TAIL])):
            row = kv.ent[rep, e % cap]
            count = int(row[EN_HI] - row[EN_LO])
            if count <= 0:
                continue
            if row[EN_NODE] < 0:
                anon += count
            else:
                queued[row[EN_NODE]] += count
        if anon + int(queued.sum()) != free:
            problems.append(f"replica {rep}: free-queue runs hold {anon + int(queued.sum())} "
                            f"blocks, counter says {free}")
        bad = np.flatnonzero(queued != res - maxext)
        if bad.size:
            c = int(bad[0])
            problems.append(f"replica {rep}: node {c} has {queued[c]} queued blocks, expected "
                            f"{int(res[c] - maxext[c])} (cached - referenced)")
        if kv.kvs[rep, KS_HBLOCKS] > 0:
            hres = kv.host[rep, :, HN_RES]
            used = int(kv.kvs[rep, KS_HUSED])
            if used != int(hres.sum()) or used > int(kv.kvs[rep, KS_HBLOCKS]):
                problems.append(f"replica {rep}: host tier holds {int(hres.sum())} blocks, "
                                f"counter says {used}, capacity {int(kv.kvs[rep, KS_HBLOCKS])}")
            if np.any(hres > nb) or np.any(hres < 0):
                problems.append(f"replica {rep}: host block count out of range")
            live = kv.hent[rep][kv.hent[rep] >= 0]
            listed = np.flatnonzero(hres > 0)
            if live.size != np.unique(live).size or not np.array_equal(np.sort(live), listed):
                problems.append(f"replica {rep}: host LRU ring lists nodes {np.sort(live)[:5]}... "
                                f"but nodes {listed[:5]}... hold host blocks")
            if np.any(kv.host[rep, listed, HN_SLOT] < 0):
                problems.append(f"replica {rep}: a node with host blocks has no ring entry")
    return problems
