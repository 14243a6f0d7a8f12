"""The router of the reference model: which replica a dispatched request goes to.

Policies (the formulas of docs and ``simulator/core/router.py``, written again here):

* ``round_robin``: replicas in turn (a counter advanced by every routed request);
* ``random``: uniform;
* ``least_outstanding``: fewest dispatched-but-unfinished requests;
* ``least_kv_usage``: lowest fraction of KV blocks in use;
* ``power_of_two``: two distinct replicas at random, the one with fewer outstanding requests;
* ``session_affinity``: a session stays on its home replica (where its previous request went)
  unless that replica's outstanding load exceeds ``affinity_overload_factor`` x (cluster
  mean + 1); then it moves to the least-loaded replica, its new home;
* ``kv_aware`` (NVIDIA Dynamo): lowest ``prefill_load_scale * max(prefill_blocks -
  overlap_score_credit * overlap_blocks, 0) + blocks in use``, where ``prefill_blocks`` is
  (prompt tokens of requests there without a first token + this prompt) / block size and
  ``overlap_blocks`` the prompt's cached prefix there; with a temperature T > 0 a softmax draw
  ``p ~ exp(-(c - c_min) / ((c_max - c_min) T))``;
* ``weighted_scorer`` (llm-d): highest ``w_prefix * hit blocks / prompt blocks + w_queue *
  (max queue - queue) / (max queue - min queue) + w_kv * (1 - KV usage)``.

With prefill/decode disaggregation there are two pools, each with its own round-robin counter,
session homes and stream of draws: the *main* pool (the aggregated replicas, or the decode
replicas) and the *prefill* pool; a policy compares only the replicas of one pool.

Ties go to a uniformly drawn one of the tied replicas. Draws come from the core's counter-based
stream (:func:`simulator.core.uniform.uniform`, keyed by seed, request and a salt), so both
models draw the same numbers, as they share the cost model. With ``staleness_s > 0`` the router
sees load figures (not cache contents) as of its last snapshot, taken every ``staleness_s``
seconds from t = 0.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from simulator.core.router import SALT_ROUTE
from simulator.core.state import G_RR_NEXT, G_RR_NEXT_PREFILL
from simulator.core.uniform import uniform
from simulator.reference.request import Request

if TYPE_CHECKING:
    from simulator.reference.replica import Replica

POLICIES = (
    "round_robin",
    "random",
    "least_outstanding",
    "least_kv_usage",
    "power_of_two",
    "session_affinity",
    "kv_aware",
    "weighted_scorer",
)
DEFAULTS = {
    "temperature": 0.0,
    "overlap_score_credit": 1.0,
    "prefill_load_scale": 1.0,
    "weights": {"prefix": 3.0, "queue": 2.0, "kv_usage": 2.0},
    "affinity_overload_factor": 2.0,
    "staleness_s": 0.0,
}


class LoadView:
    """The load figures of one replica that the router reads (live, or a snapshot)."""

    def __init__(self, rep: Replica) -> None:
        self.outstanding = rep.outstanding
        self.waiting = len(rep.waiting)
        self.used_blocks = rep.pool.num_used
        self.pending_prefill = rep.pending_prefill_tokens


class Router:
    def __init__(self, config, replicas: list[Replica], seed: int) -> None:
        """``config``: a policy name, or an object/mapping with ``policy`` and parameters."""
        if isinstance(config, str):
            config = {"policy": config}
        elif not isinstance(config, dict):
            config = config.model_dump()
        cfg = DEFAULTS | config
        if cfg["policy"] not in POLICIES:
            raise ValueError(f"router: unknown policy {cfg['policy']!r} (one of {POLICIES})")
        self.policy = cfg["policy"]
        self.cfg = cfg
        self.replicas = replicas
        prefill = [rep for rep in replicas if rep.role == "prefill"]
        main = [rep for rep in replicas if rep.role != "prefill"]
        self.pools = {"main": main, "prefill": prefill}
        # the core's stream of draws of a pool: seed + 7919 x the column of its counter
        self.seeds = {"main": seed + 7919 * G_RR_NEXT, "prefill": seed + 7919 * G_RR_NEXT_PREFILL}
        self.next_rr = {"main": 0, "prefill": 0}
        self.homes: dict[str, dict[int, Replica]] = {"main": {}, "prefill": {}}  # by session
        self.pool_name = "main"  # the pool being routed over, and its draws
        self.seed = self.seeds["main"]
        self.snapshot: list[LoadView] | None = None

    @property
    def staleness(self) -> float:
        return float(self.cfg["staleness_s"])

    def take_snapshot(self) -> None:
        self.snapshot = [LoadView(rep) for rep in self.replicas]

    def load(self) -> list[LoadView]:
        if self.staleness > 0.0:
            return self.snapshot
        return [LoadView(rep) for rep in self.replicas]

    def draw(self, r: int, salt: int, i: int) -> float:
        return float(uniform(self.seed, r, SALT_ROUTE + salt, i))

    def route(self, req: Request, pool: str = "main") -> Replica:
        """The replica of ``pool`` (``"main"`` or ``"prefill"``) that ``req`` goes to."""
        self.seed = self.seeds[pool]
        self.pool_name = pool
        candidates = self.pools[pool]
        view = self.load()
        load = [view[rep.index] for rep in candidates]
        return candidates[self.choose(req, candidates, load)]

    def best(self, scores: list[float], r: int, lowest: bool) -> int:
        """Index of the best score; a tie goes to each tied index with equal probability."""
        best, ties = 0, 1
        for k in range(1, len(scores)):
            if (scores[k] < scores[best]) if lowest else (scores[k] > scores[best]):
                best, ties = k, 1
            elif scores[k] == scores[best]:
                ties += 1
                if self.draw(r, ties, k) * ties < 1.0:  # reservoir sampling over the ties
                    best = k
        return best

    def choose(self, req: Request, candidates: list[Replica], load: list[LoadView]) -> int:
        """Index into ``candidates`` (one pool) of the replica for ``req``."""
        n = len(candidates)
        if n == 1:
            return 0
        r = req.request_id
        policy = self.policy
        if policy == "round_robin":
            k = self.next_rr[self.pool_name] % n
            self.next_rr[self.pool_name] += 1
            return k
        if policy == "random":
            return min(int(self.draw(r, 0, 0) * n), n - 1)
        outstanding = [float(v.outstanding) for v in load]
        if policy == "least_outstanding":
            return self.best(outstanding, r, lowest=True)
        if policy == "least_kv_usage":
            usage = [
                v.used_blocks / rep.pool.num_blocks for v, rep in zip(load, candidates, strict=True)
            ]
            return self.best(usage, r, lowest=True)
        if policy == "power_of_two":
            a = min(int(self.draw(r, 0, 1) * n), n - 1)
            b = min(int(self.draw(r, 0, 2) * (n - 1)), n - 2)
            if b >= a:
                b += 1  # two distinct replicas
            return a if outstanding[a] <= outstanding[b] else b
        if policy == "session_affinity":
            homes = self.homes[self.pool_name]
            home = homes.get(req.session_id)
            k = -1 if home is None else candidates.index(home)
            mean = sum(outstanding) / n
            limit = self.cfg["affinity_overload_factor"] * (mean + 1.0)
            if k < 0 or outstanding[k] > limit:
                k = self.best(outstanding, r, lowest=True)
            homes[req.session_id] = candidates[k]
            return k
        if policy == "kv_aware":
            return self.kv_aware(req, candidates, load)
        return self.weighted_scorer(req, candidates, load)

    def prompt_hits(self, req: Request, rep: Replica) -> int:
        """Blocks of ``req``'s prompt cached on ``rep`` (capped at prompt - 1 tokens)."""
        cap = (req.prompt_tokens - 1) // rep.block_size
        return len(rep.pool.longest_hit(req.keys[:cap]))

    def kv_aware(self, req: Request, candidates: list[Replica], load: list[LoadView]) -> int:
        r = req.request_id
        cost = []
        for rep, view in zip(candidates, load, strict=True):
            prefill = (view.pending_prefill + req.prompt_tokens) / rep.block_size
            adjusted = max(
                prefill - self.cfg["overlap_score_credit"] * self.prompt_hits(req, rep), 0.0
            )
            cost.append(self.cfg["prefill_load_scale"] * adjusted + view.used_blocks)
        lo, hi = min(cost), max(cost)
        temp = self.cfg["temperature"]
        if temp <= 0.0 or hi == lo:
            return self.best(cost, r, lowest=True)
        weights = [math.exp(-(c - lo) / ((hi - lo) * temp)) for c in cost]
        u = self.draw(r, 0, 3) * sum(weights)
        acc = 0.0
        for k, w in enumerate(weights):
            acc += w
            if u < acc:
                return k
        return len(weights) - 1

    def weighted_scorer(
        self, req: Request, candidates: list[Replica], load: list[LoadView]
    ) -> int:
        w = self.cfg["weights"]
        queues = [v.waiting for v in load]
        qmin, qmax = min(queues), max(queues)
        score = []
        for rep, view in zip(candidates, load, strict=True):
            prefix = 0.0
            if rep.pool.enable_caching:
                prompt_blocks = max((req.prompt_tokens - 1) // rep.block_size, 1)
                prefix = self.prompt_hits(req, rep) / prompt_blocks
            queue = 1.0 if qmax == qmin else (qmax - view.waiting) / (qmax - qmin)
            usage = view.used_blocks / rep.pool.num_blocks
            score.append(w["prefix"] * prefix + w["queue"] * queue + w["kv_usage"] * (1.0 - usage))
        return self.best(score, req.request_id, lowest=False)
