"""Differential tests: the Numba core against the SimPy reference model (simulator/reference/).

For random small scenarios (see test_reference_scenarios.py) both must agree on every request
(status, reason, replica, cached tokens, preemptions, tokens; ready / arrival / scheduled /
first-token / finish times and largest token gap to 1e-9 relative), on every replica counter
(steps, prefill and decode tokens, preemptions, peak blocks, evicted blocks, free blocks at the
end) and on the step log (every step's start, end, batch and blocks in use).

CI runs a few hundred scenarios; ``pytest --many`` (or SERVESIM_MANY=1) runs tens of thousands.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, reject, settings
from test_reference_scenarios import MANY, Scenario, scenarios

from simulator.config import ExperimentError, parse_experiment
from simulator.invariants import check_result
from simulator.reference import run_reference, simulate_reference
from simulator.reference.builder import WorkloadBuilder
from simulator.simulate import simulate

MAX_EXAMPLES = 20_000 if MANY else 300
MAX_TIER_EXAMPLES = 5_000 if MANY else 80
MAX_TTL_EXAMPLES = 3_000 if MANY else 60
MAX_DISAGG_EXAMPLES = 5_000 if MANY else 50
MAX_SPEC_EXAMPLES = 5_000 if MANY else 50
RTOL = 1e-9

EXACT_REQUEST_COLUMNS = [
    "status",
    "reject_reason",
    "replica",
    "cached_tokens",
    "preemptions",
    "output_tokens",
    "scheduled_tokens",
    "computed_prompt_tokens",
    "host_cached_tokens",
    "prefill_replica",
    "decode_replica",
    "chunks",
    "spec_proposed",
    "spec_accepted",
]
TIME_REQUEST_COLUMNS = [
    "ready_time",
    "arrival_time",
    "scheduled_time",
    "first_token_time",
    "finish_time",
    "max_tbt",
    "host_load_time",
    "kv_transfer_bytes",
    "kv_wait",
    "kv_transfer_time",
]
EXACT_REPLICA_COLUMNS = [
    "num_steps",
    "prefill_tokens",
    "decode_tokens",
    "preemptions",
    "peak_used_blocks",
    "peak_running",
    "evicted_blocks",
    "free_blocks_at_end",
    "host_capacity_blocks",
    "host_loads",
    "host_load_blocks",
    "host_stored_blocks",
    "host_evicted_blocks",
    "host_peak_blocks",
    "pins",
    "pins_broken",
    "prefetches",
    "prefetch_blocks",
    "kv_transfers_in",
    "spec_proposed",
    "spec_accepted",
    "spec_verifies",
]
EXACT_STEP_COLUMNS = [
    "replica",
    "num_seqs",
    "num_decodes",
    "prefill_tokens",
    "used_blocks",
    "num_waiting",
]


def _close(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    with np.errstate(invalid="ignore"):
        near = np.abs(a - b) <= RTOL * np.maximum(np.abs(a), np.abs(b))
    return both_nan | near


def compare(core, ref, limit: int = 8) -> list[str]:
    """Differences between a core :class:`Result` and a :class:`ReferenceResult`."""
    problems: list[str] = []
    a, b = core.requests, ref.requests
    if len(a) != len(b):
        return [f"{len(a)} core requests, {len(b)} reference requests"]
    for col in EXACT_REQUEST_COLUMNS:
        x, y = a[col].astype(object).to_numpy(), b[col].astype(object).to_numpy()
        for r in np.flatnonzero(x != y)[:limit]:
            problems.append(f"request {r}: {col} core={x[r]!r} reference={y[r]!r}")
    for col in TIME_REQUEST_COLUMNS:
        x, y = a[col].to_numpy(), b[col].to_numpy()
        for r in np.flatnonzero(~_close(x, y))[:limit]:
            problems.append(f"request {r}: {col} core={x[r]!r} reference={y[r]!r}")
    for col in EXACT_REPLICA_COLUMNS:
        x, y = core.replicas[col].to_numpy(), ref.replicas[col].to_numpy()
        for k in np.flatnonzero(x != y):
            problems.append(f"replica {k}: {col} core={x[k]} reference={y[k]}")
    if "routed_requests" in core.replicas.columns:
        x, y = core.replicas["routed_requests"].to_numpy(), ref.replicas["routed_requests"]
        for k in np.flatnonzero(x != y.to_numpy()):
            problems.append(f"replica {k}: routed_requests core={x[k]} reference={y[k]}")
    for col in (
        "busy_seconds",
        "h2d_busy_seconds",
        "kv_transfer_bytes_in",
        "kv_link_busy_seconds",
        "draft_seconds",
    ):
        x, y = core.replicas[col].to_numpy(), ref.replicas[col].to_numpy()
        for k in np.flatnonzero(~_close(x, y)):
            problems.append(f"replica {k}: {col} core={x[k]!r} reference={y[k]!r}")
    if core.steps is not None:
        sa, sb = core.steps, ref.steps
        n = min(len(sa), len(sb))
        if len(sa) != len(sb):
            problems.append(f"{len(sa)} core steps, {len(sb)} reference steps")
        bad = np.zeros(n, dtype=bool)
        for col in EXACT_STEP_COLUMNS:
            bad |= sa[col].to_numpy()[:n] != sb[col].to_numpy()[:n]
        for col in ("start", "end"):
            bad |= ~_close(sa[col].to_numpy()[:n], sb[col].to_numpy()[:n])
        for i in np.flatnonzero(bad)[:3]:
            problems.append(
                f"step {i}: core {sa.iloc[i].to_dict()} reference {sb.iloc[i].to_dict()}"
            )
    for rep in ref.cluster.replicas:
        problems += [f"reference replica {rep.index}: {p}" for p in rep.pool.check()]
    return problems


def run_both(sc: Scenario):
    exp = parse_experiment(sc.experiment)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN metrics of rejected requests
        try:
            core = simulate(exp, workload=sc.workload, progress=False)
        except ExperimentError as exc:
            # a decode pool too small for the longest transferred prompt is refused before the
            # run (simulate.check_decode_capacity): not a scenario the two models can compare
            if "can never hold" not in str(exc):
                raise
            reject()
    return core, run_reference(exp, sc.workload)


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=not MANY,  # CI: the same examples every run; --many explores new ones
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios())
def test_core_agrees_with_reference(sc: Scenario):
    assert_agrees(sc)


def assert_agrees(sc: Scenario) -> None:
    """Core and reference give the same times and counters; the core's invariants hold."""
    core, ref = run_both(sc)
    problems = compare(core, ref)
    assert not problems, "\n".join(problems) + "\n" + sc.describe()
    assert check_result(core) == []


