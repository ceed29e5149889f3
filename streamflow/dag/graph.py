"""Task graphs: the spec of a DAG task, how to build and load one, and how it is checked.

A task is a DAG whose nodes are roles (run by workers) or coordinator functions (run by the
coordinator). Edges say when a child runs:

* ``on: batch`` -- once per batch of the parent, as soon as the batch is acknowledged;
* ``on: done`` -- once, when the parent has succeeded (with several parents, ``fan_in`` says
  how many: ``all``, ``any`` or ``{"count": n}``);
* ``on: failure`` -- once, only if the parent fails permanently (a remediation node).

A node's incoming edges are all of one kind. :func:`check` lists every problem of a graph at
once; :meth:`Graph.validated` raises :class:`GraphError` with that list. A graph may have at
most :data:`MAX_NODES` nodes, :data:`MAX_EDGES` edges and :data:`MAX_DOCUMENT_BYTES` of JSON:
the coordinator refuses (fails) a stored task past them too.

What a graph implies (nodes by id, parents, children, a topological order) is computed once per
spec, in linear time, by :class:`GraphIndex`: no step of a task costs more for a bigger graph.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamflow import extras
from streamflow.errors import StreamflowError
from streamflow.keys import NAME_PATTERN
from streamflow.protocol import Headers

Name = Annotated[str, Field(pattern=f"^{NAME_PATTERN.pattern}$")]
#: A coordinator function name: dotted names such as ``merge.generic``.
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*$")]
EdgeKind = Literal["batch", "done", "failure"]

#: The most nodes a task graph may have.
MAX_NODES = 10_000
#: The most edges a task graph may have.
MAX_EDGES = 50_000
#: The largest graph document (JSON or YAML text, or the spec as stored) accepted, in bytes.
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


class GraphError(StreamflowError, ValueError):
    """A task graph is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid task graph:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RetrySpec(_Spec):
    """A node's retry policy; it overrides the role's own policy for this node's jobs."""

    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 3
    backoff: Annotated[float, Field(ge=0, le=86_400)] = 1.0
    factor: Annotated[float, Field(ge=1, le=100)] = 2.0
    max_backoff: Annotated[float, Field(ge=0, le=86_400)] = 300.0


class FanInCount(_Spec):
    """Fan-in ``{"count": n}``: the node runs once ``n`` of its parents have succeeded."""

    count: Annotated[int, Field(ge=1)]


FanIn = Literal["all", "any"] | FanInCount


class NodeSpec(_Spec):
    """One node of a task graph.

    Attributes:
        id: Unique within the graph.
        role: The role whose workers run it; or ``function``, not both.
        function: The coordinator function that runs it, e.g. ``merge.generic``.
        params: The node's parameters, merged over the task's params into its payload.
        retry: Overrides the role's retry policy for this node.
        timeout: Seconds one run may take before it fails.
        fan_in: With several ``on: done`` parents: ``all`` (default), ``any`` or
            ``{"count": n}``.
    """

    id: Name
    role: Name | None = None
    function: FunctionName | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    retry: RetrySpec | None = None
    timeout: Annotated[float, Field(gt=0, le=7 * 86_400)] | None = None
    fan_in: FanIn = "all"


