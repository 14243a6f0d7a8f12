"""Sweep files, grid expansion, the sweep table, the Pareto frontier and `servesim sweep`."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from simulator.cli import main
from simulator.executor import TaskRunner
from simulator.search import StudyError, grid_points
from simulator.sweep import load_sweep, pareto_frontier, run_sweep

BASE = """\
name: sweep-test
experiment:
  name: sw
  seed: 3
  model: llama-3.1-8b
  hardware: h100-sxm
  workload:
    kind: requests
    num_requests: 100
    arrival: {process: poisson, rate: 5}
    prompt_tokens: {dist: lognormal, mean: 800, sigma: 0.5}
    output_tokens: {dist: lognormal, mean: 200, sigma: 0.5}
"""
GRID = """\
grid:
  engine.max_num_seqs: [16, 256]
  engine.weight_dtype: [bf16, fp8]
loads: {unit: rate, values: [4, 16], duration_s: 30}
slos: [ttft_p95 <= 0.75 s, tbt_p95 <= 75 ms]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(text)
    return p


def test_grid_points_order_and_names():
    pts = grid_points({"a": [1, 2], "b": ["x", "y", "z"]})
    assert len(pts) == 6
    assert pts[0].values == {"a": 1, "b": "x"} and pts[1].values == {"a": 1, "b": "y"}
    assert pts[0].label == "a=1 b=x"
    named = grid_points({"workload": {"linear": "l.yaml", "dag": "d.yaml"}, "tp": [1]})
    assert [p.values["workload"] for p in named] == ["l.yaml", "d.yaml"]
    assert [p.label for p in named] == ["workload=linear tp=1", "workload=dag tp=1"]
    assert grid_points({})[0].values == {} and grid_points({})[0].label == "base"


def test_pareto_frontier_keeps_only_non_dominated():
    df = pd.DataFrame(
        {
            "config": list("ABCDEF"),
            "load": [1.0] * 6,
            "tokens_per_s_per_user": [100, 80, 60, 90, 50, 100],
            "output_tokens_per_s_per_gpu": [1000, 2000, 3000, 1500, 2500, 900],
            "healthy": [True, True, True, True, True, True],
            "error": [""] * 6,
        }
    )
    f = pareto_frontier(df)
    assert list(f["config"]) == ["C", "B", "D", "A"]  # E is dominated by C, F by A
    df.loc[df["config"] == "C", "healthy"] = False
    f = pareto_frontier(df)
    assert "C" not in set(f["config"]) and "E" in set(f["config"])
    assert "C" in set(pareto_frontier(df, healthy_only=False)["config"])
    with pytest.raises(StudyError, match="no column 'speed'"):
        pareto_frontier(df, x="speed")


def test_run_sweep_table(tmp_path):
    study, exp = load_sweep(write(tmp_path, BASE + GRID))
    with TaskRunner(workers=1, progress=False) as runner:
        df = run_sweep(study, exp, runner)
    assert len(df) == 2 * 2 * 2
    assert set(df["config_id"]) == {0, 1, 2, 3}
    assert {
        "engine.max_num_seqs",
        "engine.weight_dtype",
        "load",
        "seed",
        "healthy",
        "ttft_p95",
        "tbt_p95",
        "output_tokens_per_s_per_gpu",
        "tokens_per_s_per_user",
        "num_gpus",
        "error",
    } <= set(df.columns)
    assert (df["error"] == "").all() and (df["seed"] == 3).all()
    # arrivals span 30 s at every load: the run is resized with the load
    assert set(df.groupby("load")["run_num_requests"].first()) == {120, 480}
    heavy = df[df["load"] == 16]
    assert (
        heavy["output_tokens_per_s_per_gpu"]
        > df[df["load"] == 4]["output_tokens_per_s_per_gpu"].max()
    ).all()
    assert df.loc[0, "config"] == "engine.max_num_seqs=16 engine.weight_dtype=bf16"
    path = tmp_path / "t.parquet"
    df.to_parquet(path)
    assert pd.read_parquet(path).shape == df.shape


def test_bad_sweep_files(tmp_path):
    with pytest.raises(StudyError, match="empty sweep grid: axis 'engine.tp' has no values"):
        load_sweep(write(tmp_path, BASE + "grid: {engine.tp: []}\n"))
    with pytest.raises(StudyError, match="empty sweep grid"):
        load_sweep(write(tmp_path, BASE))
    with pytest.raises(StudyError, match="engine.tpp"):
        load_sweep(write(tmp_path, BASE + "grid: {engine.tpp: [1, 2]}\n"))
    with pytest.raises(StudyError, match=r"sweep.yaml: slos\.0: unknown SLO metric 'ttft'"):
        load_sweep(write(tmp_path, BASE + "grid: {tp: [1]}\nslos: [ttft <= 1 s]\n"))
    with pytest.raises(StudyError, match="loads: .*low \\(5\\) is above high"):
        load_sweep(write(tmp_path, BASE + "loads: {low: 5, high: 1, num: 3}\n"))


