"""Invariants of the core, checked after every single event of random runs.

:func:`simulator.simulate.simulate` builds the state and drives
:func:`simulator.core.loop.run_events`; here its ``run_events`` is replaced by one that runs a
single event at a time (``max_events=1``) and, after each, requires
:func:`simulator.invariants.check_kv` to find nothing (free + referenced + private blocks =
pool, the free queue holds exactly the cached-but-unreferenced blocks, no negative counts),
simulated time not to go back and no replica to run more than ``max_num_seqs`` requests. At
the end :func:`simulator.invariants.check_result` must find nothing, dependencies must hold (a
child is ready when its last parent finished and arrives ``wait_after_ready`` later), and the
results must equal those of an uninterrupted run. The checkers are shown to catch damage.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from test_reference_scenarios import MANY, Scenario, scenarios

import simulator.simulate
from simulator.config import parse_experiment
from simulator.core.kvcache import KN_FULL, KN_RES, KS_BLOCKS, KS_FREE
from simulator.core.loop import run_events
from simulator.core.state import CORE_PAUSED, RP_MAX_SEQS, RP_N_RUNNING, RQ_PRIVATE
from simulator.invariants import check_kv, check_result
from simulator.reference.builder import WorkloadBuilder

MAX_EXAMPLES = 2_000 if MANY else 25
REQUEST_COLUMNS = [
    "request_id",
    "replica",
    "status",
    "reject_reason",
    "ready_time",
    "arrival_time",
    "scheduled_time",
    "first_token_time",
    "finish_time",
    "cached_tokens",
    "output_tokens",
    "scheduled_tokens",
    "preemptions",
    "max_tbt",
]


class Stop(Exception):
    """Raised to leave simulate() with the state of a given event kept."""


class EventChecker:
    """Stands in for ``run_events``: one event at a time, invariants checked after each."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.events = 0
        self.last_time = -np.inf
        self.stop_after = stop_after  # keep the state of that event for inspection
        self.state = None

    def __call__(self, kv, q, p, wl, g, heap, max_events):
        for _ in range(max_events):
            status = run_events(kv, q, p, wl, g, heap, 1)
            self.events += 1
            self.check(kv, q, p, g, wl)
            if self.events == self.stop_after:
                self.state = (kv, q, p, wl, g, heap)
                raise Stop
            if status != CORE_PAUSED:
                return status
        return CORE_PAUSED

    def check(self, kv, q, p, g, wl) -> None:
        where = f"after event {self.events} (t = {g.now[0]})"
        problems = check_kv(kv, q, wl)
        assert not problems, f"{where}: {problems}"
        assert g.now[0] >= self.last_time, f"{where}: time went back from {self.last_time}"
        self.last_time = g.now[0]
        assert np.all(p.rpi[:, RP_N_RUNNING] <= p.rpi[:, RP_MAX_SEQS]), where
        assert np.all(q.rqi[:, RQ_PRIVATE] >= 0), where


@contextmanager
def checking_events(checker: EventChecker):
    with mock.patch.object(simulator.simulate, "run_events", checker):
        yield checker


def run(sc: Scenario, checker: EventChecker | None = None):
    exp = parse_experiment(sc.experiment)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN metrics of rejected requests
        if checker is None:
            return simulator.simulate.simulate(exp, workload=sc.workload, progress=False)
        with checking_events(checker):
            return simulator.simulate.simulate(exp, workload=sc.workload, progress=False)


def check_dependencies(df: pd.DataFrame, wl) -> None:
    for r in range(wl.num_requests):
        parents = wl.parent_ids[wl.req_parents_start[r] : wl.req_parents_start[r + 1]]
        row = df.iloc[r]
        if len(parents) == 0:
            assert row["ready_time"] == wl.req_arrival_time[r], r
        else:
            done = df.iloc[parents]
            if (done["status"] == "finished").all():
                assert row["ready_time"] == done["finish_time"].max(), r
            else:
                assert row["status"] == "rejected" and "parent" in row["reject_reason"], r
            assert row["ready_time"] >= np.nanmax(done["finish_time"].to_numpy(), initial=0.0)
        assert row["arrival_time"] == row["ready_time"] + wl.req_wait_after_ready[r], r


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=not MANY,  # CI: the same examples every run; --many explores new ones
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios(max_requests=20))
def test_invariants_hold_after_every_event(sc: Scenario):
    checker = EventChecker()
    stepped = run(sc, checker)
    assert check_result(stepped) == []
    assert (stepped.requests["status"] != "unfinished").all()
    assert (stepped.replicas["free_blocks_at_end"] == stepped.replicas["num_blocks"]).all()
    check_dependencies(stepped.requests, sc.workload)
    # pausing after every event changes nothing
    whole = run(sc)
    pd.testing.assert_frame_equal(
        stepped.requests[REQUEST_COLUMNS], whole.requests[REQUEST_COLUMNS], check_exact=True
    )
    assert stepped.num_events == whole.num_events == checker.events  # one event per call


