"""Build a small :class:`CompiledWorkload` by hand: content nodes, then requests on them.

For tests and for prototyping with the reference model::

    b = WorkloadBuilder()
    system = b.node(None, 40)                   # a 40-token system prompt (a root node)
    chat = b.node(system, 100)                  # a conversation after it
    t1 = b.request([system, chat], prompt=60, output=10)
    b.request([system, chat], prompt=90, output=10, parents=[t1], wait=1.5)
    wl = b.build()                              # validated

Rules (those of :mod:`simulator.workload.compiled`): a path starts at a root and goes from
parent to child; a request's ``prompt + output`` ends inside the last node of its path;
parents come before their children.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from simulator.workload.compiled import CompiledWorkload, children_from_parents, validate_compiled


class WorkloadBuilder:
    def __init__(self) -> None:
        self.node_parent: list[int] = []
        self.node_start: list[int] = []
        self.node_len: list[int] = []
        self.requests: list[dict] = []

    def node(self, parent: int | None, num_tokens: int) -> int:
        """Add a content node of ``num_tokens`` tokens after ``parent`` (None: a root)."""
        start = 0 if parent is None else self.node_start[parent] + self.node_len[parent]
        self.node_parent.append(-1 if parent is None else parent)
        self.node_start.append(start)
        self.node_len.append(num_tokens)
        return len(self.node_len) - 1

    def end(self, node: int) -> int:
        """Absolute token position one past the end of ``node``."""
        return self.node_start[node] + self.node_len[node]

    def request(
        self,
        path: Sequence[int],
        prompt: int,
        output: int,
        arrival: float = 0.0,
        wait: float = 0.0,
        parents: Sequence[int] = (),
        session: int | None = None,
    ) -> int:
        """Add a request; returns its id. ``session`` defaults to the request's own id."""
        r = len(self.requests)
        self.requests.append(
            {
                "path": list(path),
                "prompt": prompt,
                "output": output,
                "arrival": arrival,
                "wait": wait,
                "parents": sorted(set(parents)),
                "session": r if session is None else session,
            }
        )
        return r

    def build(self) -> CompiledWorkload:
        reqs = self.requests
        n = len(reqs)
        i64 = np.int64
        path_start = np.zeros(n + 1, dtype=i64)
        path_start[1:] = np.cumsum([len(r["path"]) for r in reqs])
        parents_start = np.zeros(n + 1, dtype=i64)
        parents_start[1:] = np.cumsum([len(r["parents"]) for r in reqs])
        parent_ids = np.array([p for r in reqs for p in r["parents"]], dtype=i64)
        children_start, child_ids = children_from_parents(n, parents_start, parent_ids)
        wl = CompiledWorkload(
            node_parent=np.array(self.node_parent, dtype=i64),
            node_start_tokens=np.array(self.node_start, dtype=i64),
            node_num_tokens=np.array(self.node_len, dtype=i64),
            req_session=np.array([r["session"] for r in reqs], dtype=i64),
            req_prompt_tokens=np.array([r["prompt"] for r in reqs], dtype=i64),
            req_output_tokens=np.array([r["output"] for r in reqs], dtype=i64),
            req_arrival_time=np.array([r["arrival"] for r in reqs], dtype=np.float64),
            req_wait_after_ready=np.array([r["wait"] for r in reqs], dtype=np.float64),
            req_path_start=path_start,
            path_nodes=np.array([c for r in reqs for c in r["path"]], dtype=i64),
            req_parents_start=parents_start,
            parent_ids=parent_ids,
            req_children_start=children_start,
            child_ids=child_ids,
        )
        validate_compiled(wl)
        return wl
