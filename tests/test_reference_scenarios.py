"""Random small scenarios (experiment + hand-built workload) for the differential tests.

``scenarios()`` is a hypothesis strategy; ``scenarios(tiers=True)`` adds, on replicas with
prefix caching, a small host KV tier (a few blocks, so it evicts; slow or fast PCIe) and a
retention policy (session TTL from 1 ms to 60 s, offload-and-prefetch with margins), with tool
waits up to a few seconds so that protections expire and prefetches run. A scenario has 1-3
replicas (possibly in groups with
different engines), each router, tiny KV pools (eviction, preemption, capacity rejections),
small ``max_num_seqs`` / ``max_num_batched_tokens`` (chunked prefill), caching on or off, and a
workload built on a content tree: shared scaffolds, lone requests, requests whose prompts end
inside a shared node (identical prompts: the duplicate-block rule), linear sessions, fan-outs
with joins, and a few extra dependency edges. Times are drawn from a small set so that events
often coincide (ties are where event order matters).

The tests here check the generator itself: it builds valid workloads and the scenarios reach
the features they are meant to (otherwise the differential test would prove little).
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from simulator.config import ExperimentError, parse_experiment
from simulator.reference.builder import WorkloadBuilder
from simulator.simulate import plan_replicas, simulate
from simulator.workload.compiled import CompiledWorkload

MANY = os.environ.get("SERVESIM_MANY", "") not in ("", "0")
MAX_REQUESTS = 50
DUMMY_WORKLOAD = {
    "kind": "requests",
    "num_requests": 1,
    "arrival": {"process": "burst"},
    "prompt_tokens": 10,
    "output_tokens": 2,
}
MODELS = ["llama-3.1-8b", "llama-3.1-8b", "llama-3.1-8b", "qwen3-30b-a3b", "qwen3.5-35b-a3b"]
HYBRID = "qwen3.5-35b-a3b"


@dataclass
class Scenario:
    experiment: dict  # raw experiment mapping (printed on failure)
    workload: CompiledWorkload

    def describe(self) -> str:
        wl = self.workload
        lines = [f"experiment: {self.experiment}"]
        lines.append(f"nodes: parent={wl.node_parent.tolist()} len={wl.node_num_tokens.tolist()}")
        for r in range(wl.num_requests):
            path = wl.path_nodes[wl.req_path_start[r] : wl.req_path_start[r + 1]].tolist()
            par = wl.parent_ids[wl.req_parents_start[r] : wl.req_parents_start[r + 1]].tolist()
            lines.append(
                f"  req {r}: path={path} prompt={wl.req_prompt_tokens[r]} "
                f"output={wl.req_output_tokens[r]} arrival={wl.req_arrival_time[r]} "
                f"wait={wl.req_wait_after_ready[r]} parents={par} session={wl.req_session[r]}"
            )
        return "\n".join(lines)


@functools.cache
def state_blocks(model: str, block_size: int) -> int:
    """Recurrent-state blocks per sequence of ``model`` (hybrid models; 0 otherwise)."""
    exp = parse_experiment(
        {
            "model": model,
            "hardware": "h100-sxm",
            "engine": {"block_size": block_size},
            "workload": DUMMY_WORKLOAD,
        }
    )
    return plan_replicas(exp)[0].state_blocks_per_seq


TIMES = st.sampled_from([0.0, 0.0, 0.0, 0.001, 0.01, 0.05, 0.2, 1.0]) | st.floats(
    0.0, 2.0, allow_nan=False, allow_infinity=False
)
WAITS = st.sampled_from([0.0, 0.0, 0.0, 0.001, 0.02]) | st.floats(
    0.0, 0.5, allow_nan=False, allow_infinity=False
)
# tool waits for the retention policies: long enough for TTLs to expire and prefetches to run
TOOL_WAITS = st.sampled_from([0.0, 0.0, 0.001, 0.02, 0.1, 0.5, 2.0]) | st.floats(
    0.0, 3.0, allow_nan=False, allow_infinity=False
)
FRESH = st.integers(0, 60)
OUTPUT = st.integers(1, 24) | st.integers(1, 70)
EXTRA = st.integers(0, 20)  # tokens a node holds past the request (later turns)


@st.composite
def workloads(draw, max_requests: int = MAX_REQUESTS, waits=WAITS) -> CompiledWorkload:
    """A workload; ``waits``: the strategy of the waits of requests that have parents (tool
    calls; requests without parents always draw from WAITS)."""
    b = WorkloadBuilder()
    scaffolds: list[list[int]] = [[]]  # paths of shared prefixes; [] = no prefix
    for _ in range(draw(st.integers(0, 3))):
        root = b.node(None, draw(st.integers(1, 70)))
        scaffolds.append([root])
        for _ in range(draw(st.integers(0, 2))):
            scaffolds.append([root, b.node(root, draw(st.integers(1, 50)))])
    kinds = st.sampled_from(["single", "single", "session", "fanout", "dup"])
    for kind in draw(st.lists(kinds, min_size=1, max_size=14)):
        if len(b.requests) >= max_requests:
            break
        prefix = draw(st.sampled_from(scaffolds))
        under = prefix[-1] if prefix else None
        start = b.end(under) if prefix else 0
        arrival = draw(TIMES)
        first_fresh = st.integers(1 if start == 0 else 0, 60)
        if kind == "single":
            f, o = draw(first_fresh), draw(OUTPUT)
            own = b.node(under, f + o + draw(EXTRA))
            b.request(prefix + [own], start + f, o, arrival, draw(WAITS))
        elif kind == "dup" and prefix:
            # prompts ending inside a shared node: identical or nested prompts and outputs
            lo, hi = b.node_start[under], b.end(under)
            for _ in range(draw(st.integers(1, 4))):
                total = draw(st.integers(max(lo + 1, 2), max(hi, 2)))
                if total > hi:
                    continue
                o = draw(st.integers(1, min(total - 1, 24)))
                b.request(
                    prefix, total - o, o, arrival + draw(st.sampled_from([0.0, 0.01])), draw(WAITS)
                )
        elif kind == "session":
            turns = [(draw(first_fresh), draw(OUTPUT))]
            turns += [(draw(FRESH), draw(OUTPUT)) for _ in range(draw(st.integers(0, 5)))]
            conv = b.node(under, sum(f + o for f, o in turns) + draw(EXTRA))
            before, prev, session = 0, None, len(b.requests)
            for f, o in turns:
                if len(b.requests) >= max_requests:
                    break
                r = b.request(
                    prefix + [conv],
                    start + before + f,
                    o,
                    arrival,
                    draw(WAITS if prev is None else waits),
                    parents=[] if prev is None else [prev],
                    session=session,
                )
                before, prev = before + f + o, r
        elif kind == "fanout":
            f0, o0 = draw(first_fresh), draw(OUTPUT)
            trunk = b.node(under, f0 + o0)  # ends exactly at the first request's end
            r0 = b.request(prefix + [trunk], start + f0, o0, arrival, draw(WAITS))
            kids = []
            for _ in range(draw(st.integers(1, 4))):
                f, o = draw(FRESH), draw(OUTPUT)
                leaf = b.node(trunk, f + o + draw(EXTRA))
                kids.append(
                    b.request(
                        prefix + [trunk, leaf],
                        b.end(trunk) + f,
                        o,
                        wait=draw(waits),
                        parents=[r0],
                        session=r0,
                    )
                )
            if draw(st.booleans()):  # a join after every branch
                f, o = draw(FRESH), draw(OUTPUT)
                leaf = b.node(trunk, f + o)
                b.request(
                    prefix + [trunk, leaf],
                    b.end(trunk) + f,
                    o,
                    wait=draw(waits),
                    parents=kids,
                    session=r0,
                )
    if not b.requests:
        own = b.node(None, 3)
        b.request([own], 2, 1)
    del b.requests[max_requests:]
    n = len(b.requests)
    if n > 1:  # a few dependency edges across groups
        for a, c in draw(
            st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=4)
        ):
            if a < c:
                b.requests[c]["parents"] = sorted({*b.requests[c]["parents"], a})
    return b.build()


@functools.cache
def block_bytes(model: str, block_size: int) -> int:
    """Bytes of one KV block of ``model`` (the unit of the host tier's capacity)."""
    exp = parse_experiment(
        {
            "model": model,
            "hardware": "h100-sxm",
            "engine": {"block_size": block_size},
            "workload": DUMMY_WORKLOAD,
        }
    )
    return plan_replicas(exp)[0].kv_bytes_per_token * block_size


# the first is the one hypothesis draws most (its simplest value)
RETENTION_POLICIES = ("offload_prefetch", "session_ttl", "lru")


@st.composite
def tiers(
    draw, model: str, block_size: int, caching: bool, policies: tuple = RETENTION_POLICIES
) -> dict:
    """Engine fields of a host tier and a retention policy (both need prefix caching)."""
    if not caching:
        return {"kv_host_tier": None, "retention": {"policy": "lru"}}
    policy = draw(st.sampled_from(policies))
    retention: dict = {"policy": policy}
    if policy == "session_ttl":
        retention["ttl_s"] = draw(st.sampled_from([0.001, 0.01, 0.05, 0.3, 2.0, 60.0]))
    if policy == "offload_prefetch":
        retention["prefetch_margin_s"] = draw(st.sampled_from([0.0, 0.0, 0.001, 0.01, 0.1]))
    host = None
    if policy == "offload_prefetch" or draw(st.integers(0, 3)) < 3:
        blocks = draw(st.integers(1, 6) | st.integers(1, 40))
        host = {
            "capacity_gb": blocks * block_bytes(model, block_size) / 1e9,
            "h2d_gb_per_s": draw(st.sampled_from([0.2, 1.0, 5.0, 45.3])),
        }
    return {"kv_host_tier": host, "retention": retention}


@st.composite
def speculations(draw) -> dict:
    """A speculative-decoding configuration: EAGLE heads (draft passes cost time) or n-gram
    lookup, 1-4 drafts or k by batch size, fixed or Beta acceptance, position decay."""
    spec: dict = {
        "method": draw(st.sampled_from(["eagle", "ngram"])),
        "num_speculative_tokens": draw(st.integers(1, 4)),
        "acceptance_rate": draw(st.sampled_from([0.7, 0.0, 0.3, 0.9, 1.0])),
    }
    if draw(st.booleans()):
        spec["acceptance_concentration"] = draw(st.sampled_from([0.5, 2.0, 20.0]))
    if draw(st.booleans()):
        spec["position_decay"] = draw(st.sampled_from([0.5, 0.9]))
    if draw(st.integers(0, 3)) == 0:
        spec["k_by_batch_size"] = draw(
            st.sampled_from([[[1, 4], [3, 2], [8, 0]], [[2, 1]], [[1, 0], [4, 3]]])
        )
    return spec


@st.composite
def engines(
    draw, block_size: int, base_blocks: int, model: str = "", policies: tuple = (),
    speculative: bool = False,
) -> dict:
    """One engine; with ``policies`` (retention policy names), a host tier and one of them;
    with ``speculative``, speculative decoding on most engines."""
    eng: dict = {
        "block_size": block_size,
        # small pools: several running requests outgrow them, so preemption is common; with
        # tiers, pools that fit most requests yet evict all the time (requests that are
        # rejected, and their children, would test nothing)
        "num_gpu_blocks_override": base_blocks
        + draw(
            st.integers(3, 12) | st.integers(6, 40)
            if policies
            else st.integers(2, 6) | st.integers(1, 12) | st.integers(1, 80)
        ),
        "max_num_seqs": draw(st.integers(1, 8)),
        "max_num_batched_tokens": draw(
            st.sampled_from([1, 7, 16, 32, 64, 2048]) | st.integers(1, 300)
        ),
        # the host tier and retention policies need prefix caching: mostly on with them
        "enable_prefix_caching": draw(
            st.sampled_from([True, True, True, False]) if policies else st.booleans()
        ),
    }
    if draw(st.integers(0, 9 if policies else 4)) == 0:
        eng["max_model_len"] = draw(st.integers(2, 300))
    if policies:
        eng |= draw(tiers(model, block_size, eng["enable_prefix_caching"], policies))
    if speculative:
        eng["speculative"] = draw(speculations()) if draw(st.integers(0, 3)) > 0 else None
    return eng


POLICIES = [
    "round_robin",
    "random",
    "least_outstanding",
    "least_kv_usage",
    "power_of_two",
    "session_affinity",
    "kv_aware",
    "weighted_scorer",
]


@st.composite
def routers(draw) -> dict:
    router: dict = {"policy": draw(st.sampled_from(POLICIES))}
    if draw(st.booleans()):
        router["staleness_s"] = draw(st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.3]))
    if router["policy"] == "kv_aware":
        router["temperature"] = draw(st.sampled_from([0.0, 0.0, 0.5, 2.0]))
        router["overlap_score_credit"] = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))
        router["prefill_load_scale"] = draw(st.sampled_from([0.0, 1.0, 3.0]))
    if router["policy"] == "weighted_scorer" and draw(st.booleans()):
        router["weights"] = {
            k: draw(st.sampled_from([0.0, 1.0, 2.5])) for k in ("prefix", "queue", "kv_usage")
        }
    if router["policy"] == "session_affinity":
        router["affinity_overload_factor"] = draw(st.sampled_from([0.1, 1.0, 2.0, 100.0]))
    return router


