"""A run's timeline as Chrome / Perfetto trace JSON (open it in ui.perfetto.dev or
chrome://tracing).

Each replica is a process track (``pid`` = replica index) whose thread "engine steps" holds one
complete slice (``ph: X``) per engine step, named by what the step did (``prefill``,
``decode``, ``mixed``), with the step's batch in ``args``; counter tracks (``ph: C``) follow the
KV blocks in use and the waiting queue. Times are microseconds of simulated time.

Input is ``Result.steps`` (``outputs.step_log: true``) or a run directory's ``steps.parquet``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_MAX_STEPS = 1_000_000


class TraceError(ValueError):
    """No step log to export; the message says how to record one."""


def _step_name(num_decodes: int, num_seqs: int, prefill_tokens: int) -> str:
    if prefill_tokens > 0 and num_decodes > 0:
        return "mixed"
    if prefill_tokens > 0:
        return "prefill"
    return "decode" if num_decodes > 0 else "idle"


def chrome_trace(
    steps: pd.DataFrame,
    replicas: pd.DataFrame | None = None,
    start: float | None = None,
    end: float | None = None,
    max_steps: int | None = DEFAULT_MAX_STEPS,
) -> dict:
    """The trace as a dict (``{"traceEvents": [...], ...}``); steps overlapping
    [``start``, ``end``] only, at most ``max_steps`` of them (the earliest)."""
    if steps is None:
        raise TraceError("no step log: run the experiment with outputs.step_log: true")
    sel = steps
    if start is not None:
        sel = sel[sel["end"] >= start]
    if end is not None:
        sel = sel[sel["start"] <= end]
    sel = sel.sort_values(["start", "replica"], kind="stable")
    truncated = max_steps is not None and len(sel) > max_steps
    if truncated:
        sel = sel.iloc[:max_steps]
    events: list[dict] = []
    reps = sorted(set(int(r) for r in sel["replica"].unique()))
    if replicas is not None:
        reps = sorted(set(reps) | set(int(r) for r in replicas["replica"]))
    for r in reps:
        name = f"replica {r}"
        if replicas is not None and r in set(replicas["replica"]):
            row = replicas[replicas["replica"] == r].iloc[0]
            name += f" ({row['model']} on {row['hardware']} x{int(row['tp'])})"
        events.append({"name": "process_name", "ph": "M", "pid": r, "args": {"name": name}})
        events.append(
            {"name": "process_sort_index", "ph": "M", "pid": r, "args": {"sort_index": r}}
        )
        events.append(
            {"name": "thread_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": "engine steps"}}
        )
    cols = {c: sel[c].to_numpy() for c in sel.columns}
    ts = np.round(cols["start"] * 1e6, 3)
    dur = np.round((cols["end"] - cols["start"]) * 1e6, 3)
    for i in range(len(sel)):
        rep = int(cols["replica"][i])
        nd, ns, pt = (
            int(cols["num_decodes"][i]),
            int(cols["num_seqs"][i]),
            int(cols["prefill_tokens"][i]),
        )
        t = float(ts[i])
        events.append(
            {
                "name": _step_name(nd, ns, pt),
                "cat": "step",
                "ph": "X",
                "pid": rep,
                "tid": 0,
                "ts": t,
                "dur": float(dur[i]),
                "args": {
                    "num_seqs": ns,
                    "num_decodes": nd,
                    "prefill_tokens": pt,
                    "used_blocks": int(cols["used_blocks"][i]),
                    "num_waiting": int(cols["num_waiting"][i]),
                },
            }
        )
        events.append(
            {
                "name": "KV blocks used",
                "ph": "C",
                "pid": rep,
                "ts": t,
                "args": {"used_blocks": int(cols["used_blocks"][i])},
            }
        )
        events.append(
            {
                "name": "queue",
                "ph": "C",
                "pid": rep,
                "ts": t,
                "args": {"waiting": int(cols["num_waiting"][i]), "running": ns},
            }
        )
    meta = {"steps": int(len(sel)), "truncated": bool(truncated), "time_unit": "us (simulated)"}
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": meta}


def export_trace(
    steps: pd.DataFrame,
    path: str | Path,
    replicas: pd.DataFrame | None = None,
    start: float | None = None,
    end: float | None = None,
    max_steps: int | None = DEFAULT_MAX_STEPS,
) -> int:
    """Write the trace JSON to ``path``; returns the number of steps written."""
    trace = chrome_trace(steps, replicas, start, end, max_steps)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        json.dump(trace, f, separators=(",", ":"))
    return int(trace["otherData"]["steps"])


def steps_from_source(source: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None, Path]:
    """Steps (and replicas) from a run directory, or from simulating an experiment YAML with
    the step log on; also the default output path."""
    source = Path(source)
    if source.is_dir():
        f = source / "steps.parquet"
        if not f.is_file():
            raise TraceError(
                f"{source}: no steps.parquet: run the experiment with "
                "outputs.step_log: true (servesim run EXP --out DIR)"
            )
        reps = source / "replicas.parquet"
        return (
            pd.read_parquet(f),
            pd.read_parquet(reps) if reps.is_file() else None,
            source / "trace.json",
        )
    from simulator.config import load_experiment
    from simulator.simulate import simulate

    exp = load_experiment(source)
    exp = exp.model_copy(update={"outputs": exp.outputs.model_copy(update={"step_log": True})})
    result = simulate(exp)
    return result.steps, result.replicas, source.with_suffix(".trace.json")