def test_impossible_config_is_an_error_row(tmp_path):
    text = BASE.replace("llama-3.1-8b", "llama-3.1-70b") + "grid: {engine.tp: [1, 4]}\n"
    study, exp = load_sweep(write(tmp_path, text))
    with TaskRunner(workers=1, progress=False) as runner:
        df = run_sweep(study, exp, runner)
    assert df.loc[df["engine.tp"] == 1, "error"].str.len().iloc[0] > 0  # 70B bf16 on one H100
    assert df.loc[df["engine.tp"] == 4, "error"].iloc[0] == ""
    assert df.loc[df["engine.tp"] == 4, "num_gpus"].iloc[0] == 4


def test_cli_sweep_process_pool(tmp_path):
    study = write(tmp_path, BASE + GRID)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["sweep", str(study), "--workers", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (
        "4 configurations x 2 loads x 1 seeds = 8 runs on local process pool (2 workers)"
        in res.output
    )
    assert "Pareto frontier" in res.output
    df = pd.read_parquet(out / "sweep.parquet")
    meta = json.loads((out / "sweep.json").read_text())
    front = pd.read_csv(out / "frontier.csv")
    assert len(df) == meta["points"] == 8
    assert len(front) == len(meta["frontier"]["points"]) >= 1
    assert front["healthy"].all()
    # the pool gives the same numbers as this process
    study_obj, exp = load_sweep(study)
    with TaskRunner(workers=1, progress=False) as runner:
        local = run_sweep(study_obj, exp, runner)
    assert list(local["ttft_p95"]) == list(df["ttft_p95"])


def test_cli_sweep_bad_file(tmp_path):
    res = CliRunner().invoke(main, ["sweep", str(write(tmp_path, BASE + "grid: {}\n"))])
    assert res.exit_code == 2 and "empty sweep grid" in res.stderr
    res = CliRunner().invoke(main, ["sweep", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "file not found" in res.stderr


PER_REPLICA = """\
grid:
  replicas: [1, 2]
  router: [round_robin, least_outstanding]
loads: {unit: rate, values: [4], duration_s: 10, per_replica: true}
figure: {x: replicas, lines: router, metrics: [ttft_p95, prefix_cache_hit_rate], x_log: true}
steady_state: false
"""


def test_per_replica_load_scales_with_the_fleet_and_draws_lines(tmp_path):
    study, exp = load_sweep(write(tmp_path, BASE + PER_REPLICA))
    with TaskRunner(workers=1, progress=False) as runner:
        df = run_sweep(study, exp, runner)
    assert list(df["load"]) == [4.0] * 4
    assert list(df["offered_load"]) == [4.0, 4.0, 8.0, 8.0]
    # arrivals span 10 s at every point: twice the replicas, twice the requests
    assert list(df["run_num_requests"]) == [40, 40, 80, 80]
    assert {"gpu_cache_hit_rate", "host_cache_hit_rate", "run_num_host_loads",
            "run_num_prefetches", "run_num_pins_broken"} <= set(df.columns)
    out = tmp_path / "out"
    from simulator.sweep import write_sweep

    figures = write_sweep(df, pareto_frontier(df), study, out, 1.0)
    assert out / "plots" / "lines.png" in figures
    assert json.loads((out / "sweep.json").read_text())["figure"]["lines"] == "router"


def test_without_per_replica_the_load_is_the_fleets(tmp_path):
    study, exp = load_sweep(write(tmp_path, BASE + PER_REPLICA.replace(", per_replica: true", "")))
    with TaskRunner(workers=1, progress=False) as runner:
        df = run_sweep(study, exp, runner)
    assert list(df["offered_load"]) == [4.0] * 4
    assert list(df["run_num_requests"]) == [40] * 4


@pytest.mark.parametrize(
    "figure,needle",
    [("{x: tp, metrics: [ttft_p95]}", r"figure.x: 'tp' is not a grid axis"),
     ("{x: replicas, lines: gpu, metrics: [ttft_p95]}", r"figure.lines: 'gpu' is not a grid"),
     ("{x: replicas, metrics: [ttft_p97]}", r"figure.metrics.*unknown metric 'ttft_p97'"),
     ("{x: replicas, metrics: []}", r"figure.metrics")],
)
def test_bad_figure_is_named(tmp_path, figure, needle):
    text = BASE + "grid: {replicas: [1, 2]}\nfigure: " + figure + "\n"
    with pytest.raises(StudyError, match=needle):
        load_sweep(write(tmp_path, text))
