"""Experiment configuration: pydantic v2 models loaded from YAML, validated before anything runs.

An experiment names a model, a GPU, engine settings, the replicas of a cluster, a workload and
where to write results::

    name: quickstart
    seed: 0
    model: llama-3.1-8b            # shipped name or path to a Hugging Face config.json
    hardware: h100-sxm             # shipped name or path to a hardware profile YAML
    engine:                        # vLLM V1 settings; unset ones take vLLM's defaults for the GPU
      max_num_batched_tokens: 8192
    cluster:
      replicas: [{count: 1}]       # each entry may override model, hardware, engine
      router: round_robin        # or {policy: kv_aware, temperature: 0, ...}
    workload: ../workloads/chat.yaml   # path (relative to this file) or an inline spec
    outputs: {dir: runs/quickstart}

Every model is frozen and rejects unknown keys. :func:`load_experiment` turns any problem into an
:class:`ExperimentError` whose message names the file, the field path and the bad value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from simulator.textio import parse_yaml, read_text
from simulator.workload.compile import format_validation_error, parse_workload_spec
from simulator.workload.compiled import WorkloadError
from simulator.workload.spec import WorkloadSpec

GIB = 1024**3

# vLLM V1 defaults (REFERENCE.md §1, `EngineArgs.get_batch_defaults`, vllm/engine/arg_utils.py):
# GPUs with >= 70 GiB that are not A100s get max_num_batched_tokens 8192 for the OpenAI API
# server (16384 for the offline LLM class) and max_num_seqs 1024; smaller GPUs 2048 and 256.
LARGE_GPU_BYTES = 70 * GIB
LARGE_GPU_DEFAULTS = (8192, 1024)
SMALL_GPU_DEFAULTS = (2048, 256)
# vLLM's gpu_memory_utilization default (0.9 for most releases; 0.92 on the newest main).
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
DEFAULT_BLOCK_SIZE = 16  # vllm/config/cache.py DEFAULT_BLOCK_SIZE
DEFAULT_MAX_MODEL_LEN = 131072


class ExperimentError(ValueError):
    """A configuration problem; the message is one line naming file, field and value."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SpeculativeConfig(_Model):
    """Speculative decoding (see simulator/specdec.py for what is modelled)."""

    method: Literal["mtp", "eagle", "draft_model", "ngram"]
    num_speculative_tokens: int = Field(ge=1, le=16, description="draft tokens per step (k)")
    acceptance_rate: float = Field(
        ge=0.0, le=1.0, allow_inf_nan=False, description="mean per-token acceptance (alpha)"
    )
    acceptance_concentration: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Beta(a, b) with a + b = this spreads alpha across requests; None: all equal",
    )
    position_decay: float = Field(
        1.0, gt=0.0, le=1.0, description="acceptance of draft position i = alpha * decay**i"
    )
    draft_model: str | None = Field(None, description="model of method draft_model")
    k_by_batch_size: list[tuple[int, int]] | None = Field(
        None, min_length=1, max_length=8,
        description="dynamic k: [[max running requests, k], ...], first matching row",
    )

    @model_validator(mode="after")
    def _check(self) -> SpeculativeConfig:
        if self.method == "draft_model" and not self.draft_model:
            raise ValueError("method draft_model needs draft_model (a model name or config path)")
        if self.method != "draft_model" and self.draft_model:
            raise ValueError(f"draft_model is only used by method draft_model, not {self.method}")
        if self.k_by_batch_size:
            limits = [row[0] for row in self.k_by_batch_size]
            if any(b <= a for a, b in zip(limits, limits[1:], strict=False)):
                raise ValueError("k_by_batch_size rows must have increasing batch limits")
            for limit, k in self.k_by_batch_size:
                if limit < 1 or not 0 <= k <= 16:
                    raise ValueError(
                        f"k_by_batch_size row [{limit}, {k}]: need limit >= 1 and 0 <= k <= 16"
                    )
        return self


class HostTierConfig(_Model):
    """A pool of KV blocks in pinned host memory behind the GPU cache (REFERENCE.md §8).

    Blocks the GPU evicts are copied there (asynchronously, overlapping compute: free in the
    model); a prefix hit on them is copied back over PCIe before the request computes, delaying
    only that request. Default bandwidth: pinned host -> device copies measured at 45.3 GB/s on
    an H100 SXM (PyTorch 2.11), per GPU; a TP replica copies over all its GPUs' links at once.
    """

    capacity_gb: float = Field(gt=0, allow_inf_nan=False, description="host memory for KV (GB, 1e9)")
    h2d_gb_per_s: float = Field(
        45.3, gt=0, allow_inf_nan=False, description="host -> GPU copy bandwidth per GPU (GB/s)"
    )


