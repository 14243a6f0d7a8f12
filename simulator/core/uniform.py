"""Counter-based uniform draws for the Numba core.

A draw is a pure function of a few integer counters (seed, request, position, salt), so no
generator state is threaded through the loop and results do not depend on event order.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def uniform(seed, r, pos, i):
    """A uniform draw in [0, 1) fixed by (seed, request, output position, draft position).

    Counter-based (a splitmix64 finaliser over the mixed counters): no generator state, so the
    draw does not depend on the order in which events happen.
    """
    x = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
    x ^= np.uint64(r) * np.uint64(0xBF58476D1CE4E5B9)
    x ^= np.uint64(pos) * np.uint64(0x94D049BB133111EB)
    x ^= np.uint64(i + 1) * np.uint64(0xD6E8FEB86659FD93)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return float(x >> np.uint64(11)) * (1.0 / 9007199254740992.0)
