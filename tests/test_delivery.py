"""Unit tests of :mod:`streamflow.delivery` (no Redis): how :meth:`Delivery.stop` stops a
handler for each cause."""

from __future__ import annotations

import anyio
import pytest

from streamflow import App, Context
from streamflow.delivery import Delivery, StopCause
from streamflow.records import CancelSignal
from streamflow.streams import Entry

SIGNAL = CancelSignal(
    protocol=1,
    kind="cancel",
    id="sig-1",
    target="message",
    target_id="m-1",
    reason="user asked",
    created_at_ms=1,
)


# The tests are async only because a cancel scope needs an event loop; nothing in them awaits,
# so they need no deadline.
def _running_delivery() -> Delivery:
    app = App()

    @app.role("work")
    async def work(ctx: Context, payload: int) -> None:
        pass

    delivery = Delivery(app.get_role("work"), "work", "ns:work", Entry(b"1-0", {}))
    delivery.context = Context("m-1", "1-0", "work", 1, "c", 0)
    delivery.scope = anyio.CancelScope()
    delivery.started = True
    return delivery


# cause, hard, signal ->
#   (lost, released, cancel signal, ctx.cancel reason, ctx.shutting_down, scope cancelled)
STOP_TABLE = [
    ("lease_lost", False, None, (True, False, None, None, False, False)),
    ("lease_lost", True, None, (True, False, None, "lease lost", False, True)),
    ("cancelled", False, SIGNAL, (False, False, SIGNAL, "user asked", False, False)),
    ("cancelled", True, None, (False, False, None, "user asked", False, True)),
    ("shutdown", False, None, (False, True, None, None, True, False)),
    ("shutdown", True, None, (False, True, None, None, True, True)),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("cause", "hard", "signal", "expected"), STOP_TABLE)
async def test_stop_sets_the_flags_token_and_scope_of_its_cause(
    cause: StopCause,
    hard: bool,
    signal: CancelSignal | None,
    expected: tuple[bool, bool, CancelSignal | None, str | None, bool, bool],
) -> None:
    delivery = _running_delivery()
    reason = "lease lost" if cause == "lease_lost" else "user asked"
    delivery.stop(cause, reason, hard=hard, signal=signal)
    assert delivery.context is not None and delivery.scope is not None
    assert (
        delivery.lost,
        delivery.released,
        delivery.cancel,
        delivery.context.cancel.reason,
        delivery.context.shutting_down,
        delivery.scope.cancel_called,
    ) == expected


@pytest.mark.anyio
@pytest.mark.parametrize("cause", ["lease_lost", "cancelled", "shutdown"])
async def test_stop_of_a_delivery_whose_handler_has_not_started_only_marks_it(
    cause: StopCause,
) -> None:
    delivery = _running_delivery()
    delivery.context = None
    delivery.scope = None
    delivery.started = False
    delivery.stop(cause, "why", hard=True, signal=SIGNAL if cause == "cancelled" else None)
    assert (delivery.lost, delivery.released, delivery.cancel) == (
        cause == "lease_lost",
        cause == "shutdown",
        SIGNAL if cause == "cancelled" else None,
    )
