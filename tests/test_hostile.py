"""Hostile inputs: every loader gives a clear error or a correct run, never a traceback or hang.

The corpus is in tests/hostile/ (see its README). For each file the tables below say what must
happen:

* an error: a ``ValueError`` subclass of the loader (``ExperimentError`` for experiments, which
  is what ``servesim run`` catches) whose message names the file and the offending field;
* a run: the experiment simulates, every request finishes or is rejected with a reason, and
  the conservation invariants hold.

A case that fails is marked ``xfail(strict=True)`` with the reason (key ``bug``), so that a fix
is noticed; none is today. Cases that could crash, hang or exhaust memory run in a child
process with a memory cap and a time limit. The experiment loader is also fuzzed with
hypothesis (random mappings and text).
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reference_scenarios import MANY

from simulator.cli import main
from simulator.config import ExperimentError, load_experiment, parse_experiment
from simulator.hardware import PROFILES_DIR, HardwareProfileError, load_hardware
from simulator.invariants import check_result
from simulator.models import ModelConfigError, load_model
from simulator.simulate import plan_replicas, simulate
from simulator.workload.azure import read_azure
from simulator.workload.compile import compile_workload, load_workload_spec
from simulator.workload.compiled import WorkloadError
from simulator.workload.mooncake import read_mooncake
from simulator.workload.openclaw import read_openclaw
from simulator.workload.veeksha import read_veeksha

HOSTILE = Path(__file__).resolve().parent / "hostile"
FUZZ_EXAMPLES = 20_000 if MANY else 300
DELETE = object()  # an edit that removes a field

# --- what each file must give --------------------------------------------------------------
# error: substrings the message must contain besides the file name
# run: a check of the finished run's requests (None: just "correct")
# bug: the reason it fails, while it does (xfail strict)
# isolate: run in a child process (it may crash, hang or exhaust memory)


def _all_rejected(reason: str):
    def check(df):
        assert (df["status"] == "rejected").all()
        assert df["reject_reason"].str.contains(reason).all()

    return check


def _all_finished(df):
    assert (df["status"] == "finished").all()


EXPERIMENTS: dict[str, dict] = {
    "baseline.yaml": {"run": _all_finished},
    "one_token_requests.yaml": {"run": _all_finished},
    "million_token_prompt.yaml": {"run": _all_rejected("max_model_len")},
    "pool_smaller_than_request.yaml": {"run": _all_rejected("KV cache capacity")},
    "truncated.yaml": {"error": ["malformed YAML", "line"]},
    "empty.yaml": {"error": ["mapping"]},
    "top_level_list.yaml": {"error": ["mapping", "list"]},
    "top_level_scalar.yaml": {"error": ["mapping", "int"]},
    "seed_not_int.yaml": {"error": ["seed", "abc"]},
    "seed_too_big.yaml": {"error": ["seed"]},
    "engine_not_mapping.yaml": {"error": ["engine"]},
    "max_num_seqs_string.yaml": {"error": ["engine.max_num_seqs", "many"]},
    "max_num_seqs_fraction.yaml": {"error": ["engine.max_num_seqs", "3.5"]},
    "nan_gpu_memory_utilization.yaml": {"error": ["engine.gpu_memory_utilization", "nan"]},
    "inf_arrival_rate.yaml": {"error": ["arrival.rate", "inf"]},
    "nan_prompt_mean.yaml": {"error": ["prompt_tokens.mean", "nan"]},
    "nan_window.yaml": {"error": ["outputs.window_seconds"]},
    "unknown_top_key.yaml": {"error": ["colour"]},
    "unknown_engine_key.yaml": {"error": ["engine.max_num_sequences"]},
    "zero_block_size.yaml": {"error": ["engine.block_size"]},
    "negative_num_blocks.yaml": {"error": ["engine.num_gpu_blocks_override", "-5"]},
    "zero_replicas.yaml": {"error": ["cluster.replicas", "count"]},
    "no_replicas.yaml": {"error": ["cluster.replicas"]},
    "zero_output_tokens.yaml": {"error": ["output_tokens"]},
    "zero_max_num_seqs.yaml": {"error": ["engine.max_num_seqs"]},
    "missing_workload.yaml": {"error": ["workload"]},
    "missing_model.yaml": {"error": ["model"]},
    "workload_file_missing.yaml": {"error": ["workload", "no_such_workload.yaml"]},
    "unknown_router.yaml": {"error": ["cluster.router", "telepathy"]},
    # the cluster (issue 5, "Bad input")
    "unknown_retention_policy.yaml": {"error": ["engine.retention.policy", "forever"]},
    "pd_no_decode_pool.yaml": {"error": ["cluster", "replicas", "no decode replicas"]},
    "pd_decode_pool_zero_count.yaml": {"error": ["cluster.replicas.1.count", "0"]},
    "zero_link_bandwidth.yaml": {
        "error": ["cluster.disaggregation.link.bandwidth_gb_per_s", "0"]
    },
    "host_tier_below_one_block.yaml": {
        "error": ["cluster.replicas[0]", "engine.kv_host_tier.capacity_gb = 0.001", "one KV block"]
    },
    "decode_pool_cannot_hold_prompt.yaml": {
        "error": ["cluster.replicas[1] (role decode)", "64 tokens", "200 tokens"]
    },
    # found while resolving replicas (after loading)
    "unknown_model.yaml": {"error": ["model", "no-such-model-70b"]},
    "unknown_hardware.yaml": {"error": ["hardware", "tpu-v9"]},
    "mixed_block_sizes.yaml": {"error": ["block_size"]},
    "bad_group_engine.yaml": {"error": ["cluster.replicas", "max_num_seqs"]},
    # sizes past any real deployment
    "huge_batched_tokens.yaml": {"error": ["engine.max_num_batched_tokens"]},
    "not_utf8.yaml": {
        "error": ["UTF-8"],
    },
    "deeply_nested.yaml": {
        "error": ["nest"],
    },
    "alias_bomb.yaml": {
        "error": ["name"],
        "isolate": True,
        "timeout": 5.0,
    },
    "huge_num_blocks.yaml": {
        "error": ["num_gpu_blocks_override"],
        "isolate": True,
    },
    "huge_max_model_len.yaml": {
        "error": ["max_model_len"],
    },
    "huge_num_requests.yaml": {
        "error": ["num_requests"],
        "isolate": True,
    },
}

# hardware profiles: three broken files, and one-field edits of the shipped h100-sxm profile
# (made at test time, so that they follow the profile's schema)
HARDWARE: dict[str, dict] = {
    "truncated.yaml": {"error": ["Field required"]},
    "not_mapping.yaml": {"error": ["mapping"]},
    "empty.yaml": {"error": ["mapping"]},
}
NAN, INF = float("nan"), float("inf")
HARDWARE_EDITS: dict[str, dict] = {
    "missing_bandwidth.yaml": {"edit": {"hbm_bandwidth": DELETE}, "error": ["hbm_bandwidth"]},
    "bandwidth_string.yaml": {"edit": {"hbm_bandwidth": "fast"}, "error": ["hbm_bandwidth"]},
    "nan_efficiency.yaml": {"edit": {"matmul_efficiency": NAN}, "error": ["matmul_efficiency"]},
    "efficiency_above_one.yaml": {
        "edit": {"memory_efficiency": 1.5},
        "error": ["memory_efficiency", "1.5"],
    },
    "negative_overhead.yaml": {"edit": {"step_overhead_s": -1.0}, "error": ["step_overhead_s"]},
    "nan_overhead.yaml": {"edit": {"step_overhead_s": NAN}, "error": ["step_overhead_s"]},
    "zero_hbm.yaml": {"edit": {"hbm_bytes": 0}, "error": ["hbm_bytes"]},
    "unknown_key.yaml": {"edit": {"warp_drive": True}, "error": ["warp_drive"]},
    "missing_source.yaml": {
        "edit": {"sources.hbm_bandwidth": DELETE},
        "error": ["sources", "hbm_bandwidth"],
    },
    "inf_bandwidth.yaml": {"edit": {"hbm_bandwidth": INF}, "error": ["hbm_bandwidth", "finite"]},
    "inf_peak_flops.yaml": {
        "edit": {"peak_flops.bf16": INF},
        "error": ["peak_flops.bf16", "finite"],
    },
    "inf_overhead.yaml": {
        "edit": {"step_overhead_s": INF},
        "error": ["step_overhead_s"],
        "isolate": True,
    },
    "huge_hbm.yaml": {
        "edit": {"hbm_bytes": 10**30},
        "error": ["hbm_bytes"],
    },
}

MODELS: dict[str, dict] = {
    "truncated.json": {"error": ["not valid JSON"]},
    "empty.json": {"error": ["not valid JSON"]},
    "not_object.json": {"error": ["JSON object"]},
    "missing_vocab.json": {"error": ["vocab_size"]},
    "layers_string.json": {"error": ["num_hidden_layers"]},
    "layers_fraction.json": {"error": ["num_hidden_layers", "32.5"]},
    "negative_layers.json": {"error": ["num_hidden_layers", "-3"]},
    "huge_intermediate.json": {"error": ["intermediate_size", "out of range"]},
    "zero_kv_heads.json": {"error": ["num_key_value_heads"]},
    "bad_layer_types.json": {"error": ["layer_types"]},
    "unknown_layer_type.json": {"error": ["layer_types[31]", "quantum_attention"]},
    "tie_not_bool.json": {"error": ["tie_word_embeddings"]},
    "moe_without_top_k.json": {"error": ["num_experts_per_tok"]},
    # load fine; resolving a replica must then refuse them
    "zero_head_dim.json": {"plan_error": ["KV cache"]},
    "zero_heads.json": {
        "error": ["num_attention_heads"],
    },
    "nan_hidden.json": {
        "error": ["hidden_size"],
    },
    "inf_hidden.json": {
        "error": ["hidden_size"],
    },
    "huge_layers.json": {
        "error": ["num_hidden_layers"],
        "isolate": True,
    },
    "not_utf8.json": {
        "error": ["UTF-8"],
    },
}

WORKLOADS: dict[str, dict] = {
    "requests_ok.yaml": {"run": None},
    "sessions_ok.yaml": {"run": None},
    "truncated.yaml": {"error": ["Field required"]},
    "not_mapping.yaml": {"error": ["mapping", "kind"]},
    "missing_kind.yaml": {"error": ["kind"]},
    "unknown_kind.yaml": {"error": ["kind", "telepathy"]},
    "nan_rate.yaml": {"error": ["arrival.rate", "nan"]},
    "inf_mean.yaml": {"error": ["prompt_tokens.mean", "inf"]},
    "negative_prompt.yaml": {"error": ["prompt_tokens", "-40"]},
    "zero_sessions.yaml": {"error": ["num_sessions"]},
    "zero_turns.yaml": {"error": ["turns"]},
    "unknown_key.yaml": {"error": ["temperature"]},
    "negative_wait.yaml": {"error": ["wait_after_ready"]},
    "nan_wait.yaml": {"error": ["wait_after_ready.mean", "nan"]},
    "prompt_string.yaml": {"error": ["prompt_tokens", "forty"]},
    "context_limit_too_small.yaml": {"error": ["max_context_tokens"]},
    # found while compiling
    "every_turn_too_long.yaml": {"error": ["max_context_tokens"]},
}


# trace files (the format is the file name's prefix): reader errors name file:line: field
TRACES: dict[str, dict] = {
    "veeksha_ok.jsonl": {"run": _all_finished},
    "veeksha_nan_wait.jsonl": {"run": _all_finished},  # documented: NaN wait = 0
    "veeksha_million_token_prompt.jsonl": {"run": None},  # rejected with reasons
    "veeksha_truncated.jsonl": {"error": [":4:", "invalid JSON"]},
    "veeksha_inf_wait.jsonl": {"error": [":2:", "wait_after_ready", "finite"]},
    "veeksha_negative_wait.jsonl": {"error": [":2:", "wait_after_ready"]},
    "veeksha_negative_output.jsonl": {"error": [":2:", "output_length"]},
    "veeksha_zero_output.jsonl": {"error": [":2:", "output_length"]},
    "veeksha_nan_length.jsonl": {"error": [":3:", "new_input_length"]},
    "veeksha_string_length.jsonl": {"error": [":2:", "output_length", "ten"]},
    "veeksha_cycle.jsonl": {"error": ["cycle"]},
    "veeksha_self_parent.jsonl": {"error": [":2:", "own parent"]},
    "veeksha_unknown_parent.jsonl": {"error": [":2:", "parent_nodes", "7"]},
    "veeksha_history_not_parent.jsonl": {"error": [":3:", "history_parent"]},
    "veeksha_not_object.jsonl": {"error": [":1:", "JSON object"]},
    "veeksha_empty.jsonl": {"error": ["no requests"]},
    "veeksha_huge_length.jsonl": {
        "error": ["new_input_length"],
    },
    "veeksha_not_utf8.jsonl": {
        "error": ["UTF-8"],
    },
    "mooncake_ok.jsonl": {"run": _all_finished},
    "mooncake_huge_hash.jsonl": {"run": _all_finished},
    "mooncake_truncated.jsonl": {"error": [":2:", "invalid JSON"]},
    "mooncake_nan_timestamp.jsonl": {"error": [":2:", "timestamp", "finite"]},
    "mooncake_inf_timestamp.jsonl": {"error": [":2:", "timestamp", "finite"]},
    "mooncake_negative_timestamp.jsonl": {"error": [":2:", "timestamp"]},
    "mooncake_hashes_not_list.jsonl": {"error": [":2:", "hash_ids"]},
    "mooncake_zero_output.jsonl": {"error": [":2:", "output_length"]},
    "mooncake_too_many_hashes.jsonl": {"error": [":2:", "hash_ids"]},
    "azure_ok.csv": {"run": _all_finished},
    "azure_empty.csv": {"error": ["empty file"]},
    "azure_header_only.csv": {"error": ["no requests"]},
    "azure_missing_column.csv": {"error": [":1:", "GeneratedTokens"]},
    "azure_bad_time.csv": {"error": [":2:", "TIMESTAMP", "yesterday"]},
    "azure_negative_tokens.csv": {"error": [":2:", "ContextTokens"]},
    "azure_nan_tokens.csv": {"error": [":2:", "ContextTokens"]},
    "azure_short_row.csv": {"error": [":2:", "fields"]},
    "azure_not_utf8.csv": {
        "error": ["UTF-8"],
    },
    "openclaw_ok.json": {"run": _all_finished},
    "openclaw_truncated.json": {"error": ["invalid JSON"]},
    "openclaw_not_object.json": {"error": ["JSON object"]},
    "openclaw_missing_nodes.json": {"error": ["nodes"]},
    "openclaw_cycle.json": {"error": ["cycle"]},
    "openclaw_unknown_node.json": {"error": ["edges[6]", "nope:x"]},
    "openclaw_negative_output.json": {"error": ["nodes[1]", "usage.output"]},
    "openclaw_nan_wait.json": {"error": ["nodes[1]", "wait_after_ready_ms", "finite"]},
    "openclaw_inf_wait.json": {"error": ["nodes[1]", "wait_after_ready_ms", "finite"]},
    "openclaw_usage_not_object.json": {"error": ["nodes[1]", "usage"]},
}
READERS = {
    "veeksha": read_veeksha,
    "mooncake": read_mooncake,
    "azure": read_azure,
    "openclaw": read_openclaw,
}


def cases(table: dict[str, dict]):
    out = []
    for name, spec in sorted(table.items()):
        marks = [pytest.mark.xfail(strict=True, reason=spec["bug"])] if "bug" in spec else []
        out.append(pytest.param(name, spec, marks=marks, id=name))
    return out


def write_hardware_edit(name: str, edit: dict, directory: Path) -> Path:
    """The shipped h100-sxm profile with ``edit`` ({dotted key: value or DELETE}) applied."""
    data = yaml.safe_load((PROFILES_DIR / "h100-sxm.yaml").read_text())
    for key, value in edit.items():
        mutate(data, tuple(key.split(".")), value)
    path = directory / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_corpus_file_has_an_expectation():
    for sub, table in (
        ("experiments", EXPERIMENTS),
        ("hardware", HARDWARE),
        ("models", MODELS),
        ("workloads", WORKLOADS),
    ):
        files = {p.name for p in (HOSTILE / sub).iterdir()}
        assert files == set(table), (sub, files ^ set(table))


# --- running a case -------------------------------------------------------------------------

CHILD = """
import resource, sys, warnings
warnings.simplefilter("ignore")
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
kind, path = sys.argv[1], sys.argv[2]
try:
    if kind == "experiments":
        from simulator.config import load_experiment
        from simulator.simulate import simulate
        simulate(load_experiment(path), progress=False)
    elif kind == "models":
        from simulator.models import load_model
        load_model(path)
    elif kind == "hardware":
        from simulator.config import parse_experiment
        from simulator.hardware import load_hardware
        from simulator.simulate import simulate
        load_hardware(path)
        simulate(parse_experiment({"model": "llama-3.1-8b", "hardware": path, "workload": {
            "kind": "requests", "num_requests": 4, "arrival": {"process": "burst"},
            "prompt_tokens": 40, "output_tokens": 4}}), progress=False)
