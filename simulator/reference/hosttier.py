"""The host-memory KV tier of one replica (REFERENCE.md §8: vLLM's OffloadingConnector,
Dynamo KVBM G2), as the reference model states it.

The tier holds copies of full KV blocks the GPU has evicted, keyed by content like the GPU's
prefix index. Its rules (docs/reference_model.md, "Host tier"):

* **What it holds.** For every content node, a number of *leading* blocks of the node: when the
  GPU evicts a block of a node, the host receives every block of the node up to and including
  it (those it lacks). The copy overlaps compute, so it costs no time.
* **LRU over nodes.** Storing to a node, or loading from it, makes the node the most recently
  used. When the tier is over its capacity it drops blocks from the least recently used node,
  that node's last block first, until it fits.

So the state is a mapping ``node -> leading blocks held``, in LRU order (oldest first). Units:
blocks; ``index`` arguments count from the node's first block.
"""

from __future__ import annotations

from collections import OrderedDict


class HostTier:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # node -> how many of its leading blocks are held; least recently used first
        self.held: OrderedDict[int, int] = OrderedDict()
        self.num_used = 0
        self.num_stored = 0  # blocks copied GPU -> host so far
        self.num_evicted = 0  # blocks dropped from the tier so far
        self.peak = 0  # most blocks held at once

    def holds(self, node: int, index: int) -> bool:
        """Whether block ``index`` (from the node's first block) of ``node`` is held here."""
        return self.held.get(node, 0) > index

    def num_held(self, node: int) -> int:
        return self.held.get(node, 0)

    def touch(self, node: int) -> None:
        """``node`` (which has blocks here) becomes the most recently used."""
        self.held.move_to_end(node)

    def store(self, node: int, upto: int) -> None:
        """Copy blocks ``0..upto-1`` of ``node`` here (those not held yet); the node becomes
        the most recently used; then evict down to the capacity."""
        have = self.num_held(node)
        if upto > have:
            self.held[node] = upto
            self.num_used += upto - have
            self.num_stored += upto - have
        if self.num_held(node) > 0:
            self.touch(node)
        if self.num_used > self.capacity:
            self.evict(self.num_used - self.capacity)
        self.peak = max(self.peak, self.num_used)

    def evict(self, count: int) -> None:
        """Drop ``count`` blocks: least recently used node first, its last block first."""
        while count > 0 and self.held:
            node, have = next(iter(self.held.items()))
            take = min(count, have)
            count -= take
            self.num_used -= take
            self.num_evicted += take
            if take == have:
                del self.held[node]
            else:
                self.held[node] = have - take  # keeps its place in the LRU order

    def check(self) -> list[str]:
        """Consistency (for tests): counts and capacity."""
        problems = []
        if sum(self.held.values()) != self.num_used:
            problems.append(f"host tier: {self.num_used} blocks counted, {sum(self.held.values())} held")
        if self.num_used > self.capacity:
            problems.append(f"host tier: {self.num_used} blocks held, capacity {self.capacity}")
        if any(n <= 0 for n in self.held.values()):
            problems.append("host tier: a node listed with no blocks")
        return problems