@settings(
    max_examples=MAX_TIER_EXAMPLES,
    deadline=None,
    derandomize=not MANY,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios(with_tiers=True, policies=("offload_prefetch", "lru")))
def test_core_agrees_with_reference_with_host_tier_and_prefetch(sc: Scenario):
    """The same, with small host KV tiers (LRU retention, or offload-and-prefetch) on the
    replicas with prefix caching, and tool waits long enough to prefetch."""
    assert_agrees(sc)


@settings(
    max_examples=MAX_TTL_EXAMPLES,
    deadline=None,
    derandomize=not MANY,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios(with_tiers=True, policies=("session_ttl",)))
def test_core_agrees_with_reference_with_session_ttl(sc: Scenario):
    """The same with session-TTL retention (protections that expire, break under pressure or
    end when a child is admitted), with or without a host tier."""
    assert_agrees(sc)


@settings(
    max_examples=MAX_DISAGG_EXAMPLES,
    deadline=None,
    derandomize=not MANY,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios(disaggregated=True))
def test_core_agrees_with_reference_disaggregated(sc: Scenario):
    """The same with prefill and decode pools: routing over both pools, conditional (local)
    prefill, hand-offs, block allocation and serialised KV moves on the decode side."""
    assert_agrees(sc)


@settings(
    max_examples=MAX_SPEC_EXAMPLES,
    deadline=None,
    derandomize=not MANY,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios(speculative=True))
def test_core_agrees_with_reference_speculative(sc: Scenario):
    """The same with speculative decoding on most replicas: drafts in the budget and the
    blocks, draft passes in the step time, per-request acceptance, rollback, chunks."""
    assert_agrees(sc)


# ----------------------------------------------------------------------------------------------
# hand-built scenarios: each pins one rule on both sides and checks a known outcome


