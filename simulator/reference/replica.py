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

**Host tier** (hosttier.py). A waiting request's prefix hit may go on past the GPU's cached
blocks into blocks only the host holds. Then it is admitted without computing anything: it takes
GPU blocks for the whole hit past the GPU part, and waits (``LOADING``: in the running list, in
no batch, never preempted) while the replica's copy engine moves the host-only blocks over PCIe
(copies are served one after the other). When the copy lands, those blocks are committed as if
computed, and the request computes the rest of its prompt from the next step on.

**Retention** across tool gaps, for a finished request that has children:

* ``lru``: its blocks are freed as usual;
* ``session_ttl``: it frees its uncached blocks but keeps referencing its committed ones
  (*pinned*) until its first child is admitted, ``ttl_s`` passes, or blocks run short: before
  preempting a running request or holding back a waiting one, the oldest pin is dropped;
* ``offload_prefetch``: if a child whose last unfinished parent it is will wait (a tool call),
  its committed blocks are stored to the host tier (deepest node first), then freed; a copy back
  is started so that it lands ``prefetch_margin_s`` before the soonest such child is due, were
  all of them missing. When it lands the blocks become cached again, unreferenced, at the tail
  of the free queue.

**Disaggregation.** A *prefill* replica that emits a request's first token (and more are to
come) hands it to the decode replica chosen at dispatch: the request stays in its running list
(``TRANSFERRING``: in no batch, never preempted) and keeps its blocks there, and joins the decode
replica's FIFO queue of prefilled requests. Each time the decode replica schedules, it first
takes requests from that queue while ``max_num_seqs`` allows: a prefix lookup over the full
prompt blocks, blocks for the whole prompt (plus recurrent state), or it waits for blocks (after
dropping pins); the prompt's full blocks are committed at once, and the KV it did not have
cached moves over its inbound link, one transfer after the other (``latency + bytes /
bandwidth``). When the move lands, the prefill replica frees the request's blocks (as at a
finish) and the request decodes on the decode replica.

**Speculative decoding** (simulator/specdec.py). The draft length ``k`` of a step comes from the
number of running requests when the batch is formed (``k_by_batch_size``, else
``num_speculative_tokens``). A running request that decodes verifies ``min(k, outputs still to
come - 1)`` drafts as well: ``1 + drafts`` tokens of budget and blocks (capped like any chunk).
A drafter that is a model (not n-gram lookup) adds ``k`` draft passes over the requests that
emit a token in the step to its duration. At the step end the drafts are accepted in order,
draft ``i`` with probability ``alpha x decay**i`` (the request's ``alpha``, a counter-based draw
per request, output position and draft), up to the first rejection; the rejected positions are
rolled back (their blocks stay allocated) and the request emits ``accepted + 1`` tokens at once,
one chunk.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import simpy

from simulator.core.uniform import uniform
from simulator.costmodel import step_seconds
from simulator.reference.hosttier import HostTier
from simulator.reference.kvcache import BlockKey, BlockPool
from simulator.reference.request import Request, Status

if TYPE_CHECKING:
    from simulator.reference.cluster import Cluster


