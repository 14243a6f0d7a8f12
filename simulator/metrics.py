"""Results as pandas tables and summary statistics (latency percentiles, throughput, cache).

Definitions (WORKLOADS.md "What users measure"):

* TTFT = first token time - arrival time (the request reaching the cluster, i.e. ready time +
  ``wait_after_ready``), queueing included.
* TBT (ITL) = gap between successive tokens of one request, over *all* tokens of all requests,
  read from a fixed-memory log-binned histogram (200 bins per decade: <= 0.6 % relative error).
* TPOT = (finish - first token) / (output tokens - 1) per request with more than one token.
* E2E = finish time - arrival time.
* TBC = gap between successive token *chunks* of one request; without speculative decoding
  every chunk is one token and TBC == TBT. With it, a chunk of m tokens after a gap G counts
  as m per-token gaps of G/m in TBT, and once as G in TBC.
* Output speed = (output tokens - 1) / (finish - first token), tokens/s, per request.
* Prefix-cache hit rate = cached prompt tokens at first scheduling / prompt tokens, over the
  requests that were scheduled (vLLM's ``num_cached_tokens``). With a host KV tier it splits
  into a GPU part and a host part (``host_cached_tokens``: prompt tokens whose KV was copied
  back from host memory); ``host_load_time`` is the wait plus the copy that delayed the
  request's first step (queued behind other copies on its replica's PCIe link).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from simulator.core.state import (
    HIST_BINS_PER_DECADE,
    HIST_DECADES,
    HIST_MIN_SECONDS,
    REJECT_REASONS,
    RQ_ARRIVAL,
    RQ_CACHED,
    RQ_CHUNKS,
    RQ_DECODE_REPLICA,
    RQ_FINISH,
    RQ_FIRST_SCHED,
    RQ_FIRST_TOKEN,
    RQ_HOST_HIT,
    RQ_LOAD_END,
    RQ_MAX_GAP,
    RQ_OUT_DONE,
    RQ_PREEMPTIONS,
    RQ_PREFILL_REPLICA,
    RQ_READY,
    RQ_REJECT,
    RQ_REPLICA,
    RQ_SCHED_TOKENS,
    RQ_SPEC_ACCEPTED,
    RQ_SPEC_PROPOSED,
    RQ_STATUS,
    RQ_XFER_BYTES,
    RQ_XFER_END,
    RQ_XFER_QUEUED,
    RQ_XFER_START,
    ST_FINISHED,
    ST_REJECTED,
)

PERCENTILES = (50, 90, 95, 99)
# per-request output speed (tokens/s after the first token): the left tail matters
# (WORKLOADS.md: with speculative decoding p5 can worsen while p25-p50 improve)
SPEED_PERCENTILES = (5, 25, 50, 95)


def hist_percentile(hist: np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0-100) of a log-binned histogram, in seconds (NaN if empty).

    Returns the geometric centre of the bin holding the percentile; bin 0 (below 10 us) maps
    to 10 us and the overflow bin to its lower edge.
    """
    total = int(hist.sum())
    if total == 0:
        return float("nan")
    rank = max(int(np.ceil(q / 100.0 * total)), 1)
    b = int(np.searchsorted(np.cumsum(hist), rank))
    if b == 0:
        return HIST_MIN_SECONDS
    regular = HIST_BINS_PER_DECADE * HIST_DECADES
    if b > regular:
        return HIST_MIN_SECONDS * 10.0**HIST_DECADES
    return HIST_MIN_SECONDS * 10.0 ** ((b - 0.5) / HIST_BINS_PER_DECADE)


def hist_mean(hist: np.ndarray) -> float:
    total = int(hist.sum())
    if total == 0:
        return float("nan")
    b = np.arange(hist.shape[0], dtype=np.float64)
    centres = HIST_MIN_SECONDS * 10.0 ** ((b - 0.5) / HIST_BINS_PER_DECADE)
    centres[0] = HIST_MIN_SECONDS
    return float((hist * centres).sum() / total)


def _pcts(values: np.ndarray, prefix: str) -> dict[str, float]:
    values = values[np.isfinite(values)]
    out: dict[str, float] = {}
    if values.size == 0:
        for p in PERCENTILES:
            out[f"{prefix}_p{p}"] = float("nan")
        out[f"{prefix}_mean"] = float("nan")
        return out
    for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True):
        out[f"{prefix}_p{p}"] = float(v)
    out[f"{prefix}_mean"] = float(values.mean())
    return out


