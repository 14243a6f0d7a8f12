"""servesim calibrate / validate-steps: recovery of known efficiencies, errors, documented numbers."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from simulator.calibrate import (
    REFERENCE_SMALL_OPS_PER_LAYER,
    load_measurements,
    predict_operators,
    validate_steps,
)
from simulator.calibrate import calibrate as fit_profile
from simulator.cli_calibrate import calibrate_command, validate_steps_command
from simulator.costmodel import P_STEP_OVERHEAD, build_cost_params, step_breakdown, step_seconds
from simulator.hardware import load_hardware
from simulator.models import load_model

MEAS = Path(__file__).resolve().parent.parent / "hardware_profiles" / "measurements"

#: The numbers docs/calibration.md states (validate-steps, shipped profiles, committed data).
DOCUMENTED = {
    "h100-sxm": {
        "prefill": (4.9, 8.5),
        "decode": (2.0, 4.4),
        "mixed": (2.8, 4.7),
        "all": (3.0, 6.5),
    },
    "h200": {
        "prefill": (5.0, 7.4),
        "decode": (3.2, 5.8),
        "mixed": (2.7, 5.1),
        "all": (4.1, 6.7),
    },
}


@pytest.fixture(scope="module")
def h100_meas():
    return load_measurements(MEAS / "h100-sxm")


def _synthetic(tmp_path, truth):
    """Copy the committed H100 rows and replace every time with ``truth``'s prediction."""
    d = tmp_path / "synthetic"
    shutil.copytree(MEAS / "h100-sxm", d)
    meas = load_measurements(d)
    pred = predict_operators(meas, truth)
    for kind, seconds in pred.items():
        df = meas.tables[kind].copy()
        if kind == "gdn":  # only the fused-kernel rows are modelled (the proxies are not)
            df.loc[df["method"].str.startswith("fla"), "seconds"] = seconds
        else:
            df["seconds"] = seconds
        df.to_csv(d / f"{kind}.csv", index=False)
    return d


def test_calibrate_recovers_known_efficiencies(tmp_path):
    truth = load_hardware("h100").model_copy(
        update={
            "calibration": None,
            "matmul_efficiency": 0.71,
            "fp8_matmul_efficiency": 0.64,
            "memory_efficiency": 0.8,
            "gemm_smoothness": 3.0,
            "gemm_latency_s": 5e-6,
            "attention_efficiency": 0.4,
            "attention_prefill_latency_s": 12e-6,
            "attention_prefill_token_s": 3e-8,
            "attention_decode_latency_s": 7e-6,
            "attention_decode_seq_s": 2e-7,
            "attention_decode_bandwidth_efficiency": 0.7,
            "attention_decode_efficiency": 0.02,
            "elementwise_bandwidth_efficiency": 0.5,
            "elementwise_latency_s": 3e-6,
            "grouped_gemm_efficiency": 0.7,
            "grouped_gemm_latency_s": 8e-6,
            "moe_routing_latency_s": 40e-6,
            "moe_routing_bandwidth_efficiency": 0.3,
            "linear_attention_efficiency": 0.05,
            "linear_attention_bandwidth_efficiency": 0.6,
            "linear_attention_decode_latency_s": 4e-6,
            "linear_attention_prefill_latency_s": 20e-6,
        }
    )
    fit = fit_profile(load_measurements(_synthetic(tmp_path, truth)), load_hardware("h100"))
    for name, value in fit.values.items():
        want = getattr(truth, name) if name != "layer_overhead_s" else None
        if name == "layer_overhead_s":
            want = REFERENCE_SMALL_OPS_PER_LAYER * truth.elementwise_latency_s
        assert value == pytest.approx(want, rel=0.02), name
    for group, r in fit.residuals.items():
        assert r["max_abs_pct"] < 1.0, group


def test_shipped_profiles_are_the_fit_of_the_committed_data():
    for gpu in ("h100-sxm", "h200"):
        fit = fit_profile(load_measurements(MEAS / gpu), load_hardware(gpu))
        shipped = load_hardware(gpu)
        for name, value in fit.values.items():
            assert getattr(shipped, name) == pytest.approx(value, rel=1e-3), (gpu, name)


@pytest.mark.parametrize("gpu", ["h100-sxm", "h200"])
def test_committed_measurements_give_documented_errors(gpu):
    report = validate_steps(load_measurements(MEAS / gpu), load_hardware(gpu))
    for kind, (median, p90) in DOCUMENTED[gpu].items():
        s = report["summary"]["llama-3.1-8b"][kind]
        assert round(s["median_abs_pct"], 1) == median, kind
        assert round(s["p90_abs_pct"], 1) == p90, kind
        assert s["meets_targets"], kind
    assert load_hardware(gpu).calibrated


