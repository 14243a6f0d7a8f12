"""Conservation invariants, checked after a run (``servesim run --check``) and by the tests.

* every request finished or was rejected with a reason; finished ones emitted exactly their
  output tokens;
* tokens are conserved: a request never preempted scheduled exactly
  ``prompt - cached + output - 1`` tokens (each output token but the last is fed back once);
* times are ordered: ready <= arrival <= scheduled <= first token <= finish;
* children are dispatched exactly ``wait_after_ready`` after their last parent finished;
* KV blocks are conserved: at the end every block is back in the free queue, and during a run
  ``free + referenced + private == pool`` (:func:`check_kv`).
"""

from __future__ import annotations

import numpy as np

from simulator.core.kvcache import KVState


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
    expect = clean["prompt_tokens"] - clean["cached_tokens"] + clean["output_tokens"] - 1
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


def check_kv(kv: KVState, rq, num_replicas: int | None = None) -> list[str]:
    """Block conservation and free-queue consistency at an arbitrary point of a run."""
    problems: list[str] = []
    n_rep = kv.num_blocks.shape[0] if num_replicas is None else num_replicas
    cap = kv.ent_node.shape[1]
    for rep in range(n_rep):
        nb = kv.node_num_blocks
        maxext = np.where(kv.full_refs[rep] > 0, nb, kv.part_max[rep])
        if np.any(kv.full_refs[rep] < 0) or np.any(kv.part_refs[rep] < 0):
            problems.append(f"replica {rep}: negative reference count")
        if np.any(maxext > kv.resident[rep]):
            c = int(np.flatnonzero(maxext > kv.resident[rep])[0])
            problems.append(f"replica {rep}: node {c} references {maxext[c]} blocks but only "
                            f"{kv.resident[rep, c]} are cached")
        if np.any(kv.resident[rep] > nb) or np.any(kv.resident[rep] < 0):
            problems.append(f"replica {rep}: cached block count out of range")
        private = int(rq.private_blocks[rq.replica == rep].sum())
        total = int(kv.num_free[rep]) + int(maxext.sum()) + private
        if total != int(kv.num_blocks[rep]):
            problems.append(f"replica {rep}: free {int(kv.num_free[rep])} + referenced "
                            f"{int(maxext.sum())} + private {private} = {total} != pool "
                            f"{int(kv.num_blocks[rep])}")
        queued = np.zeros_like(kv.resident[rep])
        anon = 0
        for e in range(int(kv.fifo_head[rep]), int(kv.fifo_tail[rep])):
            s = e % cap
            count = int(kv.ent_hi[rep, s] - kv.ent_lo[rep, s])
            if count <= 0:
                continue
            node = int(kv.ent_node[rep, s])
            if node < 0:
                anon += count
            else:
                queued[node] += count
        if anon + int(queued.sum()) != int(kv.num_free[rep]):
            problems.append(f"replica {rep}: free-queue runs hold {anon + int(queued.sum())} "
                            f"blocks, counter says {int(kv.num_free[rep])}")
        bad = np.flatnonzero(queued != kv.resident[rep] - maxext)
        if bad.size:
            c = int(bad[0])
            problems.append(f"replica {rep}: node {c} has {queued[c]} queued blocks, expected "
                            f"{int(kv.resident[rep, c] - maxext[c])} (cached - referenced)")
    return problems