def _speed(out: np.ndarray, first: np.ndarray, finish: np.ndarray) -> np.ndarray:
    """Tokens/s after the first token; NaN for single-token or unfinished requests."""
    span = finish - first
    ok = (out > 1) & (span > 0)
    speed = np.full(out.shape[0], np.nan)
    speed[ok] = (out[ok] - 1) / span[ok]
    return speed


def requests_frame(wl, q) -> pd.DataFrame:
    """One row per request (times in seconds from the start of the simulation)."""
    rqi, rqf = q.rqi, q.rqf
    st = rqi[:, RQ_STATUS]
    status = np.where(st == ST_FINISHED, "finished",
                      np.where(st == ST_REJECTED, "rejected", "unfinished"))
    reasons = np.array([REJECT_REASONS[k] for k in sorted(REJECT_REASONS)], dtype=object)
    cached_raw = rqi[:, RQ_CACHED]
    cached = np.maximum(cached_raw, 0)
    out = wl.req_output_tokens
    first, finish, arrival = rqf[:, RQ_FIRST_TOKEN], rqf[:, RQ_FINISH], rqf[:, RQ_ARRIVAL]
    tpot = np.where(out > 1, (finish - first) / np.maximum(out - 1, 1), np.nan)
    return pd.DataFrame(
        {
            "request_id": np.arange(wl.num_requests, dtype=np.int64),
            "session_id": wl.req_session,
            "replica": rqi[:, RQ_REPLICA],
            "status": pd.Categorical(status, categories=["finished", "rejected", "unfinished"]),
            "reject_reason": reasons[rqi[:, RQ_REJECT]],
            "ready_time": rqf[:, RQ_READY],
            "arrival_time": arrival,
            "scheduled_time": rqf[:, RQ_FIRST_SCHED],
            "first_token_time": first,
            "finish_time": finish,
            "prompt_tokens": wl.req_prompt_tokens,
            "cached_tokens": cached,
            "computed_prompt_tokens": np.where(cached_raw >= 0, wl.req_prompt_tokens - cached, 0),
            "output_tokens": rqi[:, RQ_OUT_DONE],
            "scheduled_tokens": rqi[:, RQ_SCHED_TOKENS],
            "preemptions": rqi[:, RQ_PREEMPTIONS],
            "ttft": first - arrival,
            "tpot": tpot,
            "e2e": finish - arrival,
            "queue_time": rqf[:, RQ_FIRST_SCHED] - arrival,
            "max_tbt": np.where(out > 1, rqf[:, RQ_MAX_GAP], np.nan),
            "output_speed": _speed(out, first, finish),
            "chunks": rqi[:, RQ_CHUNKS],
            "spec_proposed": rqi[:, RQ_SPEC_PROPOSED],
            "spec_accepted": rqi[:, RQ_SPEC_ACCEPTED],
            "prefill_replica": rqi[:, RQ_PREFILL_REPLICA],
            "decode_replica": rqi[:, RQ_DECODE_REPLICA],
            "kv_transfer_bytes": rqf[:, RQ_XFER_BYTES],
            "kv_wait": rqf[:, RQ_XFER_START] - rqf[:, RQ_XFER_QUEUED],
            "kv_transfer_time": rqf[:, RQ_XFER_END] - rqf[:, RQ_XFER_START],
            "host_cached_tokens": rqi[:, RQ_HOST_HIT],
            "host_load_time": rqf[:, RQ_LOAD_END] - rqf[:, RQ_FIRST_SCHED],
        }
    )


def _col_sum(frame: pd.DataFrame, column: str) -> int:
    return int(frame[column].sum()) if column in frame else 0


def _imbalance(replicas: pd.DataFrame) -> float:
    """Busiest replica's busy time over the mean (1.0 = perfectly even)."""
    busy = replicas["busy_seconds"].to_numpy()
    return float(busy.max() / busy.mean()) if busy.size and busy.mean() > 0 else 1.0


