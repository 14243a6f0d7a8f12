"""The cluster: request lifecycles, dependencies, rejections, and the entry point.

Processes and events (SimPy):

* a **request process** per request waits on its *arrival timer* (``wait_after_ready`` after
  it became ready) and then hands the request to the router (router.py);
* a **replica process** per replica loops schedule -> step -> step end (replica.py);
* when a request finishes (or is rejected), each child whose last parent that was
  becomes ready at once: its arrival timer starts *now* and its request process is started.

Simultaneous events. The core orders events at the same simulated time by the order in which
they were scheduled (``(time, sequence number)``); SimPy does the same with ``(time, priority,
event id)``. The model therefore creates each SimPy event at the very moment the core pushes
the matching event: an arrival timer when the request becomes ready (not one hop later, in a
process woken by its parent), the replica's wake-up when a request reaches an idle replica, its
next schedule (``timeout(0)``) right after the step end has released the children. Process
start-up events (SimPy's ``Initialize``) run before everything else due at the same time and do
nothing but wait on an event that already exists, so they change no order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import simpy

from simulator.config import DisaggregationConfig
from simulator.core.state import REJECT_REASONS
from simulator.reference.replica import Replica, StepRecord
from simulator.reference.request import ContentTree, Request, Status, make_requests
from simulator.reference.router import Router
from simulator.simulate import plan_replicas
from simulator.specdec import draw_alphas
from simulator.workload.compile import compile_workload
from simulator.workload.compiled import CompiledWorkload, validate_compiled

REASON_MAX_MODEL_LEN = REJECT_REASONS[1]
REASON_KV_CAPACITY = REJECT_REASONS[2]
REASON_PARENT = REJECT_REASONS[3]


class Cluster:
    def __init__(
        self,
        env: simpy.Environment,
        plans,
        router,
        wl: CompiledWorkload,
        seed: int = 0,
        disaggregation: DisaggregationConfig | None = None,
    ) -> None:
        self.env = env
        disaggregation = disaggregation or DisaggregationConfig()
        self.link = disaggregation.link  # each decode replica's inbound KV link
        self.local_prefill_threshold = disaggregation.local_prefill_threshold_tokens
        self.disaggregated = any(getattr(p, "role", "aggregated") == "prefill" for p in plans)
        self.step_log: list[StepRecord] = []  # every engine step, in the order they start
        block_sizes = {int(p.block_size) for p in plans}
        if len(block_sizes) != 1:
            raise ValueError(f"replicas must share one block size (got {sorted(block_sizes)})")
        self.tree = ContentTree(wl, block_sizes.pop())
        self.requests = make_requests(self.tree)
        self.seed = seed  # of the router's and the acceptance draws
        # speculative decoding: one acceptance profile per distinct configuration, in order
        self.spec_profiles: dict[str, int] = {}
        for plan in plans:
            spec = getattr(plan, "speculative", None)
            if spec is not None:
                self.spec_profiles.setdefault(spec.model_dump_json(), len(self.spec_profiles))
        self.replicas = [Replica(env, i, plan, self) for i, plan in enumerate(plans)]
        self.router = Router(router, self.replicas, seed)
        if self.router.staleness > 0.0:
            env.process(self.snapshots())
        for req in self.requests:
            if not req.parents:
                req.ready = req.arrival_time
                self.start(req, req.arrival_time + req.wait_after_ready)

    def start(self, req: Request, delay: float) -> None:
        """``req`` is ready: it reaches the cluster ``delay`` seconds from now."""
        req.status = Status.DISPATCHING
        req.arrived = self.env.now + delay
        arrival = self.env.timeout(delay)  # created now: see the module docstring
        self.env.process(self.request_process(req, arrival))

    def acceptance(self, plan) -> np.ndarray:
        """Per-request draft acceptance probability on replicas of ``plan`` (zeros without
        speculative decoding), drawn as the core draws it (:func:`simulator.specdec.draw_alphas`)."""
        spec = getattr(plan, "speculative", None)
        if spec is None:
            return np.zeros(len(self.requests))
        profile = self.spec_profiles[spec.model_dump_json()]
        return draw_alphas(spec, len(self.requests), self.seed, profile)

    def call_at(self, when: float, action) -> None:
        """Run ``action()`` at simulated time ``when`` (>= now), as an event created now.

        SimPy takes a delay and adds it to the clock; the delay is chosen so that the sum is
        exactly ``when``, the time stamp the core computes (ties between events depend on it).
        """
        now = self.env.now
        delay = when - now
        for _ in range(64):
            if now + delay == when:
                break
            delay = math.nextafter(delay, math.inf if now + delay < when else -math.inf)
        event = self.env.timeout(max(delay, 0.0))
        event.callbacks.append(lambda _event: action())

    def unpin_parents(self, req: Request) -> None:
        """``req`` is admitted for the first time: its parents' session-TTL protections end
        (on whichever replica each parent ran)."""
        for p in req.parents:
            parent = self.requests[p]
            if parent.pinned:
                self.replicas[parent.replica].unpin(parent)

    def snapshots(self):
        """Refresh the router's view of replica load every ``staleness_s``, from t = 0, for as
        long as anything else is going to happen."""
        while True:
            self.router.take_snapshot()
            if self.env.peek() == math.inf:
                return
            yield self.env.timeout(self.router.staleness)

    def request_process(self, req: Request, arrival: simpy.Event):
        yield arrival
        self.dispatch(req)

    def dispatch(self, req: Request) -> None:
        """Route ``req``; reject it if it can never run there, else queue it.

        Disaggregated: the decode replica is chosen first. The prompt is computed there when
        the part it does not cache is shorter than ``local_prefill_threshold_tokens``, else on
        a prefill replica; a request with one output token is served by a prefill replica
        alone. A prefill replica only needs room for the prompt."""
        if req.parent_failed:
            self.reject(req, REASON_PARENT)
            return
        rep = self.router.route(req)
        dst: Replica | None = None
        if self.disaggregated:
            dst = rep
            local = req.output_tokens == 1
            if not local and self.local_prefill_threshold > 0:
                cap = (req.prompt_tokens - 1) // dst.block_size
                hits = len(dst.pool.longest_hit(req.keys[:cap]))
                uncached = req.prompt_tokens - hits * dst.block_size
                local = uncached < self.local_prefill_threshold
            if not local or req.output_tokens == 1:
                rep = self.router.route(req, "prefill")
            if rep is dst or req.output_tokens == 1:
                dst = None
        req.replica = rep.index
        rep.routed += 1
        for target in (rep, dst):
            if target is None:
                continue
            if req.total_tokens > target.max_model_len:
                self.reject(req, REASON_MAX_MODEL_LEN)
                return
            # the last output token's KV is never computed
            tokens = req.total_tokens - 1 if target is dst or dst is None else req.prompt_tokens
            if target.blocks_for(tokens) + target.state_blocks > target.pool.num_blocks:
                self.reject(req, REASON_KV_CAPACITY)
                return
        if dst is not None:
            req.prefill_replica = rep.index
            req.decode_replica = dst.index
            dst.outstanding += 1
        rep.submit(req)

    def transfer_done(self, req: Request) -> None:
        """The KV of ``req`` reached its decode replica: the prefill replica lets it go, and
        the request decodes on; both replicas schedule if idle."""
        src = self.replicas[req.prefill_replica]
        dst = self.replicas[req.decode_replica]
        src.drop_prefill_copy(req)
        req.status = Status.RUNNING
        req.replica = dst.index
        src.wake()
        dst.wake()

    def reject(self, req: Request, reason: str) -> None:
        req.status = Status.REJECTED
        req.reject_reason = reason
        self.request_done(req, failed=True)

    def request_done(self, req: Request, failed: bool = False) -> None:
        """``req`` finished (or was rejected): children whose last parent it was become ready."""
        for c in req.children:
            child = self.requests[c]
            child.parent_failed = child.parent_failed or failed
            child.num_pending_parents -= 1
            if child.num_pending_parents == 0:
                child.ready = self.env.now
                self.start(child, child.wait_after_ready)

    # ------------------------------------------------------------------ results

    def requests_frame(self) -> pd.DataFrame:
        """One row per request, with the columns of ``Result.requests``."""
        reqs = self.requests
        status = [
            r.status.value if r.status in (Status.FINISHED, Status.REJECTED) else "unfinished"
            for r in reqs
        ]
        out = np.array([r.output_tokens for r in reqs], dtype=np.int64)
        prompt = np.array([r.prompt_tokens for r in reqs], dtype=np.int64)
        cached = np.array([r.cached_tokens or 0 for r in reqs], dtype=np.int64)
        arrival = np.array([r.arrived for r in reqs])
        sched = np.array([r.first_scheduled for r in reqs])
        first = np.array([r.first_token for r in reqs])
        finish = np.array([r.finished for r in reqs])
        multi = out > 1
        return pd.DataFrame(
            {
                "request_id": np.array([r.request_id for r in reqs], dtype=np.int64),
                "session_id": np.array([r.session_id for r in reqs], dtype=np.int64),
                "replica": np.array([r.replica for r in reqs], dtype=np.int64),
                "status": pd.Categorical(status, categories=["finished", "rejected", "unfinished"]),
                "reject_reason": np.array([r.reject_reason for r in reqs], dtype=object),
                "ready_time": np.array([r.ready for r in reqs]),
                "arrival_time": arrival,
                "scheduled_time": sched,
                "first_token_time": first,
                "finish_time": finish,
                "prompt_tokens": prompt,
                "cached_tokens": cached,
                "computed_prompt_tokens": np.array(
                    [
                        r.prompt_tokens - r.cached_tokens if r.cached_tokens is not None else 0
                        for r in reqs
                    ],
                    dtype=np.int64,
                ),
                "output_tokens": np.array([r.num_output for r in reqs], dtype=np.int64),
                "scheduled_tokens": np.array([r.scheduled_tokens for r in reqs], dtype=np.int64),
                "preemptions": np.array([r.preemptions for r in reqs], dtype=np.int64),
                "ttft": first - arrival,
                "tpot": np.where(multi, (finish - first) / np.maximum(out - 1, 1), math.nan),
                "e2e": finish - arrival,
                "queue_time": sched - arrival,
                "max_tbt": np.where(multi, [r.max_gap for r in reqs], math.nan),
                # a chunk is a token on replicas that do not speculate
                "chunks": np.array(
                    [
                        r.chunks if r.replica >= 0 and self.replicas[r.replica].spec else r.num_output
                        for r in reqs
                    ],
                    dtype=np.int64,
                ),
                "spec_proposed": np.array([r.spec_proposed for r in reqs], dtype=np.int64),
                "spec_accepted": np.array([r.spec_accepted for r in reqs], dtype=np.int64),
                "prefill_replica": np.array([r.prefill_replica for r in reqs], dtype=np.int64),
                "decode_replica": np.array([r.decode_replica for r in reqs], dtype=np.int64),
                "kv_transfer_bytes": np.array([r.xfer_bytes for r in reqs]),
                "kv_wait": np.array([r.xfer_start - r.xfer_queued for r in reqs]),
                "kv_transfer_time": np.array([r.xfer_end - r.xfer_start for r in reqs]),
                "host_cached_tokens": np.array([r.host_hit_tokens for r in reqs], dtype=np.int64),
                "host_load_time": np.array([r.load_end for r in reqs]) - sched,
            }
        )

    def replicas_frame(self) -> pd.DataFrame:
        return pd.DataFrame([rep.counters() for rep in self.replicas])

    def steps_frame(self) -> pd.DataFrame:
        rows = self.step_log
        columns = [
            "replica",
            "start",
            "end",
            "num_seqs",
            "num_decodes",
            "prefill_tokens",
            "used_blocks",
            "num_waiting",
        ]
        return pd.DataFrame(rows, columns=columns)


@dataclass
class ReferenceResult:
    requests: pd.DataFrame  # the columns of Result.requests
    replicas: pd.DataFrame  # per-replica counters (steps, preemptions, evicted blocks...)
    steps: pd.DataFrame  # one row per engine step, as the core's step log
    cluster: Cluster  # the final state, for inspection


def run_reference(
    experiment_or_plans,
    workload: CompiledWorkload | None = None,
    router=None,
    seed: int | None = None,
    disaggregation: DisaggregationConfig | None = None,
) -> ReferenceResult:
    """Simulate with the reference model.

    ``experiment_or_plans``: an :class:`~simulator.config.Experiment` (its replicas are
    resolved with :func:`simulator.simulate.plan_replicas`) or a list of
    :class:`~simulator.simulate.ReplicaPlan`. ``router``: a policy name or a router config
    (default: the experiment's, else round robin). ``seed``: the seed of the router's draws and
    of the workload compilation (default: the experiment's, else 0). ``workload`` defaults to
    the experiment's workload compiled with that seed. ``disaggregation``: the KV link and
    the local-prefill threshold (default: the experiment's, else the defaults).
    """
    if isinstance(experiment_or_plans, list | tuple):
        plans = list(experiment_or_plans)
        router = router or "round_robin"
        seed = seed or 0
        if workload is None:
            raise ValueError("a workload is required when replica plans are given")
    else:
        exp = experiment_or_plans
        plans = plan_replicas(exp)
        router = router or exp.cluster.router
        seed = exp.seed if seed is None else seed
        disaggregation = disaggregation or exp.cluster.disaggregation
        if workload is None:
            workload = compile_workload(exp.workload, seed)
    if not plans:
        raise ValueError("no replicas")
    validate_compiled(workload)
    env = simpy.Environment()
    cluster = Cluster(env, plans, router, workload, seed, disaggregation)
    env.run()
    return ReferenceResult(
        cluster.requests_frame(), cluster.replicas_frame(), cluster.steps_frame(), cluster
    )


def simulate_reference(
    experiment_or_plans,
    workload: CompiledWorkload | None = None,
    router=None,
    seed: int | None = None,
) -> pd.DataFrame:
    """Per-request results of the reference model (the columns of ``Result.requests``).

    The per-replica counters (evicted blocks, preemptions, steps...) are in
    ``df.attrs["replicas"]``; see :func:`run_reference` for the arguments.
    """
    res = run_reference(experiment_or_plans, workload, router, seed)
    df = res.requests
    df.attrs["replicas"] = res.replicas
    return df
