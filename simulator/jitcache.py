"""Keep Numba's on-disk cache in step with the source of every jitted function.

Numba (``cache=True``) checks only the file of the function it loads: the event loop's cache
entry does not notice an edit to :mod:`simulator.costmodel` or :mod:`simulator.core.kvcache`,
whose code is compiled into it, and would silently run the old code. At import, this module
hashes every source file that jitted code comes from and, when the hash differs from the one
stored beside the cache, deletes the package's cache files so that they are rebuilt.
Cost: about a millisecond per import. With ``NUMBA_CACHE_DIR`` set, the cache lives elsewhere
and is left alone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
STAMP = PACKAGE / "__pycache__" / "numba_sources.sha256"


def jitted_sources() -> list[Path]:
    """Source files whose code can end up in a cached Numba function."""
    files = [PACKAGE / "costmodel.py", *sorted((PACKAGE / "core").glob("*.py")),
             *sorted((PACKAGE / "workload").glob("*.py"))]
    return [f for f in files if f.is_file()]


def sources_digest() -> str:
    h = hashlib.sha256()
    for f in jitted_sources():
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def invalidate_stale_cache() -> bool:
    """Delete the package's Numba cache files if any jitted source changed since they were
    written. Returns True if files were deleted. Never raises (a read-only install keeps its
    cache as it is)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return False
    try:
        digest = sources_digest()
        if STAMP.is_file() and STAMP.read_text().strip() == digest:
            return False
        removed = False
        for pattern in ("*.nbi", "*.nbc"):
            for f in PACKAGE.rglob(f"__pycache__/{pattern}"):
                f.unlink(missing_ok=True)
                removed = True
        STAMP.parent.mkdir(exist_ok=True)
        STAMP.write_text(digest + "\n")
        return removed
    except OSError:
        return False