class EdgeSpec(_Spec):
    """An edge from parent ``from`` to child ``to``, taken ``on`` a batch, done or failure."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    source: Name = Field(alias="from")
    target: Name = Field(alias="to")
    on: EdgeKind = "done"


class GraphSpec(_Spec):
    """A task graph as submitted.

    Attributes:
        name: A label for people; not unique.
        params: Task parameters; every node's payload is these updated with its own params.
        nodes: The nodes.
        edges: The edges.
        max_running_nodes: At most this many nodes of the task run at once (None: no limit).
        headers: Headers every node job of the task carries (``ctx.headers``; see the job's
            ``headers`` in docs/protocol.md).
    """

    name: Annotated[str, Field(max_length=200)] = "task"
    params: dict[str, Any] = Field(default_factory=dict)
    nodes: list[NodeSpec]
    edges: list[EdgeSpec] = Field(default_factory=list)
    max_running_nodes: Annotated[int, Field(ge=1)] | None = None
    headers: Headers | None = None

    def node(self, node_id: str) -> NodeSpec:
        """The node called ``node_id`` (the first, if the id is duplicated)."""
        return self.index.nodes[node_id]

    def parents(self, node_id: str) -> list[EdgeSpec]:
        """The edges into ``node_id``, in spec order."""
        return list(self.index.parents.get(node_id, ()))

    def children(self, node_id: str) -> list[EdgeSpec]:
        """The edges out of ``node_id``, in spec order."""
        return list(self.index.children.get(node_id, ()))

    def input_kind(self, node_id: str) -> EdgeKind | None:
        """How the node is fed: ``batch``, ``done``, ``failure``, or None for a source."""
        edges = self.index.parents.get(node_id)
        return edges[0].on if edges else None

    @property
    def index(self) -> GraphIndex:
        """What the graph implies, computed once per spec (see :class:`GraphIndex`)."""
        slot = self._index_slot
        # A model_copy shares the slot: an index built for other node or edge lists is stale.
        if not slot or slot[0].built_for != (id(self.nodes), id(self.edges)):
            slot[:] = [GraphIndex.build(self)]
        return slot[0]

    @functools.cached_property
    def _index_slot(self) -> list[GraphIndex]:
        # A cached_property is not a field: it is neither dumped nor compared.
        return []

    def to_json(self) -> bytes:
        """The spec as JSON, with edge keys ``from`` and ``to`` as written by users."""
        return orjson.dumps(self.model_dump(mode="json", by_alias=True, exclude_defaults=True))


@dataclass(frozen=True, slots=True)
class GraphIndex:
    """What a graph implies, built in linear time once per spec.

    Attributes:
        nodes: Nodes by id (the first of a duplicated id).
        parents: Per node id, the edges into it, in spec order.
        children: Per node id, the edges out of it, in spec order.
        order: Every node id once, parents before children: the sources in spec order, then
            the nodes all of whose parents came before, layer by layer in spec order. Nodes on
            or after a cycle (an invalid graph) come last, in spec order.
        rank: Each node id's position in ``order``.
        roles: The roles its nodes run on.
        built_for: Identities of the node and edge lists it was built from.
    """

    nodes: Mapping[str, NodeSpec]
    parents: Mapping[str, tuple[EdgeSpec, ...]]
    children: Mapping[str, tuple[EdgeSpec, ...]]
    order: tuple[str, ...]
    rank: Mapping[str, int]
    roles: frozenset[str]
    built_for: tuple[int, int]

    @classmethod
    def build(cls, spec: GraphSpec) -> GraphIndex:
        """Index ``spec``: one pass over its nodes and edges, then Kahn's algorithm."""
        nodes: dict[str, NodeSpec] = {}
        for node in spec.nodes:
            nodes.setdefault(node.id, node)
        parents: dict[str, list[EdgeSpec]] = {}
        children: dict[str, list[EdgeSpec]] = {}
        for edge in spec.edges:
            parents.setdefault(edge.target, []).append(edge)
            children.setdefault(edge.source, []).append(edge)
        order = _layered_order(list(nodes), children, parents)
        return cls(
            nodes=nodes,
            parents={k: tuple(v) for k, v in parents.items()},
            children={k: tuple(v) for k, v in children.items()},
            order=tuple(order),
            rank={node_id: i for i, node_id in enumerate(order)},
            roles=frozenset(n.role for n in nodes.values() if n.role is not None),
            built_for=(id(spec.nodes), id(spec.edges)),
        )


