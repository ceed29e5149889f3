"""Unit tests of task graphs: the builder, parse/load, and the DAG checks (no Redis)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from streamflow.dag.graph import (
    MAX_DOCUMENT_BYTES,
    MAX_EDGES,
    MAX_NODES,
    EdgeSpec,
    FanInCount,
    Graph,
    GraphError,
    GraphSpec,
    NodeSpec,
    RetrySpec,
    check,
    load,
    parse,
    validated,
)

NAME_RULE = "String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}$'"

#: Calls made by YAML tags that construct Python objects; the safe loader must make none.
CALLS: list[str] = []


def record_call(*args: Any) -> str:
    CALLS.append(repr(args))
    return "called"


def role(node_id: str, name: str = "work", **fields: Any) -> dict[str, Any]:
    return {"id": node_id, "role": name, **fields}


def edge(source: str, target: str, on: str = "done") -> dict[str, Any]:
    return {"from": source, "to": target, "on": on}


def problems_of(document: Any, **known: Any) -> list[str]:
    with pytest.raises(GraphError) as caught:
        validated(document, **known)
    return caught.value.problems


# -- the builder ---------------------------------------------------------------------------


def test_builder_produces_the_spec_it_describes() -> None:
    graph = Graph("etl", params={"rows": 10}, max_running_nodes=2)
    returned = graph.node("src", role="extract", params={"size": 5}, timeout=30)
    graph.node("clean", role="transform", retry={"max_attempts": 5, "backoff": 0.5})
    graph.node("join", role="join", fan_in=1).node("total", function="metrics.aggregate")
    graph.edge("src", "clean", on="batch").edge("src", "join").edge("clean", "join")
    graph.edge("clean", "total", on="batch")

    spec = graph.spec()

    assert returned is graph
    assert spec == GraphSpec(
        name="etl",
        params={"rows": 10},
        max_running_nodes=2,
        nodes=[
            NodeSpec(id="src", role="extract", params={"size": 5}, timeout=30),
            NodeSpec(id="clean", role="transform", retry=RetrySpec(max_attempts=5, backoff=0.5)),
            NodeSpec(id="join", role="join", fan_in=FanInCount(count=1)),
            NodeSpec(id="total", function="metrics.aggregate"),
        ],
        edges=[
            EdgeSpec(source="src", target="clean", on="batch"),
            EdgeSpec(source="src", target="join", on="done"),
            EdgeSpec(source="clean", target="join", on="done"),
            EdgeSpec(source="clean", target="total", on="batch"),
        ],
    )
    assert (
        check(spec, roles={"extract", "transform", "join"}, functions={"metrics.aggregate"}) == []
    )


def test_builder_accepts_a_retry_spec_object_and_any_fan_in() -> None:
    retry = RetrySpec(max_attempts=2)
    graph = Graph().node("a", role="r").node("b", role="r").node("c", role="r", fan_in="any")
    graph.node("d", role="r", retry=retry).edge("a", "c").edge("b", "c").edge("c", "d")

    spec = validated(graph)

    assert spec.name == "task"
    assert spec.node("c").fan_in == "any"
    assert spec.node("d").retry == retry
    assert spec.max_running_nodes is None


def test_builder_reports_malformed_nodes_by_id() -> None:
    graph = Graph().node("a:b", role="r").node("ok", role="bad{role}").edge("a:b", "ok")

    with pytest.raises(GraphError) as caught:
        graph.spec()

    assert caught.value.problems == [
        f"node 'a:b'.id: {NAME_RULE}",
        f"node 'ok'.role: {NAME_RULE}",
        f"edges[0].from: {NAME_RULE}",
    ]


def test_spec_queries_follow_the_edges() -> None:
    spec = validated(
        {
            "nodes": [role("a"), role("b"), role("c"), role("fix")],
            "edges": [
                edge("a", "b", "batch"),
                edge("a", "c"),
                edge("b", "c"),
                edge("a", "fix", "failure"),
            ],
        }
    )

    assert spec.node("b") == NodeSpec(id="b", role="work")
    with pytest.raises(KeyError):
        spec.node("nope")
    assert [e.target for e in spec.children("a")] == ["b", "c", "fix"]
    assert [e.source for e in spec.parents("c")] == ["a", "b"]
    assert spec.input_kind("a") is None
    assert spec.input_kind("b") == "batch"
    assert spec.input_kind("c") == "done"
    assert spec.input_kind("fix") == "failure"


# -- parse and load ------------------------------------------------------------------------


GRAPH_DOC = {
    "name": "chain",
    "params": {"n": 3},
    "nodes": [role("src", "extract"), {"id": "sum", "function": "metrics.aggregate"}],
    "edges": [edge("src", "sum", "batch")],
}


def test_parse_passes_specs_through_and_builds_graphs() -> None:
    spec = parse(GRAPH_DOC)

    assert parse(spec) is spec
    assert parse(Graph("g").node("a", role="r")) == GraphSpec(
        name="g", nodes=[NodeSpec(id="a", role="r")]
    )
    assert spec.edges == [EdgeSpec(source="src", target="sum", on="batch")]


def test_to_json_round_trips_with_user_edge_keys() -> None:
    spec = parse({**GRAPH_DOC, "nodes": [*GRAPH_DOC["nodes"], role("j", fan_in={"count": 1})]})

    doc = orjson.loads(spec.to_json())

    assert doc["edges"] == [{"from": "src", "to": "sum", "on": "batch"}]
    assert doc["nodes"][2] == {"id": "j", "role": "work", "fan_in": {"count": 1}}
    assert parse(doc) == spec
    assert load(spec.to_json()) == spec


def test_load_reads_json_text_and_bytes() -> None:
    raw = orjson.dumps(GRAPH_DOC)

    assert load(raw) == parse(GRAPH_DOC)
    assert load(raw.decode(), filename="graph.json") == parse(GRAPH_DOC)


@pytest.mark.parametrize("filename", ["graph.yaml", "graph.yml"])
def test_load_reads_yaml(filename: str) -> None:
    text = """
