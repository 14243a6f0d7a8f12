"""The public API: ``simulate(experiment) -> Result``.

One Python function does all resolution and validation (models, GPUs, KV capacity, workload
compilation), then hands plain arrays to the Numba loop (:mod:`simulator.core.loop`) and turns
its output arrays into pandas tables. Nothing here runs per event.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from simulator.config import (
    DEFAULT_MAX_MODEL_LEN,
    GIB,
    Experiment,
    ExperimentError,
    SpeculativeConfig,
    batch_defaults,
    engine_for,
)
from simulator.core.heap import make_heap
from simulator.core.kvcache import (
    KS_EVICTED,
    KS_FREE,
    KS_HBLOCKS,
    KS_HEVICTED,
    KS_HPEAK,
    KS_HSTORED,
    make_kv_state,
)
from simulator.core.loop import init_events, run_events
from simulator.core.state import (
    CORE_DONE,
    CORE_ERR_HEAP_FULL,
    CORE_ERR_STUCK,
    CORE_PAUSED,
    G_CHUNK_HIST,
    G_ERROR,
    G_NUM_DONE,
    G_NUM_EVENTS,
    G_STEP_DROPPED,
    G_STEP_N,
    GF_AFFINITY_FACTOR,
    GF_LOCAL_PREFILL,
    GF_OVERLAP_CREDIT,
    GF_PREFILL_SCALE,
    GF_STALENESS,
    GF_TEMPERATURE,
    GF_W_KV,
    GF_W_PREFIX,
    GF_W_QUEUE,
    RETENTION_CODES,
    ROLE_CODES,
    ROUTER_CODES,
    RP_BUSY_SECONDS,
    RP_DECODE_TOKENS,
    RP_DRAFT_SECONDS,
    RP_H2D_BW,
    RP_H2D_SECONDS,
    RP_HOST_LOAD_BLOCKS,
    RP_HOST_LOADS,
    RP_KV_BYTES_TOKEN,
    RP_LINK_BW,
    RP_LINK_LATENCY,
    RP_NUM_STEPS,
    RP_PEAK_RUNNING,
    RP_PEAK_USED,
    RP_PINS,
    RP_PINS_BROKEN,
    RP_PREEMPTIONS,
    RP_PREFETCH_BLOCKS,
    RP_PREFETCH_MARGIN,
    RP_PREFETCHES,
    RP_PREFILL_TOKENS,
    RP_RETENTION,
    RP_ROLE,
    RP_ROUTED,
    RP_SPEC_ACCEPTED,
    RP_SPEC_ON,
    RP_SPEC_PROPOSED,
    RP_SPEC_VERIFIES,
    RP_TTL,
    RP_XFER_BYTES_IN,
    RP_XFER_IN,
    RP_XFER_SECONDS,
    RQ_CHUNKS,
    RQ_OUT_DONE,
    RQ_REPLICA,
    SL_END,
    SL_NUM_DECODES,
    SL_NUM_SEQS,
    SL_NUM_WAITING,
    SL_PREFILL_TOKENS,
    SL_REPLICA,
    SL_START,
    SL_USED_BLOCKS,
    make_globals,
    make_replicas,
    make_requests,
)
from simulator.costmodel import build_cost_params
from simulator.hardware import load_hardware
from simulator.invariants import InvariantError, check_kv
from simulator.memory import kv_cache_capacity
from simulator.metrics import requests_frame, summarize
from simulator.models import load_model
from simulator.progress import ProgressBar
from simulator.specdec import (
    METHOD_CODES,
    SPEC_NGRAM,
    capacity_with_draft,
    draft_cost_params,
    draft_spec,
    draw_alphas,
    k_table,
)
from simulator.workload.compile import compile_workload
from simulator.workload.compiled import CompiledWorkload
from simulator.workload.timeline import session_timelines


@dataclass(frozen=True)
class ReplicaPlan:
    """A replica as it will be simulated: resolved model, GPU and engine limits."""

    index: int
    model: str
    hardware: str
    tp: int
    num_blocks: int
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    enable_prefix_caching: bool
    state_blocks_per_seq: int
    cost_params: np.ndarray = field(repr=False)
    capacity_text: str = ""
    calibrated: bool = False
    speculative: SpeculativeConfig | None = None
    draft_params: np.ndarray | None = field(default=None, repr=False)
    role: str = "aggregated"
    kv_bytes_per_token: int = 0  # the model's KV bytes per token, all TP ranks (transfers)
    host_blocks: int = 0  # host-tier capacity in blocks (0 = no tier)
    h2d_bytes_per_s: float = 0.0  # host -> GPU copy bandwidth of the whole replica
    retention: str = "lru"
    ttl_s: float = 0.0
    prefetch_margin_s: float = 0.0


def plan_replicas(exp: Experiment) -> list[ReplicaPlan]:
    """Resolve every replica of the cluster; raise ExperimentError on any impossibility.

    Error messages start with the experiment's file when it was read from one.
    """
    try:
        return _plan_replicas(exp)
    except ExperimentError as err:
        source = exp._source
        if str(err).startswith(source):
            raise
        raise ExperimentError(f"{source}: {err}") from None


def _plan_replicas(exp: Experiment) -> list[ReplicaPlan]:
    plans: list[ReplicaPlan] = []
    cache: dict[tuple, ReplicaPlan] = {}
    block_sizes = set()
    for gi, group in enumerate(exp.cluster.replicas):
        eng = engine_for(exp, group, f"cluster.replicas[{gi}]")
        model_ref = group.model or exp.model
        hw_ref = group.hardware or exp.hardware
        key = (model_ref, hw_ref, eng.model_dump_json())
        if key not in cache:
            where = f"cluster.replicas[{gi}]"
            try:
                model = load_model(model_ref)
            except (ValueError, OSError) as exc:
                raise ExperimentError(f"{where}: model: {exc}") from None
            try:
                hw = load_hardware(hw_ref)
            except (ValueError, OSError) as exc:
                raise ExperimentError(f"{where}: hardware: {exc}") from None
            default_tokens, default_seqs = batch_defaults(hw.hbm_bytes)
            max_tokens = eng.max_num_batched_tokens or default_tokens
            max_seqs = eng.max_num_seqs or default_seqs
            spec = eng.speculative
            try:
                cap = kv_cache_capacity(
                    model, hw, eng.tp, eng.weight_dtype, eng.kv_dtype,
                    eng.gpu_memory_utilization, eng.block_size,
                    None if eng.activation_reserve_gib is None
                    else int(eng.activation_reserve_gib * GIB),
                    max_num_batched_tokens=max_tokens, max_num_seqs=max_seqs,
                )
                params = build_cost_params(model, hw, eng.tp, eng.weight_dtype, eng.kv_dtype)
                draft_params = np.zeros_like(params)
                if spec is not None:
                    draft = draft_spec(spec, model)
                    cap = capacity_with_draft(
                        cap, draft, spec, eng.tp, eng.weight_dtype, eng.kv_dtype, where
                    )
                    draft_params = draft_cost_params(
                        draft, hw, eng.tp, eng.weight_dtype, eng.kv_dtype, params.shape[0]
                    )
            except ValueError as exc:
                raise ExperimentError(f"{where}: {exc}") from None
            num_blocks = eng.num_gpu_blocks_override or cap.num_blocks
            capacity_text = cap.describe()
            if eng.num_gpu_blocks_override:
                capacity_text = (
                    f"KV cache: {num_blocks:,} blocks x {eng.block_size} tokens = "
                    f"{num_blocks * eng.block_size:,} tokens (engine.num_gpu_blocks_override; "
                    f"memory would allow {cap.num_blocks:,} blocks)"
                )
            kv_bytes_per_token = model.kv_bytes_per_token(eng.kv_dtype)
            host_blocks = 0
            h2d = 0.0
            if eng.kv_host_tier is not None:
                host_block_bytes = kv_bytes_per_token * eng.block_size
                host_blocks = int(eng.kv_host_tier.capacity_gb * 1e9 / host_block_bytes + 1e-9)
                if host_blocks < 1:
                    raise ExperimentError(
                        f"{where}: engine.kv_host_tier.capacity_gb = "
                        f"{eng.kv_host_tier.capacity_gb}: smaller than one KV block of "
                        f"{model.name} ({host_block_bytes} bytes)"
                    )
                h2d = eng.kv_host_tier.h2d_gb_per_s * 1e9 * eng.tp
            state_blocks = 0
            if cap.state_bytes_per_sequence > 0:
                state_blocks = -(-cap.state_bytes_per_sequence // cap.bytes_per_block)
            cache[key] = ReplicaPlan(
                index=-1, model=model.name, hardware=hw.name, tp=eng.tp, num_blocks=int(num_blocks),
                block_size=eng.block_size,
                max_num_batched_tokens=max_tokens,
                max_num_seqs=max_seqs,
                max_model_len=eng.max_model_len or DEFAULT_MAX_MODEL_LEN,
                enable_prefix_caching=eng.enable_prefix_caching,
                state_blocks_per_seq=int(state_blocks), cost_params=params,
                capacity_text=capacity_text, calibrated=hw.calibrated,
                speculative=spec, draft_params=draft_params,
                kv_bytes_per_token=kv_bytes_per_token,
                host_blocks=host_blocks, h2d_bytes_per_s=h2d,
                retention=eng.retention.policy, ttl_s=eng.retention.ttl_s,
                prefetch_margin_s=eng.retention.prefetch_margin_s,
            )
        block_sizes.add(eng.block_size)
        base = cache[key]
        for _ in range(group.count):
            plans.append(ReplicaPlan(**{**base.__dict__, "index": len(plans), "role": group.role}))
    if len(block_sizes) > 1:
        raise ExperimentError(
            f"cluster.replicas: all replicas must use one block_size (got {sorted(block_sizes)})"
        )
    return plans


def check_decode_capacity(exp: Experiment, plans: list[ReplicaPlan], wl: CompiledWorkload) -> None:
    """Raise ExperimentError when a decode replica's KV cache can never hold the longest prompt
    it may be sent (disaggregated clusters only).

    A decode replica allocates blocks for the whole transferred prompt before the KV moves, so a
    prompt longer than its cache (``num_blocks x block_size`` tokens, less the per-sequence
    state blocks) could only ever be rejected there. Prompts that never leave a prefill replica
    (one output token) or that exceed the replica's ``max_model_len`` (rejected for that reason)
    are left out. The message names the replica group, its capacity and the prompt (tokens).
    """
    decode = [p for p in plans if p.role == "decode"]
    if not decode or wl.num_requests == 0:
        return
    group_of: list[int] = []
    for gi, group in enumerate(exp.cluster.replicas):
        group_of += [gi] * group.count
    prompts = np.asarray(wl.req_prompt_tokens, dtype=np.int64)
    outputs = np.asarray(wl.req_output_tokens, dtype=np.int64)
    seen: set[int] = set()
    for plan in decode:
        gi = group_of[plan.index]
        if gi in seen:
            continue
        seen.add(gi)
        sent = (outputs > 1) & (prompts + outputs <= plan.max_model_len)
        if not sent.any():
            continue
        longest = int(np.argmax(np.where(sent, prompts, -1)))
        need = -(-int(prompts[longest]) // plan.block_size) + plan.state_blocks_per_seq
        if need > plan.num_blocks:
            raise ExperimentError(
                f"{exp._source}: cluster.replicas[{gi}] (role decode): its KV cache "
                f"({plan.num_blocks:,} blocks x {plan.block_size} tokens = "
                f"{plan.num_blocks * plan.block_size:,} tokens) can never hold the longest "
                f"transferred prompt ({int(prompts[longest]):,} tokens, request {longest}, "
                f"{need:,} blocks); give the decode pool more KV memory or shorten the prompts"
            )


@dataclass
class Result:
    """What one simulation produced."""

    experiment: Experiment
    replicas_plan: list[ReplicaPlan]
    requests: pd.DataFrame
    replicas: pd.DataFrame
    gap_hist: np.ndarray
    wall_seconds: float
    num_events: int
    expected_output_tokens: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    seed: int = 0
    chunk_gap_hist: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    steps: pd.DataFrame | None = None  # one row per engine step, when outputs.step_log is on
    steps_dropped: int = 0  # steps not recorded because the log was full
    window_seconds: float = 10.0
    gap_hist_windows: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))
    decode_seconds_by_count: np.ndarray = field(
        repr=False, default_factory=lambda: np.zeros((0, 0))
    )  # [replica, k]: seconds of steps with exactly k decoding sequences
    loop_seconds: float = 0.0  # wall seconds inside the event core (part of wall_seconds)

    @property
    def sessions(self) -> pd.DataFrame:
        """One row per session: time in queue, on the GPU and waiting for tools (seconds)."""
        return session_timelines(self.requests)

    @property
    def num_gpus(self) -> int:
        return sum(p.tp for p in self.replicas_plan)

    def summary(self) -> dict:
        s = summarize(self.requests, self.replicas, self.gap_hist, self.num_gpus,
                      self.chunk_gap_hist)
        s["wall_seconds"] = self.wall_seconds
        s["num_events"] = self.num_events
        s["seed"] = self.seed
        s["name"] = self.experiment.name
        s["window_seconds"] = self.window_seconds
        return s

    def save(self, out_dir: str | Path) -> Path:
        """Write requests.parquet, replicas.parquet, summary.json and token_gaps.npy."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.requests.to_parquet(out / "requests.parquet", index=False)
        self.replicas.to_parquet(out / "replicas.parquet", index=False)
        self.sessions.to_parquet(out / "sessions.parquet", index=False)
        (out / "summary.json").write_text(json.dumps(self.summary(), indent=2, default=float))
        np.save(out / "token_gaps_hist.npy", self.gap_hist)
        np.save(out / "token_gaps_hist_windows.npy", self.gap_hist_windows)
        np.save(out / "decode_seconds_by_count.npy", self.decode_seconds_by_count)
        if self.steps is not None:
            self.steps.to_parquet(out / "steps.parquet", index=False)
        return out