def _layered_order(
    ids: list[str], children: dict[str, list[EdgeSpec]], parents: dict[str, list[EdgeSpec]]
) -> list[str]:
    """Kahn's algorithm, layer by layer, each layer in spec order; cycles last, in spec order."""
    position = {node_id: i for i, node_id in enumerate(ids)}
    # Only edges between known nodes count (an edge to a missing node is reported by check).
    waiting = {
        n: sum(1 for e in parents.get(n, ()) if e.source in position and e.source != n) for n in ids
    }
    layer = [n for n in ids if waiting[n] == 0]
    order: list[str] = []
    while layer:
        order += layer
        following: list[tuple[int, str]] = []
        for node_id in layer:
            for edge in children.get(node_id, ()):
                child = edge.target
                if child in waiting and child != node_id:
                    waiting[child] -= 1
                    if waiting[child] == 0:
                        heapq.heappush(following, (position[child], child))
        layer = [heapq.heappop(following)[1] for _ in range(len(following))]
    if len(order) < len(ids):  # a cycle: validation refuses these; place the rest anyway
        placed = set(order)
        order += [n for n in ids if n not in placed]
    return order


class Graph:
    """Build a task graph in Python.

    Example:
        ```python
        graph = streamflow.Graph("etl")
        graph.node("source", role="extract", params={"rows": 1000})
        graph.node("clean", role="transform")
        graph.node("total", function="metrics.aggregate")
        graph.edge("source", "clean", on="batch")
        graph.edge("clean", "total", on="batch")
        task_id = await client.submit(graph)
        ```
    """

    def __init__(
        self,
        name: str = "task",
        *,
        params: Mapping[str, Any] | None = None,
        max_running_nodes: int | None = None,
    ) -> None:
        self.name = name
        self.params = dict(params or {})
        self.max_running_nodes = max_running_nodes
        self._nodes: list[dict[str, Any]] = []
        self._edges: list[dict[str, Any]] = []

    def node(
        self,
        node_id: str,
        *,
        role: str | None = None,
        function: str | None = None,
        params: Mapping[str, Any] | None = None,
        retry: RetrySpec | Mapping[str, Any] | None = None,
        timeout: float | None = None,
        fan_in: Literal["all", "any"] | int = "all",
    ) -> Graph:
        """Add a node run by ``role`` or by the coordinator ``function``; returns the graph."""
        node: dict[str, Any] = {"id": node_id, "params": dict(params or {}), "timeout": timeout}
        node["role"], node["function"] = role, function
        if retry is not None:
            node["retry"] = retry if isinstance(retry, RetrySpec) else dict(retry)
        node["fan_in"] = {"count": fan_in} if isinstance(fan_in, int) else fan_in
        self._nodes.append(node)
        return self

    def edge(self, source: str, target: str, *, on: EdgeKind = "done") -> Graph:
        """Add an edge from ``source`` to ``target``; returns the graph.

        ``on`` is ``batch`` (per batch of the source), ``done`` or ``failure``.
        """
        self._edges.append({"from": source, "to": target, "on": on})
        return self

    def spec(self) -> GraphSpec:
        """The graph as a :class:`GraphSpec` (structure checked, not yet the DAG rules).

        Raises:
            GraphError: A node or edge is malformed.
        """
        return parse(
            {
                "name": self.name,
                "params": self.params,
                "nodes": self._nodes,
                "edges": self._edges,
                "max_running_nodes": self.max_running_nodes,
            }
        )


def parse(document: Any) -> GraphSpec:
    """Read a graph from a parsed JSON/YAML document or a :class:`Graph`.

    Raises:
        GraphError: Listing every structural problem (missing fields, wrong types, bad names).
    """
    if isinstance(document, GraphSpec):
        return document
    if isinstance(document, Graph):
        return document.spec()
    if isinstance(document, dict):
        # Refused before pydantic builds a model per node: a huge graph costs nothing here.
        _raise_over_limits(document.get("nodes"), document.get("edges"))
    try:
        return GraphSpec.model_validate(document)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = _where(document, err["loc"])
            problems.append(f"{where}: {err['msg']}" if where else err["msg"])
        raise GraphError(problems) from None


