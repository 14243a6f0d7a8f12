"""SLO model, load scaling, overrides, capacity search (real and synthetic), fleet sizing, and
`servesim capacity`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

import simulator.search as search
from simulator.bench import BENCH_RATE, bench_experiment
from simulator.cli import main
from simulator.config import ExperimentError
from simulator.search import (
    SLO,
    LoadError,
    LoadRange,
    SearchOptions,
    StudyError,
    apply_overrides,
    capacity_search,
    fleet_search,
    load_capacity_study,
    requests_per_session,
    scale_load,
)
from simulator.workload.spec import SessionsWorkload

SLOS = ["ttft_p95 <= 0.75 s", "tbt_p95 <= 75 ms", "error_rate <= 2 %"]


# ------------------------------------------------------------------------------ SLO model
def test_slo_strings_and_units():
    assert SLO.parse("ttft_p95 <= 0.75 s").limit == pytest.approx(0.75)
    assert SLO.parse("tbt_p95 <= 75 ms").limit == pytest.approx(0.075)
    assert SLO.parse("error_rate <= 2 %").limit == pytest.approx(0.02)
    s = SLO.parse({"metric": "speed_p25", "min": 20})
    assert s.op == ">=" and s.limit == 20
    assert s.holds({"speed_p25": 25.0}) and not s.holds({"speed_p25": 19.0})
    up = SLO.parse("ttft_p95 <= 750 ms")
    assert up.holds({"ttft_p95": 0.75}) and not up.holds({"ttft_p95": 0.7501})
    assert not up.holds({"ttft_p95": float("nan")})  # nothing measured is not healthy
    assert up.ratio({"ttft_p95": 1.5}) == pytest.approx(2.0)
    # the printed form parses back to the same SLO
    for text in SLOS + ["speed_p25 >= 20 tok/s"]:
        slo = SLO.parse(text)
        assert SLO.parse(str(slo)) == slo


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("ttft_p97 <= 1 s", "unknown SLO metric 'ttft_p97'"),
        ("ttft_p95 <= 1 parsec", "unit 'parsec'"),
        ("ttft_p95 is small", "cannot read SLO"),
        ({"metric": "ttft_p95", "max": 1, "min": 0}, "exactly one of 'max' or 'min'"),
    ],
)
def test_slo_bad_input(bad, needle):
    with pytest.raises(ValueError) as err:
        SLO.parse(bad)
    assert needle in str(err.value)


# ---------------------------------------------------------------------------- load scaling
def test_scale_load_requests_resizes_to_duration():
    spec = bench_experiment(1000).workload
    out = scale_load(spec, 8.0, "rate", duration_s=50)
    assert out.arrival.rate == 8.0 and out.num_requests == 400
    assert scale_load(spec, 8.0, "requests_per_s").num_requests == 1000  # size kept
    assert spec.arrival.rate == BENCH_RATE  # the original is untouched (frozen models)


def sessions_spec(turns=5):
    return SessionsWorkload(
        kind="sessions",
        num_sessions=50,
        arrival={"process": "poisson", "rate": 1.0},
        turns=turns,
        first_prompt_tokens=500,
        fresh_input_tokens=500,
        output_tokens=300,
    )


def test_scale_load_rho_converts_to_sessions():
    spec = sessions_spec(5)
    assert requests_per_session(spec) == pytest.approx(5.0)
    out = scale_load(spec, 0.9, "rho", duration_s=300)
    assert out.arrival.rate == pytest.approx(0.18)  # rho / requests per session
    assert out.num_sessions == 54
    assert scale_load(spec, 0.18, "sessions_per_s").arrival.rate == pytest.approx(0.18)


def test_scale_load_errors_are_clear():
    class Unknown:
        kind = "telepathy"

    with pytest.raises(LoadError, match="workload kind 'telepathy' has no load scaler"):
        scale_load(Unknown(), 1.0)
    with pytest.raises(LoadError, match="unknown load unit 'qps'"):
        scale_load(sessions_spec(), 1.0, "qps")
    with pytest.raises(LoadError, match="concurrent_sessions"):
        scale_load(sessions_spec(), 4, "concurrent_sessions")
    burst = SessionsWorkload.model_validate(
        sessions_spec().model_dump() | {"arrival": {"process": "burst"}}
    )
    with pytest.raises(LoadError, match="'burst' has no rate"):
        scale_load(burst, 1.0)
    with pytest.raises(LoadError, match="positive"):
        scale_load(sessions_spec(), -1.0)


VEEKSHA = Path(__file__).resolve().parents[2] / "shared/data/veeksha_traces/workload_b_dag.jsonl"


@pytest.mark.skipif(not VEEKSHA.is_file(), reason="shared Veeksha traces not present")
def test_scale_load_trace_traffic():
    from simulator.workload.compile import parse_workload_spec

    spec = parse_workload_spec(
        {
            "kind": "trace",
            "format": "veeksha",
            "path": str(VEEKSHA),
            "traffic": {"mode": "sequential", "max_sessions": 5},
        }
    )
    out = scale_load(spec, 0.18, "sessions_per_s", duration_s=300)
    assert out.traffic.mode == "rate" and out.traffic.sessions_per_s == 0.18
    assert out.traffic.duration_s == 300 and out.traffic.max_sessions is None
    rho = scale_load(out, 2.7, "rho")
    assert rho.traffic.requests_per_s == 2.7 and rho.traffic.sessions_per_s is None
    conc = scale_load(spec, 3, "concurrent_sessions")
    assert conc.traffic.mode == "concurrent" and conc.traffic.sessions == 3
    assert scale_load(conc, 6, "concurrent_sessions").traffic.max_sessions == 10  # 5 x 6/3


def test_register_load_scaler_extends_kinds(monkeypatch):
    monkeypatch.setitem(search.LOAD_SCALERS, "fake", lambda spec, unit, v, d: (unit, v, d))
    fake = type("Fake", (), {"kind": "fake"})()
    assert scale_load(fake, 2.0, "sessions_per_s", 10) == ("sessions_per_s", 2.0, 10)


# ------------------------------------------------------------------------------ overrides
def test_apply_overrides_aliases_and_errors():
    exp = bench_experiment(100)
    out = apply_overrides(exp, {"tp": 2, "replicas": 3, "workload.arrival.rate": 5.0})
    assert out.engine.tp == 2 and out.cluster.replicas[0].count == 3
    assert out.workload.arrival.rate == 5.0
    with pytest.raises(ExperimentError, match="engine.tpp: Extra inputs are not permitted"):
        apply_overrides(exp, {"engine.tpp": 2}, "s.yaml")
    with pytest.raises(StudyError, match="s.yaml: clster.router: no such field 'clster'"):
        apply_overrides(exp, {"clster.router": "x"}, "s.yaml")
    with pytest.raises(ExperimentError, match="engine.tp"):
        apply_overrides(exp, {"engine.tp": 0}, "s.yaml")


# ------------------------------------------------------------- synthetic capacity searches
def fake_point(noise: float = 0.0):
    """ttft_p95 = load / 10 s (x a seed-dependent factor): healthy up to load 7.5."""

    def evaluate(task):
        factor = 1.0 + noise * ((task.seed * 7919) % 5 - 2) / 2
        return {
            "ttft_p95": task.load / 10.0 * factor,
            "tbt_p95": 0.01,
            "error_rate": 0.0,
            "stable": True,
            "window_start": 0.0,
            "window_end": 1.0,
        }

    return evaluate


def test_bisection_brackets_the_boundary(monkeypatch):
    monkeypatch.setattr(search, "evaluate_point", fake_point())
    opts = SearchOptions(tolerance=0.02, repeats=1)
    res = capacity_search(bench_experiment(10), LoadRange(low=1, high=20), SLOS, opts)
    assert res.status == "found"
    assert res.max_healthy_load <= 7.5 < res.first_failing_load
    assert res.first_failing_load / res.max_healthy_load - 1 <= 0.02
    assert res.failed_first == "ttft_p95 <= 750.0 ms"
    assert [p.load for p in res.probes][:2] == [1, 20]
    assert not any(p.healthy for p in res.probes if p.load > 7.5)


def test_repeats_near_boundary_and_majority(monkeypatch):
    monkeypatch.setattr(search, "evaluate_point", fake_point(noise=0.05))
    opts = SearchOptions(tolerance=0.02, repeats=3, near_boundary=0.1)
    res = capacity_search(bench_experiment(10), LoadRange(low=1, high=20), SLOS, opts)
    repeated = [p for p in res.probes if len(p.seeds) == 3]
    assert repeated, "probes near the limit must be repeated"
    for p in repeated:
        assert "repeated with 3 seeds" in p.note
        assert p.healthy == (p.healthy_seeds >= 2)
    far = [p for p in res.probes if abs(p.load / 7.5 - 1) > 0.3]
    assert all(len(p.seeds) == 1 for p in far)


def test_widen_and_probes_per_round(monkeypatch):
    monkeypatch.setattr(search, "evaluate_point", fake_point())
    opts = SearchOptions(tolerance=0.05, repeats=1, probes_per_round=3, expand=3)
    res = capacity_search(bench_experiment(10), LoadRange(low=1, high=2), SLOS, opts)
    assert any("widened to 4" in n for n in res.notes)
    assert res.status == "found" and res.max_healthy_load <= 7.5 < res.first_failing_load
    opts = SearchOptions(expand=1, repeats=1)
    res = capacity_search(bench_experiment(10), LoadRange(low=1, high=2), SLOS, opts)
    assert res.status == "high_healthy" and res.max_healthy_load == 4


def test_fleet_sizing(monkeypatch):
    def evaluate(task):
        n = task.exp.cluster.replicas[0].count
        rate = task.exp.workload.arrival.rate
        return {"ttft_p95": 0.1 if rate <= 7 * n else 5.0, "error_rate": 0.0}

    monkeypatch.setattr(search, "evaluate_point", evaluate)
    res = fleet_search(bench_experiment(10), 50.0, "rate", ["ttft_p95 <= 1 s"], max_replicas=64)
    assert res.status == "found" and res.replicas == 8 and res.gpus == 8
    assert [p["replicas"] for p in res.probes][:5] == [1, 2, 4, 8, 16][:5] or res.probes[-1][
        "replicas"
    ] in (7, 8)
    res = fleet_search(bench_experiment(10), 50.0, "rate", ["ttft_p95 <= 1 s"], max_replicas=4)
    assert res.status == "not_found" and res.replicas is None


# -------------------------------------------------------------------- real capacity search
def test_real_search_is_deterministic_and_brackets():
    exp = bench_experiment(100)
    load = LoadRange(unit="rate", low=4, high=40, duration_s=60)
    opts = SearchOptions(tolerance=0.1, repeats=2)
    a = capacity_search(exp, load, SLOS, opts)
    b = capacity_search(exp, load, SLOS, opts)
    assert a.status == "found"
    assert 4 <= a.max_healthy_load < a.first_failing_load <= 40
    assert a.healthy_metrics["ttft_p95"] <= 0.75 and a.healthy_metrics["tbt_p95"] <= 0.075
    assert a.failing_metrics is not None and a.violations_at_failing
    assert [p.load for p in a.probes] == [p.load for p in b.probes]
    assert a.max_healthy_load == b.max_healthy_load
    assert json.dumps(a.to_json(), default=str)  # serialisable


def test_real_search_low_end_unhealthy():
    exp = bench_experiment(100)
    res = capacity_search(
        exp, LoadRange(low=60, high=80, duration_s=30), SLOS, SearchOptions(repeats=1)
    )
    assert res.status == "low_unhealthy" and res.max_healthy_load is None
    assert "already unhealthy" in res.notes[0]
    assert len(res.probes) == 2


# -------------------------------------------------------------------------------- the CLI
STUDY = """\
name: cap-test
experiment:
  name: cap
  seed: 1
  model: llama-3.1-8b
  hardware: h100-sxm
  workload:
    kind: requests
    num_requests: 100
    arrival: {{process: poisson, rate: 10}}
    prompt_tokens: {{dist: lognormal, mean: 1000, sigma: 0.6}}
    output_tokens: {{dist: lognormal, mean: 250, sigma: 0.6}}
