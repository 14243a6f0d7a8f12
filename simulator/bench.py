"""``servesim bench``: simulator speed on a standard workload, measured, not asserted.

Workload: independent chat-like requests (~1k prompt tokens, ~250 output tokens, lognormal),
Poisson arrivals at a rate near the saturation of one H100 serving Llama-3.1-8B in bf16 with
vLLM defaults. Reports JIT compile (or cache load) time separately from the simulation.
"""

from __future__ import annotations

import resource
import sys
import time

from simulator.config import Experiment
from simulator.workload.spec import RequestsWorkload

# Near saturation for this model/GPU with the shipped cost model: the replica is busy almost all
# the time but queues stay bounded (see README "Benchmark").
BENCH_RATE = 17.0


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


def _peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


def run_bench(num_requests: int = 100_000) -> dict:
    from simulator.simulate import simulate

    t0 = time.perf_counter()
    simulate(bench_experiment(200), progress=False)
    compile_seconds = time.perf_counter() - t0
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