@st.composite
def scenarios(
    draw, max_requests: int = MAX_REQUESTS, with_tiers: bool = False,
    policies: tuple = RETENTION_POLICIES, disaggregated: bool = False, speculative: bool = False,
) -> Scenario:
    """A random scenario; ``with_tiers``: host tiers and the retention ``policies``;
    ``disaggregated``: prefill and decode pools (1-2 replicas each), a KV link of 0.5-50 GB/s,
    and sometimes conditional (local) prefill; ``speculative``: speculative decoding on most
    replicas (on dense models)."""
    policies = policies if with_tiers else ()
    model = draw(st.sampled_from(MODELS[:3] if speculative else MODELS))
    block_size = 16 if model == HYBRID else draw(st.sampled_from([16, 16, 16, 4, 8, 32]))
    base = state_blocks(model, block_size)
    if disaggregated:  # a prefill pool and a decode pool, one or two replicas each
        counts = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
        roles = ["prefill", "decode"]
    else:
        counts = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
        roles = ["aggregated"] * len(counts)
    groups = []
    total = 0
    for count, role in zip(counts, roles, strict=True):
        count = min(count, (4 if disaggregated else 3) - total)
        if count <= 0:
            break
        total += count
        group: dict = {"count": count}
        if disaggregated:
            group["role"] = role
        if draw(st.booleans()):
            group["engine"] = draw(engines(block_size, base, model, policies, speculative))
        groups.append(group)
    cluster: dict = {"replicas": groups, "router": draw(routers())}
    if disaggregated:
        cluster["disaggregation"] = {
            "link": {
                "bandwidth_gb_per_s": draw(st.sampled_from([0.5, 5.0, 50.0])),
                "latency_s": draw(st.sampled_from([0.0, 1e-4, 0.003])),
            },
            "local_prefill_threshold_tokens": draw(st.sampled_from([0, 0, 8, 32, 100])),
        }
    experiment = {
        "model": model,
        "hardware": draw(st.sampled_from(["h100-sxm", "h200"])),
        "engine": draw(engines(block_size, base, model, policies, speculative)),
        "cluster": cluster,
        "workload": DUMMY_WORKLOAD,
        "outputs": {"step_log": True},
        "seed": draw(st.integers(0, 2**32)),
    }
    waits = TOOL_WAITS if with_tiers else WAITS
    return Scenario(experiment, draw(workloads(max_requests, waits)))


