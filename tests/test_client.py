"""Publishing: async and sync clients, bulk, dedup, errors."""

from __future__ import annotations

import time
import warnings
from datetime import timedelta

import anyio
import pytest
from pydantic import BaseModel

from streamflow import (
    App,
    Client,
    ConfigError,
    Context,
    PayloadError,
    RedisUnavailable,
    SyncClient,
    Worker,
    connect,
)
from streamflow.errors import UnknownRoleWarning
from streamflow.keys import Keys
from streamflow.protocol import decode_job
from tests.helpers import free_port, run_cli, running


class Invoice(BaseModel):
    number: int


def test_sync_client_publishes_single_bulk_and_dedup(redis_url: str, namespace: str) -> None:
    with SyncClient(redis_url, namespace=namespace) as client:
        one = client.publish("billing", Invoice(number=7), deadline=timedelta(minutes=5))
        many = client.publish_many("billing", [{"n": i} for i in range(2500)])
        first = client.publish("billing", 1, dedup_key="inv-7")
        assert client.publish("billing", 2, dedup_key="inv-7") == first
        entries = client.redis.xrange(Keys(namespace).role_stream("billing"))
    jobs = [decode_job(fields) for _, fields in entries]
    assert [j.id for j in jobs] == [one, *many, first]
    assert jobs[0].payload == {"number": 7}
    assert jobs[0].deadline_ms is not None and jobs[0].deadline_ms > jobs[0].created_at_ms
    assert jobs[-1].dedup_key == "inv-7"


@pytest.mark.anyio
async def test_async_publish_many_keeps_order_and_ids(redis_url: str, namespace: str) -> None:
    async with Client.from_url(redis_url, namespace=namespace) as client:
        ids = await client.publish_many("r", range(2100), chunk_size=500)
        entries = await client.redis.xrange(Keys(namespace).role_stream("r"))
    jobs = [decode_job(fields) for _, fields in entries]
    assert [j.id for j in jobs] == ids
    assert [j.payload for j in jobs] == list(range(2100))


@pytest.mark.anyio
async def test_publishing_to_an_unreachable_redis_fails_fast_and_clearly() -> None:
    url = f"redis://user:S3cretCanary@127.0.0.1:{free_port()}/0"
    client = Client.from_url(url)
    start = time.monotonic()
    with anyio.fail_after(10), pytest.raises(RedisUnavailable) as info:
        await client.publish("r", 1)
    assert time.monotonic() - start < 5
    assert "S3cretCanary" not in str(info.value)
    await client.aclose()
    with pytest.raises(RedisUnavailable):
        SyncClient(url).publish("r", 1)


@pytest.mark.anyio
async def test_payload_that_is_not_json_is_refused_before_publishing(
    redis_url: str, namespace: str
) -> None:
    async with Client(connect.connect(redis_url), namespace=namespace) as client:
        with pytest.raises(PayloadError, match="JSON"):
            await client.publish("r", {"x": object()})
        assert await client.redis.xlen(Keys(namespace).role_stream("r")) == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"message_id": "a b"}, "message id"),
        ({"message_id": "x" * 129}, "message id"),
        ({"dedup_key": ""}, "dedup key"),
        ({"dedup_key": "k" * 257}, "dedup key"),
    ],
)
async def test_fields_a_worker_would_reject_are_refused_at_publish(
    redis_url: str, namespace: str, options: dict[str, str], match: str
) -> None:
    async with Client.from_url(redis_url, namespace=namespace) as client:
        with pytest.raises(ValueError, match=match):
            await client.publish("r", 1, **options)  # type: ignore[arg-type]
        assert await client.redis.xlen(Keys(namespace).role_stream("r")) == 0


@pytest.mark.anyio
async def test_publishing_to_a_role_nobody_ever_served_warns_naming_the_known_roles(
    redis_url: str, namespace: str
) -> None:
    app = App()

    @app.role("email")
    async def email(ctx: Context, payload: object) -> None:
        pass

    async with Client.from_url(redis_url, namespace=namespace) as client:
        with anyio.fail_after(20):
            async with running(Worker(app, client.redis, namespace=namespace, block_ms=100)):
                pass  # a worker served "email" once: the role is known from now on
        with pytest.warns(UnknownRoleWarning, match=r"role 'emial' has never been served.*email"):
            await client.publish("emial", {"to": "a@example.com"})
        with pytest.raises(ConfigError, match="role 'emial' has never been served"):
            await client.publish("emial", 2, strict=True)
        with pytest.raises(ConfigError, match="role 'emial' has never been served"):
            await client.publish_many("emial", [3], strict=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            await client.publish("email", {"to": "a@example.com"}, strict=True)
        assert await client.redis.xlen(Keys(namespace).role_stream("emial")) == 1
    with SyncClient(redis_url, namespace=namespace) as sync:
        with pytest.warns(UnknownRoleWarning, match="known roles: email"):
            sync.publish("emial", 4)
        with pytest.raises(ConfigError, match="role 'emial' has never been served"):
            sync.publish_many("emial", [5], strict=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sync.publish("email", 6, strict=True)


@pytest.mark.slow
def test_cli_publish_to_an_unserved_role_warns_and_strict_refuses(
    redis_url: str, namespace: str
) -> None:
    conn = ("--redis-url", redis_url, "--namespace", namespace)
    done = run_cli("publish", "emial", "--json", "1", *conn)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("warning: role 'emial' has never been served"), done.stderr
    refused = run_cli("publish", "emial", "--json", "2", "--strict", *conn)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: role 'emial' has never been served")
    with SyncClient(redis_url, namespace=namespace) as sync:
        assert sync.redis.xlen(Keys(namespace).role_stream("emial")) == 1