class RetentionConfig(_Model):
    """What happens to a finished request's blocks while its session waits (a tool call).

    * ``lru``: they join the free queue at once (vLLM's behaviour).
    * ``session_ttl``: the blocks its child will reuse stay referenced until the child is
      admitted or ``ttl_s`` passes; blocks needed by running work break protections, oldest
      first, before anything is preempted.
    * ``offload_prefetch``: copied to the host tier at once and released; copied back so that
      they land ``prefetch_margin_s`` before the child is due (needs ``kv_host_tier``).
    """

    policy: Literal["lru", "session_ttl", "offload_prefetch"] = "lru"
    ttl_s: float = Field(60.0, gt=0, allow_inf_nan=False, description="session_ttl: seconds")
    prefetch_margin_s: float = Field(
        0.0, ge=0, allow_inf_nan=False,
        description="offload_prefetch: land the copy this many seconds before the child is due",
    )


class EngineConfig(_Model):
    """One replica's serving engine (vLLM V1 semantics). ``None`` means "vLLM's default"."""

    tp: int = Field(1, ge=1, le=64, description="tensor-parallel GPUs per replica")
    weight_dtype: Literal["bf16", "fp8"] = "bf16"
    kv_dtype: Literal["bf16", "fp8"] = "bf16"
    block_size: int = Field(DEFAULT_BLOCK_SIZE, ge=1, le=1024, description="tokens per KV block")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, le=10_000_000, description="token budget per step"
    )
    max_num_seqs: int | None = Field(None, ge=1, le=65536, description="max running requests")
    max_model_len: int | None = Field(
        None, ge=2, le=100_000_000,
        description=f"max prompt + output tokens (default {DEFAULT_MAX_MODEL_LEN})",
    )
    gpu_memory_utilization: float = Field(DEFAULT_GPU_MEMORY_UTILIZATION, gt=0.0, le=1.0)
    enable_prefix_caching: bool = True
    activation_reserve_gib: float | None = Field(
        None, ge=0.0, description="GPU memory kept for activations (GiB); default: estimated"
    )
    num_gpu_blocks_override: int | None = Field(
        None, ge=1, le=100_000_000,
        description="force the KV block count (as vLLM's num_gpu_blocks_override)",
    )
    speculative: SpeculativeConfig | None = None
    kv_host_tier: HostTierConfig | None = Field(
        None, description="host-memory KV tier behind the GPU cache (None = no tier)"
    )
    retention: RetentionConfig = Field(default_factory=RetentionConfig)

    @model_validator(mode="after")
    def _check_retention(self) -> EngineConfig:
        if not self.enable_prefix_caching:
            if self.kv_host_tier is not None:
                raise ValueError("kv_host_tier needs enable_prefix_caching: true (it holds cached "
                                 "prefix blocks)")
            if self.retention.policy != "lru":
                raise ValueError(f"retention.policy {self.retention.policy!r} needs "
                                 "enable_prefix_caching: true")
        if self.retention.policy == "offload_prefetch" and self.kv_host_tier is None:
            raise ValueError("retention.policy 'offload_prefetch' needs kv_host_tier (a host "
                             "pool to offload to)")
        return self


class ReplicaGroup(_Model):
    """``count`` identical replicas; unset fields inherit the experiment's model/hardware/engine."""

    count: int = Field(1, ge=1, le=4096)
    role: Literal["aggregated", "prefill", "decode"] = Field(
        "aggregated", description="prefill/decode pools for disaggregated serving"
    )
    model: str | None = None
    hardware: str | None = None
    engine: dict[str, Any] | None = Field(
        None, description="engine fields overriding the experiment's engine for these replicas"
    )


RouterPolicy = Literal[
    "round_robin", "random", "least_outstanding", "least_kv_usage", "power_of_two",
    "session_affinity", "kv_aware", "weighted_scorer",
]


class ScorerWeights(_Model):
    """llm-d's default weights with no config: prefix 3, queue 2, kv-utilization 2."""

    prefix: float = Field(3.0, ge=0, allow_inf_nan=False)
    queue: float = Field(2.0, ge=0, allow_inf_nan=False)
    kv_usage: float = Field(2.0, ge=0, allow_inf_nan=False)


class RouterConfig(_Model):
    """How requests are spread over replicas (formulas in simulator/core/router.py)."""

    policy: RouterPolicy = "round_robin"
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False, description="kv_aware softmax T")
    overlap_score_credit: float = Field(1.0, ge=0, allow_inf_nan=False, description="kv_aware")
    prefill_load_scale: float = Field(1.0, ge=0, allow_inf_nan=False, description="kv_aware")
    weights: ScorerWeights = Field(default_factory=ScorerWeights, description="weighted_scorer")
    affinity_overload_factor: float = Field(
        2.0, gt=0, allow_inf_nan=False,
        description="session_affinity: leave home above factor x (mean outstanding + 1)",
    )
    staleness_s: float = Field(
        0.0, ge=0, allow_inf_nan=False,
        description="the router sees replica load as of its last snapshot, taken every this many"
        " seconds (0 = live)",
    )


class KVLink(_Model):
    """The link that brings a prefill replica's KV to a decode replica (one per decode replica,
    transfers serialised on it). Default: one NDR InfiniBand NIC, 400 Gb/s = 50 GB/s per
    direction (REFERENCE.md §6); NVLink4 inside a node is 450 GB/s per direction."""

    bandwidth_gb_per_s: float = Field(50.0, gt=0, allow_inf_nan=False, description="GB/s (1e9)")
    latency_s: float = Field(5e-5, ge=0, allow_inf_nan=False, description="per transfer (s)")