def scenario(
    builder: WorkloadBuilder, router: str = "round_robin", replicas: int = 1, **engine
) -> Scenario:
    eng = {"max_num_batched_tokens": 2048, "max_num_seqs": 8, "num_gpu_blocks_override": 64}
    eng |= engine
    return Scenario(
        {
            "model": "llama-3.1-8b",
            "hardware": "h100-sxm",
            "engine": eng,
            "cluster": {"replicas": [{"count": replicas}], "router": router},
            "workload": {
                "kind": "requests",
                "num_requests": 1,
                "arrival": {"process": "burst"},
                "prompt_tokens": 10,
                "output_tokens": 2,
            },
            "outputs": {"step_log": True},
        },
        builder.build(),
    )


def agree(sc: Scenario):
    core, ref = run_both(sc)
    problems = compare(core, ref)
    assert not problems, "\n".join(problems) + "\n" + sc.describe()
    return core, ref


def test_blocks_are_committed_when_scheduled():
    """Two identical 40-token prompts admitted in one step: the first commits its two full
    blocks when it is scheduled, so the second hits them (capped at 39 tokens = 2 blocks);
    a later third request hits them too."""
    b = WorkloadBuilder()
    node = b.node(None, 64)
    b.request([node], 40, 4)
    b.request([node], 40, 4)
    b.request([node], 40, 4, arrival=1.0)
    core, ref = agree(scenario(b))
    cached = ref.requests["cached_tokens"].tolist()
    assert cached == [0, 32, 32]
    assert (ref.requests["status"] == "finished").all()


def test_last_token_recompute_references_the_cached_copy():
    """A 32-token prompt seen before: the hit is capped at 31 tokens (1 block); recomputing
    block 1 finds it cached, so the request references that copy and frees its own."""
    b = WorkloadBuilder()
    node = b.node(None, 40)
    b.request([node], 32, 1)
    b.request([node], 32, 1, arrival=1.0)
    core, ref = agree(scenario(b))
    assert ref.requests["cached_tokens"].tolist() == [0, 16]
    # during request 1's step: the hit block + the cached copy of block 1 (its own copy freed)
    last = ref.steps.iloc[-1]
    assert last["used_blocks"] == 2
    pool = ref.cluster.replicas[0].pool
    assert pool.num_free == pool.num_blocks and len(pool.cached) == 2  # one copy of each


def test_preemption_recomputes_with_prefix_hits():
    """A pool too small for two growing requests: the later one is preempted, returns to the
    head of the waiting queue and re-admits with hits on its own freed blocks."""
    b = WorkloadBuilder()
    b.request([b.node(None, 100)], 32, 40)
    b.request([b.node(None, 100)], 32, 40)
    core, ref = agree(scenario(b, num_gpu_blocks_override=8))
    df = ref.requests
    assert df["preemptions"].tolist() == [0, 1]
    assert (df["status"] == "finished").all()
    assert df["scheduled_tokens"].iloc[1] > 32 + 40 - 1  # recomputed some tokens


def test_rejections_propagate_to_children():
    """max_model_len rejects request 0; its child is rejected for its parent at its own
    arrival time (ready = the parent's rejection, plus its wait)."""
    b = WorkloadBuilder()
    trunk = b.node(None, 90)
    r0 = b.request([trunk], 60, 30, arrival=0.5)
    b.request([trunk, b.node(trunk, 10)], 95, 5, wait=0.25, parents=[r0])
    core, ref = agree(scenario(b, max_model_len=80))
    df = ref.requests
    assert df["status"].tolist() == ["rejected", "rejected"]
    assert "max_model_len" in df["reject_reason"].iloc[0]
    assert "parent" in df["reject_reason"].iloc[1]
    assert df["arrival_time"].iloc[1] == pytest.approx(0.75)


@pytest.mark.parametrize("router", ["round_robin", "least_outstanding", "session_affinity"])
def test_routers(router):
    """Five requests at t = 0 over three replicas, sessions 0, 1, 1, 2, 0."""
    b = WorkloadBuilder()
    for s in (0, 1, 1, 2, 0):
        b.request([b.node(None, 30)], 20, 5 + s, session=s)
    core, ref = agree(scenario(b, router=router, replicas=3))
    rep = ref.requests["replica"].tolist()
    if router == "round_robin":
        assert rep == [0, 1, 2, 0, 1]
    elif router == "least_outstanding":
        assert sorted(np.bincount(rep, minlength=3).tolist()) == [1, 2, 2]
    else:  # sticky sessions; a new session goes to the least-loaded replica
        assert rep[2] == rep[1] and rep[4] == rep[0]
        assert len({rep[0], rep[1], rep[3]}) == 3


