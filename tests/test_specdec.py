"""Speculative decoding: acceptance statistics, verify semantics, cost trends, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simulator.config import ExperimentError, parse_experiment
from simulator.invariants import check_result
from simulator.simulate import plan_replicas, simulate
from simulator.specdec import expected_tokens_per_step

ROOT = Path(__file__).resolve().parent.parent


def _exp(spec: dict | None, *, n: int = 16, prompt: int = 200, output: int = 600,
         model: str = "llama-3.1-8b", hardware: str = "h100-sxm", **engine) -> object:
    eng = dict(engine)
    if spec is not None:
        eng["speculative"] = spec
    return parse_experiment(
        {
            "model": model,
            "hardware": hardware,
            "seed": 3,
            "engine": eng,
            "workload": {"kind": "requests", "num_requests": n, "arrival": {"process": "burst"},
                         "prompt_tokens": prompt, "output_tokens": output},
        },
        "test.yaml",
    )


@pytest.mark.parametrize("alpha,k", [(0.6, 1), (0.8, 3), (0.5, 4)])
def test_mean_tokens_per_verify_matches_closed_form(alpha, k):
    result = simulate(_exp({"method": "ngram", "num_speculative_tokens": k,
                            "acceptance_rate": alpha}, n=32, output=1500), progress=False)
    s = result.summary()
    assert check_result(result) == []
    verifies = int(result.replicas["spec_verifies"].sum())
    expected = expected_tokens_per_step(alpha, k)
    # tokens per verify are bounded by k + 1: standard error <= (k + 1) / (2 sqrt(n))
    tolerance = 4 * (k + 1) / (2 * np.sqrt(verifies))
    assert abs(s["spec_mean_accepted_length"] - expected) < tolerance
    assert s["spec_acceptance_rate"] == pytest.approx(
        (expected - 1) / k, abs=tolerance / k
    )


def test_acceptance_extremes_and_token_conservation():
    never = simulate(_exp({"method": "ngram", "num_speculative_tokens": 3,
                           "acceptance_rate": 0.0}), progress=False)
    always = simulate(_exp({"method": "ngram", "num_speculative_tokens": 3,
                            "acceptance_rate": 1.0}), progress=False)
    for r in (never, always):
        assert check_result(r) == []
        fin = r.requests
        assert (fin["output_tokens"] == 600).all()
    assert never.summary()["spec_acceptance_rate"] == 0.0
    assert always.summary()["spec_acceptance_rate"] == 1.0
    # all drafts accepted: 4 tokens per verify, so about a quarter of the chunks
    chunks = always.requests["chunks"].to_numpy()
    assert np.all(chunks == 1 + np.ceil((600 - 1) / 4))
    assert np.all(never.requests["chunks"].to_numpy() == 600)
    # rejected drafts are scheduled (verified) but rolled back
    rej = never.requests
    assert (rej["spec_proposed"] > 0).all() and (rej["spec_accepted"] == 0).all()


def test_per_token_and_per_chunk_gaps():
    r = simulate(_exp({"method": "ngram", "num_speculative_tokens": 3, "acceptance_rate": 1.0},
                      n=1), progress=False)
    s = r.summary()
    # every chunk carries 4 tokens: the per-token gap is a quarter of the per-chunk gap
    assert s["tbt_p50"] == pytest.approx(s["tbc_p50"] / 4, rel=0.02)
    assert int(r.gap_hist.sum()) == 600 - 1
    assert int(r.chunk_gap_hist.sum()) == r.requests["chunks"].iloc[0] - 1


def test_speedup_shrinks_with_batch_and_turns_into_slowdown():
    spec = {"method": "eagle", "num_speculative_tokens": 3, "acceptance_rate": 0.7}

    def tpot(n, spec_cfg):
        res = simulate(_exp(spec_cfg, n=n, prompt=100, output=300, max_num_batched_tokens=16384),
                       progress=False)
        return float(res.requests["tpot"].median())

    speedups = [tpot(n, None) / tpot(n, spec) for n in (1, 64, 512)]
    assert speedups[0] > 1.3  # memory-bound decode: drafts are nearly free to verify
    assert speedups[0] > speedups[1] > speedups[2]
    assert speedups[2] < 1.0  # compute-bound: verifying 4 tokens per request costs more


def test_speed_distribution_trap_shipped_study():
    from simulator.compare import load_study, run_study

    study, experiments = load_study(ROOT / "experiments/specdec/speed_tail.yaml")
    table, _ = run_study(study, experiments)
    off, mtp = table.loc["off"], table.loc["MTP-3"]
    assert mtp["speed_p50"] > off["speed_p50"]
    assert mtp["speed_p25"] > off["speed_p25"]
    assert mtp["speed_p5"] < off["speed_p5"]


def test_spec_runs_are_deterministic():
    spec = {"method": "mtp", "num_speculative_tokens": 2, "acceptance_rate": 0.7,
            "acceptance_concentration": 5.0}
    a = simulate(_exp(spec, model="deepseek-v3", hardware="h200", tp=8, weight_dtype="fp8"),
                 progress=False)
    b = simulate(_exp(spec, model="deepseek-v3", hardware="h200", tp=8, weight_dtype="fp8"),
                 progress=False)
    assert a.requests.drop(columns=[]).equals(b.requests)
    c = simulate(_exp(spec, model="deepseek-v3", hardware="h200", tp=8, weight_dtype="fp8"),
                 seed=4, progress=False)
    assert not np.array_equal(a.requests["spec_accepted"], c.requests["spec_accepted"])


def test_drafter_memory_reduces_kv_blocks():
    base = plan_replicas(_exp(None))[0].num_blocks
    eagle = plan_replicas(_exp({"method": "eagle", "num_speculative_tokens": 2,
                                "acceptance_rate": 0.7}))[0].num_blocks
    ngram = plan_replicas(_exp({"method": "ngram", "num_speculative_tokens": 2,
                                "acceptance_rate": 0.7}))[0].num_blocks
    assert ngram == base
    assert eagle < base


@pytest.mark.parametrize(
    "spec,needle",
    [
        ({"method": "mtp", "num_speculative_tokens": 0, "acceptance_rate": 0.5},
         "num_speculative_tokens"),
        ({"method": "mtp", "num_speculative_tokens": 2, "acceptance_rate": 1.5},
         "acceptance_rate"),
        ({"method": "mtp", "num_speculative_tokens": 2, "acceptance_rate": -0.1},
         "acceptance_rate"),
        ({"method": "medusa", "num_speculative_tokens": 2, "acceptance_rate": 0.5}, "method"),
        ({"method": "draft_model", "num_speculative_tokens": 2, "acceptance_rate": 0.5},
         "draft_model"),
    ],
)
def test_bad_speculative_config_is_a_clear_error(spec, needle):
    with pytest.raises(ExperimentError, match=needle):
        _exp(spec)


def test_impossible_drafters_are_rejected_before_running():
    with pytest.raises(ExperimentError, match="no MTP layers"):
        plan_replicas(_exp({"method": "mtp", "num_speculative_tokens": 2,
                            "acceptance_rate": 0.5}))
    with pytest.raises(ExperimentError, match="not smaller than the target"):
        plan_replicas(_exp({"method": "draft_model", "draft_model": "llama-3.1-70b",
                            "num_speculative_tokens": 2, "acceptance_rate": 0.5}))
    with pytest.raises(ExperimentError, match="does not fit beside the target"):
        plan_replicas(_exp({"method": "draft_model", "draft_model": "llama-3.1-8b",
                            "num_speculative_tokens": 2, "acceptance_rate": 0.5},
                           model="llama-3.1-70b", tp=2, gpu_memory_utilization=0.95))
