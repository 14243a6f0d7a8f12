"""Workloads: specs and traces compiled into :class:`CompiledWorkload` arrays."""

from simulator.workload.compiled import CompiledWorkload, WorkloadError, validate_compiled

__all__ = ["CompiledWorkload", "WorkloadError", "validate_compiled"]
