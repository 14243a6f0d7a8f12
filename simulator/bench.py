"""``servesim bench``: simulator speed on standard workloads, measured, not asserted.

Three benchmarks, each reporting JIT compile (or cache load) time apart from the simulation:

* the default: independent chat-like requests (~1k prompt tokens, ~250 output tokens,
  lognormal), Poisson arrivals near the saturation of one H100 serving Llama-3.1-8B in bf16
  with vLLM defaults;
* ``--cluster``: multi-turn agentic sessions (a scaffold shared by every session, contexts to
  100k tokens, tool waits) on 16 H200s serving Qwen3.5-35B-A3B behind the KV-aware router,
  with prefix caching; plus the scaling checks (cost per request as the request count grows,
  cost per event as contexts grow);
* ``--soak``: 10M requests through one replica and through 16, following the simulation rate
  and the process memory over the run.

Units: seconds of wall time unless a name says otherwise; rates per wall second.
"""

from __future__ import annotations

import math
import resource
import sys
import time

from simulator.config import Experiment
from simulator.workload.spec import RequestsWorkload, SessionsWorkload

# Near saturation for this model/GPU with the shipped cost model: the replica is busy almost all
# the time but queues stay bounded (see README "Benchmark").
BENCH_RATE = 17.0

# Cluster benchmark: sessions/s at which 16 H200s serving Qwen3.5-35B-A3B with the KV-aware
# router are loaded but healthy in steady state (measured on 225k requests: TTFT p50 0.24 s, p95
# 2.2 s, prefix hit rate 81 %, no preemptions); at 0.4 sessions/s TTFT p95 is 3.7 s and the hit
# rate 72 %, at 0.45 5.2 s and 66 %: the router starts moving sessions off the replicas that
# hold their cache.
CLUSTER_SESSION_RATE = 0.35
CLUSTER_REPLICAS = 16
CLUSTER_MEAN_TURNS = 75.0  # turns ~ uniform(10, 140)
# A 10-million-request soak run. Not part of CI: minutes of wall time and ~10 GB of memory.
SOAK_REQUESTS = 10_000_000
# The soak's 16-replica run: session-affinity routing keeps every session's cache, so the fleet
# takes twice the benchmark's load and stays healthy (measured on 198k requests: TTFT p50 53 ms,
# p95 98 ms, 98.7 % prefix hits, 17.9 events a request).
SOAK_SESSION_RATE = 0.9


def bench_experiment(num_requests: int, rate: float = BENCH_RATE) -> Experiment:
    workload = RequestsWorkload(
        kind="requests",
        num_requests=num_requests,
        arrival={"process": "poisson", "rate": rate},
        prompt_tokens={"dist": "lognormal", "mean": 1000, "sigma": 0.6, "max": 16384},
        output_tokens={"dist": "lognormal", "mean": 250, "sigma": 0.6, "max": 4096},
    )
    return Experiment(name="bench", seed=1, model="llama-3.1-8b", hardware="h100-sxm",
                      workload=workload)


def cluster_experiment(num_requests: int, context_scale: float = 1.0,
                       router: str = "kv_aware",
                       session_rate: float = CLUSTER_SESSION_RATE) -> Experiment:
    """The cluster benchmark with about ``num_requests`` requests.

    Sessions share an 8,000-token scaffold, start with ~2,000 fresh tokens, then add ~500
    (tool results) and generate ~200 per turn for 10-140 turns, with exponential tool waits of
    mean 2 s; contexts are capped at 100,000 tokens. ``context_scale`` multiplies every input
    length and the cap (0.25: the same sessions with contexts to 25,000 tokens). ``router``: the
    routing policy (the benchmark's is KV-aware); ``session_rate``: sessions/s.
    """
    k = context_scale
    sessions = max(1, round(num_requests / CLUSTER_MEAN_TURNS))
    workload = SessionsWorkload(
        kind="sessions",
        num_sessions=sessions,
        arrival={"process": "poisson", "rate": session_rate},
        shared_prefix_tokens=round(8000 * k),
        turns={"dist": "uniform", "low": 10, "high": 140},
        first_prompt_tokens={"dist": "lognormal", "mean": 2000 * k, "sigma": 0.6,
                             "max": round(16000 * k)},
        fresh_input_tokens={"dist": "lognormal", "mean": 500 * k, "sigma": 0.8,
                            "max": round(8000 * k)},
        output_tokens={"dist": "lognormal", "mean": 200, "sigma": 0.6, "max": 2000},
        wait_after_ready={"dist": "exponential", "mean": 2.0},
        max_context_tokens=round(100_000 * k),
    )
    return Experiment(
        name="bench-cluster", seed=1, model="qwen3.5-35b-a3b", hardware="h200",
        cluster={"replicas": [{"count": CLUSTER_REPLICAS}], "router": router},
        workload=workload,
    )


