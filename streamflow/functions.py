"""Coordinator functions: task nodes that run inside the coordinator, without a worker.

A function node's invocations are dispatched like any node's (once per parent batch, or once
when its parents are done). For each invocation the coordinator calls the function's ``map``
on the input batches and records the partial result exactly once, in the same step as the
invocation's completion; when the node is complete it calls ``reduce`` on the partials, in
invocation order, and stores the result as the node's one output batch. So a result never
counts an input twice or misses one, whatever the order and repetition of the events.

``map`` and ``reduce`` must be pure and quick: they run on the coordinator's event loop and may
run more than once for one invocation after a crash (only one result is kept).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from streamflow.context import Batch

MapFn = Callable[[dict[str, Any], Sequence[Batch]], Any]
ReduceFn = Callable[[dict[str, Any], Sequence[Any]], list[Any] | None]


def concatenate(params: dict[str, Any], partials: Sequence[Any]) -> list[Any]:
    """The default ``reduce``: the partials (lists) one after another."""
    out: list[Any] = []
    for partial in partials:
        out.extend(partial or [])
    return out


@dataclass(frozen=True, slots=True)
class Function:
    """A coordinator function.

    Attributes:
        name: Its name in task graphs, e.g. ``merge.generic``.
        map: ``(params, batches) -> partial``: one invocation's result (JSON-serializable).
        reduce: ``(params, partials) -> items``: the node's output batch (None: no output).
    """

    name: str
    map: MapFn
    reduce: ReduceFn = concatenate


def _merge(params: dict[str, Any], batches: Sequence[Batch]) -> list[Any]:
    out: list[Any] = []
    for batch in batches:
        out.extend(batch.items)
    return out


def _aggregate(params: dict[str, Any], batches: Sequence[Batch]) -> dict[str, Any]:
    """Count the items and sum their numbers exactly (as fractions, so order never matters)."""
    wanted = params.get("fields")
    count, total = 0, Fraction(0)
    sums: dict[str, Fraction] = {}
    floats: set[str] = set()
    for batch in batches:
        for item in batch.items:
            count += 1
            if _is_number(item):
                total += Fraction(item)
                if isinstance(item, float):
                    floats.add("")
            elif isinstance(item, dict):
                for name, value in item.items():
                    if _is_number(value) and (wanted is None or name in wanted):
                        sums[name] = sums.get(name, Fraction(0)) + Fraction(value)
                        if isinstance(value, float):
                            floats.add(name)
    return {
        "count": count,
        "sum": str(total),
        "sums": {name: str(value) for name, value in sums.items()},
        "floats": sorted(floats),
    }


def _aggregate_reduce(params: dict[str, Any], partials: Sequence[Any]) -> list[Any]:
    count, total = 0, Fraction(0)
    sums: dict[str, Fraction] = {}
    floats: set[str] = set()
    for partial in partials:
        count += partial["count"]
        total += Fraction(partial["sum"])
        for name, value in partial["sums"].items():
            sums[name] = sums.get(name, Fraction(0)) + Fraction(value)
        floats.update(partial["floats"])
    result: dict[str, Any] = {"count": count, "sum": _number(total, "" in floats)}
    result["sums"] = {name: _number(value, name in floats) for name, value in sorted(sums.items())}
    return [result]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: Fraction, as_float: bool) -> int | float:
    if as_float or value.denominator != 1:
        return float(value)
    return int(value)


#: The functions every coordinator provides.
BUILTINS: dict[str, Function] = {
    "merge.generic": Function("merge.generic", _merge),
    "metrics.aggregate": Function("metrics.aggregate", _aggregate, _aggregate_reduce),
}