class Scheduled(NamedTuple):
    request: Request
    num_new: int  # tokens computed in this step (drafts included)
    num_context: int  # tokens already computed before it
    num_drafts: int = 0  # speculative decoding: draft tokens it verifies


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
        self.tree = cluster.tree
        host_blocks = int(getattr(plan, "host_blocks", 0))
        self.host = HostTier(host_blocks) if host_blocks > 0 else None
        self.pool = BlockPool(
            int(plan.num_blocks),
            bool(plan.enable_prefix_caching),
            self.host,
            cluster.tree.first_blocks(),
        )
        # host -> GPU copies, loads and prefetches alike, one after the other
        self.h2d_bytes_per_s = float(getattr(plan, "h2d_bytes_per_s", 0.0))
        self.kv_bytes_per_token = float(getattr(plan, "kv_bytes_per_token", 0))
        self.h2d_free_at = 0.0
        self.h2d_busy_seconds = 0.0
        self.retention = getattr(plan, "retention", "lru")
        self.ttl = float(getattr(plan, "ttl_s", 0.0))
        self.prefetch_margin = float(getattr(plan, "prefetch_margin_s", 0.0))
        self.pinned: list[Request] = []  # session TTL: finished requests holding blocks, oldest first
        # speculative decoding
        self.spec = getattr(plan, "speculative", None)
        self.draft_params = getattr(plan, "draft_params", None)
        self.alpha = cluster.acceptance(plan)  # per request
        self.k = 0  # drafts per decode in the current step
        self.spec_proposed = 0
        self.spec_accepted = 0
        self.spec_verifies = 0
        self.draft_seconds = 0.0
        # disaggregation
        self.role = getattr(plan, "role", "aggregated")
        self.remote: deque[Request] = deque()  # decode role: prefilled requests awaiting blocks
        link = cluster.link
        self.link_bytes_per_s = link.bandwidth_gb_per_s * 1e9
        self.link_latency = link.latency_s
        self.link_free_at = 0.0
        self.link_busy_seconds = 0.0
        self.transfer_bytes_in = 0.0
        self.transfers_in = 0
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
        self.host_loads = 0
        self.host_load_blocks = 0
        self.pins = 0
        self.pins_broken = 0
        self.prefetches = 0
        self.prefetch_blocks = 0
        self.process = env.process(self.run())

    # ------------------------------------------------------------------ the process

    def submit(self, req: Request) -> None:
        """A routed request joins the waiting queue; an idle replica wakes up now."""
        req.status = Status.WAITING
        req.num_tokens = req.prompt_tokens
        self.outstanding += 1
        self.pending_prefill_tokens += req.prompt_tokens
        self.waiting.append(req)
        self.wake()

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
            held = any(r.status in (Status.LOADING, Status.TRANSFERRING) for r in self.running)
            if (self.waiting or self.running) and not held:  # a landing copy wakes it
                raise SchedulerStuck(
                    f"replica {self.index}: {len(self.waiting)} waiting and {len(self.running)} "
                    "running requests, but no batch could be formed"
                )
            self.idle = True
            self._wake = env.event()

    def wake(self) -> None:
        """Work for an idle replica: it schedules now (after events already due)."""
        if self.idle:
            self.idle = False
            self._wake.succeed()

    # ------------------------------------------------------------------ scheduling

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def draft_length(self) -> int:
        """Speculative decoding: drafts per decode in the step being formed (0 = none)."""
        if self.spec is None:
            return 0
        rows = self.spec.k_by_batch_size or [(math.inf, self.spec.num_speculative_tokens)]
        for max_running, k in rows:
            if len(self.running) <= max_running:
                return k
        return rows[-1][1]

    def schedule(self) -> list[Scheduled]:
        if self.remote:
            self.start_transfers()
        budget = self.max_num_batched_tokens
        batch: list[Scheduled] = []
        preempted = False
        self.k = self.draft_length()

        # 1. running requests, in admission order
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.status is not Status.RUNNING:  # loading, or its KV is moving
                i += 1
                continue
            wanted = req.num_tokens - req.num_computed
            drafts = 0
            if self.k > 0 and wanted == 1 and req.num_output > 0:
                drafts = min(self.k, req.output_tokens - req.num_output - 1)
                wanted = 1 + drafts
            n = min(wanted, budget, self.max_model_len - 1 - req.num_computed)
            if n <= 0:
                i += 1
                continue
            drafts = min(drafts, n - 1)
            need = self.blocks_for(req.num_computed + n) - len(req.block_table)
            while need > self.pool.num_free and self.pinned:
                self.unpin_oldest()
            while need > self.pool.num_free:
                # the newest running request that is not loading or handing over its KV
                victim = next(r for r in reversed(self.running) if r.status is Status.RUNNING)
                self.running.remove(victim)
                self.preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break  # it preempted itself: nothing after it runs either
            if need > 0:
                req.block_table += self.pool.allocate(need)
            self.compute(req, n, batch, drafts)
            budget -= n
            i += 1

        # 2. waiting requests, FCFS
        if preempted:
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            cap = (req.num_tokens - 1) // self.block_size  # the last token is always computed
            hit = self.pool.longest_hit(req.keys[:cap])
            host_only = 0  # blocks past the GPU hit that only the host holds
            tiered = len(hit)  # blocks held by either tier, from the first one
            if self.host is not None and self.pool.enable_caching:
                for key in req.keys[len(hit) : cap]:
                    if key in self.pool.cached:
                        tiered += 1
                    elif self.host_holds(key):
                        tiered += 1
                        host_only += 1
                    else:
                        break
            loading = tiered > len(hit)
            if loading:
                num_computed = tiered * self.block_size
                n = 0
                new_blocks = tiered - len(hit)
            else:
                num_computed = len(hit) * self.block_size
                n = min(req.num_tokens - num_computed, budget)
                new_blocks = self.blocks_for(num_computed + n) - len(hit)
            need = new_blocks + self.state_blocks + self.pool.num_queued(hit)
            if need > self.pool.num_free:
                if self.pinned:
                    self.unpin_oldest()
                    continue  # look again
                break
            self.waiting.popleft()
            self.pool.touch(hit)
            blocks = self.pool.allocate(new_blocks + self.state_blocks)
            req.block_table = hit + blocks[:new_blocks]
            req.extra_blocks = blocks[new_blocks:]
            req.num_committed = len(hit)
            req.num_computed = num_computed
            first = req.cached_tokens is None
            if first:
                req.cached_tokens = num_computed
                req.first_scheduled = self.env.now
                if req.decode_replica < 0:  # else when its decode replica takes it
                    self.cluster.unpin_parents(req)
            self.running.append(req)
            if loading:
                self.start_load(req, tiered, host_only, first)
                continue
            req.status = Status.RUNNING
            self.compute(req, n, batch)
            budget -= n
        return batch

    def compute(self, req: Request, n: int, batch: list[Scheduled], drafts: int = 0) -> None:
        """Put ``n`` tokens of ``req`` in the batch; commit the blocks they complete."""
        batch.append(Scheduled(req, n, req.num_computed, drafts))
        req.num_computed += n
        req.scheduled_tokens += n
        self.commit(req)

    def commit(self, req: Request) -> None:
        """Enter the full blocks ``req`` has computed (or loaded) into the prefix index."""
        if not self.pool.enable_caching:
            return
        known = min(req.num_computed, req.num_tokens)  # drafts are not content yet
        for i in range(req.num_committed, known // self.block_size):
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
        seconds = float(step_seconds(self.cost_params, new, context, len(batch)))
        if self.k > 0 and self.spec.method != "ngram":
            # k draft passes over the sequences that emit a token in this step
            emitting = [s.request for s in batch if s.request.num_computed >= s.request.num_tokens]
            if emitting:
                ones = np.ones(len(emitting), dtype=np.int64)
                context = np.array([r.num_tokens for r in emitting], dtype=np.int64)
                draft = self.k * float(
                    step_seconds(self.draft_params, ones, context, len(emitting))
                )
                self.draft_seconds += draft
                seconds += draft
        return seconds

    @staticmethod
    def is_decode(s: Scheduled) -> bool:
        return s.num_new - s.num_drafts == 1 and s.request.num_output > 0

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
            tokens = 1 + self.verify(req, s.num_drafts) if s.num_drafts else 1
            if self.spec is not None:
                req.chunks += 1
            req.num_output += tokens
            req.num_tokens += tokens
            if req.num_output == tokens:
                req.first_token = now
                self.pending_prefill_tokens -= req.prompt_tokens
            else:
                req.max_gap = max(req.max_gap, now - req.last_token)
            req.last_token = now
            if req.num_output == tokens < req.output_tokens and self.role == "prefill":
                self.hand_off(req)
                continue
            if req.num_output >= req.output_tokens:
                req.finished = now
                done.append(req)
        if not done:
            return
        for req in [r for r in self.running if r in done]:
            self.retain(req)
            req.status = Status.FINISHED
            self.outstanding -= 1
        self.running = [r for r in self.running if r.status is not Status.FINISHED]
        for req in done:
            self.cluster.request_done(req)

    def verify(self, req: Request, drafts: int) -> int:
        """Accept ``req``'s drafts in order up to the first rejection; roll back the rest.
        Returns the number accepted."""
        alpha = self.alpha[req.request_id]
        accepted = 0
        while accepted < drafts:
            u = uniform(self.cluster.seed, req.request_id, req.num_output, accepted)
            if u >= alpha * self.spec.position_decay**accepted:
                break
            accepted += 1
        req.num_computed -= drafts - accepted
        req.spec_proposed += drafts
        req.spec_accepted += accepted
        self.spec_proposed += drafts
        self.spec_accepted += accepted
        self.spec_verifies += 1
        return accepted

    # ------------------------------------------------------------------ host tier

    def host_holds(self, key: BlockKey) -> bool:
        node, index = key
        return self.host is not None and self.host.holds(node, index - self.tree.first_block(node))

    def host_touch(self, keys: list[BlockKey]) -> None:
        """The nodes of ``keys`` that have host blocks become the most recently used there,
        deepest first (so a session's shared, shallow nodes outlive its own)."""
        for node in reversed(nodes_of(keys)):
            if self.host.num_held(node) > 0:
                self.host.touch(node)

    def copy_to_gpu(self, num_blocks: int) -> tuple[float, float]:
        """Book the copy engine for ``num_blocks`` blocks: ``(start, end)`` of the copy."""
        nbytes = num_blocks * self.block_size * self.kv_bytes_per_token
        start = max(self.env.now, self.h2d_free_at)
        busy = nbytes / self.h2d_bytes_per_s
        self.h2d_free_at = start + busy
        self.h2d_busy_seconds += busy
        return start, start + busy

    def start_load(self, req: Request, tiered: int, host_only: int, first: bool) -> None:
        """``req`` was admitted with a hit reaching into host-only blocks: copy them in."""
        req.status = Status.LOADING
        self.host_loads += 1
        self.host_load_blocks += host_only
        self.host_touch(req.keys[:tiered])
        _, end = self.copy_to_gpu(host_only)
        if first:
            req.host_hit_tokens = host_only * self.block_size
            req.load_end = end
        self.cluster.call_at(end, lambda: self.load_done(req))

    def load_done(self, req: Request) -> None:
        """The copy landed: the loaded blocks are committed; ``req`` computes on."""
        req.status = Status.RUNNING
        self.commit(req)
        self.wake()

    # ------------------------------------------------------------------ retention

    def retain(self, req: Request) -> None:
        """``req`` finished: free its blocks under the replica's retention policy."""
        if self.retention == "lru" or not req.children or not self.pool.enable_caching:
            self.release(req)
        elif self.retention == "session_ttl":
            if req.num_committed == 0:
                self.release(req)  # no cached block to protect
                return
            self.pin(req)
        else:
            self.offload(req)

    def pin(self, req: Request) -> None:
        uncached = req.block_table[req.num_committed :] + req.extra_blocks
        self.pool.free(reversed(uncached))
        req.block_table = req.block_table[: req.num_committed]
        req.extra_blocks = []
        req.pinned = True
        self.pinned.append(req)
        self.pins += 1
        self.cluster.call_at(self.env.now + self.ttl, lambda: self.expire(req))

    def expire(self, req: Request) -> None:
        if req.pinned:
            self.unpin(req)

    def unpin(self, req: Request) -> None:
        """End ``req``'s protection: its blocks are freed as at a finish (last block first)."""
        self.pinned.remove(req)
        req.pinned = False
        self.pool.free(reversed(req.block_table))
        req.block_table = []
        req.num_committed = 0

    def unpin_oldest(self) -> None:
        """Blocks are short: the oldest protection on this replica ends early."""
        self.unpin(self.pinned[0])
        self.pins_broken += 1

    def offload(self, req: Request) -> None:
        """Offload-and-prefetch: store ``req``'s committed blocks to the host and free them; a
        prefetch brings them back before the soonest child that only waits for ``req``."""
        waits = [
            child.wait_after_ready
            for child in (self.cluster.requests[c] for c in req.children)
            if child.num_pending_parents == 1  # req is its last unfinished parent
        ]
        wait = min(waits, default=-1.0)
        retain = req.num_committed
        if wait <= 0.0 or retain == 0 or self.host is None:
            self.release(req)
            return
        req.retained = retain
        kept = req.keys[:retain]
        for node in reversed(nodes_of(kept)):
            index = max(i for c, i in kept if c == node)
            self.host.store(node, index - self.tree.first_block(node) + 1)
        self.release(req)
        now = self.env.now
        lead = retain * self.block_size * self.kv_bytes_per_token / self.h2d_bytes_per_s
        due = now + wait - lead - self.prefetch_margin
        self.cluster.call_at(max(due, now), lambda: self.prefetch(req))

    def prefetch(self, req: Request) -> None:
        """Copy the retained blocks that the host holds and the GPU lost back to the GPU."""
        kept = req.keys[: req.retained]
        missing = sum(1 for key in kept if key not in self.pool.cached and self.host_holds(key))
        if missing == 0:
            return
        _, end = self.copy_to_gpu(missing)
        self.cluster.call_at(end, lambda: self.prefetch_done(req))

    def prefetch_done(self, req: Request) -> None:
        """The prefetched blocks are in GPU memory: per node, deepest first, the node's blocks
        the host holds and the GPU lacks are cached again (taking free blocks from the head of
        the queue, as any allocation), and the node's unreferenced cached blocks move to the
        tail, last block first. An allocation never takes blocks this prefetch already put at
        the tail: what does not fit is dropped."""
        kept = req.keys[: req.retained]
        pool = self.pool
        pushed = 0  # blocks this prefetch put at the tail
        added = 0
        for node in reversed(nodes_of(kept)):
            first = self.tree.first_block(node)
            want = min(self.host.num_held(node), sum(1 for c, _ in kept if c == node))
            res = pool.resident(node)
            if want <= res:
                continue
            queued = [
                pool.cached[(node, first + i)]
                for i in range(res)
                if pool.blocks[pool.cached[(node, first + i)]].ref_cnt == 0
            ]
            referenced = res - len(queued)  # a prefix of the node
            pool.lift(queued)
            add = min(want - res, max(pool.num_free - pushed, 0))
            for k, b in enumerate(pool.allocate(add)):
                pool.install(b, (node, first + res + k))
            added += add
            top = res + add
            pool.append(pool.cached[(node, first + i)] for i in reversed(range(referenced, top)))
            pushed += top - referenced
        self.host_touch(kept)
        if added > 0:
            self.prefetches += 1
            self.prefetch_blocks += added

    # ------------------------------------------------------------------ disaggregation

    def hand_off(self, req: Request) -> None:
        """Prefill replica: ``req`` has its first token; its KV goes to its decode replica. Its
        blocks here stay held (and it stays in the running list) until the move lands."""
        req.status = Status.TRANSFERRING
        req.prefill_copy = (req.block_table, req.num_committed, req.extra_blocks)
        req.block_table, req.num_committed, req.extra_blocks = [], 0, []
        req.xfer_queued = self.env.now
        dst = self.cluster.replicas[req.decode_replica]
        dst.remote.append(req)
        dst.wake()

    def start_transfers(self) -> None:
        """Decode replica: give blocks to prefilled requests, first come first served, and
        start moving the KV this replica does not cache over the inbound link."""
        bs = self.block_size
        while self.remote and len(self.running) < self.max_num_seqs:
            req = self.remote[0]
            prompt = req.prompt_tokens
            hit = self.pool.longest_hit(req.keys[: prompt // bs])
            table = self.blocks_for(prompt)
            need = table - len(hit) + self.state_blocks
            if need + self.pool.num_queued(hit) > self.pool.num_free:
                if self.pinned:
                    self.unpin_oldest()
                    continue
                return
            self.remote.popleft()
            self.pool.touch(hit)
            blocks = self.pool.allocate(need)
            req.block_table = hit + blocks[: table - len(hit)]
            req.extra_blocks = blocks[table - len(hit) :]
            req.num_committed = len(hit)
            self.commit(req)  # the whole prompt arrives: its full blocks are cached here
            self.cluster.unpin_parents(req)
            self.running.append(req)
            nbytes = (prompt - len(hit) * bs) * self.kv_bytes_per_token
            start = max(self.env.now, self.link_free_at)
            busy = nbytes / self.link_bytes_per_s
            self.link_free_at = start + busy
            self.link_busy_seconds += busy
            self.transfer_bytes_in += nbytes
            self.transfers_in += 1
            req.xfer_start = start
            req.xfer_end = start + busy + self.link_latency
            req.xfer_bytes = nbytes
            self.cluster.call_at(req.xfer_end, lambda req=req: self.cluster.transfer_done(req))

    def drop_prefill_copy(self, req: Request) -> None:
        """Prefill replica: the KV of ``req`` has moved; free its blocks here, as at a finish."""
        table, committed, extra = req.prefill_copy
        self.pool.free(reversed(table[committed:] + extra))
        self.pool.free(reversed(table[:committed]))
        req.prefill_copy = None
        self.running.remove(req)
        self.outstanding -= 1

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
            "host_capacity_blocks": self.host.capacity if self.host else 0,
            "host_loads": self.host_loads,
            "host_load_blocks": self.host_load_blocks,
            "h2d_busy_seconds": self.h2d_busy_seconds,
            "host_stored_blocks": self.host.num_stored if self.host else 0,
            "host_evicted_blocks": self.host.num_evicted if self.host else 0,
            "host_peak_blocks": self.host.peak if self.host else 0,
            "pins": self.pins,
            "pins_broken": self.pins_broken,
            "prefetches": self.prefetches,
            "prefetch_blocks": self.prefetch_blocks,
            "draft_seconds": self.draft_seconds,
            "spec_proposed": self.spec_proposed,
            "spec_accepted": self.spec_accepted,
            "spec_verifies": self.spec_verifies,
            "role": self.role,
            "kv_transfers_in": self.transfers_in,
            "kv_transfer_bytes_in": self.transfer_bytes_in,
            "kv_link_busy_seconds": self.link_busy_seconds,
        }


def nodes_of(keys: list[BlockKey]) -> list[int]:
    """The content nodes of a sequence's block keys, in path order (root first)."""
    nodes: list[int] = []
    for node, _ in keys:
        if not nodes or nodes[-1] != node:
            nodes.append(node)
    return nodes