def test_children_dispatch_after_their_last_parent_plus_wait():
    b = WorkloadBuilder()
    a = b.request([b.node(None, 30)], 20, 3)
    c = b.request([b.node(None, 30)], 20, 9)
    b.request([b.node(None, 30)], 20, 3, wait=0.125, parents=[a, c])
    core, ref = agree(scenario(b))
    df = ref.requests
    assert df["ready_time"].iloc[2] == df["finish_time"].iloc[:2].max()
    assert df["arrival_time"].iloc[2] == df["ready_time"].iloc[2] + 0.125


def test_simulate_reference_returns_the_request_columns():
    b = WorkloadBuilder()
    b.request([b.node(None, 30)], 20, 3)
    sc = scenario(b)
    df = simulate_reference(parse_experiment(sc.experiment), sc.workload)
    core, _ = run_both(sc)
    assert list(df.columns) == [c for c in core.requests.columns if c in df.columns]
    assert {
        "request_id",
        "replica",
        "status",
        "ready_time",
        "first_token_time",
        "finish_time",
        "cached_tokens",
        "preemptions",
    } <= set(df.columns)
    assert isinstance(df.attrs["replicas"], pd.DataFrame)
    assert df.attrs["replicas"]["evicted_blocks"].tolist() == [0]
    assert math.isclose(
        df["finish_time"].iloc[0], core.requests["finish_time"].iloc[0], rel_tol=RTOL
    )


def test_lone_self_preemption_does_not_deadlock():
    """A recomputed block that is cached already must not cost a second block: a request that
    needs the whole pool runs to the end (this used to preempt itself and stall)."""
    b = WorkloadBuilder()
    node = b.node(None, 48)
    b.request([node], 32, 1)  # caches blocks 0 and 1
    b.request([node], 32, 9, arrival=1.0)  # 41 tokens: 3 blocks, the whole pool
    core, ref = agree(scenario(b, num_gpu_blocks_override=3))
    assert (core.requests["status"] == "finished").all()
    assert core.requests["preemptions"].tolist() == [0, 0]
    assert core.requests["cached_tokens"].tolist() == [0, 16]


# ----------------------------------------------------------------------------------------------
# host tier and retention policies, by hand


def tier_scenario(builder: WorkloadBuilder, host_blocks: int = 0, **engine) -> Scenario:
    """:func:`scenario` with a host tier of ``host_blocks`` Llama-3.1-8B blocks (16 tokens)."""
    if host_blocks:
        engine["kv_host_tier"] = {"capacity_gb": host_blocks * 16 * 131072 / 1e9}
    return scenario(builder, **engine)


def test_session_ttl_admitted_child_keeps_the_blocks_it_shares_with_its_parent():
    """Request 0 computes 49 tokens of a 100-token node: 3 committed blocks, kept referenced
    (session TTL) while its child waits 0.1 s. The child hits those 3 blocks and allocates 1;
    admitting it ends the parent's protection, but the child still references the 3 blocks:
    4 blocks are in use during its steps, none of the shared ones is free."""
    b = WorkloadBuilder()
    node = b.node(None, 100)
    parent = b.request([node], 40, 10)
    b.request([node], 60, 4, parents=[parent], wait=0.1)
    sc = scenario(b, retention={"policy": "session_ttl", "ttl_s": 60.0})
    core, ref = run_both(sc)
    child_steps = core.steps[core.steps["start"] >= core.requests["scheduled_time"].iloc[1]]
    assert child_steps["used_blocks"].tolist() == [4] * len(child_steps)
    assert ref.requests["cached_tokens"].tolist() == [0, 48]
    problems = compare(core, ref)
    assert not problems, "\n".join(problems)


