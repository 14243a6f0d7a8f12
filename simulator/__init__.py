"""servesim: a discrete-event simulator of GPU LLM inference serving."""

from simulator.jitcache import invalidate_stale_cache

invalidate_stale_cache()
