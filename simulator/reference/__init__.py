"""The reference model: servesim's semantics as plain SimPy processes, written to be read.

It is the oracle the fast Numba core (:mod:`simulator.core`) is tested against
(``tests/test_reference_diff.py``), and the place to prototype a policy in Python before
porting it to the core. Nothing here is shared with the core but what defines the inputs: the
cost model (:func:`simulator.costmodel.step_seconds`), the replica plans, the workload arrays,
the counter-based draws (:func:`simulator.core.uniform.uniform`) and the per-request draft
acceptance (:func:`simulator.specdec.draw_alphas`).

* :mod:`.kvcache` -- a block-level KV cache: block ids, ref counts, an LRU free queue, a prefix
  index keyed by content (vLLM V1's block pool);
* :mod:`.hosttier` -- the host-memory KV tier: leading blocks per content node, LRU over nodes;
* :mod:`.request` -- a request's state and the content key of each of its blocks;
* :mod:`.replica` -- the vLLM-V1 scheduler and the replica's schedule -> step -> step-end
  process; host loads, retention across tool gaps (session TTL, offload-and-prefetch),
  prefill/decode hand-offs and KV moves, speculative decoding;
* :mod:`.cluster` -- request lifecycles, dependencies, routing (over the prefill and decode
  pools when disaggregated), :func:`simulate_reference`.

See docs/reference_model.md.
"""

from simulator.reference.cluster import ReferenceResult, run_reference, simulate_reference

__all__ = ["ReferenceResult", "run_reference", "simulate_reference"]
