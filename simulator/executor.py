"""Run many independent simulations: a local process pool, or a Dask distributed cluster.

:class:`TaskRunner` maps a module-level function over a list of tasks and returns the results in
task order, drawing a progress bar with an ETA (:mod:`simulator.progress`)::

    with TaskRunner() as runner:                        # all cores, concurrent.futures
        results = runner.map(simulate_point, tasks, label="sweep")
    with TaskRunner(scheduler="tcp://10.0.0.5:8786"):   # a running Dask scheduler
        ...

* ``workers=1`` (or a single task) runs in this process: no pool, no pickling.
* The local pool forks (on Linux) after warming the Numba functions in the parent, so workers
  start with the compiled simulator already loaded.
* With ``scheduler``, tasks go to a ``distributed.Client`` (``pip install servesim[dist]``);
  the workers must be able to import :mod:`simulator`. A scheduler that cannot be reached raises
  :class:`ExecutorError` after ``connect_timeout`` seconds (5 s by default).

Task functions catch the errors that belong to one task (an impossible configuration) and return
them as data; anything else raised in a worker propagates here.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, wait
from typing import Any

from simulator.progress import ProgressBar

DEFAULT_CONNECT_TIMEOUT = 5.0


class ExecutorError(RuntimeError):
    """The executor cannot be set up (e.g. an unreachable scheduler); one line, for the user."""


def default_workers() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - not Linux
        return max(os.cpu_count() or 1, 1)


def warm_up() -> None:
    """Load (or compile) the simulator's Numba functions in this process."""
    from simulator.bench import bench_experiment
    from simulator.simulate import simulate

    simulate(bench_experiment(20), progress=False)


class TaskRunner:
    """A context manager that runs tasks locally or on a Dask cluster."""

    def __init__(
        self,
        scheduler: str | None = None,
        workers: int | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        progress: bool | None = None,
    ):
        if workers is not None and workers < 1:
            raise ExecutorError(f"--workers: must be >= 1 (got {workers})")
        self.scheduler = scheduler
        self.workers = workers or default_workers()
        self.progress = progress
        self._pool: Executor | None = None
        self._client = None
        if scheduler:
            self._client = _connect(scheduler, connect_timeout)

    # -- lifecycle
    def __enter__(self) -> TaskRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def description(self) -> str:
        if self._client is not None:
            n = len(self._client.scheduler_info().get("workers", {}))
            return f"Dask scheduler {self.scheduler} ({n} workers)"
        if self.workers == 1:
            return "this process (1 worker)"
        return f"local process pool ({self.workers} workers)"

    def _local_pool(self) -> Executor:
        if self._pool is None:
            ctx = None
            if sys.platform.startswith("linux"):
                warm_up()  # forked workers inherit the loaded Numba functions
                ctx = multiprocessing.get_context("fork")
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)
        return self._pool

    # -- running
    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], label: str = "tasks") -> list:
        """``[fn(t) for t in tasks]``, run in parallel; results in task order."""
        tasks = list(tasks)
        if not tasks:
            return []
        bar = ProgressBar(len(tasks), label, enabled=self.progress)
        results: list[Any] = [None] * len(tasks)
        try:
            if self._client is not None:
                self._map_dask(fn, tasks, results, bar)
            elif self.workers == 1 or len(tasks) == 1:
                for i, t in enumerate(tasks):
                    results[i] = fn(t)
                    bar.update(i + 1)
            else:
                self._map_pool(fn, tasks, results, bar)
        finally:
            bar.close()
        return results

    def _map_pool(self, fn, tasks, results, bar) -> None:
        pool = self._local_pool()
        pending = {pool.submit(fn, t): i for i, t in enumerate(tasks)}
        done_count = 0
        while pending:
            done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in done:
                results[pending.pop(fut)] = fut.result()
                done_count += 1
            bar.update(done_count)

    def _map_dask(self, fn, tasks, results, bar) -> None:
        from distributed import as_completed

        futures = self._client.map(fn, tasks, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        done = as_completed(futures, loop=self._client.loop)
        for n, fut in enumerate(done, start=1):
            results[index[fut.key]] = fut.result()
            bar.update(n)


def _connect(address: str, timeout: float):
    try:
        from distributed import Client
    except ImportError:
        raise ExecutorError(
            "--scheduler needs the Dask 'distributed' package: pip install 'servesim[dist]'"
        ) from None
    t0 = time.perf_counter()
    try:
        return Client(address, timeout=f"{timeout}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        waited = time.perf_counter() - t0
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExecutorError(
            f"--scheduler: cannot reach the Dask scheduler at {address!r} "
            f"(gave up after {waited:.1f} s: {detail})"
        ) from None
