"""Fit a synthetic ``kind: agentic`` spec to a trace (``servesim workload fit``).

Lengths (first input, later fresh input, output) and waits are fitted by maximum likelihood
(``scipy.stats``, location fixed at 0) among lognormal, gamma, Weibull, inverse Gaussian,
exponential, Pareto and spike + Pareto tail; the **criterion is the AIC** (``2k - 2 log L``,
lowest wins), computed on the positive values. Zero waits become the weight of a ``fixed: 0``
component of a mixture; counts are fitted on values >= 1 (generated counts are >= 1).

Graph shape:

* sessions of one agent run that are chains -> ``linear`` graphs with ``turns`` resampled from the
  trace's requests per run (``empirical``);
* DAGs -> ``branching`` graphs with layers, widths, fan-out and fan-in resampled from the trace;
* subagents (agent runs spawned inside a session, as in OpenClaw) -> a ``sub`` agent spawned by
  ``main`` with the trace's spawns per run (``empirical``) and result fan-in fraction; subagent
  runs get their own graph and first-input fit;
* scaffolds: the trace's prefix nodes when there are at most 32 of them (OpenClaw's observed
  scaffolds), the prefix a role's roots use most.

Traffic: a trace with arrival times gets Poisson session arrivals at its mean session rate, one
without gets sequential sessions; both with ``max_sessions`` = the trace's sessions. Not fitted:
prefix tries (Mooncake), partial histories and compaction.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import stats as sps

from simulator.workload.graph import KIND_REQUEST, SessionGraph, graph_positions, session_bounds

__all__ = ["CANDIDATES", "fit_distribution", "fit_workload"]

CANDIDATES = (
    "lognormal",
    "gamma",
    "weibull",
    "inverse_gaussian",
    "exponential",
    "pareto",
    "spike_pareto",
)
_MIN_FIT = 8  # fewer values than this: resample them (empirical)
_MAX_EMPIRICAL = 2000  # distinct values kept by an empirical distribution


def _r(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def _spike_pareto(x: np.ndarray) -> tuple[float, dict] | None:
    """Best spike (lognormal body) + Pareto tail over a grid of tail thresholds, by likelihood."""
    best = None
    logx = np.log(x)
    for q in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95):
        xm = float(np.quantile(x, q))
        tail = x >= xm
        nt = int(tail.sum())
        nb = x.size - nt
        if nt < 5 or nb < 5 or xm <= 0:
            continue
        p = nt / x.size
        denom = float(np.sum(np.log(x[tail] / xm)))
        if denom <= 0:
            continue
        alpha = nt / denom
        mu = float(logx[~tail].mean())
        s = max(float(logx[~tail].std()), 1e-3)
        body = sps.lognorm.pdf(x, s, scale=math.exp(mu))
        tpdf = np.where(tail, alpha * xm**alpha / x ** (alpha + 1), 0.0)
        ll = float(np.sum(np.log((1 - p) * body + p * tpdf + 1e-300)))
        if best is None or ll > best[0]:
            best = (
                ll,
                {
                    "dist": "spike_pareto",
                    "spike": _r(math.exp(mu)),
                    "spike_sigma": _r(s),
                    "tail_probability": _r(p),
                    "tail_min": _r(xm),
                    "tail_alpha": _r(alpha),
                },
            )
    return best


def _candidates(x: np.ndarray) -> list[dict]:
    """Every candidate's fit: ``{name, spec, loglik, aic, ks}`` (failed fits are left out)."""
    out = []
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for name in CANDIDATES:
            try:
                if name == "lognormal":
                    s, _, scale = sps.lognorm.fit(x, floc=0)
                    ll, k = sps.lognorm.logpdf(x, s, scale=scale).sum(), 2
                    cdf = sps.lognorm(s, scale=scale).cdf
                    spec = {
                        "dist": "lognormal",
                        "mean": _r(scale * math.exp(s * s / 2)),
                        "sigma": _r(s),
                    }
                elif name == "gamma":
                    a, _, scale = sps.gamma.fit(x, floc=0)
                    ll, k = sps.gamma.logpdf(x, a, scale=scale).sum(), 2
                    cdf = sps.gamma(a, scale=scale).cdf
                    spec = {"dist": "gamma", "mean": _r(a * scale), "cv": _r(1 / math.sqrt(a))}
                elif name == "weibull":
                    c, _, scale = sps.weibull_min.fit(x, floc=0)
                    ll, k = sps.weibull_min.logpdf(x, c, scale=scale).sum(), 2
                    cdf = sps.weibull_min(c, scale=scale).cdf
                    spec = {"dist": "weibull", "shape": _r(c), "scale": _r(scale)}
                elif name == "inverse_gaussian":
                    mu, _, scale = sps.invgauss.fit(x, floc=0)
                    ll, k = sps.invgauss.logpdf(x, mu, scale=scale).sum(), 2
                    cdf = sps.invgauss(mu, scale=scale).cdf
                    spec = {"dist": "inverse_gaussian", "mean": _r(mu * scale), "shape": _r(scale)}
                elif name == "exponential":
                    _, scale = sps.expon.fit(x, floc=0)
                    ll, k = sps.expon.logpdf(x, scale=scale).sum(), 1
                    cdf = sps.expon(scale=scale).cdf
                    spec = {"dist": "exponential", "mean": _r(scale)}
                elif name == "pareto":
                    b, _, scale = sps.pareto.fit(x, floc=0)
                    ll, k = sps.pareto.logpdf(x, b, scale=scale).sum(), 2
                    cdf = sps.pareto(b, scale=scale).cdf
                    spec = {"dist": "pareto", "alpha": _r(b), "scale": _r(scale)}
                else:
                    res = _spike_pareto(x)
                    if res is None:
                        continue
                    ll, spec = res
                    k = 5
                    cdf = None
            except (ValueError, RuntimeError, FloatingPointError, OverflowError):
                continue
            ll = float(ll)
            if not math.isfinite(ll) or any(
                isinstance(v, float) and not math.isfinite(v) for v in spec.values()
            ):
                continue
            ks = float(sps.kstest(x, cdf).statistic) if cdf is not None else float("nan")
            out.append({"name": name, "spec": spec, "loglik": ll, "aic": 2 * k - 2 * ll, "ks": ks})
    return out


