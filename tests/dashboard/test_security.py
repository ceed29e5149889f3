"""Safe to expose: the bind check, the token, CSRF and read-only, over plain HTTP (no browser)."""

from __future__ import annotations

import re

import pytest

from streamflow import Client
from streamflow.dashboard.settings import DashboardSettings, is_loopback
from tests.dashboard.conftest import TOKEN, Procs
from tests.dashboard.http import csrf_of, request
from tests.helpers import clean_env, run_cli


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.4", False),
        ("example.org", False),
    ],
)
def test_only_loopback_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    refused = DashboardSettings(host=host).problem()
    assert (refused is None) is loopback
    assert DashboardSettings(host=host, token=TOKEN).problem() is None


def test_a_short_token_or_a_strange_prefix_is_refused() -> None:
    assert "too short" in str(DashboardSettings(token="short").problem())
    assert "root-path" in str(DashboardSettings(root_path="/a b").problem())
    assert DashboardSettings(root_path="/sf/").prefix == "/sf"


@pytest.mark.slow
def test_a_non_loopback_bind_without_a_token_is_refused_in_one_line() -> None:
    done = run_cli("dashboard", "--host", "0.0.0.0", "--port", "1")
    assert done.returncode == 2
    assert done.stderr.startswith("error: refusing to bind 0.0.0.0 without a token")
    assert done.stderr.count("\n") == 1


@pytest.mark.slow
def test_the_token_comes_from_the_environment_too() -> None:
    env = clean_env(STREAMFLOW_DASHBOARD_TOKEN="short")
    done = run_cli("dashboard", "--host", "0.0.0.0", "--port", "1", env=env)
    assert (done.returncode, done.stderr) == (
        2,
        "error: the dashboard token is too short: use at least 16 characters\n",
    )


@pytest.mark.redis
@pytest.mark.slow
def test_without_the_token_nothing_but_the_login_form_is_served(procs: Procs) -> None:
    base = procs.dashboard("--token", TOKEN)
    assert request(base + "/")[0] == 401
    assert request(base + "/tasks/x/live")[0] == 401
    assert request(base + "/", headers={"Accept": "text/html"})[0] == 303  # to the login form
    assert request(base + "/", headers={"Authorization": "Bearer nope-nope-nope-nope"})[0] == 401
    assert request(base + "/", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert request(base + "/login")[0] == 200


@pytest.mark.redis
@pytest.mark.slow
def test_an_action_needs_the_csrf_token_and_the_same_origin(procs: Procs) -> None:
    async def publish(client: Client) -> str:
        return await client.publish("record", {}, delay=600)

    message_id = procs.query(publish)
    base = procs.dashboard()
    token = csrf_of(request(f"{base}/jobs?id={message_id}")[1])
    form = f"id={message_id}".encode()
    assert request(base + "/jobs/cancel", data=form)[0] == 403
    assert request(base + "/jobs/cancel", data=form + b"&csrf=0123")[0] == 403
    evil = {"Origin": "http://evil.example"}
    assert (
        request(base + "/jobs/cancel", data=form + f"&csrf={token}".encode(), headers=evil)[0]
        == 403
    )
    assert request(f"{base}/jobs?id={message_id}")[1].count("delayed") >= 1
    assert request(base + "/jobs/cancel", data=form + f"&csrf={token}".encode())[0] == 303


@pytest.mark.redis
@pytest.mark.slow
def test_read_only_refuses_every_action(procs: Procs) -> None:
    procs.worker("w1", "tests.apps:app", "forge")

    async def forge(client: Client) -> None:
        await client.publish("forge", {"text": "no"})

    procs.query(forge)
    # A read-only page has no form to take a CSRF token from; a writable one's is sent instead.
    # The refusals below name read-only, which is checked first.
    writable = procs.dashboard()
    token = csrf_of(request(writable + "/deadletters/forge")[1])
    base = procs.dashboard("--read-only")
    page = request(base + "/deadletters/forge")[1]
    dead_id = re.search(r'<article class="letter" data-id="([^"]+)"', page)
    assert dead_id is not None and 'method="post"' not in page
    for path, form in [
        ("/deadletters/forge/replay", f"id={dead_id.group(1)}"),
        ("/deadletters/forge/purge", "confirm=forge"),
        ("/jobs/cancel", "id=x"),
        ("/tasks/x/cancel", ""),
    ]:
        found = request(base + path, data=f"{form}&csrf={token}".encode())
        assert found[0] == 403 and "read-only" in found[1], path

    async def count(client: Client) -> int:
        return await client.dead_letter_count("forge")

    assert procs.query(count) == 1
