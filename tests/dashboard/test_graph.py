"""The task graph's layout (streamflow/dashboard/graph.py): longest-path columns, no I/O."""

from __future__ import annotations

from streamflow.dag.graph import GraphSpec
from streamflow.dag.tasks import NodeState
from streamflow.dashboard import graph


def test_a_node_sits_one_column_right_of_its_deepest_parent() -> None:
    edges = [("a", "b"), ("b", "c"), ("a", "c"), ("c", "d"), ("e", "d")]
    assert graph.layers(["a", "b", "c", "d", "e"], edges) == {
        "a": 0,
        "b": 1,
        "c": 2,
        "d": 3,
        "e": 0,
    }


def test_a_circle_or_an_unknown_node_does_not_hang_the_layout() -> None:
    assert graph.layers(["a", "b"], [("a", "b"), ("b", "a"), ("x", "a")]) == {"a": 1, "b": 0}


def test_the_drawing_places_boxes_in_columns_and_arrows_between_them() -> None:
    spec = GraphSpec.model_validate(
        {
            "nodes": [
                {"id": "src", "role": "src"},
                {"id": "x", "role": "r"},
                {"id": "y", "role": "r"},
            ],
            "edges": [{"from": "src", "to": "x", "on": "batch"}, {"from": "src", "to": "y"}],
        }
    )
    drawing = graph.draw(spec, {"x": NodeState(state="running", batches_in=2)})
    boxes = {box.id: box for box in drawing.boxes}
    assert boxes["src"].x < boxes["x"].x == boxes["y"].x
    assert boxes["x"].y < boxes["y"].y
    assert (boxes["x"].state.state, boxes["x"].state.batches_in, boxes["y"].state.state) == (
        "running",
        2,
        "queued",
    )
    assert [arrow.on for arrow in drawing.arrows] == ["batch", "done"]
    first = drawing.arrows[0]
    assert (first.x1, first.x2) == (boxes["src"].x + graph.NODE_WIDTH, boxes["x"].x)
    assert drawing.width == boxes["x"].x + graph.NODE_WIDTH + graph.MARGIN
    assert drawing.height == boxes["y"].y + graph.NODE_HEIGHT + graph.MARGIN
