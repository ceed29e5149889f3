"""A task graph laid out for drawing: longest-path layers as columns, no I/O.

A node's column is the length of the longest path that reaches it from a root, so every edge
points right; nodes of a column are stacked in the graph's order.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamflow.dag.graph import GraphSpec
from streamflow.dag.tasks import NodeState

#: Sizes in SVG user units.
NODE_WIDTH = 200
NODE_HEIGHT = 64
COLUMN_GAP = 40
ROW_GAP = 24
MARGIN = 12


@dataclass(frozen=True, slots=True)
class Box:
    """A node drawn at (x, y), with what it shows."""

    id: str
    x: int
    y: int
    runs: str
    state: NodeState


@dataclass(frozen=True, slots=True)
class Arrow:
    """An edge from the right side of one box to the left side of another."""

    x1: int
    y1: int
    x2: int
    y2: int
    on: str


@dataclass(frozen=True, slots=True)
class Drawing:
    """A laid-out graph: its boxes, arrows and size."""

    boxes: list[Box]
    arrows: list[Arrow]
    width: int
    height: int


def layers(nodes: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    """Each node's column: 0 for a root, else one more than its deepest parent."""
    parents: dict[str, list[str]] = {node: [] for node in nodes}
    for parent, child in edges:
        if parent in parents and child in parents:
            parents[child].append(parent)
    found: dict[str, int] = {}
    for node in nodes:
        _layer(node, parents, found, set())
    return found


def _layer(node: str, parents: dict[str, list[str]], found: dict[str, int], path: set[str]) -> int:
    if node not in found:
        path.add(node)
        # A parent on the path would be a circle, which a submitted graph never has.
        above = [_layer(p, parents, found, path) for p in parents[node] if p not in path]
        found[node] = 1 + max(above) if above else 0
        path.discard(node)
    return found[node]


def draw(spec: GraphSpec, nodes: dict[str, NodeState]) -> Drawing:
    """The boxes and arrows of ``spec``, showing the node states in ``nodes``."""
    ids = [node.id for node in spec.nodes]
    edges = [(edge.source, edge.target) for edge in spec.edges]
    column = layers(ids, edges)
    rows: dict[int, int] = {}
    where: dict[str, tuple[int, int]] = {}
    boxes = []
    for node in spec.nodes:
        col = column[node.id]
        row = rows.get(col, 0)
        rows[col] = row + 1
        x = MARGIN + col * (NODE_WIDTH + COLUMN_GAP)
        y = MARGIN + row * (NODE_HEIGHT + ROW_GAP)
        where[node.id] = (x, y)
        runs = node.role or node.function or ""
        boxes.append(Box(node.id, x, y, runs, nodes.get(node.id) or NodeState()))
    arrows = [
        Arrow(
            where[a][0] + NODE_WIDTH,
            where[a][1] + NODE_HEIGHT // 2,
            where[b][0],
            where[b][1] + NODE_HEIGHT // 2,
            edge.on,
        )
        for edge, (a, b) in zip(spec.edges, edges, strict=True)
        if a in where and b in where
    ]
    width = 2 * MARGIN + max(1, len(rows)) * (NODE_WIDTH + COLUMN_GAP) - COLUMN_GAP
    height = 2 * MARGIN + max(rows.values(), default=1) * (NODE_HEIGHT + ROW_GAP) - ROW_GAP
    return Drawing(boxes, arrows, width, height)
