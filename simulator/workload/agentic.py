"""``kind: agentic``: synthetic agent sessions (linear chains, branching DAGs, subagent trees,
compaction) generated from distributions.

YAML::

    kind: agentic
    scaffolds:                          # shared content, by name (a parent is a shared prefix)
      system: {tokens: 10000}
      main_tools: {tokens: 4000, parent: system}
      sub_tools: {tokens: 1500, parent: system}
    agents:
      main:                             # the entry agent (default: the first one listed)
        scaffold: main_tools            # every chain of this agent starts with it
        graph: {type: linear, turns: {dist: uniform, low: 20, high: 60}}
        first_input_tokens: {dist: lognormal, mean: 600, sigma: 0.6}   # the task / user text
        fresh_input_tokens: {dist: inverse_gaussian, mean: 815, shape: 200}   # tool results
        output_tokens: {dist: inverse_gaussian, mean: 615, shape: 145}
        wait_after_ready: {dist: spike_pareto, spike: 0.032, spike_sigma: 0.8,
                           tail_probability: 0.1, tail_min: 1.0, tail_alpha: 0.9}
        spawn: {agent: researcher, count: {dist: poisson, mean: 2}, result_fan_in: 1.0}
        compaction: {context_limit: 120000, prompt_tokens: 200, summary_tokens: 3000}
      researcher:
        scaffold: sub_tools
        graph: {type: linear, turns: {dist: uniform, low: 5, high: 20}}
        ...
    entry_agent: main
    max_spawn_depth: 2
    traffic: {mode: rate, process: poisson, sessions_per_s: 0.2, max_sessions: 100}

Graphs of one agent instance (requests numbered in generation order):

* ``linear{turns, inherit_history=true}``: a chain; each turn's history parent is the previous
  turn (``inherit_history: false``: a dependency only, every turn starts from the scaffold).
* ``branching{layers, width, fan_out, fan_in, connection_distance, inherit_history, single_root}``
  (Veeksha's layered DAG): ``layers`` per instance, ``width`` per layer (1 for the first layer
  with ``single_root``); each node of a layer ``l`` gets ``fan_out`` edges to distinct nodes of
  layer ``l + connection_distance`` (capped at the last layer); then each node of a layer ``l >= 1``
  with fewer than ``fan_in`` parents gets more from layer ``l - 1`` (as many as exist). With
  ``inherit_history``, one parent, uniformly chosen, is the history parent.

Requests without a history parent (roots) take ``first_input_tokens`` as fresh input, the others
``fresh_input_tokens``; each request waits ``wait_after_ready`` after its parents (top-level roots
start with their session). Prompts follow the session-graph rules (history parent's conversation
+ fresh input; roots: scaffold + fresh input).

Subagents: an instance at depth ``d < max_spawn_depth`` spawns ``spawn.count`` instances of agent
``spawn.agent`` (a count that may be 0). Each spawn happens at a request with a child in its own
graph, uniformly chosen (several spawns may share one: parallel subagents). The subagent's roots
depend on that request (no history: they start from the subagent's scaffold + a task description,
its ``first_input_tokens``). With probability ``result_fan_in`` the subagent's result (the output
of its last request) returns: the spawning request's first child depends on that last request and
gets the result tokens as extra fresh input (fan-in).

Compaction (per agent, see :mod:`simulator.workload.compaction`) is applied after generation.
A session is one top-level instance with all its subagents. Requests come out session by session,
each session in a topological order. Deterministic for a (spec, seed) pair.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from numba import njit
from pydantic import BaseModel, ConfigDict, Field, model_validator

from simulator.workload.compaction import Compaction
from simulator.workload.compiled import WorkloadError
from simulator.workload.distributions import (
    Count0Dist,
    Dist,
    Fixed,
    FixedTime,
    TimeDist,
    Uniform,
    sample_counts,
    sample_times,
)
from simulator.workload.graph import (
    SessionGraph,
    apply_compaction,
    csr_from_edges,
    make_graph,
    topo_order,
)
from simulator.workload.traffic import RateTraffic, Traffic, apply_closed_loop, plan_sessions

__all__ = [
    "ScaffoldSpec",
    "LinearGraph",
    "BranchingGraph",
    "SpawnSpec",
    "AgentSpec",
    "AgenticWorkload",
    "generate_sessions",
    "agentic_graph",
]

_I64 = np.int64


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScaffoldSpec(_Model):
    """Shared content (system prompt, tool definitions); ``parent`` is a scaffold it extends."""

    tokens: Annotated[int, Field(ge=1)]
    parent: str | None = None


class LinearGraph(_Model):
    type: Literal["linear"] = "linear"
    turns: Dist
    inherit_history: bool = True


class BranchingGraph(_Model):
    type: Literal["branching"] = "branching"
    layers: Dist = Uniform(low=2, high=5)
    width: Dist = Uniform(low=1, high=3)
    fan_out: Dist = Uniform(low=1, high=2)
    fan_in: Dist = Uniform(low=1, high=2)
    connection_distance: Dist = Fixed(value=1)
    inherit_history: bool = True
    single_root: bool = True


class SpawnSpec(_Model):
    agent: str
    count: Count0Dist
    result_fan_in: Annotated[float, Field(ge=0, le=1)] = 1.0


class AgentSpec(_Model):
    scaffold: str | None = None
    graph: Annotated[LinearGraph | BranchingGraph, Field(discriminator="type")]
    first_input_tokens: Dist
    fresh_input_tokens: Dist
    output_tokens: Dist
    wait_after_ready: TimeDist = FixedTime(value=0.0)
    spawn: SpawnSpec | None = None
    compaction: Compaction | None = None


class AgenticWorkload(_Model):
    """Synthetic agent sessions: scaffolds, agent types, subagents, compaction, traffic."""

    kind: Literal["agentic"] = "agentic"
    description: str = ""
    scaffolds: dict[str, ScaffoldSpec] = Field(default_factory=dict)
    agents: Annotated[dict[str, AgentSpec], Field(min_length=1)]
    entry_agent: str | None = None
    max_spawn_depth: Annotated[int, Field(ge=0)] = 2
    traffic: Traffic

    @model_validator(mode="after")
    def _check_names(self) -> AgenticWorkload:
        for name, sc in self.scaffolds.items():
            if sc.parent is not None and sc.parent not in self.scaffolds:
                raise ValueError(f"scaffolds.{name}.parent: unknown scaffold {sc.parent!r}")
        self.scaffold_order()  # raises on a cycle
        for name, ag in self.agents.items():
            if ag.scaffold is not None and ag.scaffold not in self.scaffolds:
                raise ValueError(f"agents.{name}.scaffold: unknown scaffold {ag.scaffold!r}")
            if ag.spawn is not None and ag.spawn.agent not in self.agents:
                raise ValueError(f"agents.{name}.spawn.agent: unknown agent {ag.spawn.agent!r}")
        if self.entry_agent is not None and self.entry_agent not in self.agents:
            raise ValueError(f"entry_agent: unknown agent {self.entry_agent!r}")
        if self.traffic.mode == "trace":
            raise ValueError("traffic: mode trace needs a trace (kind: trace)")
        return self

    def scaffold_order(self) -> list[str]:
        """Scaffold names, parents before children."""
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                raise ValueError(f"scaffolds: cycle {' -> '.join(chain + (name,))}")
            state[name] = 1
            parent = self.scaffolds[name].parent
            if parent is not None:
                visit(parent, chain + (name,))
            state[name] = 2
            order.append(name)

        for name in self.scaffolds:
            visit(name, ())
        return order

    @property
    def entry(self) -> str:
        return self.entry_agent or next(iter(self.agents))


# --------------------------------------------------------------------------- instance graphs


class _Batch:
    """Requests of a batch of instances of one agent (batch-local indices, instance-major)."""

    def __init__(self, inst_of_req, edge_child, edge_parent, hp):
        self.inst_of_req = inst_of_req  # int64[n], 0..num_instances-1
        self.edge_child = edge_child
        self.edge_parent = edge_parent
        self.hp = hp

    @property
    def num_requests(self) -> int:
        return int(self.inst_of_req.shape[0])


def _linear(g: LinearGraph, rng: np.random.Generator, n_inst: int) -> _Batch:
    turns = sample_counts(g.turns, rng, n_inst)
    total = int(turns.sum())
    inst = np.repeat(np.arange(n_inst, dtype=_I64), turns)
    first = np.zeros(n_inst, dtype=_I64)
    np.cumsum(turns[:-1], out=first[1:])
    is_first = np.zeros(total, dtype=bool)
    is_first[first] = True
    child = np.flatnonzero(~is_first).astype(_I64)
    hp = np.full(total, -1, dtype=_I64)
    if g.inherit_history:
        hp[child] = child - 1
    return _Batch(inst, child, child - 1, hp)


@njit(cache=True)
def _branching_kernel(layers, widths, fan_out, fan_in, conn, u, inherit):
    num_nodes = widths.sum()
    max_edges = fan_out.sum() + fan_in.sum()
    ec = np.empty(max_edges, dtype=np.int64)
    ep = np.empty(max_edges, dtype=np.int64)
    hp = np.full(num_nodes, -1, dtype=np.int64)
    mark = np.zeros(num_nodes, dtype=np.bool_)
    ne = 0
    ui = 0
    node0 = 0
    li = 0
    for i in range(layers.shape[0]):
        num_layers = layers[i]
        lstart = np.empty(num_layers + 1, dtype=np.int64)
        lstart[0] = node0
        for layer in range(num_layers):
            lstart[layer + 1] = lstart[layer] + widths[li + layer]
        e0 = ne
        for layer in range(num_layers - 1):
            for v in range(lstart[layer], lstart[layer + 1]):
                d = conn[v]
                if d > num_layers - 1 - layer:
                    d = num_layers - 1 - layer
                t = layer + d
                wt = lstart[t + 1] - lstart[t]
                k = fan_out[v] if fan_out[v] < wt else wt
                scratch = np.arange(wt)
                for j in range(k):
                    pick = j + int(u[ui] * (wt - j))
                    ui += 1
                    tmp = scratch[j]
                    scratch[j] = scratch[pick]
                    scratch[pick] = tmp
                    ec[ne] = lstart[t] + scratch[j]
                    ep[ne] = v
                    ne += 1
        # parents per child of this instance
        order = np.argsort(ec[e0:ne], kind="mergesort")
        pc = ec[e0:ne][order]
        pp = ep[e0:ne][order]
        pos = 0
        for layer in range(1, num_layers):
            prev0 = lstart[layer - 1]
            prev1 = lstart[layer]
            for v in range(lstart[layer], lstart[layer + 1]):
                a = pos
                while pos < pc.shape[0] and pc[pos] == v:
                    mark[pp[pos]] = True
                    pos += 1
                have = pos - a
                need = fan_in[v] - have
                if need > 0:
                    cand = np.empty(prev1 - prev0, dtype=np.int64)
                    nc = 0
                    for x in range(prev0, prev1):
                        if not mark[x]:
                            cand[nc] = x
                            nc += 1
                    if need > nc:
                        need = nc
                    for j in range(need):
                        pick = j + int(u[ui] * (nc - j))
                        ui += 1
                        tmp = cand[j]
                        cand[j] = cand[pick]
                        cand[pick] = tmp
                        ec[ne] = v
                        ep[ne] = cand[j]
                        ne += 1
                        mark[cand[j]] = True
                for x in range(prev0, prev1):
                    mark[x] = False
                for q in range(a, pos):
                    mark[pp[q]] = False
        node0 = lstart[num_layers]
        li += num_layers
    # history parent: one parent per non-root node, uniformly
    order = np.argsort(ec[:ne], kind="mergesort")
    ec2 = ec[:ne][order]
    ep2 = ep[:ne][order]
    if inherit:
        j = 0
        while j < ne:
            v = ec2[j]
            k = j
            while k < ne and ec2[k] == v:
                k += 1
            hp[v] = ep2[j + int(u[ui] * (k - j))]
            ui += 1
            j = k
    return ec2, ep2, hp


def _branching(g: BranchingGraph, rng: np.random.Generator, n_inst: int) -> _Batch:
    layers = sample_counts(g.layers, rng, n_inst)
    widths = sample_counts(g.width, rng, int(layers.sum()))
    if g.single_root:
        first = np.zeros(n_inst, dtype=_I64)
        np.cumsum(layers[:-1], out=first[1:])
        widths[first] = 1
    total = int(widths.sum())
    fan_out = sample_counts(g.fan_out, rng, total)
    fan_in = sample_counts(g.fan_in, rng, total)
    conn = sample_counts(g.connection_distance, rng, total)
    u = rng.random(int(fan_out.sum() + fan_in.sum()) + total)
    ec, ep, hp = _branching_kernel(layers, widths, fan_out, fan_in, conn, u, g.inherit_history)
    nodes_per_inst = np.add.reduceat(widths, np.concatenate([[0], np.cumsum(layers[:-1])]))
    inst = np.repeat(np.arange(n_inst, dtype=_I64), nodes_per_inst)
    return _Batch(inst, ec, ep, hp)


# --------------------------------------------------------------------------- generation


class _Acc:
    """Accumulates requests and edges in generation order."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {
            k: [] for k in ("inst", "agent", "fresh", "output", "wait", "hp")
        }
        self.edge_child: list[np.ndarray] = []
        self.edge_parent: list[np.ndarray] = []
        self.n = 0

    def cat(self, key: str, dtype) -> np.ndarray:
        parts = self.parts[key]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)