def load(text: str | bytes, *, filename: str = "") -> GraphSpec:
    """Read a graph from JSON or YAML text (YAML when ``filename`` ends in .yaml or .yml).

    YAML is read with the safe loader: plain data only, never objects. It needs the ``yaml``
    extra (``pip install 'streamflow[yaml]'``); JSON needs nothing more.

    Raises:
        GraphError: The text is over :data:`MAX_DOCUMENT_BYTES`, does not parse, or the graph is
            malformed.
        MissingExtraError: A YAML graph, and the ``yaml`` extra is not installed.
    """
    if len(text) > MAX_DOCUMENT_BYTES:
        raise GraphError([_too_big("the graph document", len(text))])
    if filename.endswith((".yaml", ".yml")):
        yaml = extras.require("yaml", "a YAML task graph")

        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise GraphError([f"not valid YAML: {exc}"]) from None
        # YAML 1.1 reads a bare ``on`` key as the boolean true: give edges their key back.
        edges = document.get("edges") if isinstance(document, dict) else None
        for edge in edges if isinstance(edges, list) else []:
            if isinstance(edge, dict) and True in edge and "on" not in edge:
                edge["on"] = edge.pop(True)
    else:
        try:
            document = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise GraphError([f"not valid JSON: {exc}"]) from None
    if not isinstance(document, dict):
        raise GraphError(["a task graph is an object with 'nodes' and 'edges'"])
    return parse(document)


def check(
    spec: GraphSpec,
    *,
    roles: Collection[str] | None = None,
    functions: Collection[str] | None = None,
) -> list[str]:
    """Every problem of ``spec`` as a DAG, in a stable order; empty when it is valid.

    Args:
        spec: The graph.
        roles: The roles that exist; None skips the check.
        functions: The coordinator functions that exist; None skips the check.
    """
    over = _over_limits(len(spec.nodes), len(spec.edges))
    if over:
        return over  # refused whole: listing a huge graph's every problem helps nobody
    size = len(spec.to_json())
    if size > MAX_DOCUMENT_BYTES:
        return [_too_big("the graph as JSON", size)]
    problems: list[str] = []
    ids = [n.id for n in spec.nodes]
    if not ids:
        problems.append("the graph has no nodes")
    seen: set[str] = set()
    for node_id in ids:
        if node_id in seen:
            problems.append(f"duplicate node id {node_id!r}")
        seen.add(node_id)
    for node in spec.nodes:
        problems += _check_node(node, roles, functions)
    known = set(ids)
    problems += _check_edges(spec, known)
    for node in spec.nodes:
        problems += _check_inputs(spec, node)
    cycle = _find_cycle(ids, [(e.source, e.target) for e in spec.edges if e.target in known])
    if cycle:
        problems.append("cycle: " + _path(cycle))
    return problems


def validated(
    document: Any,
    *,
    roles: Collection[str] | None = None,
    functions: Collection[str] | None = None,
) -> GraphSpec:
    """Parse and check a graph.

    Raises:
        GraphError: Listing every problem found.
    """
    spec = parse(document)
    problems = check(spec, roles=roles, functions=functions)
    if problems:
        raise GraphError(problems)
    return spec


def _check_edges(spec: GraphSpec, known: set[str]) -> list[str]:
    problems = []
    pairs: set[tuple[str, str]] = set()
    for edge in spec.edges:
        name = f"edge {edge.source!r} -> {edge.target!r}"
        for end in (edge.source, edge.target):
            if end not in known:
                problems.append(f"{name}: unknown node {end!r}")
        if edge.source == edge.target:
            problems.append(f"{name}: a node cannot feed itself")
        if (edge.source, edge.target) in pairs:
            problems.append(f"{name}: duplicate edge")
        pairs.add((edge.source, edge.target))
    return problems


def _check_node(
    node: NodeSpec, roles: Collection[str] | None, functions: Collection[str] | None
) -> list[str]:
    name = f"node {node.id!r}"
    if (node.role is None) == (node.function is None):
        return [f"{name}: give exactly one of 'role' or 'function'"]
    if node.role is not None and roles is not None and node.role not in roles:
        known = ", ".join(sorted(roles)) or "none registered"
        return [f"{name}: unknown role {node.role!r} (known: {known})"]
    if node.function is not None and functions is not None and node.function not in functions:
        known = ", ".join(sorted(functions)) or "none"
        return [f"{name}: unknown function {node.function!r} (known: {known})"]
    if node.function is not None and (node.retry is not None or node.timeout is not None):
        return [f"{name}: a coordinator function takes no retry policy or timeout"]
    return []