def busy_scenario() -> Scenario:
    """Six requests sharing a prefix on a 14-block pool: hits, eviction, preemption."""
    b = WorkloadBuilder()
    shared = b.node(None, 48)
    for i in range(6):
        b.request([shared, b.node(shared, 60)], 48 + 20, 30, arrival=0.01 * i)
    return Scenario(
        {
            "model": "llama-3.1-8b",
            "hardware": "h100-sxm",
            "engine": {
                "num_gpu_blocks_override": 14,
                "max_num_seqs": 4,
                "max_num_batched_tokens": 64,
            },
            "workload": {
                "kind": "requests",
                "num_requests": 1,
                "arrival": {"process": "burst"},
                "prompt_tokens": 10,
                "output_tokens": 2,
            },
        },
        b.build(),
    )


def test_busy_scenario_is_busy():
    res = run(busy_scenario(), EventChecker())
    assert check_result(res) == []
    assert res.requests["preemptions"].sum() > 0
    assert res.requests["cached_tokens"].sum() > 0
    assert res.replicas["evicted_blocks"].sum() > 0


def test_check_kv_catches_corruption():
    """check_kv is silent on a consistent mid-run state and reports each kind of damage."""
    checker = EventChecker(stop_after=40)
    try:
        run(busy_scenario(), checker)
    except Stop:
        pass
    kv, q, *_ = checker.state
    assert check_kv(kv, q) == []
    assert kv.kvs[0, KS_FREE] < kv.kvs[0, KS_BLOCKS], "the scenario should hold blocks here"
    kv.kvs[0, KS_FREE] -= 1  # a block leaks
    assert any("!= pool" in s for s in check_kv(kv, q))
    kv.kvs[0, KS_FREE] += 1
    node = int(np.flatnonzero(kv.kvn[0, :, KN_RES])[0])
    kv.kvn[0, node, KN_RES] += 1  # a cached block appears from nowhere
    assert check_kv(kv, q) != []
    kv.kvn[0, node, KN_RES] -= 1
    assert check_kv(kv, q) == []
    private = int(np.flatnonzero(q.rqi[:, RQ_PRIVATE])[0])
    q.rqi[private, RQ_PRIVATE] += 1  # a request claims a block it does not hold
    assert any("!= pool" in s for s in check_kv(kv, q))


def test_check_references_catches_a_lost_reference():
    """The TTL bug the reference model found: a node's count misses a request that references
    it, so blocks return to the free queue while in use. Conservation alone cannot see that
    (its "referenced" figure comes from the same counts); recounting from the requests does."""
    checker = EventChecker(stop_after=40)
    try:
        run(busy_scenario(), checker)
    except Stop:
        pass
    kv, q, _, wl, *_ = checker.state
    assert check_kv(kv, q, wl) == []
    rep_nodes = np.argwhere(kv.kvn[:, :, KN_FULL] > 0)
    assert rep_nodes.size, "the scenario should have fully referenced nodes here"
    rep, node = (int(x) for x in rep_nodes[0])
    kv.kvn[rep, node, KN_FULL] -= 1  # one referencing request forgotten
    assert any("full references" in s for s in check_kv(kv, q, wl))
    kv.kvn[rep, node, KN_FULL] += 1
    assert check_kv(kv, q, wl) == []


def test_check_result_catches_violations():
    result = run(busy_scenario())
    assert check_result(result) == []

    def broken(column, row, value):
        df = result.requests.copy()
        df.loc[row, column] = value
        return check_result(type(result)(**{**result.__dict__, "requests": df}))

    first = result.requests.loc[2, "first_token_time"]
    assert any("first_token_time > finish_time" in s for s in broken("finish_time", 2, first - 1))
    clean = int(np.flatnonzero(result.requests["preemptions"] == 0)[0])
    extra = result.requests.loc[clean, "scheduled_tokens"] + 1
    assert any("scheduled" in s for s in broken("scheduled_tokens", clean, extra))
    assert any("neither finished nor rejected" in s for s in broken("status", 1, "unfinished"))
    assert any("emitted" in s for s in broken("output_tokens", 3, 0))