except ValueError as exc:
    print(type(exc).__name__ + ": " + str(exc)[:2000])
    sys.exit(3)
print("ran")
"""


def run_isolated(kind: str, path: Path, timeout: float = 20.0) -> str:
    """The outcome of loading (and running) ``path`` in a child process with 3 GiB of memory."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, kind, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=os.environ.copy(),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{path.name}: no answer in {timeout} s (a hang)")
    assert proc.returncode in (0, 3), (
        f"{path.name}: exit code {proc.returncode} (crash or raw exception)\n{proc.stderr[-2000:]}"
    )
    return proc.stdout.strip()


def simulate_quietly(exp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN metrics of rejected requests
        return simulate(exp, progress=False)


def check_run(result, check) -> None:
    assert check_result(result) == []
    assert (result.requests["status"] != "unfinished").all()
    if check is not None:
        check(result.requests)


def check_message(message: str, path: Path, spec: dict) -> None:
    assert str(path) in message, f"the message does not name the file: {message}"
    for part in spec["error"]:
        assert part in message, f"the message does not mention {part!r}: {message}"


@pytest.mark.parametrize("name, spec", cases(EXPERIMENTS))
def test_hostile_experiment(name, spec):
    path = HOSTILE / "experiments" / name
    if spec.get("isolate"):
        out = run_isolated("experiments", path, spec.get("timeout", 20.0))
        assert out.startswith("ExperimentError: "), out
        check_message(out, path, spec)
        return
    if "run" in spec:
        check_run(simulate_quietly(load_experiment(path)), spec["run"])
        return
    with pytest.raises(ExperimentError) as info:
        exp = load_experiment(path)
        simulate_quietly(exp)
    check_message(str(info.value), path, spec)


@pytest.mark.parametrize("name, spec", cases(HARDWARE) + cases(HARDWARE_EDITS))
def test_hostile_hardware_profile(name, spec, tmp_path):
    if "edit" in spec:
        path = write_hardware_edit(name, spec["edit"], tmp_path)
    else:
        path = HOSTILE / "hardware" / name
    if spec.get("isolate"):
        out = run_isolated("hardware", path)
        assert out.startswith(("HardwareProfileError: ", "ExperimentError: ")), out
        check_message(out, path, spec)
        return
    exp = {
        "model": "llama-3.1-8b",
        "hardware": str(path),
        "workload": {
            "kind": "requests",
            "num_requests": 4,
            "arrival": {"process": "burst"},
            "prompt_tokens": 40,
            "output_tokens": 4,
        },
    }
    if "run" in spec:
        load_hardware(path)
        check_run(simulate_quietly(parse_experiment(exp)), spec["run"])
        return
    with pytest.raises((HardwareProfileError, ExperimentError)) as info:
        load_hardware(path)
        simulate_quietly(parse_experiment(exp))
    check_message(str(info.value), path, spec)


@pytest.mark.parametrize("name, spec", cases(MODELS))
def test_hostile_model_config(name, spec):
    path = HOSTILE / "models" / name
    if spec.get("isolate"):
        out = run_isolated("models", path)
        assert out.startswith("ModelConfigError: "), out
        check_message(out, path, spec)
        return
    if "plan_error" in spec:
        load_model(path)
        exp = parse_experiment(
            {
                "model": str(path),
                "hardware": "h100-sxm",
                "workload": {
                    "kind": "requests",
                    "num_requests": 1,
                    "arrival": {"process": "burst"},
                    "prompt_tokens": 4,
                    "output_tokens": 1,
                },
            }
        )
        with pytest.raises(ExperimentError) as info:
            plan_replicas(exp)
        for part in spec["plan_error"]:
            assert part in str(info.value)
        return
    with pytest.raises(ModelConfigError) as info:
        load_model(path)
    check_message(str(info.value), path, spec)


@pytest.mark.parametrize("name, spec", cases(WORKLOADS))
def test_hostile_workload_spec(name, spec):
    path = HOSTILE / "workloads" / name
    if "run" in spec:
        wl = compile_workload(load_workload_spec(path), 0)
        assert wl.num_requests > 0
        exp = parse_experiment(
            {
                "model": "llama-3.1-8b",
                "hardware": "h100-sxm",
                "engine": {"num_gpu_blocks_override": 200},
                "workload": str(path),
            }
        )
        check_run(simulate_quietly(exp), _all_finished)
        return
    with pytest.raises(WorkloadError) as info:
        compile_workload(load_workload_spec(path), 0)
    check_message(str(info.value), path, spec)


def trace_experiment(path: Path) -> dict:
    return {
        "model": "llama-3.1-8b",
        "hardware": "h100-sxm",
        "workload": {"kind": "trace", "format": path.name.split("_")[0], "path": str(path)},
    }


@pytest.mark.parametrize("name, spec", cases(TRACES))
def test_hostile_trace(name, spec):
    path = HOSTILE / "traces" / name
    reader = READERS[name.split("_")[0]]
    if "run" in spec:
        reader(path)
        check_run(simulate_quietly(parse_experiment(trace_experiment(path))), spec["run"])
        return
    with pytest.raises(WorkloadError) as info:
        reader(path)
        simulate_quietly(parse_experiment(trace_experiment(path)))
    check_message(str(info.value), path, spec)


@pytest.mark.parametrize("shape", ["fan_out", "chain"])
def test_huge_session_graphs(shape, tmp_path):
    """A root with N children (N = 100,000; 1,000,000 with --many), or a chain of N turns:
    read and simulated in seconds; every request finishes or is rejected with a reason."""
    n = 1_000_000 if MANY else 100_000
    path = tmp_path / f"veeksha_{shape}.jsonl"
    root = (
        '{"session_id": 1, "input_length": 10, "new_input_length": 10, "output_length": 2, '
        '"session_context": {"node_id": 0, "parent_nodes": [], "history_parent": null, '
        '"wait_after_ready": 0.0}}\n'
    )
    row = (
        '{"session_id": 1, "input_length": 5, "new_input_length": 5, "output_length": 1, '
        '"session_context": {"node_id": %d, "parent_nodes": [%d], "history_parent": %d, '
        '"wait_after_ready": 0.0}}\n'
    )
    with path.open("w") as f:
        f.write(root)
        for i in range(1, n + 1):
            parent = 0 if shape == "fan_out" else i - 1
            f.write(row % (i, parent, parent))
    result = simulate_quietly(parse_experiment(trace_experiment(path)))
    df = result.requests
    assert len(df) == n + 1
    check_run(result, None)
    if shape == "fan_out":
        assert (df["status"] == "finished").all()
        assert (df["ready_time"].iloc[1:] == df["finish_time"].iloc[0]).all()
    else:  # the context grows by 6 tokens a turn until max_model_len rejects the chain
        assert (df["status"] == "rejected").any()


# --- the command line -----------------------------------------------------------------------

CLI_CASES = [
    pytest.param(
        name,
        marks=[pytest.mark.xfail(strict=True, reason=spec["bug"])] if "bug" in spec else [],
        id=name,
    )
    for name, spec in sorted(EXPERIMENTS.items())
    if "error" in spec and not spec.get("isolate")
]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_prints_one_error_and_exits_2(name):
    """``servesim run`` on a bad file: exit code 2, an ``error:`` message, no traceback."""
    result = CliRunner().invoke(main, ["run", str(HOSTILE / "experiments" / name), "--no-progress"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == 2, result.output
    assert "error:" in result.output
    assert "Traceback" not in result.output


# --- fuzzing the experiment loader ----------------------------------------------------------

BASELINE = yaml.safe_load((HOSTILE / "experiments" / "baseline.yaml").read_text())
FIELDS = [
    ("name",),
    ("seed",),
    ("model",),
    ("hardware",),
    ("engine",),
    ("engine", "tp"),
    ("engine", "block_size"),
    ("engine", "max_num_seqs"),
    ("engine", "max_num_batched_tokens"),
    ("engine", "max_model_len"),
    ("engine", "gpu_memory_utilization"),
    ("engine", "num_gpu_blocks_override"),
    ("engine", "enable_prefix_caching"),
    ("engine", "kv_dtype"),
    ("engine", "activation_reserve_gib"),
    ("cluster",),
    ("cluster", "replicas"),
    ("cluster", "router"),
    ("workload",),
    ("workload", "kind"),
    ("workload", "num_requests"),
    ("workload", "arrival"),
    ("workload", "arrival", "rate"),
    ("workload", "arrival", "process"),
    ("workload", "prompt_tokens"),
    ("workload", "output_tokens"),
    ("workload", "shared_prefix_tokens"),
    ("outputs",),
    ("outputs", "window_seconds"),
    ("outputs", "max_windows"),
    ("bogus",),
    ("engine", "bogus"),
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "llama-3.1-8b",
            "h100-sxm",
            "poisson",
            "burst",
            "requests",
            "sessions",
            "round_robin",
            "1e400",
            "-0",
            "nan",
            ".inf",
            "",
            "~",
        ]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=6,
)


def mutate(data: dict, path: tuple, value) -> None:
    node = data
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if value is DELETE:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=not MANY,  # CI: the same examples every run; --many explores new ones
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.lists(st.tuples(st.sampled_from(FIELDS), VALUES | st.just(DELETE)), min_size=1, max_size=4)
)
def test_fuzz_experiment_mappings(mutations):
    """Random edits of a valid experiment: an Experiment, or an ExperimentError naming the
    source; resolving the replicas of a valid one: plans, or an ExperimentError."""
    data = yaml.safe_load(yaml.safe_dump(BASELINE))
    for path, value in mutations:
        mutate(data, path, value)
    try:
        exp = parse_experiment(data, "fuzz.yaml")
    except ExperimentError as exc:
        assert str(exc).startswith("fuzz.yaml") or "cluster.replicas" in str(exc), str(exc)
        return
    try:
        plans = plan_replicas(exp)
    except ExperimentError:
        return
    assert plans and all(p.num_blocks >= 1 for p in plans)
    assert all(math.isfinite(float(x)) for p in plans for x in p.cost_params)


YAML_TOKENS = list("abcdemnorstwkl:_-{}[],&*!|>'\"#%@ \n\t0123456789.") + [
    "model: ",
    "engine:\n  ",
    "workload: ",
    ".nan",
    ".inf",
    "&a ",
    "*a",
    "\x00",
    "\u00e9",
]
YAMLISH = st.lists(st.sampled_from(YAML_TOKENS), max_size=60).map("".join)


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=not MANY,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(YAMLISH)
def test_fuzz_experiment_text(text):
    """Random YAML-ish text in an experiment file: only ExperimentError ever comes out."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_experiment(path)
        except ExperimentError as exc:
            assert str(path) in str(exc)


def test_memory_cap_is_available():
    """The isolated cases rely on RLIMIT_AS (Linux and macOS)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    assert hard == resource.RLIM_INFINITY or hard >= 3 * 2**30