def generate_sessions(
    spec: AgenticWorkload, num_sessions: int, rng: np.random.Generator
) -> tuple[SessionGraph, np.ndarray]:
    """Generate ``num_sessions`` sessions of ``spec`` (no compaction, no traffic).

    Returns the graph and the agent index (order of ``spec.agents``) of every request.
    """
    names = list(spec.agents)
    agent_index = {n: i for i, n in enumerate(names)}
    scaffold_names = spec.scaffold_order()
    scaffold_index = {n: i for i, n in enumerate(scaffold_names)}
    prefix_parent = np.array(
        [
            scaffold_index[spec.scaffolds[n].parent] if spec.scaffolds[n].parent else -1
            for n in scaffold_names
        ],
        dtype=_I64,
    )
    prefix_tokens = np.array([spec.scaffolds[n].tokens for n in scaffold_names], dtype=_I64)
    agent_prefix = np.array(
        [scaffold_index[spec.agents[n].scaffold] if spec.agents[n].scaffold else -1 for n in names],
        dtype=_I64,
    )

    acc = _Acc()
    inst_session: list[np.ndarray] = []
    num_inst = 0
    # the current level: instances to generate
    lvl_agent = np.full(num_sessions, agent_index[spec.entry], dtype=_I64)
    lvl_session = np.arange(num_sessions, dtype=_I64)
    lvl_spawn = np.full(num_sessions, -1, dtype=_I64)  # generation index of the spawning request
    lvl_join = np.full(num_sessions, -1, dtype=_I64)  # request receiving the result, -1 = none
    depth = 0
    fresh_parts = acc.parts["fresh"]
    while lvl_agent.shape[0]:
        nxt = {k: [] for k in ("agent", "session", "spawn", "join")}
        for a, name in enumerate(names):
            sel = np.flatnonzero(lvl_agent == a)
            if sel.size == 0:
                continue
            ag = spec.agents[name]
            k = sel.size
            batch = (_linear if ag.graph.type == "linear" else _branching)(ag.graph, rng, k)
            n = batch.num_requests
            base = acc.n
            inst_global = num_inst + batch.inst_of_req
            local_root = np.ones(n, dtype=bool)
            local_root[batch.edge_child] = False
            fresh = np.empty(n, dtype=_I64)
            fresh[local_root] = sample_counts(ag.first_input_tokens, rng, int(local_root.sum()))
            fresh[~local_root] = sample_counts(ag.fresh_input_tokens, rng, int((~local_root).sum()))
            output = sample_counts(ag.output_tokens, rng, n)
            wait = sample_times(ag.wait_after_ready, rng, n)
            spawn_req = lvl_spawn[sel][batch.inst_of_req]
            wait[local_root & (spawn_req < 0)] = 0.0
            hp = np.where(batch.hp >= 0, batch.hp + base, -1)
            for key, arr in (
                ("inst", inst_global),
                ("agent", np.full(n, a)),
                ("fresh", fresh),
                ("output", output),
                ("wait", wait),
                ("hp", hp),
            ):
                acc.parts[key].append(arr)
            acc.edge_child.append(batch.edge_child + base)
            acc.edge_parent.append(batch.edge_parent + base)
            # spawned roots depend on the spawning request (no history)
            sub_roots = np.flatnonzero(local_root & (spawn_req >= 0))
            acc.edge_child.append(sub_roots + base)
            acc.edge_parent.append(spawn_req[sub_roots])
            # the result (last request of each instance) returns to the join request
            last = np.zeros(k, dtype=_I64)
            np.maximum.at(last, batch.inst_of_req, np.arange(n, dtype=_I64))
            join = lvl_join[sel]
            has_join = np.flatnonzero(join >= 0)
            if has_join.size:
                acc.edge_child.append(join[has_join])
                acc.edge_parent.append(last[has_join] + base)
                _add_at_global(fresh_parts, join[has_join], output[last[has_join]])
            inst_session.append(lvl_session[sel])
            # spawns
            if ag.spawn is not None and depth < spec.max_spawn_depth:
                counts = sample_counts(ag.spawn.count, rng, k, low=0)
                has_child = np.zeros(n, dtype=bool)
                has_child[batch.edge_parent] = True
                first_child = np.full(n, n, dtype=_I64)
                np.minimum.at(first_child, batch.edge_parent, batch.edge_child)
                elig = np.flatnonzero(has_child)
                e_count = np.bincount(batch.inst_of_req[elig], minlength=k)
                e_start = np.zeros(k, dtype=_I64)
                np.cumsum(e_count[:-1], out=e_start[1:])
                counts = np.where(e_count > 0, counts, 0)
                total = int(counts.sum())
                owner = np.repeat(np.arange(k, dtype=_I64), counts)
                pick = elig[e_start[owner] + (rng.random(total) * e_count[owner]).astype(_I64)]
                joins = rng.random(total) < ag.spawn.result_fan_in
                nxt["agent"].append(np.full(total, agent_index[ag.spawn.agent], dtype=_I64))
                nxt["session"].append(lvl_session[sel][owner])
                nxt["spawn"].append(pick + base)
                nxt["join"].append(np.where(joins, first_child[pick] + base, -1))
            acc.n += n
            num_inst += k
        depth += 1
        if not nxt["agent"]:
            break
        lvl_agent = np.concatenate(nxt["agent"])
        lvl_session = np.concatenate(nxt["session"])
        lvl_spawn = np.concatenate(nxt["spawn"])
        lvl_join = np.concatenate(nxt["join"])

    n = acc.n
    inst = acc.cat("inst", _I64)
    session = np.concatenate(inst_session)[inst]
    agent = acc.cat("agent", _I64)
    hp = acc.cat("hp", _I64)
    edge_child = np.concatenate(acc.edge_child).astype(_I64)
    edge_parent = np.concatenate(acc.edge_parent).astype(_I64)
    # order: session by session, topological, generation order among the ready requests
    rank = np.empty(n, dtype=_I64)
    by_session = np.argsort(session, kind="stable")
    rank[by_session] = np.arange(n, dtype=_I64)
    if depth > 1:
        ps, pid = csr_from_edges(n, rank[edge_child], rank[edge_parent])
        order_rank = topo_order(n, ps, pid)
        if order_rank.shape[0] != n:  # pragma: no cover - generation never makes a cycle
            raise WorkloadError("internal error: generated sessions contain a cycle")
        order = by_session[order_rank]
    else:
        order = by_session
    new = np.empty(n, dtype=_I64)
    new[order] = np.arange(n, dtype=_I64)
    ps, pid = csr_from_edges(n, new[edge_child], new[edge_parent])
    hp_new = np.where(hp >= 0, new[np.maximum(hp, 0)], -1)[order]
    agent = agent[order]
    return make_graph(
        session=session[order],
        subsession=inst[order],
        fresh=acc.cat("fresh", _I64)[order],
        output=acc.cat("output", _I64)[order],
        wait=acc.cat("wait", np.float64)[order],
        parents_start=ps,
        parent_ids=pid,
        history_parent=hp_new,
        prefix=np.where(hp_new < 0, agent_prefix[agent], -1),
        prefix_parent=prefix_parent,
        prefix_tokens=prefix_tokens,
        prefix_names=tuple(f"scaffold:{s}" for s in scaffold_names),
        source="agentic",
    ), agent


