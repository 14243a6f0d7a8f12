"""A binary min-heap of timed events on plain arrays, for the Numba core.

Events are ordered by ``(time, seq)``: ``seq`` is a counter that increases with every push, so
events at the same simulated time run in the order they were scheduled. That makes a run
bit-for-bit reproducible (SimPy's kernel breaks ties the same way, with an event id).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit


class EventHeap(NamedTuple):
    time: np.ndarray  # float64[cap], seconds
    seq: np.ndarray  # int64[cap], tie-breaker
    kind: np.ndarray  # int64[cap], event kind code
    payload: np.ndarray  # int64[cap], request or replica id
    size: np.ndarray  # int64[1], number of events in the heap
    next_seq: np.ndarray  # int64[1]


def make_heap(capacity: int) -> EventHeap:
    capacity = max(int(capacity), 16)
    return EventHeap(
        time=np.zeros(capacity, dtype=np.float64),
        seq=np.zeros(capacity, dtype=np.int64),
        kind=np.zeros(capacity, dtype=np.int64),
        payload=np.zeros(capacity, dtype=np.int64),
        size=np.zeros(1, dtype=np.int64),
        next_seq=np.zeros(1, dtype=np.int64),
    )


@njit(cache=True, inline="always")
def _less(h, i, j):
    if h.time[i] < h.time[j]:
        return True
    if h.time[i] > h.time[j]:
        return False
    return h.seq[i] < h.seq[j]


@njit(cache=True, inline="always")
def _swap(h, i, j):
    t = h.time[i]
    h.time[i] = h.time[j]
    h.time[j] = t
    s = h.seq[i]
    h.seq[i] = h.seq[j]
    h.seq[j] = s
    k = h.kind[i]
    h.kind[i] = h.kind[j]
    h.kind[j] = k
    p = h.payload[i]
    h.payload[i] = h.payload[j]
    h.payload[j] = p


@njit(cache=True, inline="always")
def heap_push(h, time, kind, payload):
    """Schedule an event; returns False when the heap is full (the caller reports it)."""
    n = h.size[0]
    if n >= h.time.shape[0]:
        return False
    h.time[n] = time
    h.seq[n] = h.next_seq[0]
    h.next_seq[0] += 1
    h.kind[n] = kind
    h.payload[n] = payload
    h.size[0] = n + 1
    i = n
    while i > 0:
        parent = (i - 1) >> 1
        if _less(h, i, parent):
            _swap(h, i, parent)
            i = parent
        else:
            break
    return True


@njit(cache=True, inline="always")
def heap_pop(h):
    """Remove the earliest event; returns (time, kind, payload). The heap must not be empty."""
    time = h.time[0]
    kind = h.kind[0]
    payload = h.payload[0]
    n = h.size[0] - 1
    h.size[0] = n
    if n > 0:
        h.time[0] = h.time[n]
        h.seq[0] = h.seq[n]
        h.kind[0] = h.kind[n]
        h.payload[0] = h.payload[n]
        i = 0
        while True:
            left = 2 * i + 1
            if left >= n:
                break
            best = left
            right = left + 1
            if right < n and _less(h, right, left):
                best = right
            if _less(h, best, i):
                _swap(h, best, i)
                i = best
            else:
                break
    return time, kind, payload
