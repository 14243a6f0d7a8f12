"""A dependency-free progress bar for long runs, drawn on stderr only when it is a terminal
or when forced, and only after the work has taken longer than ``delay`` seconds."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, total: int, label: str, delay: float = 2.0, enabled: bool | None = None):
        self.total = max(int(total), 1)
        self.label = label
        self.delay = delay
        self.start = time.perf_counter()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.shown = False

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        if elapsed < self.delay:
            return
        frac = min(max(done / self.total, 0.0), 1.0)
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        width = 30
        filled = int(frac * width)
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(
            f"\r{self.label} [{bar}] {frac * 100:5.1f}% {done:,}/{self.total:,} "
            f"{elapsed:6.1f}s elapsed, ETA {eta:6.1f}s"
        )
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.update(self.total)
            sys.stderr.write("\n")
            sys.stderr.flush()
