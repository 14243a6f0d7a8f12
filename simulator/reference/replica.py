"""One serving replica as a SimPy process: schedule a batch, run the step, finish the step.

The scheduler follows vLLM V1's ``Scheduler.schedule()`` (REFERENCE.md §1) as stated in
docs/semantics.md:

1. **Running** requests, in admission order, each take ``min(tokens still needed, remaining
   budget, max_model_len - 1 - computed)`` tokens. When the blocks for them cannot be
   allocated, the most recently admitted running request is preempted (possibly the request
   itself) until they can: its blocks are freed, its computed tokens reset, and it goes back
   to the *head* of the waiting queue (recompute).
2. **Waiting** requests, FCFS, only if nothing was preempted in this step and fewer than
   ``max_num_seqs`` requests run: a prefix-cache lookup (capped at ``num_tokens - 1`` tokens),
   then the uncached part of the prompt, capped by the budget. A request whose blocks do not
   fit (counting the cached blocks a hit would take out of the free queue) stops admission.

A full block is committed to the prefix index as soon as it is scheduled. When its content is
already cached in another block (the last-token recompute, or two identical prompts in one
step), the request references the cached block and its own copy goes straight back to the free
queue, uncached (servesim's duplicate-block rule: one block per position, as in vLLM, which
keeps the new copy instead and leaves the old one evictable). A request that ends or is
preempted frees its uncached blocks first, then its block table from the last block to the
first.

At the end of a step every scheduled request whose computed tokens caught up with its known
tokens emits one token; requests that emitted their last token free their blocks and release
their children (see cluster.py).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import simpy

from simulator.costmodel import step_seconds
from simulator.reference.kvcache import BlockPool
from simulator.reference.request import Request, Status

if TYPE_CHECKING:
    from simulator.reference.cluster import Cluster


class Scheduled(NamedTuple):
    request: Request
    num_new: int  # tokens computed in this step
    num_context: int  # tokens already computed before it


class StepRecord(NamedTuple):
    """One engine step, as the core's step log records it."""

    replica: int
    start: float
    end: float
    num_seqs: int
    num_decodes: int
    prefill_tokens: int
    used_blocks: int
    num_waiting: int


class SchedulerStuck(RuntimeError):
    """A replica has queued work but cannot form a batch (a bug, never a user error)."""