def _peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


def _current_rss_mib() -> float:
    """Resident memory now (Linux /proc; the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return _peak_rss_mib()


def _compile_seconds(exp: Experiment) -> float:
    from simulator.simulate import simulate

    t0 = time.perf_counter()
    simulate(exp, progress=False)
    return time.perf_counter() - t0


def run_bench(num_requests: int = 100_000) -> dict:
    from simulator.simulate import simulate

    compile_seconds = _compile_seconds(bench_experiment(200))
    exp = bench_experiment(num_requests)
    result = simulate(exp, progress=None)
    s = result.summary()
    return {
        "workload": f"{num_requests:,} chat requests (~1k in / ~250 out), Poisson {BENCH_RATE} "
                    "req/s, Llama-3.1-8B bf16 on one H100 SXM",
        "num_requests": num_requests,
        "compile_seconds": compile_seconds,
        "wall_seconds": result.wall_seconds,
        "requests_per_wall_second": num_requests / result.wall_seconds,
        "events_per_wall_second": result.num_events / result.wall_seconds,
        "simulated_seconds": s["simulated_seconds"],
        "output_tokens_per_s": s["output_tokens_per_s"],
        "ttft_p50": s["ttft_p50"],
        "peak_kv_usage": s["peak_kv_usage"],
        "peak_rss_mib": _peak_rss_mib(),
    }


def _measure(exp: Experiment, label: str, progress: bool | None) -> dict:
    """One timed run: wall split into the event core and the rest, rates, sizes, health."""
    from simulator.simulate import simulate

    result = simulate(exp, progress=progress)
    s = result.summary()
    req = result.requests
    n = len(req)
    loop = result.loop_seconds
    return {
        "label": label,
        "num_requests": n,
        "num_events": result.num_events,
        "events_per_request": result.num_events / n,
        "wall_seconds": result.wall_seconds,
        "loop_seconds": loop,
        "requests_per_wall_second": n / result.wall_seconds,
        "loop_us_per_request": loop / n * 1e6,
        "loop_us_per_event": loop / result.num_events * 1e6,
        "mean_prompt_tokens": float(req["prompt_tokens"].mean()),
        "max_prompt_tokens": int(req["prompt_tokens"].max()),
        "simulated_seconds": s["simulated_seconds"],
        "ttft_p50": s["ttft_p50"],
        "ttft_p95": s["ttft_p95"],
        "prefix_cache_hit_rate": s["prefix_cache_hit_rate"],
        "num_preemptions": s["num_preemptions"],
        "num_finished": s["num_finished"],
        "peak_rss_mib": _peak_rss_mib(),
    }


def context_experiment(prompt_tokens: int, num_requests: int = 20_000) -> Experiment:
    """One request at a time through one H200 (Llama-3.1-8B, a step budget that prefills any
    prompt in one step, no prefix sharing): every request takes the same events (its arrival, one
    prefill step, 49 decode steps) in batches of one, whatever its prompt length, so the core's
    time per event isolates the cost of context length."""
    workload = RequestsWorkload(
        kind="requests",
        num_requests=num_requests,
        arrival={"process": "burst"},
        prompt_tokens={"dist": "fixed", "value": prompt_tokens},
        output_tokens={"dist": "fixed", "value": 50},
    )
    return Experiment(name=f"bench-context-{prompt_tokens}", seed=1, model="llama-3.1-8b",
                      hardware="h200", workload=workload,
                      engine={"max_num_seqs": 1, "max_num_batched_tokens": 131072})


def run_cluster_bench(num_requests: int = 1_000_000, scaling: bool = True,
                      progress: bool | None = None) -> dict:
    """The cluster benchmark, then (``scaling``) the same at a quarter of the requests and at a
    quarter of the requests with contexts a quarter as long, and the context check: the same
    requests one at a time with 1k- and 100k-token prompts."""
    compile_seconds = _compile_seconds(cluster_experiment(300))
    runs = [_measure(cluster_experiment(num_requests), "main", progress)]
    if scaling:
        quarter = max(num_requests // 4, 1000)
        runs.append(_measure(cluster_experiment(quarter), "quarter requests", progress))
        runs.append(_measure(cluster_experiment(quarter, 0.25), "quarter requests, contexts / 4",
                             progress))
        for prompt in (1_000, 100_000):
            runs.append(_measure(context_experiment(prompt), f"one at a time, {prompt:,}-token "
                                 "prompts", progress))
    return {
        "workload": (
            f"agentic sessions on {CLUSTER_REPLICAS} x H200 serving Qwen3.5-35B-A3B bf16, "
            "kv_aware routing, prefix caching: 8k-token shared scaffold, 10-140 turns of ~500 "
            f"fresh / ~200 output tokens, 2 s tool waits, contexts to 100k tokens, "
            f"{CLUSTER_SESSION_RATE} sessions/s"
        ),
        "compile_seconds": compile_seconds,
        "runs": runs,
    }


def _rates_between(samples: list[tuple[float, int, int, float]], lo: float,
                   hi: float) -> tuple[float, float]:
    """(requests, events) finished per CPU second between the first samples at or past
    fractions ``lo`` and ``hi`` of the run's requests. ``samples``: (CPU s, requests done,
    events, RSS MiB) at each pause of the core."""
    total = samples[-1][1]

    def at(frac: float) -> tuple[float, int, int]:
        for t, done, events, _ in samples:
            if done >= frac * total:
                return t, done, events
        return samples[-1][0], samples[-1][1], samples[-1][2]

    t0, d0, e0 = at(lo)
    t1, d1, e1 = at(hi)
    if t1 <= t0:
        return math.nan, math.nan
    return (d1 - d0) / (t1 - t0), (e1 - e0) / (t1 - t0)


def soak_one(exp: Experiment, label: str, progress: bool | None = None,
             pause_every: int = 200_000) -> dict:
    """Run ``exp`` once, sampling the process CPU time, the finished-request count, the event
    count and the memory at every pause of the core (every ``pause_every`` events).

    The request rate of the last 10 % of requests includes the drain (the last sessions finish
    on an emptying fleet, in small batches: more steps per request); the event rate is the
    simulator's own speed and should stay flat.
    """
    from simulator.simulate import simulate

    samples: list[tuple[float, int, int, float]] = []
    t_start = time.process_time()
    rss_before = _current_rss_mib()

    def on_chunk(done: int, events: int) -> None:
        samples.append((time.process_time() - t_start, done, events, _current_rss_mib()))

    result = simulate(exp, progress=progress, on_chunk=on_chunk, pause_every=pause_every)
    s = result.summary()
    first_req, first_ev = _rates_between(samples, 0.0, 0.1)
    last_req, last_ev = _rates_between(samples, 0.9, 1.0)
    rss_during = [r for _, done, _, r in samples if done >= 0.1 * samples[-1][1]]
    return {
        "label": label,
        "num_requests": len(result.requests),
        "num_finished": s["num_finished"],
        "num_rejected": s["num_rejected"],
        "num_unfinished": s["num_unfinished"],
        "all_accounted_for": bool(
            s["num_finished"] + s["num_rejected"] == len(result.requests)
            and s["num_unfinished"] == 0),
        "num_events": result.num_events,
        "wall_seconds": result.wall_seconds,
        "loop_seconds": result.loop_seconds,
        "rate_first_10pct": first_req,
        "rate_last_10pct": last_req,
        "rate_ratio_last_to_first": last_req / first_req if first_req else math.nan,
        "event_rate_first_10pct": first_ev,
        "event_rate_last_10pct": last_ev,
        "event_rate_ratio_last_to_first": last_ev / first_ev if first_ev else math.nan,
        "rss_before_mib": rss_before,
        "rss_at_10pct_mib": rss_during[0] if rss_during else math.nan,
        "rss_at_end_of_core_mib": samples[-1][3],
        "peak_rss_mib": _peak_rss_mib(),
        "ttft_p50": s["ttft_p50"],
    }


def run_soak(num_requests: int = SOAK_REQUESTS, progress: bool | None = None) -> dict:
    """10M requests through one replica (the chat benchmark) and through 16 (the cluster
    benchmark's sessions with session-affinity routing).

    Why not the KV-aware router for the soak: near the fleet's capacity it can hold for a million
    requests, then tip into a recomputation spiral (measured over 10M requests at 0.45 sessions/s
    with the cost model of 2026-11-23: TTFT p50 2,209 s, 5.7 events a request instead of 21), so
    the second half of the run would simulate a different regime from the first. Session affinity keeps each
    session's cache and the fleet in one regime for the whole run.

    Rates are per second of this process's CPU time, so that other jobs on the machine do not
    pass for a slowdown (or a speed-up) of the simulator.
    """
    compile_seconds = _compile_seconds(bench_experiment(200))
    runs = [soak_one(bench_experiment(num_requests), "1 replica (chat)", progress)]
    runs.append(soak_one(
        cluster_experiment(num_requests, router="session_affinity",
                           session_rate=SOAK_SESSION_RATE),
        "16 replicas (agentic, session affinity)", progress))
    return {"compile_seconds": compile_seconds, "runs": runs}
