"""Per-session timelines from the per-request results (``simulator.metrics.requests_frame``).

Where does a session's time go? One row per session (seconds):

* ``start``: the first request ready; ``end``: the last request finished; ``span = end - start``;
* sums over the session's requests: ``tool_s`` (ready -> dispatch: ``wait_after_ready``, i.e. tool
  latency and think time), ``queue_s`` (dispatch -> first scheduled), ``prefill_s`` (first
  scheduled -> first token), ``decode_s`` (first token -> finish);
* unions over the session's requests, so that parallel requests are not counted twice:
  ``gpu_s`` (time with at least one request scheduled and unfinished), ``in_system_s`` (time with
  at least one request dispatched and unfinished: queued or on the GPU), ``idle_s = span -
  in_system_s`` (nothing in flight: waiting for tools or the user), ``queue_only_s = in_system_s
  - gpu_s``;
* ``idle_fraction = idle_s / span``: a fleet holds about ``1 / (1 - idle_fraction)`` times the
  sessions a no-tool benchmark predicts (WORKLOADS.md, "teaching tool-call gaps").

Requests that never started (rejected, unfinished) contribute nothing to the unions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["session_timelines", "interval_union"]


def interval_union(
    group: np.ndarray, start: np.ndarray, end: np.ndarray, num_groups: int
) -> np.ndarray:
    """Total length of the union of ``[start, end)`` intervals per group (NaN intervals skipped)."""
    ok = np.isfinite(start) & np.isfinite(end) & (end > start)
    g, s, e = group[ok], start[ok], end[ok]
    out = np.zeros(num_groups, dtype=np.float64)
    if g.size == 0:
        return out
    order = np.lexsort((s, g))
    g, s, e = g[order], s[order], e[order]
    # running max of the ends before each interval, restarted at each group
    cm = pd.Series(e).groupby(g).cummax().to_numpy()
    prev = np.empty_like(cm)
    prev[0] = -np.inf
    prev[1:] = cm[:-1]
    first = np.ones(g.size, dtype=bool)
    first[1:] = g[1:] != g[:-1]
    prev[first] = -np.inf
    contrib = np.maximum(0.0, e - np.maximum(s, prev))
    np.add.at(out, g, contrib)
    return out


def session_timelines(requests: pd.DataFrame) -> pd.DataFrame:
    """One row per session: where its time went (see the module docstring)."""
    sess_ids, sess = np.unique(requests["session_id"].to_numpy(), return_inverse=True)
    num = sess_ids.shape[0]
    ready = requests["ready_time"].to_numpy(dtype=np.float64)
    arrival = requests["arrival_time"].to_numpy(dtype=np.float64)
    sched = requests["scheduled_time"].to_numpy(dtype=np.float64)
    first = requests["first_token_time"].to_numpy(dtype=np.float64)
    finish = requests["finish_time"].to_numpy(dtype=np.float64)

    def total(x: np.ndarray) -> np.ndarray:
        out = np.zeros(num, dtype=np.float64)
        ok = np.isfinite(x)
        np.add.at(out, sess[ok], x[ok])
        return out

    def extreme(x: np.ndarray, fn) -> np.ndarray:
        s = pd.Series(x).groupby(sess).agg(fn)
        return s.reindex(range(num)).to_numpy(dtype=np.float64)

    start = extreme(ready, "min")
    end = extreme(finish, "max")
    span = end - start
    in_system = interval_union(sess, arrival, finish, num)
    gpu = interval_union(sess, sched, finish, num)
    status = requests["status"].astype(str).to_numpy()
    frame = pd.DataFrame(
        {
            "session_id": sess_ids,
            "num_requests": np.bincount(sess, minlength=num),
            "num_finished": np.bincount(sess[status == "finished"], minlength=num),
            "start": start,
            "end": end,
            "span_s": span,
            "tool_s": total(arrival - ready),
            "queue_s": total(sched - arrival),
            "prefill_s": total(first - sched),
            "decode_s": total(finish - first),
            "gpu_s": gpu,
            "in_system_s": in_system,
            "queue_only_s": in_system - gpu,
            "idle_s": span - in_system,
        }
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        frame["idle_fraction"] = np.where(span > 0, frame["idle_s"] / span, np.nan)
    return frame