def summarize(requests: pd.DataFrame, replicas: pd.DataFrame, gap_hist: np.ndarray,
              num_gpus: int, chunk_gap_hist: np.ndarray | None = None,
              ) -> dict[str, float | int | str | dict]:
    """The summary of one run: counts, latency percentiles, throughput, cache and KV figures."""
    fin = requests[requests["status"] == "finished"]
    rej = requests[requests["status"] == "rejected"]
    start = float(np.nanmin(requests["arrival_time"])) if len(requests) else 0.0
    end = float(np.nanmax(fin["finish_time"])) if len(fin) else start
    duration = max(end - start, 0.0)
    out_tokens = int(fin["output_tokens"].sum())
    scheduled = requests[requests["scheduled_time"].notna()]
    prompt = int(scheduled["prompt_tokens"].sum())
    cached = int(scheduled["cached_tokens"].sum())
    host_cached = _col_sum(scheduled, "host_cached_tokens")
    summary: dict = {
        "num_requests": int(len(requests)),
        "num_finished": int(len(fin)),
        "num_rejected": int(len(rej)),
        "num_unfinished": int(len(requests) - len(fin) - len(rej)),
        "reject_reasons": {str(k): int(v) for k, v in rej["reject_reason"].value_counts().items()},
        "simulated_seconds": duration,
    }
    summary |= _pcts(fin["ttft"].to_numpy(), "ttft")
    for p in PERCENTILES:
        summary[f"tbt_p{p}"] = hist_percentile(gap_hist, p)
    summary["tbt_mean"] = hist_mean(gap_hist)
    if chunk_gap_hist is not None and chunk_gap_hist.size:
        for p in PERCENTILES:
            summary[f"tbc_p{p}"] = hist_percentile(chunk_gap_hist, p)
    speed = fin["output_speed"].to_numpy()
    speed = speed[np.isfinite(speed)]
    for p in SPEED_PERCENTILES:
        summary[f"speed_p{p}"] = float(np.percentile(speed, p)) if speed.size else float("nan")
    proposed = int(replicas["spec_proposed"].sum()) if "spec_proposed" in replicas else 0
    if proposed:
        accepted = int(replicas["spec_accepted"].sum())
        summary["spec_acceptance_rate"] = accepted / proposed
        summary["spec_mean_accepted_length"] = 1.0 + accepted / int(replicas["spec_verifies"].sum())
    summary |= _pcts(fin["tpot"].to_numpy(), "tpot")
    summary |= _pcts(fin["e2e"].to_numpy(), "e2e")
    summary |= _pcts(fin["queue_time"].to_numpy(), "queue_time")
    if (requests["decode_replica"] >= 0).any():
        summary |= _pcts(fin["kv_wait"].to_numpy(), "kv_wait")
        summary |= _pcts(fin["kv_transfer_time"].to_numpy(), "kv_transfer_time")
    if host_cached:
        summary |= _pcts(fin["host_load_time"].dropna().to_numpy(), "host_load_time")
    tput = out_tokens / duration if duration > 0 else float("nan")
    summary |= {
        "output_tokens": out_tokens,
        "output_tokens_per_s": tput,
        "output_tokens_per_s_per_gpu": tput / max(num_gpus, 1),
        "input_tokens_per_s": float(fin["prompt_tokens"].sum()) / duration if duration > 0 else float("nan"),
        "requests_per_s": len(fin) / duration if duration > 0 else float("nan"),
        "prefix_cache_hit_rate": cached / prompt if prompt else 0.0,
        "gpu_cache_hit_rate": (cached - host_cached) / prompt if prompt else 0.0,
        "host_cache_hit_rate": host_cached / prompt if prompt else 0.0,
        "num_preemptions": int(requests["preemptions"].sum()),
        "peak_kv_usage": float((replicas["peak_used_blocks"] / replicas["num_blocks"]).max()),
        "num_evicted_blocks": int(replicas["evicted_blocks"].sum()),
        "load_imbalance": _imbalance(replicas),
        "kv_transfer_bytes": float(requests["kv_transfer_bytes"].sum()),
        "num_host_loads": _col_sum(replicas, "host_loads"),
        "num_pins": _col_sum(replicas, "pins"),
        "num_pins_broken": _col_sum(replicas, "pins_broken"),
        "num_prefetches": _col_sum(replicas, "prefetches"),
        "host_tier": bool(_col_sum(replicas, "host_capacity_blocks") > 0),
        "num_gpus": int(num_gpus),
        "num_replicas": int(len(replicas)),
    }
    return summary


def fmt_seconds(x: float | None) -> str:
    """A duration for people: microseconds, milliseconds or seconds; "-" when unknown."""
    if x is None or not math.isfinite(x):
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.0f} us"
    if x < 1.0:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.2f} s"