def _empirical(values: np.ndarray) -> dict:
    vals, counts = np.unique(np.asarray(values, dtype=np.float64), return_counts=True)
    if vals.size > _MAX_EMPIRICAL:  # keep the distribution's shape with quantiles
        vals = np.quantile(values, np.linspace(0, 1, _MAX_EMPIRICAL))
        counts = np.ones_like(vals)
    spec: dict[str, Any] = {"dist": "empirical", "values": [_r(v) for v in vals]}
    if np.any(counts != counts[0]):
        spec["weights"] = [int(c) for c in counts]
    return spec


def fit_distribution(values: np.ndarray, *, time: bool = False) -> tuple[dict, list[dict]]:
    """The best spec (a YAML-ready mapping) for ``values`` and every candidate's fit.

    ``time``: durations (zeros allowed, become a ``fixed: 0`` mixture component); otherwise
    counts (values below 1 are raised to 1).
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return ({"dist": "fixed", "value": 0.0 if time else 1.0}, [])
    if not time:
        x = np.maximum(x, 1.0)
    zeros = x <= 0
    pos = x[~zeros]
    if pos.size == 0:
        return {"dist": "fixed", "value": 0.0}, []
    if np.all(pos == pos[0]):
        best: dict = {"dist": "fixed", "value": _r(float(pos[0]))}
        table: list[dict] = []
    elif pos.size < _MIN_FIT:
        best, table = _empirical(pos), []
    else:
        table = sorted(_candidates(pos), key=lambda c: c["aic"])
        best = table[0]["spec"] if table else _empirical(pos)
    if time and zeros.any():
        p0 = float(zeros.mean())
        best = {
            "dist": "mixture",
            "weights": [_r(p0), _r(1 - p0)],
            "components": [{"dist": "fixed", "value": 0.0}, best],
        }
    return best, table


# --------------------------------------------------------------------------- graph shape


def _roles(g: SessionGraph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per subsession: is it a subagent run, its spawning run (-1), and its nesting depth."""
    sub = g.subsession
    _, sub = np.unique(sub, return_inverse=True)
    num = int(sub.max()) + 1
    first_req = np.full(num, g.num_requests, dtype=np.int64)
    np.minimum.at(first_req, sub, np.arange(g.num_requests))
    bounds = session_bounds(g)
    is_sub = first_req != bounds[g.session[first_req]]
    parent_run = np.full(num, -1, dtype=np.int64)
    child = np.repeat(np.arange(g.num_requests), np.diff(g.parents_start))
    cross = (sub[g.parent_ids] != sub[child]) & (g.session[g.parent_ids] == g.session[child])
    # a run's spawning run: the run of a parent of its first request
    spawn_edge = cross & (child == first_req[sub[child]])
    parent_run[sub[child[spawn_edge]]] = sub[g.parent_ids[spawn_edge]]
    depth = np.zeros(num, dtype=np.int64)
    for r in np.argsort(first_req):  # a spawning run starts before the runs it spawns
        if parent_run[r] >= 0:
            depth[r] = depth[parent_run[r]] + 1
    return is_sub, parent_run, depth


