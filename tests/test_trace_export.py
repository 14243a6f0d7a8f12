"""Chrome/Perfetto trace export: replicas as processes, steps as complete slices."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from simulator.cli import main
from simulator.trace_export import TraceError, chrome_trace, export_trace

STEPS = pd.DataFrame(
    {
        "replica": [0, 1, 0, 1],
        "start": [0.0, 0.001, 0.010, 0.012],
        "end": [0.010, 0.012, 0.018, 0.020],
        "num_seqs": [2, 1, 3, 1],
        "num_decodes": [0, 0, 2, 1],
        "prefill_tokens": [1000, 500, 300, 0],
        "used_blocks": [70, 30, 95, 32],
        "num_waiting": [1, 0, 0, 0],
    }
)
REPLICAS = pd.DataFrame(
    {"replica": [0, 1], "model": ["m", "m"], "hardware": ["h100", "h100"], "tp": [1, 1]}
)


def slices(trace):
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def test_steps_become_slices_on_replica_tracks():
    trace = chrome_trace(STEPS, REPLICAS)
    xs = slices(trace)
    assert len(xs) == 4
    first = xs[0]
    assert first["pid"] == 0 and first["ts"] == 0.0 and first["dur"] == pytest.approx(10_000)
    assert [e["name"] for e in xs] == ["prefill", "prefill", "mixed", "decode"]
    assert xs[2]["args"] == {
        "num_seqs": 3,
        "num_decodes": 2,
        "prefill_tokens": 300,
        "used_blocks": 95,
        "num_waiting": 0,
    }
    names = {
        e["pid"]: e["args"]["name"]
        for e in trace["traceEvents"]
        if e["ph"] == "M" and e["name"] == "process_name"
    }
    assert names == {0: "replica 0 (m on h100 x1)", 1: "replica 1 (m on h100 x1)"}
    counters = [e for e in trace["traceEvents"] if e["ph"] == "C"]
    assert len(counters) == 8
    # slices on one track never overlap (a replica runs one step at a time)
    for rep in (0, 1):
        mine = [e for e in xs if e["pid"] == rep]
        for a, b in zip(mine, mine[1:], strict=False):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-6


def test_window_and_truncation(tmp_path):
    trace = chrome_trace(STEPS, start=0.011, end=1.0)
    assert len(slices(trace)) == 3  # the first step ends before 0.011
    trace = chrome_trace(STEPS, max_steps=2)
    assert len(slices(trace)) == 2 and trace["otherData"]["truncated"]
    path = tmp_path / "t.json"
    assert export_trace(STEPS, path) == 4
    assert len(slices(json.loads(path.read_text()))) == 4
    with pytest.raises(TraceError, match="step_log"):
        chrome_trace(None)


def test_cli_trace(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    STEPS.to_parquet(run / "steps.parquet")
    REPLICAS.to_parquet(run / "replicas.parquet")
    res = CliRunner().invoke(main, ["trace", str(run)])
    assert res.exit_code == 0, res.output
    assert len(slices(json.loads((run / "trace.json").read_text()))) == 4
    (run / "steps.parquet").unlink()
    res = CliRunner().invoke(main, ["trace", str(run)])
    assert res.exit_code == 2 and "outputs.step_log: true" in res.stderr


def test_trace_of_an_experiment_file(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text(
        "name: t\nmodel: llama-3.1-8b\nhardware: h100-sxm\nworkload: {kind: requests, "
        "num_requests: 20, arrival: {process: poisson, rate: 5}, prompt_tokens: 200, "
        "output_tokens: 20}\n"
    )
    out = tmp_path / "x.json"
    res = CliRunner().invoke(main, ["trace", str(exp), "--out", str(out)])
    assert res.exit_code == 0, res.output
    xs = slices(json.loads(out.read_text()))
    assert len(xs) >= 20  # at least one step per output position
    assert sum(e["args"]["prefill_tokens"] for e in xs) >= 20 * 200 - 20 * 16
