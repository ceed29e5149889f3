"""Task graphs: the spec of a DAG task, how to build and load one, and how it is checked.

A task is a DAG whose nodes are roles (run by workers) or coordinator functions (run by the
coordinator). Edges say when a child runs:

* ``on: batch`` -- once per batch of the parent, as soon as the batch is acknowledged;
* ``on: done`` -- once, when the parent has succeeded (with several parents, ``fan_in`` says
  how many: ``all``, ``any`` or ``{"count": n}``);
* ``on: failure`` -- once, only if the parent fails permanently (a remediation node).

A node's incoming edges are all of one kind. :func:`check` lists every problem of a graph at
once; :meth:`Graph.validated` raises :class:`GraphError` with that list.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamflow import extras
from streamflow.errors import StreamflowError
from streamflow.keys import NAME_PATTERN

Name = Annotated[str, Field(pattern=f"^{NAME_PATTERN.pattern}$")]
#: A coordinator function name: dotted names such as ``merge.generic``.
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*$")]
EdgeKind = Literal["batch", "done", "failure"]


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
    """

    name: Annotated[str, Field(max_length=200)] = "task"
    params: dict[str, Any] = Field(default_factory=dict)
    nodes: list[NodeSpec]
    edges: list[EdgeSpec] = Field(default_factory=list)
    max_running_nodes: Annotated[int, Field(ge=1)] | None = None

    def node(self, node_id: str) -> NodeSpec:
        """The node called ``node_id``."""
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    def parents(self, node_id: str) -> list[EdgeSpec]:
        """The edges into ``node_id``, in spec order."""
        return [e for e in self.edges if e.target == node_id]

    def children(self, node_id: str) -> list[EdgeSpec]:
        """The edges out of ``node_id``, in spec order."""
        return [e for e in self.edges if e.source == node_id]

    def input_kind(self, node_id: str) -> EdgeKind | None:
        """How the node is fed: ``batch``, ``done``, ``failure``, or None for a source."""
        edges = self.parents(node_id)
        return edges[0].on if edges else None

    def to_json(self) -> bytes:
        """The spec as JSON, with edge keys ``from`` and ``to`` as written by users."""
        return orjson.dumps(self.model_dump(mode="json", by_alias=True, exclude_defaults=True))


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
        GraphError: The text does not parse, or the graph is malformed.
        MissingExtraError: A YAML graph, and the ``yaml`` extra is not installed.
    """
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
        problems.append("cycle: " + " -> ".join(cycle))
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
    """One cycle as a closed path of node ids, or an empty list."""
    children: dict[str, list[str]] = {}
    for source, target in edges:
        children.setdefault(source, []).append(target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for child in children.get(node, []):
            if state.get(child) == 1:
                return [*path[path.index(child) :], child]
            if child not in state and (found := visit(child)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in ids:
        if node not in state and (found := visit(node)):
            return found
    return []


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