class Replica:
    def __init__(self, env: simpy.Environment, index: int, plan, cluster: Cluster) -> None:
        self.env = env
        self.index = index
        self.cluster = cluster
        self.block_size = int(plan.block_size)
        self.max_num_batched_tokens = int(plan.max_num_batched_tokens)
        self.max_num_seqs = int(plan.max_num_seqs)
        self.max_model_len = int(plan.max_model_len)
        self.state_blocks = int(plan.state_blocks_per_seq)  # recurrent state, per sequence
        self.cost_params = plan.cost_params
        self.pool = BlockPool(int(plan.num_blocks), bool(plan.enable_prefix_caching))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order
        self.outstanding = 0  # dispatched here and not finished (the router reads it)
        self.pending_prefill_tokens = 0  # prompts of requests here without a first token yet
        self.routed = 0  # requests the router sent here (rejected ones included)
        self.idle = True
        self._wake = env.event()
        # counters
        self.num_steps = 0
        self.busy_seconds = 0.0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.num_preemptions = 0
        self.peak_used_blocks = 0
        self.peak_running = 0
        self.process = env.process(self.run())

    # ------------------------------------------------------------------ the process

    def submit(self, req: Request) -> None:
        """A routed request joins the waiting queue; an idle replica wakes up now."""
        req.status = Status.WAITING
        req.num_tokens = req.prompt_tokens
        self.outstanding += 1
        self.pending_prefill_tokens += req.prompt_tokens
        self.waiting.append(req)
        if self.idle:
            self.idle = False
            self._wake.succeed()

    def run(self):
        """schedule -> step -> step end, for as long as there is work; then sleep."""
        env = self.env
        while True:
            yield self._wake
            while True:
                batch = self.schedule()
                if not batch:
                    break
                seconds = self.step_duration(batch)
                self.record_step(batch, seconds)
                yield env.timeout(seconds)
                self.end_step(batch)
                # the next batch is formed at this same time, after every event already due
                yield env.timeout(0)
            if self.waiting or self.running:
                raise SchedulerStuck(
                    f"replica {self.index}: {len(self.waiting)} waiting and {len(self.running)} "
                    "running requests, but no batch could be formed"
                )
            self.idle = True
            self._wake = env.event()

    # ------------------------------------------------------------------ scheduling

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def schedule(self) -> list[Scheduled]:
        budget = self.max_num_batched_tokens
        batch: list[Scheduled] = []
        preempted = False

        # 1. running requests, in admission order
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(
                req.num_tokens - req.num_computed,
                budget,
                self.max_model_len - 1 - req.num_computed,
            )
            if n <= 0:
                i += 1
                continue
            need = self.blocks_for(req.num_computed + n) - len(req.block_table)
            while need > self.pool.num_free:
                victim = self.running.pop()
                self.preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break  # it preempted itself: nothing after it runs either
            if need > 0:
                req.block_table += self.pool.allocate(need)
            self.compute(req, n, batch)
            budget -= n
            i += 1

        # 2. waiting requests, FCFS
        if preempted:
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            cap = (req.num_tokens - 1) // self.block_size  # the last token is always computed
            hit = self.pool.longest_hit(req.keys[:cap])
            num_computed = len(hit) * self.block_size
            n = min(req.num_tokens - num_computed, budget)
            new_blocks = self.blocks_for(num_computed + n) - len(hit)
            if new_blocks + self.state_blocks + self.pool.num_queued(hit) > self.pool.num_free:
                break
            self.waiting.popleft()
            self.pool.touch(hit)
            req.block_table = hit + self.pool.allocate(new_blocks)
            req.num_committed = len(hit)
            req.extra_blocks = self.pool.allocate(self.state_blocks)
            req.num_computed = num_computed
            if req.cached_tokens is None:
                req.cached_tokens = num_computed
                req.first_scheduled = self.env.now
            req.status = Status.RUNNING
            self.running.append(req)
            self.compute(req, n, batch)
            budget -= n
        return batch

    def compute(self, req: Request, n: int, batch: list[Scheduled]) -> None:
        """Put ``n`` tokens of ``req`` in the batch; commit the blocks they complete."""
        batch.append(Scheduled(req, n, req.num_computed))
        req.num_computed += n
        req.scheduled_tokens += n
        if not self.pool.enable_caching:
            return
        for i in range(req.num_committed, req.num_computed // self.block_size):
            own = req.block_table[i]
            block = self.pool.commit(own, req.keys[i])
            if block != own:  # already cached elsewhere: use that copy, free ours
                req.block_table[i] = block
                self.pool.free([own])
            req.num_committed = i + 1

    def release(self, req: Request) -> None:
        """Free every block of ``req``: uncached ones first, then its table last block first."""
        uncached = req.block_table[req.num_committed :] + req.extra_blocks
        self.pool.free(reversed(uncached))
        self.pool.free(reversed(req.block_table[: req.num_committed]))
        req.block_table = []
        req.extra_blocks = []
        req.num_committed = 0

    def preempt(self, req: Request) -> None:
        self.release(req)
        req.num_computed = 0
        req.preemptions += 1
        self.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    # ------------------------------------------------------------------ the step

    def step_duration(self, batch: list[Scheduled]) -> float:
        new = np.array([s.num_new for s in batch], dtype=np.int64)
        context = np.array([s.num_context for s in batch], dtype=np.int64)
        return float(step_seconds(self.cost_params, new, context, len(batch)))

    @staticmethod
    def is_decode(s: Scheduled) -> bool:
        return s.num_new == 1 and s.request.num_output > 0

    def record_step(self, batch: list[Scheduled], seconds: float) -> None:
        now = self.env.now
        self.num_steps += 1
        self.busy_seconds += seconds
        self.peak_used_blocks = max(self.peak_used_blocks, self.pool.num_used)
        self.peak_running = max(self.peak_running, len(self.running))
        decodes = sum(1 for s in batch if self.is_decode(s))
        prefill = sum(s.num_new for s in batch if not self.is_decode(s))
        self.cluster.step_log.append(
            StepRecord(
                self.index,
                now,
                now + seconds,
                len(batch),
                decodes,
                prefill,
                self.pool.num_used,
                len(self.waiting),
            )
        )

    def end_step(self, batch: list[Scheduled]) -> None:
        now = self.env.now
        done: list[Request] = []
        for s in batch:
            req = s.request
            if self.is_decode(s):
                self.decode_tokens += 1
            else:
                self.prefill_tokens += s.num_new
            if req.num_computed < req.num_tokens:
                continue  # a prefill chunk short of the prompt's end: no token yet
            req.num_output += 1
            req.num_tokens += 1
            if req.num_output == 1:
                req.first_token = now
                self.pending_prefill_tokens -= req.prompt_tokens
            else:
                req.max_gap = max(req.max_gap, now - req.last_token)
            req.last_token = now
            if req.num_output >= req.output_tokens:
                req.finished = now
                done.append(req)
        if not done:
            return
        for req in [r for r in self.running if r in done]:
            self.release(req)
            req.status = Status.FINISHED
            self.outstanding -= 1
        self.running = [r for r in self.running if r.status is Status.RUNNING]
        for req in done:
            self.cluster.request_done(req)

    # ------------------------------------------------------------------ results

    def counters(self) -> dict:
        return {
            "replica": self.index,
            "num_blocks": self.pool.num_blocks,
            "num_steps": self.num_steps,
            "busy_seconds": self.busy_seconds,
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "preemptions": self.num_preemptions,
            "peak_used_blocks": self.peak_used_blocks,
            "peak_running": self.peak_running,
            "evicted_blocks": self.pool.num_evicted,
            "free_blocks_at_end": self.pool.num_free,
            "routed_requests": self.routed,
        }