class DisaggregationConfig(_Model):
    link: KVLink = Field(default_factory=KVLink)
    local_prefill_threshold_tokens: int = Field(
        0,
        ge=0,
        description="conditional disaggregation: prefill on the decode replica when the prompt "
        "part it does not cache is shorter than this (0 = always disaggregate)",
    )


class ClusterConfig(_Model):
    replicas: list[ReplicaGroup] = Field(default_factory=lambda: [ReplicaGroup()], min_length=1)
    router: RouterConfig = Field(default_factory=RouterConfig)
    disaggregation: DisaggregationConfig = Field(default_factory=DisaggregationConfig)

    @model_validator(mode="after")
    def _pools(self) -> ClusterConfig:
        roles = {g.role for g in self.replicas}
        if roles - {"aggregated"}:
            if "aggregated" in roles:
                raise ValueError(
                    "replicas: mixing aggregated replicas with prefill/decode pools is not "
                    "supported; give every group role prefill or decode"
                )
            missing = {"prefill", "decode"} - roles
            if missing:
                raise ValueError(
                    f"replicas: a disaggregated cluster needs both pools; no {missing.pop()} "
                    "replicas are configured"
                )
        return self

    @field_validator("router", mode="before")
    @classmethod
    def _policy_shorthand(cls, value: Any) -> Any:
        return {"policy": value} if isinstance(value, str) else value


class OutputConfig(_Model):
    dir: str | None = Field(None, description="directory for results (relative to the CWD)")
    window_seconds: float = Field(
        10.0, gt=0, allow_inf_nan=False, description="width of the metrics-over-time windows (s)"
    )
    max_windows: int = Field(
        2000, ge=1, le=1_000_000, description="windows kept; later tokens go to the last one"
    )
    step_log: bool = Field(False, description="record every engine step (timeline, trace export)")
    max_step_records: int = Field(2_000_000, ge=1, le=100_000_000)


class Experiment(_Model):
    name: str = "experiment"
    seed: int = Field(0, ge=0, le=2**63 - 1)
    model: str
    hardware: str
    engine: EngineConfig = Field(default_factory=EngineConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    workload: WorkloadSpec
    outputs: OutputConfig = Field(default_factory=OutputConfig)
    # the file it was read from; errors found while planning the run name it
    _source: str = PrivateAttr("<experiment>")


def load_yaml(path: Path) -> Any:
    """Parsed YAML of ``path``; every problem is an :class:`ExperimentError` naming the file."""
    return parse_yaml(read_text(path, ExperimentError), path, ExperimentError)


def _resolve_workload(value: Any, base: Path, source: str) -> WorkloadSpec:
    if isinstance(value, str):
        candidates = [base / value, Path(value)]
        for cand in candidates:
            if cand.is_file():
                data = load_yaml(cand)
                try:
                    return parse_workload_spec(data, str(cand))
                except WorkloadError as exc:
                    raise ExperimentError(str(exc)) from None
        raise ExperimentError(f"{source}: workload: file not found: {value!r}")
    if isinstance(value, dict):
        try:
            return parse_workload_spec(value, f"{source}: workload")
        except WorkloadError as exc:
            raise ExperimentError(str(exc)) from None
    raise ExperimentError(
        f"{source}: workload: expected a file path or a mapping (got {type(value).__name__})"
    )


def parse_experiment(data: Any, source: str = "<experiment>", base: Path | None = None) -> Experiment:
    """Validate a parsed YAML mapping; ``base`` resolves relative workload paths."""
    if not isinstance(data, dict):
        raise ExperimentError(
            f"{source}: expected a mapping at the top level (got {type(data).__name__})"
        )
    data = dict(data)
    if "workload" not in data:
        raise ExperimentError(f"{source}: workload: field required")
    data["workload"] = _resolve_workload(data["workload"], base or Path("."), source)
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as err:
        raise ExperimentError(format_validation_error(source, err, data)) from None
    exp._source = source
    return exp


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment YAML file."""
    path = Path(path)
    exp = parse_experiment(load_yaml(path), str(path), path.parent)
    exp._source = str(path)
    return exp


def engine_for(exp: Experiment, group: ReplicaGroup, where: str = "cluster.replicas") -> EngineConfig:
    """The engine of a replica group: the experiment's engine with the group's overrides."""
    if not group.engine:
        return exp.engine
    merged = exp.engine.model_dump() | dict(group.engine)
    try:
        return EngineConfig.model_validate(merged)
    except ValidationError as err:
        raise ExperimentError(
            format_validation_error(f"{exp._source}: {where}.engine", err, merged)
        ) from None


def batch_defaults(hbm_bytes: float) -> tuple[int, int]:
    """vLLM's (max_num_batched_tokens, max_num_seqs) defaults for a GPU of ``hbm_bytes``."""
    return LARGE_GPU_DEFAULTS if hbm_bytes >= LARGE_GPU_BYTES else SMALL_GPU_DEFAULTS


def experiment_json_schema() -> dict[str, Any]:
    return Experiment.model_json_schema()
