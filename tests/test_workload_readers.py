"""Trace readers (Veeksha, OpenClaw, Mooncake, Azure): fixtures, strict validation, real data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from simulator.cli_workload import workload_group
from simulator.workload.azure import read_azure
from simulator.workload.compile import compile_workload, load_workload_spec, parse_workload_spec
from simulator.workload.compiled import WorkloadError, validate_compiled
from simulator.workload.graph import compile_graph, graph_positions
from simulator.workload.mooncake import read_mooncake
from simulator.workload.openclaw import read_openclaw
from simulator.workload.stats import graph_stats
from simulator.workload.trace import detect_format, load_trace
from simulator.workload.veeksha import read_veeksha, write_veeksha

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "workloads"
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"real traces not available ({SHARED} is absent)"
)


def parents_of(g, r):
    return g.parent_ids[g.parents_start[r] : g.parents_start[r + 1]].tolist()


# --------------------------------------------------------------------------- Veeksha


def test_veeksha_with_session_context():
    g = read_veeksha(FIX / "veeksha_dag.jsonl")
    assert g.num_requests == 6 and g.num_sessions == 2
    inherited, prompt, _ = graph_positions(g)
    # node 3: history parent 2 (prompt 100 + 20 + 40 = 160, + 10 output) + 50 fresh
    assert prompt.tolist() == [100, 150, 160, 220, 60, 76]
    assert parents_of(g, 3) == [1, 2] and g.history_parent[3] == 2
    assert g.wait.tolist() == [0.0, 0.5, 0.0, 1.25, 0.0, 0.1]
    validate_compiled(compile_graph(g))


def test_veeksha_legacy_chains_by_turn_idx_or_file_order():
    g = read_veeksha(FIX / "veeksha_legacy.jsonl")
    # session "a" ordered by turn_idx (40, 50, 20 fresh), "b" in file order
    assert g.fresh.tolist() == [40, 50, 20, 30, 5]
    assert g.history_parent.tolist() == [-1, 0, 1, -1, 3]
    assert g.wait.tolist() == [0.0, 2.0, 0.5, 0.0, 1.0]


def test_veeksha_round_trip(tmp_path):
    g = read_veeksha(FIX / "veeksha_dag.jsonl")
    write_veeksha(g, tmp_path / "out.jsonl")
    h = read_veeksha(tmp_path / "out.jsonl")
    for name in ("fresh", "output", "history_parent", "wait", "parent_ids", "session"):
        assert np.array_equal(getattr(g, name), getattr(h, name)), name


ROW = {
    "session_id": 1,
    "input_length": 10,
    "new_input_length": 10,
    "output_length": 5,
    "session_context": {
        "node_id": 0,
        "parent_nodes": [],
        "history_parent": None,
        "wait_after_ready": 0.0,
    },
}


def row(node, parents=(), hp=None, **kw):
    r = json.loads(json.dumps(ROW))
    r["session_context"].update(node_id=node, parent_nodes=list(parents), history_parent=hp)
    r.update(kw)
    return json.dumps(r)


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        ([row(0), row(1, [2], 2), row(2, [1], 1)], r"dependency cycle: .*node [12].* -> "),
        ([row(0), row(1, [5], 5)], r":2: session_context\.parent_nodes: unknown parent node 5"),
        (
            [row(0), row(1, [0], None), row(2, [1], 0)],
            r":3: session_context\.history_parent: 0 is not one of parent_nodes \[1\]",
        ),
        ([row(0), row(0)], r":2: session_context\.node_id: duplicate node_id 0 .*first on line 1"),
        ([row(0, output_length=-3)], r":1: output_length: must be >= 1 \(got -3\)"),
        ([row(0, new_input_length=2.5)], r":1: new_input_length: must be an integer"),
        (
            [row(0), json.dumps({k: v for k, v in ROW.items() if k != "session_context"})],
            r":2: session_context: session 1 mixes rows with and without session_context",
        ),
        ([row(0), '{"session_id": 1, "input_length": ', row(1, [0], 0)], r":2: invalid JSON"),
        ([row(0, session_id=None)], r":1: session_id: missing"),
        ([row(0), row(1, [0, 0], 0)], r":2: session_context\.parent_nodes: duplicate parent"),
    ],
)
def test_veeksha_bad_input(tmp_path, lines, pattern):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(WorkloadError, match=pattern) as exc:
        read_veeksha(p)
    assert str(p) in str(exc.value)


def test_bad_trace_via_cli_exits_2(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(row(0) + "\n" + row(1, [7], 7) + "\n")
    res = CliRunner().invoke(workload_group, ["stats", str(p)])
    assert res.exit_code == 2
    assert "bad.jsonl:2: session_context.parent_nodes: unknown parent node 7" in res.output


def test_bad_trace_in_spec_is_reported_at_load(tmp_path):
    (tmp_path / "t.jsonl").write_text(row(0, output_length=0) + "\n")
    (tmp_path / "w.yaml").write_text("kind: trace\npath: t.jsonl\n")
    with pytest.raises(WorkloadError, match=r"w\.yaml: .*t\.jsonl:1: output_length"):
        load_workload_spec(tmp_path / "w.yaml")


# --------------------------------------------------------------------------- OpenClaw


def test_openclaw_fixture_full_history():
    g = read_openclaw(FIX / "openclaw_small.json")
    assert g.num_requests == 6 and g.num_sessions == 1
    assert len(np.unique(g.subsession)) == 2
    # scaffold: common = min cache_read of the roots (800), main part = 1000 - 800
    assert g.prefix_tokens.tolist() == [800, 200]
    inherited, prompt, _ = graph_positions(g)
    order = [g.subsession[r] for r in range(6)]
    assert order[:2] == [0, 0]
    # the main root: 1800 injected + 100 new tokens, 1000 of them served by the scaffold
    assert prompt[0] == 1900 and g.fresh[0] == 900
    # the subagent root depends on m1 without inheriting its history
    sub_root = int(np.flatnonzero(g.subsession == 1)[0])
    assert g.history_parent[sub_root] == -1 and parents_of(g, sub_root) == [1]
    # m3 waits for m2 (history) and the subagent's last request (result)
    m3 = 5
    assert sorted(parents_of(g, m3)) == sorted([4, int(np.flatnonzero(g.subsession == 1)[-1])])
    assert g.wait[4] == 15.0
    validate_compiled(compile_graph(g))


def test_openclaw_measured_history_matches_provider_prompts():
    g = read_openclaw(FIX / "openclaw_small.json", history="measured")
    _, prompt, _ = graph_positions(g)
    raw = json.loads((FIX / "openclaw_small.json").read_text())["nodes"]
    want = sorted(n["usage"]["input"] + n["usage"]["cache_read"] for n in raw)
    assert sorted(prompt.tolist()) == want
    validate_compiled(compile_graph(g))


def _openclaw_variant(tmp_path, mutate) -> Path:
    doc = json.loads((FIX / "openclaw_small.json").read_text())
    mutate(doc)
    p = tmp_path / "oc.json"
    p.write_text(json.dumps(doc, indent=2))
    return p


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (
            lambda d: d["edges"].append(
                {
                    "from": d["nodes"][5]["id"],
                    "to": d["nodes"][1]["id"],
                    "type": "sequential",
                    "is_history_parent": False,
                }
            ),
            "dependency cycle",
        ),
        (lambda d: d["edges"][0].update({"to": "nope"}), r"edges\[0\]: to: unknown node id"),
        (
            lambda d: d["nodes"][3].update({"id": d["nodes"][2]["id"]}),
            r":\d+: nodes\[3\] \(id .*\): id: duplicate node id",
        ),
        (lambda d: d["nodes"][2]["usage"].update({"output": -1}), r"usage\.output: must be >= 1"),
        (
            lambda d: d["nodes"][1]["new_tokens"].update({"total": "many"}),
            r"new_tokens\.total: must be an integer",
        ),
        (lambda d: d["edges"][5].update({"is_history_parent": True}), "two history parents"),
        (lambda d: d["edges"][2].update({"type": "fork"}), r"edges\[2\]: type: must be one of"),
    ],
)
def test_openclaw_bad_input(tmp_path, mutate, pattern):
    p = _openclaw_variant(tmp_path, mutate)
    with pytest.raises(WorkloadError, match=pattern):
        read_openclaw(p)


def test_openclaw_bad_json_names_line(tmp_path):
    p = tmp_path / "oc.json"
    p.write_text('{\n  "nodes": [\n    {"id": 1,}\n  ]\n}\n')
    with pytest.raises(WorkloadError, match=r"oc\.json:3: invalid JSON"):
        read_openclaw(p)


# --------------------------------------------------------------------------- Mooncake, Azure


def test_mooncake_prefix_trie():
    g = read_mooncake(FIX / "mooncake_small.jsonl")
    assert g.num_sessions == 5
    assert g.session_time.tolist() == [0.0, 0.25, 0.5, 1.5, 2.0]  # sorted by timestamp
    _, prompt, _ = graph_positions(g)
    assert prompt.tolist() == [1100, 1600, 1024, 300, 700]
    wl = compile_graph(g)
    # blocks [0, 1] are shared by rows 0, 1, 2 and 4 ([0]); a 1024-token prompt ends at the split
    assert wl.node_num_tokens[wl.path_nodes[wl.req_path_start[0]]] == 512
    assert wl.req_prompt_tokens[2] == 1024
    s = graph_stats(g, wl)
    # cacheable: row 1 reuses 1024 (blocks 0,1), row 2 reuses all 1024, row 4 reuses block 0
    assert s["cacheable_tokens"] == 1024 + 1024 + 512


def test_mooncake_bad_hash_count(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 1100, "output_length": 3, "hash_ids": [1]}\n')
    with pytest.raises(WorkloadError, match=r"m\.jsonl:1: hash_ids: 1 ids for input_length 1100"):
        read_mooncake(p)


def test_azure_reader():
    g = read_azure(FIX / "azure_small.csv")
    assert g.fresh.tolist() == [374, 879, 396, 91]
    assert g.session_time[1] == pytest.approx(0.31941, abs=1e-4)
    assert g.session_time[-1] == pytest.approx(14.81941, abs=1e-4)


def test_azure_bad_rows(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,10,1\n"
        "2023-11-16 18:15:47,abc,3\n"
    )
    with pytest.raises(WorkloadError, match=r"a\.csv:3: ContextTokens: must be an integer"):
        read_azure(p)
    p.write_text("TIMESTAMP,Context\n1,2\n")
    with pytest.raises(WorkloadError, match="missing column"):
        read_azure(p)


def test_detect_format():
    assert detect_format(FIX / "veeksha_dag.jsonl") == "veeksha"
    assert detect_format(FIX / "mooncake_small.jsonl") == "mooncake"
    assert detect_format(FIX / "openclaw_small.json") == "openclaw"
    assert detect_format(FIX / "azure_small.csv") == "azure"


def test_trace_spec_resolves_path_against_its_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the path inside the spec is relative to the spec's folder
    spec = load_workload_spec(FIX / "trace_veeksha.yaml")
    assert Path(spec.path).is_absolute() and spec.format == "veeksha"
    wl = compile_workload(spec, 0)
    assert wl.num_requests == 4 + 2 + 4 + 2 + 4  # sessions 7, 8, then a reshuffled pass
    # inline in an experiment: resolved against the experiment file named by the source
    shutil.copy(FIX / "veeksha_dag.jsonl", tmp_path / "t.jsonl")
    (tmp_path / "exp.yaml").write_text("x: 1\n")
    spec2 = parse_workload_spec(
        {"kind": "trace", "path": "t.jsonl"}, f"{tmp_path / 'exp.yaml'}: workload"
    )
    assert Path(spec2.path) == (tmp_path / "t.jsonl").resolve()
    with pytest.raises(WorkloadError, match="path: trace file not found"):
        parse_workload_spec({"kind": "trace", "path": "missing.jsonl"}, "w.yaml")
    with pytest.raises(WorkloadError, match="history: only for format openclaw"):
        parse_workload_spec(
            {"kind": "trace", "path": str(FIX / "veeksha_dag.jsonl"), "history": "measured"},
            "w.yaml",
        )


# --------------------------------------------------------------------------- real traces


@needs_shared
def test_real_veeksha_traces():
    lin = load_trace(SHARED / "veeksha_traces" / "workload_a_linear.jsonl")
    dag = load_trace(SHARED / "veeksha_traces" / "workload_b_dag.jsonl")
    assert (lin.num_requests, lin.num_sessions, dag.num_requests, dag.num_sessions) == (
        150,
        30,
        150,
        10,
    )
    # design totals (workload_shape_metadata.json): effective input 315,000 vs 379,000
    assert graph_positions(lin)[1].sum() == 315_000
    assert graph_positions(dag)[1].sum() == 379_000
    raw = [json.loads(x) for x in (SHARED / "veeksha_traces" / "workload_b_dag.jsonl").open()]
    assert sorted(graph_positions(dag)[1].tolist()) == sorted(r["input_length"] for r in raw)


@needs_shared
def test_real_openclaw_traces():
    s = graph_stats(load_trace(SHARED / "openclaw" / "case2_branching.json"))
    assert (s["requests"], s["agent_runs"]) == (575, 34)  # 35 listed sessions, one empty
    assert s["depth"]["max"] == 44 and s["width"]["max"] == 25  # README figures
    assert s["fan_in"]["max"] == 2 and s["fan_out"]["max"] == 2
    m = graph_stats(
        load_trace(
            SHARED / "openclaw" / "case1_interp.json",
            "openclaw",
            (("history", "measured"), ("scaffold", "observed")),
        )
    )
    assert m["max_context"] - int(m["output"]["max"]) <= 117_247 <= m["max_context"]
    assert m["wait_after_ready"]["p50"] == pytest.approx(0.032)


@needs_shared
def test_real_mooncake_reuse_matches_readme():
    # README: 36.6% (conversation) and 64.0% (synthetic) of blocks seen before
    for name, want in (("conversation_trace.jsonl", 0.366), ("synthetic_trace.jsonl", 0.640)):
        s = graph_stats(load_trace(SHARED / "mooncake" / name))
        assert s["cacheable_fraction"] == pytest.approx(want, abs=0.015)


@needs_shared
def test_real_azure_traces():
    for name, rows, mean_ctx in (("code", 8819, 2048), ("conv", 19366, 1155)):
        g = load_trace(SHARED / "azure_2023" / f"AzureLLMInferenceTrace_{name}.csv")
        assert g.num_requests == rows
        assert g.fresh.mean() == pytest.approx(mean_ctx, abs=1)


def test_veeksha_rows_out_of_order_are_sorted_topologically(tmp_path):
    p = tmp_path / "rev.jsonl"
    p.write_text("\n".join([row(2, [1], 1), row(1, [0], 0), row(0)]) + "\n")
    g = read_veeksha(p)
    assert g.history_parent.tolist() == [-1, 0, 1]
    assert graph_positions(g)[1].tolist() == [10, 25, 40]
