"""The worker side of the Django recipe: the role the view publishes to.

Run it:

    streamflow worker --app examples.django_view.worker_app:app
"""

from __future__ import annotations

from pydantic import BaseModel

import streamflow

app = streamflow.App()


class Invoice(BaseModel):
    """The order to invoice."""

    order_id: int
    email: str


# keep_result: the outcome is kept a minute, so anyone can read it (`streamflow result ID`).
@app.role("invoice", keep_result=60)
async def invoice(ctx: streamflow.Context, job: Invoice) -> str:
    """Render and send the invoice (here: return what would be sent)."""
    ctx.log.info("invoicing order %d", job.order_id)
    return f"invoice for order {job.order_id} sent to {job.email}"
