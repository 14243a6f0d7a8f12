"""Azure LLM inference traces (CSV: ``TIMESTAMP, ContextTokens, GeneratedTokens``): reader.

Schema (../shared/data/azure_2023/README.md): ``TIMESTAMP`` is an absolute time
(``YYYY-MM-DD HH:MM:SS.fffffff``), ``ContextTokens`` the prompt, ``GeneratedTokens`` the output.
Each row is a request in its own session, starting ``TIMESTAMP - first TIMESTAMP`` seconds into
the run (``traffic: {mode: trace}``); there is no prefix information, so nothing is shared. Rows
are sorted by time (stable); extra columns are ignored. Errors name the file, the line and the
column.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime
from pathlib import Path

import numpy as np

from simulator.textio import read_text
from simulator.workload.compiled import WorkloadError
from simulator.workload.graph import SessionGraph, make_graph
from simulator.workload.tracefile import Where

__all__ = ["read_azure"]

_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def _parse_time(text: str, where: Where) -> float:
    s = text.strip()
    try:
        return float(s)  # plain seconds are accepted too
    except ValueError:
        pass
    if "." in s:  # Python parses at most 6 fractional digits; the trace has 7
        head, frac = s.rsplit(".", 1)
        if frac.isdigit():
            s = f"{head}.{frac[:6]}"
    try:
        return datetime.fromisoformat(s).timestamp()
    except ValueError:
        raise where.error("TIMESTAMP", f"not a date-time (got {text!r})") from None


def _parse_count(text: str, where: Where, column: str, minimum: int) -> int:
    try:
        v = float(text)
    except ValueError:
        raise where.error(column, f"must be an integer (got {text!r})") from None
    if not np.isfinite(v) or v != int(v):
        raise where.error(column, f"must be an integer (got {text!r})")
    if v < minimum:
        raise where.error(column, f"must be >= {minimum} (got {int(v)})")
    return int(v)


def read_azure(path: str | Path) -> SessionGraph:
    """Read an Azure LLM inference CSV; every problem is a :class:`WorkloadError`."""
    path = Path(path)
    src = str(path)
    text = read_text(path, WorkloadError)
    times: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise WorkloadError(f"{src}: empty file (expected a header {', '.join(_COLUMNS)})")
    header = [h.strip() for h in header]
    missing = [c for c in _COLUMNS if c not in header]
    if missing:
        raise WorkloadError(f"{src}:1: missing column(s) {', '.join(missing)}")
    col = [header.index(c) for c in _COLUMNS]
    for row in reader:
        where = Where(src, reader.line_num)
        if not row or all(not x.strip() for x in row):
            continue
        if len(row) != len(header):
            raise where.error(None, f"{len(row)} fields, the header has {len(header)}")
        times.append(_parse_time(row[col[0]], where))
        prompt.append(_parse_count(row[col[1]], where, "ContextTokens", 1))
        output.append(_parse_count(row[col[2]], where, "GeneratedTokens", 1))
    n = len(prompt)
    if n == 0:
        raise WorkloadError(f"{src}: no requests in the file")
    t = np.asarray(times, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    return make_graph(
        session=np.arange(n, dtype=np.int64),
        fresh=np.asarray(prompt, dtype=np.int64)[order],
        output=np.asarray(output, dtype=np.int64)[order],
        parents_start=np.zeros(n + 1, dtype=np.int64),
        parent_ids=np.zeros(0, dtype=np.int64),
        session_time=t[order] - t.min(),
        source=src,
    )