def _check_inputs(spec: GraphSpec, node: NodeSpec) -> list[str]:
    name = f"node {node.id!r}"
    edges = spec.parents(node.id)
    kinds = {e.on for e in edges}
    problems = []
    if len(kinds) > 1:
        problems.append(
            f"{name}: its incoming edges mix {', '.join(sorted(kinds))}; a node is fed either "
            "per batch, or when its parents are done, or on their failure"
        )
    fan_in = node.fan_in
    if isinstance(fan_in, FanInCount):
        if kinds != {"done"}:
            problems.append(f"{name}: fan_in count needs 'on: done' parents")
        elif fan_in.count > len(edges):
            problems.append(f"{name}: fan_in count {fan_in.count} exceeds its {len(edges)} parents")
    elif fan_in == "any" and kinds != {"done"}:
        # A remediation node runs on the first failure of any parent: it takes no fan_in.
        problems.append(f"{name}: fan_in 'any' needs 'on: done' parents")
    return problems


def _find_cycle(ids: Iterable[str], edges: list[tuple[str, str]]) -> list[str]:
    """One cycle as a closed path of node ids, or an empty list.

    A depth-first search with its own stack (a long chain must not hit Python's recursion
    limit), visiting nodes in ``ids`` order and children in edge order; linear time.
    """
    children: dict[str, list[str]] = {}
    for source, target in edges:
        children.setdefault(source, []).append(target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in ids:
        if root in state:
            continue
        path = [root]
        state[root] = 1
        stack: list[Iterator[str]] = [iter(children.get(root, ()))]
        where = {root: 0}  # position on the path, to cut the cycle out of it
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                done = path.pop()
                state[done] = 2
                del where[done]
            elif state.get(child) == 1:
                return [*path[where[child] :], child]
            elif child not in state:
                state[child] = 1
                where[child] = len(path)
                path.append(child)
                stack.append(iter(children.get(child, ())))
    return []


def _path(cycle: list[str], shown: int = 8) -> str:
    """A cycle for people: a long one shows its ends and how many nodes it skips."""
    if len(cycle) <= 2 * shown + 1:
        return " -> ".join(cycle)
    skipped = len(cycle) - 2 * shown
    return " -> ".join([*cycle[:shown], f"... {skipped:,} more ...", *cycle[-shown:]])


def _over_limits(nodes: int, edges: int) -> list[str]:
    problems = []
    if nodes > MAX_NODES:
        problems.append(f"the graph has {nodes:,} nodes; at most {MAX_NODES:,} are allowed")
    if edges > MAX_EDGES:
        problems.append(f"the graph has {edges:,} edges; at most {MAX_EDGES:,} are allowed")
    return problems


def _raise_over_limits(nodes: Any, edges: Any) -> None:
    over = _over_limits(
        len(nodes) if isinstance(nodes, list) else 0, len(edges) if isinstance(edges, list) else 0
    )
    if over:
        raise GraphError(over)


def _too_big(what: str, size: int) -> str:
    return f"{what} is {size:,} bytes; at most {MAX_DOCUMENT_BYTES:,} are allowed"


def _where(document: Any, loc: tuple[int | str, ...]) -> str:
    """A readable location, naming nodes by id: ``node 'a'.role`` rather than ``nodes.0.role``."""
    parts: list[str] = []
    current = document
    for i, step in enumerate(loc):
        if (
            i > 0
            and loc[i - 1] in ("nodes", "edges")
            and isinstance(step, int)
            and isinstance(current, list)
            and step < len(current)
        ):
            item = current[step]
            label = item.get("id") if isinstance(item, dict) and loc[i - 1] == "nodes" else None
            parts[-1] = f"node {label!r}" if label is not None else f"{loc[i - 1]}[{step}]"
            current = item
            continue
        parts.append(str(step))
        current = current.get(step) if isinstance(current, dict) else None
    return ".".join(parts)
