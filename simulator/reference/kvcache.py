"""A paged KV cache with prefix caching, block by block, the way vLLM V1's block pool works.

This is the reference model's cache (REFERENCE.md §1, vLLM's ``block_pool.py`` and
``kv_cache_manager.py``). It is deliberately naive: every block is a Python object, the free
queue is an ``OrderedDict`` of block ids, and the prefix index maps a block's content key to
the block holding it. Nothing here knows about runs of blocks or content nodes beyond the key.

* **Content key.** vLLM hashes a full block's tokens chained with its parent's hash. servesim
  has no token ids; block ``i`` of a sequence is identified by ``(node, i)``, where ``node`` is
  the content node (see :mod:`simulator.workload.compiled`) holding the block's last token
  ``block_size * i + block_size - 1``. Two sequences have the same key for block ``i`` exactly
  when they share every token up to the end of that block.
* **Free queue.** Every block with no reference sits in the queue, cached or not. Allocation
  pops the head; if that block still holds cached content, the content is evicted (LRU).
  A prefix hit on a queued block takes it out of the queue. Freed blocks are appended at the
  tail, in the order the caller gives.
* **Reference counts.** A block is referenced by every running request whose block table holds
  it; it returns to the queue when the count drops to zero and keeps its content (lazy
  eviction), so a later request can still hit it.
* **Host tier** (optional, :mod:`.hosttier`). When an allocation evicts cached blocks, the host
  receives them: at the first evicted block of each stretch of one node's blocks (blocks freed
  together, last block first, sit in the queue as such a stretch), the host stores the node's
  blocks up to that one. Prefetching puts blocks copied back from the host into the cache,
  unreferenced, at the tail of the free queue (:meth:`BlockPool.install`).

Units: blocks, except where a name says tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from simulator.reference.hosttier import HostTier

#: Content key of a full block: (content node holding the block's last token, block index).
BlockKey = tuple[int, int]


@dataclass
class Block:
    """One physical KV block."""

    block_id: int
    ref_cnt: int = 0
    key: BlockKey | None = None  # the cached content, while it is in the prefix index


class BlockPool:
    """The KV blocks of one replica: free queue, prefix index and reference counts."""

    def __init__(
        self,
        num_blocks: int,
        enable_caching: bool,
        host: HostTier | None = None,
        first_block: Sequence[int] = (),
    ) -> None:
        """``host``: the replica's host tier, if any; ``first_block[node]``: the absolute index
        of the node's first block (the host counts a node's blocks from there)."""
        self.num_blocks = num_blocks
        self.host = host
        self.first_block = first_block
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # head = least recently freed = next to be allocated (and evicted)
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[BlockKey, int] = {}  # content key -> block id
        self.num_evicted = 0  # cached blocks whose content was dropped to reuse the block

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def longest_hit(self, keys: Iterable[BlockKey]) -> list[int]:
        """Blocks holding the longest cached prefix of a sequence whose block keys are ``keys``."""
        hit: list[int] = []
        if not self.enable_caching:
            return hit
        for key in keys:
            block_id = self.cached.get(key)
            if block_id is None:
                break
            hit.append(block_id)
        return hit

    def num_queued(self, block_ids: Iterable[int]) -> int:
        """How many of ``block_ids`` sit in the free queue (a hit would take them out of it)."""
        return sum(1 for b in block_ids if self.blocks[b].ref_cnt == 0)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Reference cached blocks (a prefix hit): raise their counts, leave the free queue."""
        for b in block_ids:
            block = self.blocks[b]
            if block.ref_cnt == 0:
                del self.free_queue[b]
            block.ref_cnt += 1

    def resident(self, node: int) -> int:
        """How many leading blocks of ``node`` are cached (the cached part is a prefix: LRU
        with last-block-first freeing evicts a block before the blocks in front of it)."""
        first = self.first_block[node]
        k = 0
        while (node, first + k) in self.cached:
            k += 1
        return k

    def allocate(self, count: int) -> list[int]:
        """Pop ``count`` blocks from the head of the free queue, evicting their content (to the
        host tier, if there is one)."""
        if count > len(self.free_queue):
            raise RuntimeError(f"allocate({count}) with {len(self.free_queue)} free blocks")
        out = []
        previous: BlockKey | None = None  # content of the block evicted just before
        for _ in range(count):
            b, _ = self.free_queue.popitem(last=False)
            block = self.blocks[b]
            if block.key is not None:
                node, index = block.key
                if self.host is not None and previous != (node, index + 1):
                    # the first (deepest) block of a stretch of this node's blocks
                    self.host.store(node, index - self.first_block[node] + 1)
                previous = block.key
                del self.cached[block.key]
                block.key = None
                self.num_evicted += 1
            else:
                previous = None
            block.ref_cnt = 1
            out.append(b)
        return out

    def lift(self, block_ids: Iterable[int]) -> None:
        """Take unreferenced blocks out of the free queue (they keep count 0 for now)."""
        for b in block_ids:
            del self.free_queue[b]

    def install(self, block_id: int, key: BlockKey) -> None:
        """A freshly allocated block receives content ``key`` copied from the host; it stays
        unreferenced (the caller appends it to the free queue)."""
        block = self.blocks[block_id]
        block.key = key
        block.ref_cnt = 0
        self.cached[key] = block_id

    def append(self, block_ids: Iterable[int]) -> None:
        """Put unreferenced blocks at the tail of the free queue, in order."""
        for b in block_ids:
            if self.blocks[b].ref_cnt != 0:
                raise RuntimeError(f"block {b} is referenced; it cannot join the free queue")
            self.free_queue[b] = None

    def commit(self, block_id: int, key: BlockKey) -> int:
        """A request has computed the full block ``block_id`` with content ``key``.

        Returns the block the request references from now on for this position: its own block,
        which now enters the prefix index, or, when the content is already cached in another
        block, that block, referenced (the caller then frees its own copy: servesim's
        duplicate-block rule, docs/semantics.md).
        """
        existing = self.cached.get(key)
        if existing is not None:
            self.touch([existing])
            return existing
        self.cached[key] = block_id
        self.blocks[block_id].key = key
        return block_id

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; blocks reaching zero join the tail, in order."""
        for b in block_ids:
            block = self.blocks[b]
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {b} freed more often than referenced")
            if block.ref_cnt == 0:
                self.free_queue[b] = None

    def check(self) -> list[str]:
        """Consistency of the pool (for tests): counts, queue membership, index."""
        problems = []
        for block in self.blocks:
            if block.ref_cnt < 0:
                problems.append(f"block {block.block_id}: ref_cnt {block.ref_cnt}")
            if (block.ref_cnt == 0) != (block.block_id in self.free_queue):
                problems.append(
                    f"block {block.block_id}: ref_cnt {block.ref_cnt} but "
                    f"{'' if block.block_id in self.free_queue else 'not '}queued"
                )
            if block.key is not None and self.cached.get(block.key) != block.block_id:
                problems.append(f"block {block.block_id}: key {block.key} not indexed to it")
        if len(self.cached) != sum(1 for b in self.blocks if b.key is not None):
            problems.append("prefix index and block keys disagree")
        if self.host is not None:
            problems += self.host.check()
        return problems
