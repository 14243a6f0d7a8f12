"""A request of the reference model: its workload facts, its progress and its KV blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from simulator.reference.kvcache import BlockKey
from simulator.workload.compiled import CompiledWorkload


class Status(Enum):
    PENDING = "pending"  # a parent has not finished yet
    DISPATCHING = "dispatching"  # ready; waiting out wait_after_ready
    WAITING = "waiting"  # in a replica's waiting queue
    RUNNING = "running"
    LOADING = "loading"  # admitted; its prefix is being copied from the host tier
    TRANSFERRING = "transferring"  # prefilled; its KV is moving to its decode replica
    FINISHED = "finished"
    REJECTED = "rejected"


@dataclass(eq=False)
class Request:
    """One request. Token counts are tokens; times are seconds from the start (NaN = never)."""

    request_id: int
    session_id: int
    prompt_tokens: int
    output_tokens: int
    arrival_time: float  # the workload's ready time, for a request without parents
    wait_after_ready: float
    parents: list[int]
    children: list[int]
    # block index -> content key; built from the content tree (see ContentTree.block_keys)
    keys: list[BlockKey]

    status: Status = Status.PENDING
    reject_reason: str = ""
    replica: int = -1
    num_pending_parents: int = 0
    parent_failed: bool = False

    num_tokens: int = 0  # prompt + outputs emitted so far (vLLM num_tokens)
    num_computed: int = 0  # tokens whose KV has been computed (vLLM num_computed_tokens)
    num_output: int = 0
    cached_tokens: int | None = None  # prefix hit at first scheduling
    scheduled_tokens: int = 0  # every token ever scheduled, recompute included
    preemptions: int = 0

    # KV blocks held while running
    block_table: list[int] = field(default_factory=list)  # one block per sequence block
    num_committed: int = 0  # leading entries of block_table that are in the prefix index
    extra_blocks: list[int] = field(default_factory=list)  # recurrent state, never cached

    # speculative decoding (replica.py)
    chunks: int = 0  # token emissions on speculating replicas (several tokens each)
    spec_proposed: int = 0  # draft tokens verified for it
    spec_accepted: int = 0

    # retention across tool gaps (replica.py) and the host tier
    pinned: bool = False  # session TTL: finished, still holding its committed blocks
    retained: int = 0  # offload-and-prefetch: leading blocks offloaded when it finished
    host_hit_tokens: int = 0  # tokens of its first prefix hit copied from the host tier
    load_end: float = math.nan  # when that copy completed

    # prefill/decode disaggregation (replica.py)
    prefill_replica: int = -1  # where its prompt was computed, if not where it decodes
    decode_replica: int = -1
    # blocks still held on the prefill replica while the KV moves: (table, committed, extra)
    prefill_copy: tuple[list[int], int, list[int]] | None = None
    xfer_queued: float = math.nan  # prefill done, waiting for the decode replica's blocks
    xfer_start: float = math.nan  # the move starts (blocks allocated, link free)
    xfer_end: float = math.nan
    xfer_bytes: float = 0.0  # what the decode replica did not have cached

    ready: float = math.nan
    arrived: float = math.nan
    first_scheduled: float = math.nan
    first_token: float = math.nan
    finished: float = math.nan
    last_token: float = math.nan
    max_gap: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


class ContentTree:
    """Block identity from the workload's content tree (see simulator/workload/compiled.py)."""

    def __init__(self, wl: CompiledWorkload, block_size: int) -> None:
        self.wl = wl
        self.block_size = block_size

    def first_block(self, node: int) -> int:
        """Absolute index of the first block whose last token lies in ``node``."""
        return int(self.wl.node_start_tokens[node]) // self.block_size

    def first_blocks(self) -> list[int]:
        """:meth:`first_block` of every node."""
        return [int(t) // self.block_size for t in self.wl.node_start_tokens]

    def path(self, r: int) -> list[int]:
        wl = self.wl
        return [int(c) for c in wl.path_nodes[wl.req_path_start[r] : wl.req_path_start[r + 1]]]

    def node_holding(self, path: list[int], token: int) -> int:
        """The node of ``path`` that holds absolute token position ``token``."""
        wl = self.wl
        for c in path:
            start = int(wl.node_start_tokens[c])
            if start <= token < start + int(wl.node_num_tokens[c]):
                return c
        raise ValueError(f"token {token} is past the end of content path {path}")

    def block_keys(self, r: int) -> list[BlockKey]:
        """Keys of every full block request ``r`` can ever hold (prompt + output tokens)."""
        path = self.path(r)
        bs = self.block_size
        total = int(self.wl.req_prompt_tokens[r] + self.wl.req_output_tokens[r])
        return [(self.node_holding(path, bs * i + bs - 1), i) for i in range(total // bs)]


def make_requests(tree: ContentTree) -> list[Request]:
    wl = tree.wl
    out = []
    for r in range(wl.num_requests):
        p0, p1 = wl.req_parents_start[r], wl.req_parents_start[r + 1]
        c0, c1 = wl.req_children_start[r], wl.req_children_start[r + 1]
        req = Request(
            request_id=r,
            session_id=int(wl.req_session[r]),
            prompt_tokens=int(wl.req_prompt_tokens[r]),
            output_tokens=int(wl.req_output_tokens[r]),
            arrival_time=float(wl.req_arrival_time[r]),
            wait_after_ready=float(wl.req_wait_after_ready[r]),
            parents=[int(x) for x in wl.parent_ids[p0:p1]],
            children=[int(x) for x in wl.child_ids[c0:c1]],
            keys=tree.block_keys(r),
        )
        req.num_pending_parents = len(req.parents)
        out.append(req)
    return out