def _graph_spec(g: SessionGraph, mask_req: np.ndarray, sub: np.ndarray) -> dict:
    """A linear or branching graph for the runs whose requests are selected by ``mask_req``."""
    idx = np.flatnonzero(mask_req)
    runs, counts = np.unique(sub[idx], return_counts=True)
    child = np.repeat(np.arange(g.num_requests), np.diff(g.parents_start))
    inside = (sub[g.parent_ids] == sub[child]) & mask_req[child]
    fan_in = np.bincount(child[inside], minlength=g.num_requests)
    fan_out = np.bincount(g.parent_ids[inside], minlength=g.num_requests)
    chain = bool(np.all(fan_in[idx] <= 1) and np.all(fan_out[idx] <= 1))
    hp = g.history_parent[idx]
    inherit = bool(np.mean(hp[fan_in[idx] > 0] >= 0) >= 0.5) if np.any(fan_in[idx] > 0) else True
    if chain:
        return {"type": "linear", "turns": _count_empirical(counts), "inherit_history": inherit}
    # depth within the run (parents in the same run only)
    depth = np.ones(g.num_requests, dtype=np.int64)
    for r in idx:  # requests are topological
        for j in range(g.parents_start[r], g.parents_start[r + 1]):
            p = g.parent_ids[j]
            if sub[p] == sub[r]:
                depth[r] = max(depth[r], depth[p] + 1)
    layers = np.zeros(int(sub.max()) + 1, dtype=np.int64)
    np.maximum.at(layers, sub[idx], depth[idx])
    key = sub[idx] * (int(depth.max()) + 1) + depth[idx]
    _, widths = np.unique(key, return_counts=True)
    roots_per_run = np.bincount(sub[idx][depth[idx] == 1], minlength=int(sub.max()) + 1)
    single_root = bool(np.all(roots_per_run[runs] == 1))
    return {
        "type": "branching",
        "layers": _count_empirical(layers[runs]),
        "width": _count_empirical(widths),
        "fan_out": _count_empirical(np.maximum(fan_out[idx][fan_out[idx] > 0], 1)),
        "fan_in": _count_empirical(np.maximum(fan_in[idx][fan_in[idx] > 0], 1)),
        "connection_distance": 1,
        "inherit_history": inherit,
        "single_root": single_root,
    }


def _count_empirical(values: np.ndarray) -> Any:
    v = np.asarray(values)
    if v.size and np.all(v == v[0]):
        return int(v[0])
    spec = _empirical(v)
    spec["values"] = [int(round(x)) for x in spec["values"]]
    return spec