def simulate(
    exp: Experiment, seed: int | None = None, progress: bool | None = None,
    workload: CompiledWorkload | None = None, check_every: int = 0,
    plans: list[ReplicaPlan] | None = None,
    on_chunk: Callable[[int, int], None] | None = None, pause_every: int = 200_000,
) -> Result:
    """Run one experiment to completion and return its :class:`Result`.

    ``seed`` overrides the experiment's seed; ``workload`` replaces its compiled workload (tests
    and trace replays use it); ``progress`` forces the progress bar on or off (default: on for
    a terminal, after 2 s). ``check_every > 0`` stops the core every that many events to verify
    KV-block conservation (:func:`simulator.invariants.check_kv`), raising
    :class:`simulator.invariants.InvariantError` at the first violation. ``plans`` replaces
    :func:`plan_replicas`'s (prediction bands pass plans with perturbed cost parameters).
    ``on_chunk(requests_done, events)`` is called each time the core pauses (every
    ``pause_every`` events, or ``check_every``): benchmarks use it to follow the rate and memory
    over a run.
    """
    t0 = time.perf_counter()
    if plans is None:
        plans = plan_replicas(exp)
    if workload is None:
        workload = compile_workload(exp.workload, exp.seed if seed is None else seed)
    wl = workload
    check_decode_capacity(exp, plans, wl)
    n_rep = len(plans)
    kv = make_kv_state(
        wl.node_start_tokens, wl.node_num_tokens, plans[0].block_size,
        np.array([p.num_blocks for p in plans], dtype=np.int64),
        np.array([int(p.enable_prefix_caching) for p in plans], dtype=np.int64),
        host_blocks=np.array([p.host_blocks for p in plans], dtype=np.int64),
    )
    run_seed = exp.seed if seed is None else seed
    profiles: dict[str, int] = {}
    for pl in plans:
        if pl.speculative is not None:
            profiles.setdefault(pl.speculative.model_dump_json(), len(profiles))
    spec_alpha = np.zeros((max(len(profiles), 1), wl.num_requests), dtype=np.float64)
    for pl in plans:
        if pl.speculative is not None:
            row = profiles[pl.speculative.model_dump_json()]
            spec_alpha[row] = draw_alphas(pl.speculative, wl.num_requests, run_seed, row)
    p = make_replicas(
        np.stack([pl.cost_params for pl in plans]),
        np.array([pl.max_num_batched_tokens for pl in plans], dtype=np.int64),
        np.array([pl.max_num_seqs for pl in plans], dtype=np.int64),
        np.array([pl.max_model_len for pl in plans], dtype=np.int64),
        np.array([pl.state_blocks_per_seq for pl in plans], dtype=np.int64),
        spec_on=np.array([int(pl.speculative is not None) for pl in plans], dtype=np.int64),
        spec_profile=np.array(
            [profiles.get(pl.speculative.model_dump_json(), 0) if pl.speculative else 0
             for pl in plans], dtype=np.int64),
        spec_decay=np.array(
            [pl.speculative.position_decay if pl.speculative else 1.0 for pl in plans]),
        spec_draft=np.array(
            [int(pl.speculative is not None and METHOD_CODES[pl.speculative.method] != SPEC_NGRAM)
             for pl in plans], dtype=np.int64),
        spec_alpha=spec_alpha,
        spec_k_table=np.stack(
            [k_table(pl.speculative) if pl.speculative else np.zeros((8, 2), dtype=np.int64)
             for pl in plans]),
        draft_params=np.stack([pl.draft_params for pl in plans]),
    )
    q = make_requests(wl.num_requests)
    out = exp.outputs
    router = exp.cluster.router
    g = make_globals(
        ROUTER_CODES[router.policy], max(pl.max_num_seqs for pl in plans),
        out.window_seconds, out.max_windows, out.max_step_records if out.step_log else 0,
        run_seed, int(wl.req_session.max()) + 1,
        {
            GF_TEMPERATURE: router.temperature,
            GF_OVERLAP_CREDIT: router.overlap_score_credit,
            GF_PREFILL_SCALE: router.prefill_load_scale,
            GF_W_PREFIX: router.weights.prefix,
            GF_W_QUEUE: router.weights.queue,
            GF_W_KV: router.weights.kv_usage,
            GF_AFFINITY_FACTOR: router.affinity_overload_factor,
            GF_STALENESS: router.staleness_s,
        },
        n_rep,
        np.array([ROLE_CODES[pl.role] for pl in plans], dtype=np.int64),
    )
    link = exp.cluster.disaggregation.link
    p.rpi[:, RP_ROLE] = [ROLE_CODES[pl.role] for pl in plans]
    p.rpf[:, RP_LINK_BW] = link.bandwidth_gb_per_s * 1e9
    p.rpf[:, RP_LINK_LATENCY] = link.latency_s
    p.rpf[:, RP_KV_BYTES_TOKEN] = [pl.kv_bytes_per_token for pl in plans]
    g.gf[GF_LOCAL_PREFILL] = exp.cluster.disaggregation.local_prefill_threshold_tokens
    g.gi[G_CHUNK_HIST] = int(any(pl.speculative is not None for pl in plans))
    p.rpf[:, RP_H2D_BW] = [pl.h2d_bytes_per_s for pl in plans]
    p.rpi[:, RP_RETENTION] = [RETENTION_CODES[pl.retention] for pl in plans]
    p.rpf[:, RP_TTL] = [pl.ttl_s for pl in plans]
    p.rpf[:, RP_PREFETCH_MARGIN] = [pl.prefetch_margin_s for pl in plans]
    # one arrival per request at most, plus: one unpin or prefetch per finished request under a
    # retention policy, one load completion per running request with a host tier
    heap_size = wl.num_requests + 4 * n_rep + 16
    if any(pl.retention != "lru" for pl in plans):
        heap_size += wl.num_requests
    heap_size += sum(pl.max_num_seqs for pl in plans if pl.host_blocks > 0)
    heap = make_heap(heap_size)
    if not init_events(q, wl, heap, router.staleness_s):
        raise RuntimeError("event heap overflow while queueing arrivals")
    bar = ProgressBar(wl.num_requests, f"simulating {exp.name}", enabled=progress)
    chunk = check_every if check_every > 0 else max(int(pause_every), 1)
    loop_seconds = 0.0
    while True:
        t_loop = time.perf_counter()
        status = run_events(kv, q, p, wl, g, heap, chunk)
        loop_seconds += time.perf_counter() - t_loop
        bar.update(int(g.gi[G_NUM_DONE]))
        if on_chunk is not None:
            on_chunk(int(g.gi[G_NUM_DONE]), int(g.gi[G_NUM_EVENTS]))
        if check_every > 0:
            problems = check_kv(kv, q, wl)
            if problems:
                raise InvariantError(
                    f"after {int(g.gi[G_NUM_EVENTS])} events (t = {g.now[0]:.6f} s): "
                    + "; ".join(problems)
                )
        if status == CORE_PAUSED:
            continue
        if status == CORE_DONE:
            break
        if status == CORE_ERR_HEAP_FULL:
            raise RuntimeError("internal error: the event heap overflowed")
        if status == CORE_ERR_STUCK:
            raise RuntimeError(
                f"internal error: replica {int(g.gi[G_ERROR])} has queued work it cannot "
                "schedule"
            )
        raise RuntimeError(f"internal error: core returned status {status}")
    bar.close()
    wall = time.perf_counter() - t0
    # without speculative decoding every chunk is one token: the core skips that bookkeeping
    on_plain = np.isin(q.rqi[:, RQ_REPLICA], np.flatnonzero(p.rpi[:, RP_SPEC_ON] == 0))
    q.rqi[on_plain, RQ_CHUNKS] = q.rqi[on_plain, RQ_OUT_DONE]
    chunk_gap_hist = g.chunk_gap_hist if g.gi[G_CHUNK_HIST] else g.gap_hist.copy()
    requests = requests_frame(wl, q)
    replicas = pd.DataFrame(
        {
            "replica": np.arange(n_rep),
            "model": [p.model for p in plans],
            "hardware": [p.hardware for p in plans],
            "tp": [p.tp for p in plans],
            "num_blocks": [pl.num_blocks for pl in plans],
            "block_size": [p.block_size for p in plans],
            "num_steps": p.rpi[:, RP_NUM_STEPS],
            "busy_seconds": p.rpf[:, RP_BUSY_SECONDS],
            "prefill_tokens": p.rpi[:, RP_PREFILL_TOKENS],
            "decode_tokens": p.rpi[:, RP_DECODE_TOKENS],
            "preemptions": p.rpi[:, RP_PREEMPTIONS],
            "peak_used_blocks": p.rpi[:, RP_PEAK_USED],
            "peak_running": p.rpi[:, RP_PEAK_RUNNING],
            "evicted_blocks": kv.kvs[:, KS_EVICTED],
            "free_blocks_at_end": kv.kvs[:, KS_FREE],
            "draft_seconds": p.rpf[:, RP_DRAFT_SECONDS],
            "spec_proposed": p.rpi[:, RP_SPEC_PROPOSED],
            "spec_accepted": p.rpi[:, RP_SPEC_ACCEPTED],
            "spec_verifies": p.rpi[:, RP_SPEC_VERIFIES],
            "routed_requests": p.rpi[:, RP_ROUTED],
            "role": [pl.role for pl in plans],
            "kv_transfers_in": p.rpi[:, RP_XFER_IN],
            "kv_transfer_bytes_in": p.rpf[:, RP_XFER_BYTES_IN],
            "kv_link_busy_seconds": p.rpf[:, RP_XFER_SECONDS],
            "retention": [pl.retention for pl in plans],
            "host_capacity_blocks": kv.kvs[:, KS_HBLOCKS],
            "host_loads": p.rpi[:, RP_HOST_LOADS],
            "host_load_blocks": p.rpi[:, RP_HOST_LOAD_BLOCKS],
            "h2d_busy_seconds": p.rpf[:, RP_H2D_SECONDS],
            "host_stored_blocks": kv.kvs[:, KS_HSTORED],
            "host_evicted_blocks": kv.kvs[:, KS_HEVICTED],
            "host_peak_blocks": kv.kvs[:, KS_HPEAK],
            "pins": p.rpi[:, RP_PINS],
            "pins_broken": p.rpi[:, RP_PINS_BROKEN],
            "prefetches": p.rpi[:, RP_PREFETCHES],
            "prefetch_blocks": p.rpi[:, RP_PREFETCH_BLOCKS],
        }
    )
    steps = None
    if out.step_log:
        n_steps = int(g.gi[G_STEP_N])
        log = g.step_log[:n_steps]
        steps = pd.DataFrame(
            {
                "replica": log[:, SL_REPLICA].astype(np.int64),
                "start": log[:, SL_START],
                "end": log[:, SL_END],
                "num_seqs": log[:, SL_NUM_SEQS].astype(np.int64),
                "num_decodes": log[:, SL_NUM_DECODES].astype(np.int64),
                "prefill_tokens": log[:, SL_PREFILL_TOKENS].astype(np.int64),
                "used_blocks": log[:, SL_USED_BLOCKS].astype(np.int64),
                "num_waiting": log[:, SL_NUM_WAITING].astype(np.int64),
            }
        )
    scheduled = requests[requests["scheduled_time"].notna()]
    per_rep = scheduled.groupby("replica")[["prompt_tokens", "cached_tokens"]].sum()
    replicas["prompt_tokens"] = per_rep["prompt_tokens"].reindex(range(n_rep), fill_value=0)
    replicas["cached_tokens"] = per_rep["cached_tokens"].reindex(range(n_rep), fill_value=0)
    host = scheduled.groupby("replica")["host_cached_tokens"].sum()
    replicas["host_cached_tokens"] = host.reindex(range(n_rep), fill_value=0)
    replicas["prefix_cache_hit_rate"] = (
        replicas["cached_tokens"] / replicas["prompt_tokens"].where(replicas["prompt_tokens"] > 0)
    ).fillna(0.0)
    return Result(
        exp, plans, requests, replicas, g.gap_hist.copy(), wall, int(g.gi[G_NUM_EVENTS]),
        wl.req_output_tokens.copy(), exp.seed if seed is None else seed,
        chunk_gap_hist=chunk_gap_hist,
        steps=steps, steps_dropped=int(g.gi[G_STEP_DROPPED]),
        window_seconds=out.window_seconds, gap_hist_windows=g.gap_hist_win.copy(),
        decode_seconds_by_count=p.decode_seconds_by_count.copy(),
        loop_seconds=loop_seconds,
    )
