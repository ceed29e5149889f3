"""The dashboard's job page for a job a per-key limit parked (plain HTTP, no browser)."""

from __future__ import annotations

from typing import Any

import pytest

from streamflow import Client
from streamflow.keys import GROUP
from streamflow.scripts import Scripts
from tests.dashboard.conftest import Procs
from tests.dashboard.http import request


@pytest.mark.redis
@pytest.mark.slow
def test_the_job_page_says_a_parked_job_waits_for_its_key(procs: Procs) -> None:
    async def park(client: Client) -> str:
        redis, keys = client.redis, client.keys
        message_id = await client.publish("keyed", {}, limit_key="cust-7")
        stream = keys.role_stream("keyed")
        await redis.xgroup_create(stream, GROUP, id="0")
        found: Any = await redis.xreadgroup(GROUP, "me", {stream: ">"}, count=1)
        entry_id = found[0][1][0][0]
        park_keys = [stream, keys.parked("keyed"), keys.park("keyed", "cust-7")]
        park_keys.append(keys.starts("keyed", entry_id.decode()))
        args = [GROUP, "me", entry_id, "cust-7", 0, 0]
        assert await Scripts(redis).park(keys=park_keys, args=args, client=redis) == 1
        return message_id

    message_id = procs.query(park)
    base = procs.dashboard()
    status, page = request(f"{base}/jobs?id={message_id}")
    assert status == 200
    assert 'id="job-state">parked<' in page
    assert "parked: waiting for its limit key cust-7" in page