def fit_workload(g: SessionGraph) -> tuple[dict, dict]:
    """A ``kind: agentic`` spec (YAML-ready mapping) fitted to ``g``, and a fit report."""
    normal = g.kind == KIND_REQUEST
    _, sub = np.unique(g.subsession, return_inverse=True)
    is_sub_run, parent_run, run_depth = _roles(g)
    req_is_sub = is_sub_run[sub]
    has_hp = g.history_parent >= 0
    has_par = np.diff(g.parents_start) > 0
    _, prompt, _ = graph_positions(g)
    report: dict[str, Any] = {"criterion": "AIC = 2k - 2 log L (lowest wins)", "fits": {}}

    def fit(name: str, values: np.ndarray, time: bool = False) -> dict:
        spec, table = fit_distribution(values, time=time)
        report["fits"][name] = [{k: c[k] for k in ("name", "aic", "ks")} for c in table]
        return spec

    roles = [("main", ~req_is_sub)]
    if req_is_sub.any():
        roles.append(("sub", req_is_sub))
    # shared fits (pooled over roles): later fresh input, output, waits
    fresh = fit("fresh_input_tokens", g.fresh[normal & has_hp])
    output = fit("output_tokens", g.output[normal])
    wait = fit("wait_after_ready", g.wait[normal & has_par & has_hp], time=True)
    # scaffolds: the trace's prefix nodes, if few
    scaffolds: dict[str, dict] = {}
    use_prefix = 0 < g.num_prefix_nodes <= 32
    if use_prefix:
        names = [
            (g.prefix_names[i] if i < len(g.prefix_names) else f"p{i}").replace("scaffold:", "")
            for i in range(g.num_prefix_nodes)
        ]
        for i in range(g.num_prefix_nodes):
            entry: dict[str, Any] = {"tokens": int(g.prefix_tokens[i])}
            if g.prefix_parent[i] >= 0:
                entry["parent"] = names[g.prefix_parent[i]]
            scaffolds[names[i]] = entry
    agents: dict[str, dict] = {}
    for role, mask in roles:
        roots = mask & normal & ~has_hp
        agent: dict[str, Any] = {}
        if use_prefix:
            pre = g.prefix[roots]
            pre = pre[pre >= 0]
            if pre.size:
                agent["scaffold"] = names[int(np.bincount(pre).argmax())]
        agent["graph"] = _graph_spec(g, mask & normal, sub)
        # without the trace's prefix nodes, a root's whole prompt is its first input
        first = g.fresh[roots] if use_prefix else prompt[roots]
        agent["first_input_tokens"] = fit(f"{role}.first_input_tokens", first)
        agent["fresh_input_tokens"] = fresh
        agent["output_tokens"] = output
        agent["wait_after_ready"] = wait
        agents[role] = agent
    max_depth = 0
    if req_is_sub.any():
        runs_main = np.flatnonzero(~is_sub_run)
        runs_sub = np.flatnonzero(is_sub_run)
        spawned = np.bincount(parent_run[parent_run >= 0], minlength=is_sub_run.shape[0])
        # results returned: a subagent run with a request that a run outside it depends on
        child = np.repeat(np.arange(g.num_requests), np.diff(g.parents_start))
        back = (sub[g.parent_ids] != sub[child]) & is_sub_run[sub[g.parent_ids]]
        returned = np.unique(sub[g.parent_ids[back]])
        fan_in = _r(returned.size / runs_sub.size) if runs_sub.size else 1.0
        agents["main"]["spawn"] = {
            "agent": "sub",
            "count": _count0(spawned[runs_main]),
            "result_fan_in": min(fan_in, 1.0),
        }
        if np.any(spawned[runs_sub] > 0):
            agents["sub"]["spawn"] = {
                "agent": "sub",
                "count": _count0(spawned[runs_sub]),
                "result_fan_in": min(fan_in, 1.0),
            }
        max_depth = int(run_depth.max())
    bounds = session_bounds(g)
    spec: dict[str, Any] = {
        "kind": "agentic",
        "description": f"fitted to {g.source or 'a trace'}",
    }
    if scaffolds:
        spec["scaffolds"] = scaffolds
    spec["agents"] = agents
    spec["entry_agent"] = "main"
    spec["max_spawn_depth"] = max_depth
    if g.session_time is not None and g.num_sessions > 1:
        span = float(g.session_time.max() - g.session_time.min())
        rate = (g.num_sessions - 1) / span if span > 0 else 1.0
        spec["traffic"] = {
            "mode": "rate",
            "process": "poisson",
            "sessions_per_s": _r(rate),
            "max_sessions": g.num_sessions,
        }
    else:
        spec["traffic"] = {"mode": "sequential", "max_sessions": g.num_sessions}
    report["requests"] = g.num_requests
    report["sessions"] = g.num_sessions
    report["requests_per_session_mean"] = float(np.diff(bounds).mean())
    return spec, report


def _count0(values: np.ndarray) -> Any:
    v = np.asarray(values)
    if np.all(v == v[0]):
        return int(v[0])
    spec = _empirical(v)
    spec["values"] = [int(round(x)) for x in spec["values"]]
    return spec
