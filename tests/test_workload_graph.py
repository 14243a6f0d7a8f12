"""Session graphs compiled to content trees: positions, compression, splits, compaction."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.workload.compiled import WorkloadError, validate_compiled
from simulator.workload.graph import (
    KIND_COMPACTION,
    add_dependencies,
    apply_compaction,
    compile_graph,
    csr_from_edges,
    graph_positions,
    make_graph,
    select_sessions,
    topo_order,
    validate_graph,
)

DAG_PARENTS = {
    0: [],
    1: [0],
    2: [1],
    3: [1],
    4: [1],
    5: [2],
    6: [2],
    7: [2],
    8: [3],
    9: [3],
    10: [3],
    11: [4],
    12: [4],
    13: [4],
    14: [1, 7, 10, 13],
}
DAG_HISTORY = [-1, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 13]


def graph_from(parents: dict, history: list[int], fresh=500, output=300, **kw):
    n = len(parents)
    child = [c for c in parents for _ in parents[c]]
    par = [p for c in parents for p in parents[c]]
    ps, pid = csr_from_edges(n, np.array(child, dtype=np.int64), np.array(par, dtype=np.int64))
    return make_graph(
        session=kw.pop("session", np.zeros(n)),
        fresh=np.broadcast_to(fresh, (n,)),
        output=np.broadcast_to(output, (n,)),
        parents_start=ps,
        parent_ids=pid,
        history_parent=history,
        **kw,
    )


def chain(n: int, **kw):
    return graph_from({i: ([i - 1] if i else []) for i in range(n)}, list(range(-1, n - 1)), **kw)


def path(wl, r: int) -> list[int]:
    return wl.path_nodes[wl.req_path_start[r] : wl.req_path_start[r + 1]].tolist()


def history_ancestors(g, r: int) -> set[int]:
    out = set()
    while g.history_parent[r] >= 0:
        r = int(g.history_parent[r])
        out.add(r)
    return out


def assert_end_rule(g, wl) -> None:
    """Requests ending inside one content node are history ancestors of one another."""
    last = wl.path_nodes[wl.req_path_start[1:] - 1]
    for c in np.unique(last):
        reqs = np.flatnonzero(last == c)
        for a, b in zip(reqs[:-1], reqs[1:], strict=True):
            assert a in history_ancestors(g, int(b)), (c, a, b)


def test_veeksha_dag_prompts_and_tree():
    g = graph_from(DAG_PARENTS, DAG_HISTORY)
    wl = compile_graph(g)
    assert wl.req_prompt_tokens.tolist() == [500, 1300, 2100, 2100, 2100] + [2900] * 9 + [3700]
    # 0 and 1 form one node; 13 and its only history child 14 form one node
    assert path(wl, 0) == path(wl, 1) == [0]
    assert path(wl, 13) == path(wl, 14)
    assert len({tuple(path(wl, r)) for r in range(5, 14)}) == 9  # siblings end in distinct nodes
    assert wl.num_nodes == 13
    assert_end_rule(g, wl)


def test_long_chain_is_one_node():
    g = chain(130, fresh=500, output=200)
    wl = compile_graph(g)
    assert wl.num_nodes == 1 and wl.path_nodes.shape[0] == 130
    assert wl.node_num_tokens[0] == 130 * 700
    assert wl.req_prompt_tokens[-1] == 129 * 700 + 500


def test_prefix_forest_and_partial_history():
    ps, pid = csr_from_edges(4, np.array([1, 2]), np.array([0, 1]))
    g = make_graph(
        session=[0, 0, 0, 1],
        fresh=[10, 20, 30, 5],
        output=[5, 5, 5, 5],
        parents_start=ps,
        parent_ids=pid,
        history_parent=[-1, 0, 1, -1],
        history_tokens=[-1, 120, -1, -1],
        prefix=[1, -1, -1, 1],
        prefix_parent=[-1, 0],
        prefix_tokens=[100, 50],
    )
    wl = compile_graph(g)
    # r1 inherits 120 tokens: the shared scaffold is cut at 120 (inside its second part)
    assert wl.req_prompt_tokens.tolist() == [160, 140, 175, 155]
    assert wl.node_start_tokens[path(wl, 1)].tolist() == [0, 120]
    assert wl.node_num_tokens[path(wl, 0)[0]] == 120  # system + first 20 tool tokens
    assert path(wl, 0)[:2] == path(wl, 3)[:2] and path(wl, 0)[-1] != path(wl, 3)[-1]
    assert path(wl, 1) == path(wl, 2)  # r2 extends r1's conversation
    assert_end_rule(g, wl)


def test_history_tokens_longer_than_parent_is_an_error():
    g = chain(2, history_tokens=[-1, 10_000])
    with pytest.raises(WorkloadError, match="history_tokens = 10000"):
        compile_graph(g)


def test_compaction_restarts_chain_from_scaffold():
    n = 10
    g = chain(
        n,
        fresh=100,
        output=50,
        prefix=np.r_[0, np.full(n - 1, -1)],
        prefix_parent=[-1],
        prefix_tokens=[200],
        wait=np.full(n, 0.5),
    )
    g2 = apply_compaction(g, 700, 30, 40)
    _, prompt, end = graph_positions(g2)
    comp = np.flatnonzero(g2.kind == KIND_COMPACTION)
    assert comp.size >= 2
    k = int(comp[0])
    # the compaction request inherits the history and takes over the wait
    assert g2.history_parent[k] == k - 1 and g2.wait[k] == 0.5 and g2.output[k] == 40
    # the next request restarts from scaffold + summary + its fresh input, after k, no wait
    r = k + 1
    assert g2.history_parent[r] == -1 and g2.prefix[r] == 0
    assert prompt[r] == 200 + 40 + 100 and g2.wait[r] == 0.0
    assert g2.parent_ids[g2.parents_start[r] : g2.parents_start[r + 1]].tolist() == [k]
    # no ordinary request exceeds the limit
    assert np.all(end[g2.kind == 0] <= 700)
    wl = compile_graph(g2)
    assert_end_rule(g2, wl)
    validate_compiled(wl)


def test_select_sessions_copies_and_renumbers():
    a = chain(3)
    b = graph_from({0: [], 1: [0], 2: [0]}, [-1, 0, 0])
    both = make_graph(
        session=[0, 0, 0, 1, 1, 1],
        fresh=np.r_[a.fresh, b.fresh],
        output=np.r_[a.output, b.output],
        parents_start=np.r_[a.parents_start, b.parents_start[1:] + 2],
        parent_ids=np.r_[a.parent_ids, b.parent_ids + 3],
        history_parent=[-1, 0, 1, -1, 3, 3],
        session_time=[5.0, 7.0],
    )
    validate_graph(both)
    sel = select_sessions(both, np.array([1, 0, 1]))
    assert sel.session.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert sel.history_parent.tolist() == [-1, 0, 0, -1, 3, 4, -1, 6, 6]
    assert sel.session_time.tolist() == [7.0, 5.0, 7.0]
    assert len(np.unique(sel.subsession)) == 3
    validate_graph(sel)


def test_validation_errors():
    g = chain(3)
    with pytest.raises(WorkloadError, match="history parent 0 is not one of its parents"):
        validate_graph(graph_from({0: [], 1: [], 2: [1]}, [-1, 0, 1]))
    bad = make_graph(
        session=[0, 0], fresh=[1, -1], output=[1, 1], parents_start=[0, 0, 0], parent_ids=[]
    )
    with pytest.raises(WorkloadError, match="fresh input tokens = -1"):
        validate_graph(bad)
    with pytest.raises(WorkloadError, match="empty prompt"):
        compile_graph(
            make_graph(session=[0], fresh=[0], output=[3], parents_start=[0, 0], parent_ids=[])
        )
    with pytest.raises(WorkloadError, match="every parent must come before"):
        add_dependencies(g, np.array([0]), np.array([2]))


def test_topo_order_and_cycle_detection():
    ps, pid = csr_from_edges(4, np.array([0, 2, 3]), np.array([3, 0, 1]))
    order = topo_order(4, ps, pid)
    assert order.tolist() == [1, 3, 0, 2]
    ps, pid = csr_from_edges(3, np.array([0, 1]), np.array([1, 0]))
    assert topo_order(3, ps, pid).tolist() == [2]  # 0 and 1 form a cycle


def test_session_start_sets_root_arrivals():
    g = select_sessions(chain(3), np.array([0, 0]))
    wl = compile_graph(g, np.array([1.0, 4.0]))
    assert wl.req_arrival_time.tolist() == [1.0, 0.0, 0.0, 4.0, 0.0, 0.0]