name: chain
params: {n: 3}
nodes:
  - {id: src, role: extract}
  - {id: sum, function: metrics.aggregate}
edges:
  - {from: src, to: sum, "on": batch}
"""
    assert load(text, filename=filename) == parse(GRAPH_DOC)


def test_load_reads_yaml_edges_written_with_a_bare_on_key() -> None:
    text = """
nodes:
  - {id: src, role: extract}
  - {id: each, role: transform}
edges:
  - from: src
    to: each
    on: batch
"""
    spec = load(text, filename="graph.yaml")

    assert spec.edges == [EdgeSpec(source="src", target="each", on="batch")]


def test_yaml_is_read_with_the_safe_loader() -> None:
    CALLS.clear()
    text = (
        "name: !!python/object/apply:tests.dag.test_graph.record_call [pwned]\n"
        "nodes: [{id: a, role: r}]\n"
    )

    with pytest.raises(GraphError) as caught:
        load(text, filename="evil.yaml")

    [problem] = caught.value.problems
    assert problem.startswith("not valid YAML: could not determine a constructor for the tag")
    assert "python/object/apply:tests.dag.test_graph.record_call" in problem
    assert CALLS == []


def test_yaml_python_object_tag_is_refused() -> None:
    text = "!!python/object:streamflow.dag.graph.Graph {name: x}\n"

    with pytest.raises(GraphError) as caught:
        load(text, filename="g.yml")

    assert "tag:yaml.org,2002:python/object:streamflow.dag.graph.Graph" in caught.value.problems[0]


@pytest.mark.parametrize(
    ("text", "filename", "expected"),
    [
        ("{", "", "not valid JSON: "),
        ("nodes: [1", "g.yaml", "not valid YAML: "),
        ("[1, 2]", "", "a task graph is an object with 'nodes' and 'edges'"),
        ("just text", "g.yaml", "a task graph is an object with 'nodes' and 'edges'"),
        ("", "g.yaml", "a task graph is an object with 'nodes' and 'edges'"),
    ],
)
def test_load_refuses_text_that_is_not_a_graph_object(
    text: str, filename: str, expected: str
) -> None:
    with pytest.raises(GraphError) as caught:
        load(text, filename=filename)

    [problem] = caught.value.problems
    assert problem.startswith(expected)


# -- checks --------------------------------------------------------------------------------


INVALID = [
    pytest.param(
        {
            "nodes": [role("a"), role("b"), role("c")],
            "edges": [edge("a", "b"), edge("b", "c"), edge("c", "a")],
        },
        {},
        ["cycle: a -> b -> c -> a"],
        id="cycle",
    ),
    pytest.param(
        {"nodes": [role("a"), role("b")], "edges": [edge("a", "ghost"), edge("spook", "b")]},
        {},
        ["edge 'a' -> 'ghost': unknown node 'ghost'", "edge 'spook' -> 'b': unknown node 'spook'"],
        id="unknown-node-in-edge",
    ),
    pytest.param(
        {"nodes": [role("a"), role("b"), role("a", "other")]},
        {},
        ["duplicate node id 'a'"],
        id="duplicate-node-id",
    ),
    pytest.param(
        {"nodes": [role("a", "extract"), role("b", "transfrom")], "edges": [edge("a", "b")]},
        {"roles": {"extract", "transform"}},
        ["node 'b': unknown role 'transfrom' (known: extract, transform)"],
        id="unknown-role",
    ),
    pytest.param(
        {"nodes": [role("a", "extract")]},
        {"roles": set()},
        ["node 'a': unknown role 'extract' (known: none registered)"],
        id="unknown-role-none-registered",
    ),
    pytest.param(
        {"nodes": [role("a"), {"id": "m", "function": "merge.generc"}], "edges": [edge("a", "m")]},
        {"functions": {"merge.generic", "metrics.aggregate"}},
        ["node 'm': unknown function 'merge.generc' (known: merge.generic, metrics.aggregate)"],
        id="unknown-function",
    ),
    pytest.param(
        {"nodes": [role("a")], "edges": [edge("a", "a", "batch")]},
        {},
        ["edge 'a' -> 'a': a node cannot feed itself", "cycle: a -> a"],
        id="self-loop",
    ),
    pytest.param(
        {"nodes": [role("a"), role("b")], "edges": [edge("a", "b"), edge("a", "b")]},
        {},
        ["edge 'a' -> 'b': duplicate edge"],
        id="duplicate-edge",
    ),
    pytest.param(
        {
            "nodes": [role("a"), role("b"), role("c")],
            "edges": [edge("a", "c", "batch"), edge("b", "c", "done")],
        },
        {},
        [
            "node 'c': its incoming edges mix batch, done; a node is fed either per batch, "
            "or when its parents are done, or on their failure"
        ],
        id="mixed-incoming-kinds",
    ),
    pytest.param(
        {
            "nodes": [role("a"), role("b"), role("c", fan_in={"count": 3})],
            "edges": [edge("a", "c"), edge("b", "c")],
        },
        {},
        ["node 'c': fan_in count 3 exceeds its 2 parents"],
        id="fan-in-count-exceeds-parents",
    ),
    pytest.param(
        {"nodes": [role("a"), role("b", fan_in={"count": 1})], "edges": [edge("a", "b", "batch")]},
        {},
        ["node 'b': fan_in count needs 'on: done' parents"],
        id="fan-in-count-on-per-batch-node",
    ),
    pytest.param(
        {"nodes": [role("a"), role("b", fan_in="any")], "edges": [edge("a", "b", "batch")]},
        {},
        ["node 'b': fan_in 'any' needs 'on: done' parents"],
        id="fan-in-any-on-per-batch-node",
    ),
    pytest.param(
        {"nodes": [{"id": "a", "role": "r", "function": "merge.generic"}]},
        {},
        ["node 'a': give exactly one of 'role' or 'function'"],
        id="role-and-function",
    ),
    pytest.param(
        {"nodes": [{"id": "a"}]},
        {},
        ["node 'a': give exactly one of 'role' or 'function'"],
        id="neither-role-nor-function",
    ),
    pytest.param(
        {"nodes": [{"id": "m", "function": "merge.generic", "timeout": 5}]},
        {},
        ["node 'm': a coordinator function takes no retry policy or timeout"],
        id="function-with-timeout",
    ),
    pytest.param({"nodes": []}, {}, ["the graph has no nodes"], id="no-nodes"),
    pytest.param({"edges": []}, {}, ["nodes: Field required"], id="missing-nodes"),
    pytest.param(
        {"nodes": [role("a:b")]}, {}, [f"node 'a:b'.id: {NAME_RULE}"], id="colon-in-node-id"
    ),
    pytest.param(
        {"nodes": [role("a", "r{x}")]}, {}, [f"node 'a'.role: {NAME_RULE}"], id="brace-in-role"
    ),
    pytest.param(
        {"nodes": [role("a")], "edges": [edge("a", "b}")]},
        {},
        [f"edges[0].to: {NAME_RULE}"],
        id="brace-in-edge",
    ),
    pytest.param(
        {"nodes": [{"id": "m", "function": "merge:generic"}]},
        {},
        [
            "node 'm'.function: String should match pattern "
            "'^[A-Za-z][A-Za-z0-9_]*(\\.[A-Za-z][A-Za-z0-9_]*)*$'"
        ],
        id="colon-in-function",
    ),
    pytest.param(
        {"nodes": [role("a", colour="red")], "edges": [{"from": "a", "to": "a", "on": "later"}]},
        {},
        [
            "node 'a'.colour: Extra inputs are not permitted",
            "edges[0].on: Input should be 'batch', 'done' or 'failure'",
        ],
        id="unknown-field-and-edge-kind",
    ),
]


@pytest.mark.parametrize(("document", "known", "expected"), INVALID)
def test_invalid_graphs_are_rejected_with_their_problems(
    document: dict[str, Any], known: dict[str, Any], expected: list[str]
) -> None:
    assert problems_of(document, **known) == expected


def test_every_problem_is_reported_at_once() -> None:
    document = {
        "nodes": [
            role("a", "extract"),
            role("b", "transfrom"),
            role("a", "extract"),
            role("c", fan_in={"count": 2}),
            {"id": "m", "role": "extract", "function": "merge.generic"},
        ],
        "edges": [
            edge("a", "b"),
            edge("b", "a"),
            edge("b", "ghost"),
            edge("a", "c", "batch"),
        ],
    }

    with pytest.raises(GraphError) as caught:
        validated(document, roles={"extract", "work"}, functions={"merge.generic"})

    expected = [
        "duplicate node id 'a'",
        "node 'b': unknown role 'transfrom' (known: extract, work)",
        "node 'm': give exactly one of 'role' or 'function'",
        "edge 'b' -> 'ghost': unknown node 'ghost'",
        "node 'c': fan_in count needs 'on: done' parents",
        "cycle: a -> b -> a",
    ]
    assert caught.value.problems == expected
    assert str(caught.value) == "invalid task graph:\n" + "\n".join(f"  - {p}" for p in expected)
    assert check(parse(document), roles={"extract", "work"}, functions={"merge.generic"}) == (
        expected
    )


def test_every_structural_problem_is_reported_at_once() -> None:
    document = {
        "name": "x" * 201,
        "nodes": [role("a:1"), {"id": "b", "role": "r", "timeout": 0}, {"role": "r"}],
        "edges": [{"from": "a", "on": "done"}],
        "max_running_nodes": 0,
    }

    problems = problems_of(document)

    assert problems == [
        "name: String should have at most 200 characters",
        f"node 'a:1'.id: {NAME_RULE}",
        "node 'b'.timeout: Input should be greater than 0",
        "nodes[2].id: Field required",
        "edges[0].to: Field required",
        "max_running_nodes: Input should be greater than or equal to 1",
    ]


def test_role_and_function_checks_are_skipped_when_not_given() -> None:
    spec = parse({"nodes": [role("a", "anything"), {"id": "m", "function": "some.thing"}]})

    assert check(spec) == []
    assert check(spec, roles={"anything"}, functions={"some.thing"}) == []
    assert check(spec, roles=set(), functions=set()) == [
        "node 'a': unknown role 'anything' (known: none registered)",
        "node 'm': unknown function 'some.thing' (known: none)",
    ]


def test_valid_shapes_pass_the_checks() -> None:
    document = {
        "nodes": [
            role("src"),
            role("side"),
            role("each"),
            role("join", fan_in={"count": 2}),
            role("first", fan_in="any"),
            role("fix"),
            {"id": "total", "function": "metrics.aggregate"},
        ],
        "edges": [
            edge("src", "each", "batch"),
            edge("each", "total", "batch"),
            edge("src", "join"),
            edge("side", "join"),
            edge("src", "first"),
            edge("side", "first"),
            edge("src", "fix", "failure"),
            edge("side", "fix", "failure"),
        ],
    }

    spec = validated(document, roles={"work"}, functions={"metrics.aggregate"})

    assert [n.id for n in spec.nodes] == ["src", "side", "each", "join", "first", "fix", "total"]


def chain_document(length: int) -> dict[str, Any]:
    nodes = [role(f"n{i}") for i in range(length)]
    return {"nodes": nodes, "edges": [edge(f"n{i}", f"n{i + 1}") for i in range(length - 1)]}


def fan_out_document(children: int) -> dict[str, Any]:
    nodes = [role("root"), *(role(f"c{i}") for i in range(children))]
    return {"nodes": nodes, "edges": [edge("root", f"c{i}") for i in range(children)]}


@pytest.mark.slow
@pytest.mark.parametrize("length", [1_000, 5_000, MAX_NODES])
def test_a_long_chain_validates_without_recursion(length: int) -> None:
    spec = validated(chain_document(length), roles={"work"})

    assert spec.index.order == tuple(f"n{i}" for i in range(length))
    assert spec.parents(f"n{length - 1}") == [
        EdgeSpec(source=f"n{length - 2}", target=f"n{length - 1}")
    ]


def test_a_long_cycle_is_found_and_shown_shortened() -> None:
    document = chain_document(3_000)
    document["edges"].append(edge("n2999", "n5"))

    with pytest.raises(GraphError) as caught:
        validated(document, roles={"work"})

    (problem,) = caught.value.problems
    assert problem.startswith("cycle: n5 -> n6 -> ")
    assert "... 2,980 more ..." in problem
    assert problem.endswith("-> n2998 -> n2999 -> n5")


def test_the_widest_fan_out_allowed_validates() -> None:
    spec = validated(fan_out_document(MAX_NODES - 1), roles={"work"})

    assert len(spec.children("root")) == MAX_NODES - 1
    assert spec.index.order[0] == "root"


def test_twenty_thousand_children_are_refused_at_once_by_the_size_limit() -> None:
    document = fan_out_document(20_000)

    with pytest.raises(GraphError) as caught:
        validated(document, roles={"work"})

    assert caught.value.problems == ["the graph has 20,001 nodes; at most 10,000 are allowed"]
    # The same answer for a spec that got past parse (built in Python, or stored).
    spec = GraphSpec.model_construct(
        nodes=[NodeSpec(**n) for n in document["nodes"]],
        edges=[EdgeSpec.model_validate(e) for e in document["edges"]],
    )
    assert check(spec) == caught.value.problems


def test_too_many_edges_and_too_large_a_document_are_refused() -> None:
    document = chain_document(300)
    document["edges"] = [edge("n0", "n1")] * (MAX_EDGES + 1)
    with pytest.raises(GraphError) as caught:
        parse(document)
    assert caught.value.problems == ["the graph has 50,001 edges; at most 50,000 are allowed"]

    big = orjson.dumps({"params": {"blob": "x" * MAX_DOCUMENT_BYTES}, "nodes": [role("a")]})
    with pytest.raises(GraphError) as caught:
        load(big)
    assert caught.value.problems == [
        f"the graph document is {len(big):,} bytes; at most 4,194,304 are allowed"
    ]
    # Built in Python, the same limit holds for the spec as it would be stored.
    spec = parse({"params": {"blob": "x" * MAX_DOCUMENT_BYTES}, "nodes": [role("a")]})
    (problem,) = check(spec)
    assert problem.startswith("the graph as JSON is ") and "at most 4,194,304" in problem


def test_the_order_puts_parents_first_layer_by_layer_in_spec_order() -> None:
    document = {
        "nodes": [role("d"), role("b"), role("a"), role("c"), role("e")],
        "edges": [edge("a", "d"), edge("b", "d"), edge("d", "e"), edge("c", "e")],
    }

    spec = validated(document)

    assert spec.index.order == ("b", "a", "c", "d", "e")
    assert spec.index is spec.index  # built once
    copied = spec.model_copy(update={"nodes": spec.nodes[:3], "edges": []})
    assert copied.index.order == ("d", "b", "a")  # a copy with other nodes is indexed anew
    assert spec.index.order == ("b", "a", "c", "d", "e")
