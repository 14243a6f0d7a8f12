"""The `servesim step` command."""

import json

import pytest
from click.testing import CliRunner

from simulator.cli_step import step_command

BASE = ["--model", "llama-3.1-8b", "--hardware", "h100"]


def invoke(args):
    return CliRunner().invoke(step_command, args)


def test_table_output():
    res = invoke(BASE + ["--prefill", "2048@0", "--decode", "32@1024"])
    assert res.exit_code == 0, res.output
    assert "predicted step time:" in res.output
    assert "33 sequences, 2,080 new tokens" in res.output
    assert "attention_decode" in res.output and "compute" in res.output


def test_json_output_is_one_object():
    res = invoke(BASE + ["--decode", "1@1024", "--json"])
    assert res.exit_code == 0
    out = json.loads(res.output)
    # calibrated H100: 7.6 ms measured decode step + ~0.8 ms host overhead (docs/calibration.md)
    assert 7.5e-3 <= out["seconds"] <= 9.5e-3
    assert set(out["groups"]["mlp"]) >= {"seconds", "compute_seconds", "memory_seconds", "bound"}
    assert out["num_seqs"] == 1


def test_prefill_and_decode_repeat():
    one = json.loads(invoke(BASE + ["--decode", "4@100", "--json"]).output)
    two = json.loads(invoke(BASE + ["--decode", "4@100", "--decode", "4@100", "--json"]).output)
    assert two["num_seqs"] == 8 and two["seconds"] > one["seconds"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (BASE + ["--prefill", "abc"], "N@CONTEXT"),
        (BASE + ["--decode", "0@5"], "N >= 1"),
        (["--model", "nope", "--hardware", "h100", "--decode", "1@1"], "llama-3.1-8b"),
        (["--model", "llama-3.1-8b", "--hardware", "tpu", "--decode", "1@1"], "h100-sxm"),
        (BASE + ["--tp", "3", "--decode", "1@1"], "attention heads"),
        (BASE, "at least one"),
    ],
)
def test_bad_input_exit_2_without_traceback(args, needle):
    res = invoke(args)
    assert res.exit_code == 2
    assert needle in res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