def run_core(sc: Scenario):
    """The core's result; a scenario whose decode pool can never hold its longest transferred
    prompt is refused before the run (simulate.check_decode_capacity) and skipped here."""
    try:
        return simulate(parse_experiment(sc.experiment), workload=sc.workload, progress=False)
    except ExperimentError as exc:
        if "can never hold" not in str(exc):
            raise
        reject()


def test_generated_workloads_are_valid_and_varied():
    """Every generated workload validates (build() checks it) and the shapes vary."""
    seen = Counter()

    @settings(
        max_examples=200,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(workloads())
    def check(wl):
        assert 1 <= wl.num_requests <= MAX_REQUESTS
        seen["with_parents"] += int((wl.req_parents_start[1:] > wl.req_parents_start[:-1]).any())
        seen["multi_parent"] += int(
            (wl.req_parents_start[1:] - wl.req_parents_start[:-1] > 1).any()
        )
        paths = [
            tuple(wl.path_nodes[wl.req_path_start[r] : wl.req_path_start[r + 1]])
            for r in range(wl.num_requests)
        ]
        seen["shared_path"] += int(len(set(paths)) < len(paths))
        seen["deep_path"] += int(max(len(p) for p in paths) >= 3)

    check()
    for key in ("with_parents", "multi_parent", "shared_path", "deep_path"):
        assert seen[key] >= 10, (key, seen)


def test_scenarios_reach_the_hard_cases():
    """Enough scenarios evict, preempt, reject, hit the cache and chunk prefills."""
    seen = Counter()

    @settings(
        max_examples=200,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(scenarios())
    def check(sc):
        res = run_core(sc)
        df, reps = res.requests, res.replicas
        seen["evicted"] += int(reps["evicted_blocks"].sum() > 0)
        seen["preempted"] += int(df["preemptions"].sum() > 0)
        seen["rejected_len"] += int(df["reject_reason"].str.contains("max_model_len").any())
        seen["rejected_kv"] += int(df["reject_reason"].str.contains("KV cache").any())
        seen["rejected_parent"] += int(df["reject_reason"].str.contains("parent").any())
        seen["hits"] += int(df["cached_tokens"].sum() > 0)
        seen["multi_replica"] += int(len(reps) > 1)
        seen["state_blocks"] += int(
            sc.experiment["model"] == HYBRID and (df["status"] == "finished").any()
        )
        fin = df[df["status"] == "finished"]
        budget = [res.replicas_plan[rep].max_num_batched_tokens for rep in fin["replica"]]
        seen["chunked"] += int((fin["computed_prompt_tokens"].to_numpy() > budget).any())
        ties = df["arrival_time"].dropna().to_numpy()
        seen["tied_arrivals"] += int(len(ties) != len(set(ties.tolist())))
        assert math.isfinite(res.summary()["simulated_seconds"])

    check()
    for key in (
        "evicted",
        "preempted",
        "rejected_len",
        "rejected_kv",
        "rejected_parent",
        "hits",
        "multi_replica",
        "state_blocks",
        "chunked",
        "tied_arrivals",
    ):
        assert seen[key] >= 3, (key, seen)


@pytest.mark.parametrize(
    "kind,examples,wanted",
    [
        ({"with_tiers": True, "policies": ("offload_prefetch", "lru")}, 200,
         ("host_loads", "host_evicted_blocks", "prefetches")),
        ({"with_tiers": True, "policies": ("session_ttl",)}, 50,
         ("pins", "pins_broken", "evicted_blocks")),
        ({"disaggregated": True}, 40, ("kv_transfers_in", "evicted_blocks")),
        ({"speculative": True}, 40, ("spec_accepted", "draft_seconds")),
    ],
    ids=["prefetch", "ttl", "disagg", "specdec"],
)
def test_feature_scenarios_reach_their_features(kind, examples, wanted):
    """The strategies of the feature tests of test_reference_diff.py load from the host tier,
    evict from it, prefetch; pin and break pins; move KV between pools; accept drafts and pay
    for draft passes (checked on fewer examples than those tests run)."""
    seen = Counter()

    @settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(scenarios(**kind))
    def check(sc):
        res = run_core(sc)
        for key in wanted:
            seen[key] += int(res.replicas[key].sum() > 0)
        assert math.isfinite(res.summary()["simulated_seconds"])

    check()
    for key in wanted:
        assert seen[key] >= 3, (key, seen)
