"""Borrowed array views for the Numba core: the same memory, no reference counting.

Numba counts references to every array it passes around: each jitted call that receives a
tuple of arrays, and each variable that holds one, adds and drops references with atomic
operations. The event loop's state is a few tuples of ~50 arrays, so before this module about
40 % of the loop's time went to those counts (measured with ``perf`` on a 16-replica run).

:func:`borrow` returns a view of an array with no owner (a null meminfo, as a view over foreign
memory has): Numba's reference-count calls return at once for such arrays. It is safe only while
something else keeps the array alive; :func:`simulator.core.loop.run_events` borrows its
arguments, which its caller holds for the whole call, and never lets a borrowed view escape.
"""

from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def borrow(typingctx, arr):
    """A view of ``arr`` (same data, shape and strides) that owns no reference to it."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, signature, args):
        src = context.make_array(arr)(context, builder, value=args[0])
        out = context.make_array(arr)(context, builder)
        out.meminfo = cgutils.get_null_value(out.meminfo.type)
        out.parent = cgutils.get_null_value(out.parent.type)
        out.nitems = src.nitems
        out.itemsize = src.itemsize
        out.data = src.data
        out.shape = src.shape
        out.strides = src.strides
        return out._getvalue()

    return arr(arr), codegen
