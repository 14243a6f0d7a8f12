"""`servesim run` and `servesim schema` through click's CliRunner; user errors exit 2 with one
line on stderr naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from simulator.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
INLINE_WORKLOAD = (
    "{kind: requests, num_requests: 3, arrival: {process: burst}, prompt_tokens: 100, "
    "output_tokens: 10}"
)


def invoke(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=True)


@pytest.fixture(scope="module")
def quickstart_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    res = invoke(["run", str(QUICKSTART), "--json", "--no-progress", "--out", str(out)])
    return res, out


def test_run_json_prints_one_object(quickstart_json):
    res, _ = quickstart_json
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert isinstance(summary, dict)
    for key in ("ttft_p50", "tbt_p99", "output_tokens_per_s", "prefix_cache_hit_rate"):
        assert key in summary
        assert isinstance(summary[key], float)
    assert summary["num_finished"] == summary["num_requests"] > 0
    assert summary["name"] == "quickstart"
    assert 0 < summary["ttft_p50"] <= summary["ttft_p99"]
    assert 0 < summary["tbt_p50"] <= summary["tbt_p99"]
    assert summary["output_tokens_per_s"] > 0
    assert 0 < summary["prefix_cache_hit_rate"] < 1  # sessions share a 2000-token prefix


def test_run_writes_results(quickstart_json):
    res, out = quickstart_json
    summary = json.loads(res.stdout)
    requests = pd.read_parquet(out / "requests.parquet")
    assert len(requests) == summary["num_requests"]
    assert {"request_id", "ttft", "cached_tokens", "status"} <= set(requests.columns)
    assert int(requests["output_tokens"].sum()) == summary["output_tokens"]
    saved = json.loads((out / "summary.json").read_text())
    assert json.dumps(saved, sort_keys=True) == json.dumps(summary, sort_keys=True)


def test_run_check_passes(tmp_path):
    res = invoke(["run", str(QUICKSTART), "--check", "--no-progress", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "invariants: all hold" in res.stdout
    assert "invariant violated" not in res.output
    assert (tmp_path / "summary.json").is_file()


def test_schema_is_json_schema():
    res = invoke(["schema"])
    assert res.exit_code == 0
    schema = json.loads(res.stdout)
    assert "properties" in schema
    assert {"model", "hardware", "engine", "workload"} <= set(schema["properties"])


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def experiment_text(model="llama-3.1-8b", hardware="h100-sxm", extra="", workload=None):
    return (
        f"name: bad\nmodel: {model}\nhardware: {hardware}\n{extra}"
        f"workload: {workload or INLINE_WORKLOAD}\n"
    )


BAD_INPUTS = {
    "malformed_yaml": ("name: [unclosed\nmodel: x\n", ["malformed YAML"]),
    "unknown_top_level_key": (experiment_text(extra="bogus_key: 1\n"), ["bogus_key"]),
    "negative_max_num_seqs": (
        experiment_text(extra="engine: {max_num_seqs: -4}\n"),
        ["max_num_seqs", "-4"],
    ),
    "missing_workload_file": (
        experiment_text(workload="no_such_workload.yaml"),
        ["no_such_workload.yaml", "not found"],
    ),
    "unknown_model": (experiment_text(model="llama-9-999b"), ["llama-9-999b"]),
    "model_does_not_fit": (
        experiment_text(model="llama-3.1-70b"),
        ["llama-3.1-70b", "does not fit", "h100-sxm"],
    ),
    "unknown_hardware": (experiment_text(hardware="tpu-v99"), ["tpu-v99"]),
}


def assert_user_error(res, words: list[str]) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(tmp_path, case):
    text, words = BAD_INPUTS[case]
    path = write(tmp_path, text)
    res = invoke(["run", str(path), "--json", "--out", str(tmp_path / "out")])
    assert_user_error(res, words)
    assert not (tmp_path / "out").exists()


def test_nonexistent_experiment_file(tmp_path):
    missing = tmp_path / "no_such_experiment.yaml"
    res = invoke(["run", str(missing)])
    assert_user_error(res, ["no_such_experiment.yaml", "not found"])


def test_negative_seed_option(tmp_path):
    path = write(tmp_path, experiment_text())
    res = invoke(["run", str(path), "--seed", "-1"])
    assert_user_error(res, ["--seed"])


def test_small_inline_run_human_output(tmp_path):
    path = write(tmp_path, experiment_text())
    res = invoke(["run", str(path), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "requests: 3 finished, 0 rejected, 0 unfinished" in res.stdout
    assert "TTFT" in res.stdout
