"""Runs are reproducible: a (experiment, seed) pair fixes every output bit for bit, in-process
and across interpreter processes with different hash seeds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from simulator.config import load_experiment
from simulator.invariants import check_result
from simulator.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "small_sessions.yaml"
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


def summary_text(summary: dict) -> str:
    """The summary without its wall-clock field, as canonical JSON (NaN-safe comparison)."""
    s = {k: v for k, v in summary.items() if k != "wall_seconds"}
    return json.dumps(s, sort_keys=True, default=float)


@pytest.fixture(scope="module")
def exp():
    return load_experiment(FIXTURE)


@pytest.fixture(scope="module")
def first_run(exp):
    return simulate(exp, progress=False)


def test_fixture_run_is_interesting(first_run):
    """Guard: the fixture exercises batching, prefix hits, evictions and dependencies."""
    s = first_run.summary()
    assert check_result(first_run) == []
    assert s["num_finished"] == s["num_requests"] > 40
    assert s["prefix_cache_hit_rate"] > 0.3
    assert s["num_evicted_blocks"] > 0
    assert first_run.replicas["peak_running"].iloc[0] > 1


def test_same_seed_identical(exp, first_run):
    again = simulate(exp, progress=False)
    pd.testing.assert_frame_equal(first_run.requests, again.requests, check_exact=True)
    pd.testing.assert_frame_equal(first_run.replicas, again.replicas, check_exact=True)
    assert (first_run.gap_hist == again.gap_hist).all()
    assert summary_text(first_run.summary()) == summary_text(again.summary())
    assert first_run.num_events == again.num_events


def test_seed_argument_equals_seed_in_experiment(exp):
    by_arg = simulate(exp, seed=9, progress=False)
    by_exp = simulate(exp.model_copy(update={"seed": 9}), progress=False)
    pd.testing.assert_frame_equal(by_arg.requests, by_exp.requests, check_exact=True)


def test_summary_reports_the_seed_actually_used(exp):
    """Regression: commit 1df6acd reported ``exp.seed`` even when ``seed=`` overrode it."""
    assert exp.seed != 9
    assert simulate(exp, seed=9, progress=False).summary()["seed"] == 9


def test_different_seed_differs(exp, first_run):
    other = simulate(exp, seed=exp.seed + 1, progress=False)
    assert not first_run.requests["arrival_time"].equals(other.requests["arrival_time"])
    assert len(first_run.requests) != len(other.requests) or not first_run.requests[
        "prompt_tokens"
    ].equals(other.requests["prompt_tokens"])
    assert summary_text(first_run.summary()) != summary_text(other.summary())


def _servesim() -> list[str]:
    script = Path(sys.executable).with_name("servesim")
    if script.exists():
        return [str(script)]
    found = shutil.which("servesim")
    assert found, "the servesim console script is not installed"
    return [found]


def _run_cli(experiment: Path, hashseed: str, cwd: Path) -> dict:
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [*_servesim(), "run", str(experiment), "--json", "--no-progress", "--out", str(cwd)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


@pytest.mark.parametrize("experiment", [FIXTURE, QUICKSTART], ids=["fixture", "quickstart"])
def test_subprocess_hashseed_independent(experiment, tmp_path):
    a = _run_cli(experiment, "0", tmp_path / "a")
    b = _run_cli(experiment, "123", tmp_path / "b")
    assert "wall_seconds" in a and "wall_seconds" in b
    assert a["num_finished"] > 0
    assert summary_text(a) == summary_text(b)
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "a" / "requests.parquet"),
        pd.read_parquet(tmp_path / "b" / "requests.parquet"),
        check_exact=True,
    )


def test_subprocess_matches_in_process(exp, first_run, tmp_path):
    out = _run_cli(FIXTURE, "7", tmp_path)
    assert summary_text(out) == summary_text(json.loads(json.dumps(first_run.summary())))