def _add_at_global(parts: list[np.ndarray], idx: np.ndarray, values: np.ndarray) -> None:
    """``fresh[idx] += values`` where ``fresh`` is the concatenation of ``parts``."""
    bounds = np.cumsum([0] + [p.shape[0] for p in parts])
    which = np.searchsorted(bounds, idx, side="right") - 1
    for w in np.unique(which):
        m = which == w
        np.add.at(parts[w], idx[m] - bounds[w], values[m])


def _with_compaction(
    spec: AgenticWorkload, g: SessionGraph, agent: np.ndarray, rng: np.random.Generator
) -> SessionGraph:
    n = g.num_requests
    limit = np.zeros(n, dtype=_I64)
    cprompt = np.zeros(n, dtype=_I64)
    summary = np.ones(n, dtype=_I64)
    any_compaction = False
    for a, name in enumerate(spec.agents):
        c = spec.agents[name].compaction
        if c is None:
            continue
        any_compaction = True
        m = agent == a
        limit[m] = c.context_limit
        cprompt[m] = c.prompt_tokens
        summary[m] = sample_counts(c.summary_tokens, rng, int(m.sum()))
    if not any_compaction:
        return g
    return apply_compaction(g, limit, cprompt, summary)


def build_sessions(
    spec: AgenticWorkload,
    num_sessions: int,
    rng: np.random.Generator,
    compaction_rng: np.random.Generator,
) -> SessionGraph:
    """Generated sessions with compaction applied (no traffic)."""
    g, agent = generate_sessions(spec, num_sessions, rng)
    return _with_compaction(spec, g, agent, compaction_rng)


