"""HardwareProfile: shipped profiles, sources for every number, error messages."""

import pytest
import yaml

from simulator.hardware import HardwareProfileError, load_hardware, shipped_hardware


def test_shipped_profiles_load():
    assert shipped_hardware() == ["b200", "h100-sxm", "h200"]
    h100 = load_hardware("h100")
    assert h100.name == "h100-sxm"
    assert load_hardware("H100-SXM") == h100
    assert h100.peak_flops.bf16 == 989e12
    assert h100.peak_flops.fp4 is None
    assert h100.hbm_bandwidth == 3.35e12
    assert h100.nvlink_bandwidth_per_direction == 450e9


def test_efficiencies_from_measurements():
    h100 = load_hardware("h100")
    # fitted by servesim calibrate to sustained-clock GEMM rows: 620-740 TF at large M
    assert 620e12 <= h100.matmul_rate("bf16") <= 740e12
    # weight streaming of small-M GEMMs: about 2.8 TB/s (the d2d copy moved 2.99 TB/s)
    assert 2.6e12 <= h100.hbm_bandwidth * h100.memory_efficiency <= 3.0e12
    assert h100.calibrated and h100.calibration["fitted_on"]
    assert "fitted by servesim calibrate" in h100.sources["matmul_efficiency"]
    # estimates that no measurement here can fit say so
    assert "not measured" in h100.sources["step_overhead_s"]


def test_calibration_block_is_not_a_numeric_field():
    h100 = load_hardware("h100")
    assert "calibration" not in h100.numeric_fields()
    assert set(h100.calibration["residuals"]) >= {"gemm_bf16", "attention_prefill", "moe"}


def test_b200_uncalibrated_with_fp4():
    b200 = load_hardware("b200")
    assert not b200.calibrated
    assert b200.peak_flops.fp4 == 9000e12
    assert b200.matmul_rate("fp4") > b200.matmul_rate("fp8") > b200.matmul_rate("bf16")
    assert "carried over" in b200.sources["memory_efficiency"]
    with pytest.raises(ValueError, match="FP4"):
        load_hardware("h200").matmul_rate("fp4")


@pytest.mark.parametrize("name", ["h100-sxm", "h200", "b200"])
def test_every_number_has_a_source(name):
    hw = load_hardware(name)
    for field in hw.numeric_fields():
        assert hw.sources[field].strip(), field


def _profile_dict():
    return yaml.safe_load(open(load_hardware.__globals__["PROFILES_DIR"] / "h100-sxm.yaml"))


def test_error_names_file_field_and_value(tmp_path):
    data = _profile_dict()
    data["memory_efficiency"] = 1.5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(HardwareProfileError) as info:
        load_hardware(str(path))
    msg = str(info.value)
    assert "bad.yaml: memory_efficiency:" in msg and "1.5" in msg


def test_missing_source_rejected(tmp_path):
    data = _profile_dict()
    del data["sources"]["hbm_bandwidth"]
    path = tmp_path / "nosrc.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(HardwareProfileError, match="hbm_bandwidth"):
        load_hardware(str(path))


def test_extra_field_and_nested_errors(tmp_path):
    data = _profile_dict()
    data["turbo"] = True
    data["peak_flops"]["bf16"] = -1
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(HardwareProfileError) as info:
        load_hardware(str(path))
    msg = str(info.value)
    assert "turbo" in msg and "peak_flops.bf16" in msg


def test_unknown_name():
    with pytest.raises(HardwareProfileError, match="h100-sxm"):
        load_hardware("tpu-v5")
    assert issubclass(HardwareProfileError, ValueError)