def _evicted_session(policy: str = "lru", wait: float = 1.0) -> WorkloadBuilder:
    """Turn 0 of a session computes 65 tokens of node A (4 full blocks) on an 8-block pool; an
    unrelated 114-token request at t = 0.3 needs all 8 blocks, evicting A's 4 to the host;
    turn 1 (100-token prompt) comes ``wait`` s after turn 0."""
    b = WorkloadBuilder()
    a = b.node(None, 200)
    first = b.request([a], 64, 2)
    b.request([b.node(None, 120)], 112, 2, arrival=0.3)
    b.request([a], 100, 2, parents=[first], wait=wait)
    return b


def test_host_tier_load_delays_only_its_request():
    """Turn 1 finds A's 4 blocks only in the host: it is admitted at its arrival, waits for a
    4-block PCIe copy at the default 45.3 GB/s, then computes the other 36 prompt tokens."""
    b = _evicted_session()
    core, ref = agree(tier_scenario(b, host_blocks=20, num_gpu_blocks_override=8))
    row = ref.requests.iloc[2]
    assert row["cached_tokens"] == 64 and row["host_cached_tokens"] == 64
    assert row["scheduled_time"] == row["arrival_time"]
    assert row["host_load_time"] == pytest.approx(4 * 16 * 131072 / 45.3e9, rel=1e-12)
    rep = ref.replicas.iloc[0]
    assert (rep["host_loads"], rep["host_load_blocks"]) == (1, 4)
    assert rep["host_stored_blocks"] == 4 + 7  # A's blocks, then the flood's, evicted by turn 1


def test_host_tier_is_lru_over_nodes():
    """A 2-block host tier: evicting A's 4 blocks stores them and keeps A's first 2 (a node
    shrinks from its last block); the flood's own blocks, evicted later by nothing, never go."""
    b = _evicted_session()
    core, ref = agree(tier_scenario(b, host_blocks=2, num_gpu_blocks_override=8))
    assert ref.requests["host_cached_tokens"].iloc[2] == 32
    host = ref.cluster.replicas[0].host
    assert host.num_used <= 2 and host.num_evicted >= 2


def test_offload_prefetch_brings_the_session_back_before_its_next_turn():
    """Offload-and-prefetch: turn 0's 4 blocks go to the host when it finishes; the flood
    evicts them from the GPU; the prefetch copies them back before turn 1 arrives, which then
    hits them on the GPU (no load)."""
    b = _evicted_session()
    core, ref = agree(
        tier_scenario(
            b, host_blocks=20, num_gpu_blocks_override=8,
            retention={"policy": "offload_prefetch"},
        )
    )
    row = ref.requests.iloc[2]
    assert row["cached_tokens"] == 64 and row["host_cached_tokens"] == 0
    rep = ref.replicas.iloc[0]
    assert (rep["prefetches"], rep["prefetch_blocks"]) == (1, 4)


def test_session_ttl_pin_expires_or_breaks():
    """Session TTL on the same scenario: a 60 s pin keeps A's blocks, so the 8-block flood
    breaks it (the pool cannot hold both); a 1 ms pin has expired before the flood."""
    for ttl, broken in ((60.0, 1), (0.001, 0)):
        b = _evicted_session()
        core, ref = agree(
            tier_scenario(
                b, num_gpu_blocks_override=8,
                retention={"policy": "session_ttl", "ttl_s": ttl},
            )
        )
        rep = ref.replicas.iloc[0]
        assert (rep["pins"], rep["pins_broken"]) == (1, broken)


def test_disaggregated_hand_off_and_serialised_link():
    """Two requests prefilled together on the prefill replica: both KV moves use the decode
    replica's link one after the other, so the second waits for the first."""
    b = WorkloadBuilder()
    b.request([b.node(None, 200)], 160, 3)
    b.request([b.node(None, 200)], 160, 3)
    sc = scenario(b)
    sc.experiment["cluster"] = {
        "replicas": [{"count": 1, "role": "prefill"}, {"count": 1, "role": "decode"}],
        "disaggregation": {"link": {"bandwidth_gb_per_s": 1.0, "latency_s": 0.001}},
    }
    core, ref = agree(sc)
    df = ref.requests
    assert df["prefill_replica"].tolist() == [0, 0] and df["replica"].tolist() == [1, 1]
    move = 160 * 131072 / 1e9
    assert df["kv_transfer_time"].tolist() == pytest.approx([move + 0.001] * 2, rel=1e-12)
    assert df["kv_wait"].tolist() == pytest.approx([0.0, move], rel=1e-9, abs=1e-15)