def test_validate_prediction_is_step_seconds_minus_host_overhead(h100_meas):
    hw = load_hardware("h100")
    report = validate_steps(h100_meas, hw)
    row = next(r for r in report["rows"] if r["batch"] == "2048@0 + 32x1@2048")
    p = build_cost_params(load_model("llama-3.1-8b"), hw)
    new = np.array([2048] + [1] * 32, dtype=np.int64)
    ctx = np.array([0] + [2048] * 32, dtype=np.int64)
    want = step_seconds(p, new, ctx, 33) - p[P_STEP_OVERHEAD]
    assert row["predicted_seconds"] == pytest.approx(want)


def test_validate_steps_json_shape():
    res = CliRunner().invoke(validate_steps_command, [str(MEAS / "h100-sxm"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    llama = out["summary"]["llama-3.1-8b"]
    assert set(llama) == {"prefill", "decode", "mixed", "all"}
    for s in llama.values():
        assert {"rows", "median_abs_pct", "p90_abs_pct", "max_abs_pct", "meets_targets"} <= set(s)
    assert sum(r["model"] == "llama-3.1-8b" for r in out["rows"]) == 35
    assert len(out["worst"]) == 5
    assert {
        "kind",
        "model",
        "batch",
        "experts_touched",
        "measured_seconds",
        "predicted_seconds",
        "error_pct",
    } == set(out["rows"][0])
    assert out["routing"] == "uniform"
    text = CliRunner().invoke(validate_steps_command, [str(MEAS / "h200")])
    assert text.exit_code == 0 and "worst rows" in text.output and "mixed" in text.output


def test_calibrate_cli_writes_a_loadable_profile(tmp_path):
    out = tmp_path / "fitted.yaml"
    res = CliRunner().invoke(calibrate_command, [str(MEAS / "h100-sxm"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "gemm_bf16" in res.output and "calibrated: true" in res.output
    hw = load_hardware(str(out))
    assert hw.calibrated and hw.name == "h100-sxm"
    assert "fitted by servesim calibrate from " in hw.sources["attention_efficiency"]
    assert "measurements/h100-sxm" in hw.sources["attention_efficiency"]


def _run_bad(tmp_path, edit, args=()):
    d = tmp_path / "m"
    shutil.copytree(MEAS / "h100-sxm", d)
    edit(d)
    res = CliRunner().invoke(calibrate_command, [str(d), "-o", str(tmp_path / "o.yaml"), *args])
    return res


def _rename_column(d, old, new, kind="gemm"):
    text = (d / f"{kind}.csv").read_text().splitlines()
    text[0] = ",".join(new if c == old else c for c in text[0].split(","))
    (d / f"{kind}.csv").write_text("\n".join(text) + "\n")


def test_bad_input_missing_column(tmp_path):
    res = _run_bad(tmp_path, lambda d: _rename_column(d, "flops", "work"))
    assert res.exit_code == 2
    assert "gemm.csv: missing column(s) flops" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_bad_input_unit_mismatch(tmp_path):
    res = _run_bad(tmp_path, lambda d: _rename_column(d, "seconds", "ms", "attention_decode"))
    assert res.exit_code == 2 and "unit mismatch" in res.output


def test_bad_input_times_not_in_seconds(tmp_path):
    def to_us(d):
        f = d / "elementwise.csv"
        import pandas as pd

        df = pd.read_csv(f)
        df["seconds"] *= 1e9  # nanoseconds under a 'seconds' header
        df.to_csv(f, index=False)

    res = _run_bad(tmp_path, to_us)
    assert res.exit_code == 2 and "unit mismatch" in res.output


def test_bad_input_gpu_name_mismatch(tmp_path):
    res = _run_bad(tmp_path, lambda d: None, ["--hardware", "h200"])
    assert res.exit_code == 2
    assert "does not match profile 'h200'" in res.output
    res = CliRunner().invoke(validate_steps_command, [str(MEAS / "h100-sxm"), "--hardware", "b200"])
    assert res.exit_code == 2 and "does not match" in res.output


def test_bad_input_missing_files(tmp_path):
    res = _run_bad(tmp_path, lambda d: (d / "metadata.json").unlink())
    assert res.exit_code == 2 and "metadata.json: missing" in res.output
    res = _run_bad(tmp_path / "x", lambda d: (d / "moe.csv").unlink())
    assert res.exit_code == 2 and "moe.csv: missing" in res.output
    res = CliRunner().invoke(validate_steps_command, [str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "not a directory" in res.output


def test_fit_that_does_not_converge_keeps_the_previous_profile(tmp_path):
    out = tmp_path / "o.yaml"
    previous = yaml.safe_dump({"keep": "me"})
    out.write_text(previous)
    res = CliRunner().invoke(
        calibrate_command, [str(MEAS / "h100-sxm"), "-o", str(out), "--max-evaluations", "1"]
    )
    assert res.exit_code == 1
    assert "did not converge" in res.output and "left as it was" in res.output
    assert out.read_text() == previous


@pytest.mark.parametrize("gpu", ["h100-sxm", "h200"])
def test_refit_with_the_original_date_reproduces_the_shipped_profile(tmp_path, monkeypatch, gpu):
    root = MEAS.parent.parent
    monkeypatch.chdir(root)
    out = tmp_path / f"{gpu}.yaml"
    args = [f"hardware_profiles/measurements/{gpu}", "-o", str(out), "--date", "2026-12-07"]
    res = CliRunner().invoke(calibrate_command, args)
    assert res.exit_code == 0, res.output
    assert out.read_text() == (root / "hardware_profiles" / f"{gpu}.yaml").read_text()


def test_calibrate_bad_date_is_one_line(tmp_path):
    args = [str(MEAS / "h100-sxm"), "-o", str(tmp_path / "o.yaml"), "--date", "23/11/2026"]
    res = CliRunner().invoke(calibrate_command, args)
    assert res.exit_code == 2
    assert res.output.strip() == "error: --date: not a YYYY-MM-DD date (got '23/11/2026')"
    assert not (tmp_path / "o.yaml").exists()


#: validate-steps on the Qwen3-30B-A3B whole steps (H100, measured 2026-12-07), per way of
#: counting the experts a step reads (docs/calibration.md, "MoE whole steps").
MOE_DOCUMENTED = {
    "uniform": {
        "prefill": (2.1, 36.6),
        "decode": (3.9, 6.6),
        "mixed": (2.8, 7.1),
        "all": (3.3, 8.2),
    },
    "measured": {
        "prefill": (3.6, 13.3),
        "decode": (4.0, 7.1),
        "mixed": (5.5, 11.9),
        "all": (4.1, 10.5),
    },
}


@pytest.mark.parametrize("routing", ["uniform", "measured"])
def test_moe_steps_give_documented_errors(h100_meas, routing):
    report = validate_steps(h100_meas, load_hardware("h100-sxm"), routing=routing)
    moe = report["summary"]["qwen3-30b-a3b"]
    assert moe["all"]["rows"] == 35
    for kind, (median, p90) in MOE_DOCUMENTED[routing].items():
        assert round(moe[kind]["median_abs_pct"], 1) == median, kind
        assert round(moe[kind]["p90_abs_pct"], 1) == p90, kind
    assert moe["decode"]["meets_targets"]
    # the MoE rows are reported beside the reference model; they do not gate the profile
    assert report["summary"]["llama-3.1-8b"]["all"]["meets_targets"]


def test_moe_uniform_outliers_are_the_prefills_whose_routing_collapsed(h100_meas):
    report = validate_steps(h100_meas, load_hardware("h100-sxm"))
    moe = [r for r in report["rows"] if r["model"] == "qwen3-30b-a3b"]
    outliers = [r for r in moe if abs(r["error_pct"]) > 12.0]
    assert {r["batch"] for r in outliers} == {"128@0", "512@0", "1024@0"}
    # random-weight prefill tokens converge and route to few experts (the formula says 128)
    assert all(r["experts_touched"] < 60 for r in outliers)


def test_touched_experts_formula_matches_decode_routing(h100_meas):
    s = h100_meas.tables["steps"]
    dec = s[(s["model"] == "qwen3-30b-a3b") & (s["kind"] == "decode")]
    ratio = dec["experts_touched_mean"] / dec["experts_touched_expected"]
    assert len(dec) == 18 and np.all(np.abs(ratio - 1.0) < 0.02)


def test_unsplit_decode_attention_follows_kv_heads(h100_meas):
    """Qwen3's 8 query heads per KV head: the unsplit kernel takes half Llama's time."""
    q = pd.read_csv(MEAS / "h100-sxm" / "attention_decode_qwen3.csv")
    meas = load_measurements(MEAS / "h100-sxm")
    meas.tables["attention_decode"] = q
    hw = load_hardware("h100-sxm")
    err = 100 * np.abs(predict_operators(meas, hw)["attention_decode"] / q["seconds"] - 1)
    unsplit = q["batch"] * q["kv_heads"] >= hw.attention_decode_split_below
    assert unsplit.sum() == 11 and np.median(err[unsplit]) < 10.0


def test_gdn_layer_cost_matches_the_fused_kernel_rows():
    gd = pd.read_csv(MEAS / "h100-sxm" / "gdn.csv")
    fused = gd[gd["method"].str.startswith("fla")]
    assert len(fused) == 11
    model = load_model("qwen3.5-35b-a3b")
    p = build_cost_params(model, load_hardware("h100-sxm"))
    for _, r in fused.iterrows():
        if r["phase"] == "decode":
            new, ctx = np.ones(r["batch"], dtype=np.int64), np.full(r["batch"], 4096)
        else:
            new, ctx = np.array([r["tokens"]]), np.array([0])
        layer = step_breakdown(p, new, ctx)["groups"]["linear_attention"]["seconds"]
        layer /= model.num_linear_attention_layers
        assert layer == pytest.approx(r["seconds"], rel=0.2), (r["phase"], r["batch"])


def test_routing_rows_must_count_the_cost_models_bytes(tmp_path):
    def edit(d):
        f = d / "moe_routing.csv"
        df = pd.read_csv(f)
        df["bytes"] *= 2
        df.to_csv(f, index=False)

    res = _run_bad(tmp_path, edit)
    assert res.exit_code == 2 and "routing bytes" in res.output
