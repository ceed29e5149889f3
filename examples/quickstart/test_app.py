"""How to test your own handlers with streamflow.testing (runs in CI with the suite).

No Redis server is needed: the harness runs a real worker on an in-process fake Redis.
Pass ``redis_url=...`` to run the same test against a real Redis.
"""

from __future__ import annotations

import pytest

from examples.quickstart.app import app
from streamflow.testing import Harness


@pytest.mark.anyio
async def test_echo_acks_good_messages_and_dead_letters_bad_ones() -> None:
    async with Harness(app) as h:
        good = await h.publish("echo", {"text": "hello"})
        bad = await h.publish("echo", {"txt": "typo in the field name"})
        await h.drain()

    assert h.acked == [good]
    (letter,) = h.dead_lettered
    assert (letter.message_id, letter.reason) == (bad, "invalid_payload")
