"""TaskRunner: in-process, local process pool, a Dask LocalCluster of 2 workers, and an
unreachable scheduler."""

from __future__ import annotations

import operator
import time

import pytest
from click.testing import CliRunner

from simulator.bench import bench_experiment
from simulator.cli import main
from simulator.executor import ExecutorError, TaskRunner, default_workers
from simulator.search import PointTask, evaluate_point


def tasks():
    exp = bench_experiment(100)
    return [PointTask(exp, load, "rate", 20.0, seed) for load in (4.0, 12.0) for seed in (0, 1)]


def test_in_process_and_pool_agree():
    assert default_workers() >= 1
    with TaskRunner(workers=1, progress=False) as r:
        assert r.map(operator.neg, [1, 2, 3]) == [-1, -2, -3]
        serial = r.map(evaluate_point, tasks())
    with TaskRunner(workers=2, progress=False) as r:
        assert "process pool (2 workers)" in r.description
        pooled = r.map(evaluate_point, tasks())
        assert r.map(operator.neg, list(range(20))) == [-i for i in range(20)]
    assert [s["ttft_p95"] for s in serial] == [s["ttft_p95"] for s in pooled]
    assert serial[0]["num_requests"] != serial[2]["num_requests"]  # loads differ
    with pytest.raises(ExecutorError, match="--workers: must be >= 1"):
        TaskRunner(workers=0)


def test_dask_local_cluster_two_workers():
    distributed = pytest.importorskip("distributed")
    # two worker threads in this process (no process start-up), behind a real scheduler: tasks
    # are serialised and shipped over the scheduler's comms as on a remote cluster
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        with TaskRunner(scheduler=cluster.scheduler_address, progress=False) as r:
            assert "2 workers" in r.description
            results = r.map(evaluate_point, tasks())
    with TaskRunner(workers=1, progress=False) as r:
        local = r.map(evaluate_point, tasks())
    assert [s["ttft_p95"] for s in results] == [s["ttft_p95"] for s in local]


def test_unreachable_scheduler_fails_fast():
    pytest.importorskip("distributed")
    t0 = time.perf_counter()
    with pytest.raises(
        ExecutorError, match="cannot reach the Dask scheduler at 'tcp://127.0.0.1:9'"
    ):
        TaskRunner(scheduler="tcp://127.0.0.1:9", connect_timeout=1.0)
    assert time.perf_counter() - t0 < 10


def test_cli_unreachable_scheduler_within_10s(tmp_path):
    pytest.importorskip("distributed")
    study = tmp_path / "s.yaml"
    study.write_text(
        "experiment: {model: llama-3.1-8b, hardware: h100-sxm, workload: {kind: requests, "
        "num_requests: 10, arrival: {process: poisson, rate: 1}, prompt_tokens: 100, "
        "output_tokens: 10}}\ngrid: {tp: [1]}\n"
    )
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["sweep", str(study), "--scheduler", "tcp://127.0.0.1:9"])
    assert time.perf_counter() - t0 < 10
    assert res.exit_code == 2
    assert "cannot reach the Dask scheduler" in res.stderr