def agentic_graph(spec: AgenticWorkload, seed: int) -> tuple[SessionGraph, np.ndarray]:
    """The graph a ``kind: agentic`` workload runs and its session start times."""
    gen_rng, traffic_rng, pilot_rng, compact_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    t = spec.traffic
    needs_mean = isinstance(t, RateTraffic) and t.requests_per_s is not None
    if needs_mean and t.duration_s is not None:
        pilot = build_sessions(spec, min(t.max_sessions or 256, 256), pilot_rng, pilot_rng)
        plan = plan_sessions(
            t, traffic_rng, available=None, mean_requests=pilot.num_requests / pilot.num_sessions
        )
        g = build_sessions(spec, plan.num_sessions, gen_rng, compact_rng)
    elif needs_mean:
        if t.max_sessions is None:
            raise WorkloadError("traffic: a generated workload needs max_sessions or duration_s")
        g = build_sessions(spec, t.max_sessions, gen_rng, compact_rng)
        plan = plan_sessions(
            t, traffic_rng, available=None, mean_requests=g.num_requests / g.num_sessions
        )
    else:
        plan = plan_sessions(t, traffic_rng, available=None, mean_requests=1.0)
        g = build_sessions(spec, plan.num_sessions, gen_rng, compact_rng)
    return apply_closed_loop(g, plan.concurrency), plan.start