load: {{unit: rate, low: {low}, high: {high}, duration_s: 40}}
slos: [{slos}]
search: {{tolerance: 0.15, repeats: 1}}
"""


SLO_TEXT = ", ".join(SLOS)


def write_study(tmp_path: Path, low=4, high=40, slos=SLO_TEXT) -> Path:
    p = tmp_path / "cap.yaml"
    p.write_text(STUDY.format(low=low, high=high, slos=slos))
    return p


def test_cli_capacity_text_and_json(tmp_path):
    study = write_study(tmp_path)
    res = CliRunner().invoke(
        main, ["capacity", str(study), "--workers", "1", "--out", str(tmp_path / "out")]
    )
    assert res.exit_code == 0, res.output
    for needle in (
        "max healthy load:",
        "first failing load:",
        "SLO that failed first:",
        "search trace:",
        "probes in",
    ):
        assert needle in res.output
    saved = json.loads((tmp_path / "out" / "capacity.json").read_text())
    assert saved["status"] == "found"
    res = CliRunner().invoke(main, ["capacity", str(study), "--json", "--workers", "1"])
    data = json.loads(res.stdout)
    assert data["max_healthy_load"] == saved["max_healthy_load"]
    assert math.isfinite(data["first_failing_load"])


def test_cli_capacity_low_end_unhealthy_exits_1(tmp_path):
    res = CliRunner().invoke(
        main, ["capacity", str(write_study(tmp_path, 70, 90)), "--workers", "1"]
    )
    assert res.exit_code == 1
    assert "NO HEALTHY LOAD: the lower end 70" in res.output


def test_cli_capacity_bad_input(tmp_path):
    study = write_study(tmp_path, slos="ttft_p96 <= 1 s")
    res = CliRunner().invoke(main, ["capacity", str(study)])
    assert res.exit_code == 2
    assert f"{study}: slos.0: unknown SLO metric 'ttft_p96'" in res.stderr
    assert "(got 'ttft_p96 <= 1 s')" in res.stderr
    study = write_study(tmp_path, low=5, high=2)
    res = CliRunner().invoke(main, ["capacity", str(study)])
    assert res.exit_code == 2 and "low (5) must be below high (2)" in res.stderr
    study.write_text(study.read_text().replace("search:", "serach:"))
    with pytest.raises(StudyError, match="serach"):
        load_capacity_study(study)
