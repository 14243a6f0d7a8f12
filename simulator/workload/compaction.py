"""Context compaction: the YAML option and how it is applied to a session graph.

::

    compaction:
      context_limit: 100000        # a request whose prompt + output would exceed it is compacted
      prompt_tokens: 200           # the "summarise the conversation" instruction
      summary_tokens: {dist: lognormal, mean: 2000, sigma: 0.5}

Before such a request, a compaction request summarises the history (it inherits the history and
outputs the summary); the request then restarts its chain from the agent's scaffold + summary +
its own fresh input: the old prefix is no longer reused. See
:func:`simulator.workload.graph.apply_compaction`.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from simulator.workload.distributions import Dist, sample_counts
from simulator.workload.graph import SessionGraph, apply_compaction

__all__ = ["Compaction", "compact"]


class Compaction(BaseModel):
    """Compact a chain when a request would exceed ``context_limit`` tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    context_limit: Annotated[int, Field(ge=2)]
    prompt_tokens: Annotated[int, Field(ge=0)] = 200
    summary_tokens: Dist


def compact(
    g: SessionGraph,
    spec: Compaction | None,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
) -> SessionGraph:
    """Apply ``spec`` to the requests selected by ``mask`` (all by default).

    Draws one summary length per request (whether compacted or not), so the draws do not depend
    on where compaction happens.
    """
    if spec is None:
        return g
    n = g.num_requests
    limit = np.full(n, spec.context_limit, dtype=np.int64)
    if mask is not None:
        limit[~mask] = 0
    summary = sample_counts(spec.summary_tokens, rng, n)
    return apply_compaction(g, limit, np.full(n, spec.prompt_tokens, dtype=np.int64), summary)
