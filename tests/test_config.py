"""Unit tests of streamflow.config: validation, secret URLs, environment and app loading."""

from __future__ import annotations

import sys

import pytest

from streamflow import config
from streamflow.app import App
from streamflow.config import ConnectionSettings, WorkerSettings, build
from streamflow.errors import ConfigError

CANARY = "S3cretCanary"
SECRET_URL = f"redis://user:{CANARY}@redis.example:6380/2"


@pytest.fixture(autouse=True)
def _isolated_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_app may add the current directory to sys.path; undo it after each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


# -- build ----------------------------------------------------------------------------------


def test_build_reports_every_problem_in_one_error_naming_the_options() -> None:
    with pytest.raises(ConfigError) as caught:
        build(
            WorkerSettings,
            app="tests.apps:app",
            roles=("bad:role",),
            concurrency=0,
            redis_url="http://x",
        )
    message = str(caught.value)
    for option in ("--role:", "--concurrency:", "--redis-url:"):
        assert option in message, (option, message)
    assert message.count("; ") == 2
    assert "bad:role" in message and "scheme" in message
    assert "\n" not in message


def test_build_names_multiword_options_with_dashes() -> None:
    with pytest.raises(ConfigError) as caught:
        build(WorkerSettings, app="tests.apps:app", max_message_bytes=1, block_ms=0)
    message = str(caught.value)
    assert "--max-message-bytes:" in message and "--block-ms:" in message


def test_build_ignores_none_values_and_keeps_defaults() -> None:
    settings = build(WorkerSettings, app="tests.apps:app", consumer_name=None, roles=("record",))
    assert isinstance(settings, WorkerSettings)
    assert settings.consumer_name is None
    assert settings.roles == ("record",)
    assert settings.concurrency == 64
    assert settings.namespace == "sf"


@pytest.mark.parametrize(("given", "expected"), [("auto", "auto"), ("0", 0), ("256", 256), (7, 7)])
def test_prefetch_is_auto_or_a_whole_number(given: object, expected: object) -> None:
    settings = build(WorkerSettings, app="tests.apps:app", prefetch=given)
    assert isinstance(settings, WorkerSettings)
    assert settings.prefetch == expected
    assert WorkerSettings(app="tests.apps:app").prefetch == "auto"


@pytest.mark.parametrize("given", ["many", "-1", "100001", "2.5", True])
def test_a_bad_prefetch_is_one_clear_error(given: object) -> None:
    with pytest.raises(ConfigError) as caught:
        build(WorkerSettings, app="tests.apps:app", prefetch=given)
    assert str(caught.value) == (
        f"--prefetch: must be 'auto' or a whole number from 0 to 100,000, not {given!r}"
    )


def test_settings_are_frozen() -> None:
    settings = build(ConnectionSettings, namespace="ns1")
    with pytest.raises(Exception, match="frozen"):
        settings.namespace = "other"  # type: ignore[misc]


def test_build_rejects_an_invalid_namespace_and_unknown_options() -> None:
    with pytest.raises(ConfigError, match="--namespace: invalid namespace 'a:b'"):
        build(ConnectionSettings, namespace="a:b")
    with pytest.raises(ConfigError, match="--colour"):
        build(ConnectionSettings, colour="blue")


# -- secret URLs ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", [ConnectionSettings, WorkerSettings])
def test_redis_password_is_not_in_repr_or_str_of_settings(
    model: type[ConnectionSettings],
) -> None:
    extra = {"app": "tests.apps:app"} if model is WorkerSettings else {}
    settings = build(model, redis_url=SECRET_URL, **extra)
    assert CANARY not in repr(settings)
    assert CANARY not in str(settings)
    assert CANARY not in settings.model_dump_json()
    assert settings.url == SECRET_URL


def test_safe_url_masks_the_password_and_keeps_the_rest() -> None:
    settings = build(ConnectionSettings, redis_url=SECRET_URL)
    assert settings.safe_url == "redis://user:***@redis.example:6380/2"


def test_safe_url_of_a_url_without_password_is_the_url() -> None:
    url = "redis://127.0.0.1:6379/0"
    assert build(ConnectionSettings, redis_url=url).safe_url == url


def test_invalid_url_error_masks_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        build(ConnectionSettings, redis_url=f"http://user:{CANARY}@x/0")
    assert CANARY not in str(caught.value)
    assert "user:***@x" in str(caught.value)


@pytest.mark.parametrize("password", ["S3cret/Canary", "S3cret#Canary", "S3cret?Canary"])
def test_invalid_url_error_does_not_show_a_password_with_url_special_characters(
    password: str,
) -> None:
    # Such passwords should be percent-encoded, but users paste them as they are; the error
    # must not echo the password back into logs and terminals.
    with pytest.raises(ConfigError) as caught:
        build(ConnectionSettings, redis_url=f"redis://user:{password}@127.0.0.1:6379/0")
    message = str(caught.value)
    assert "--redis-url" in message
    assert "S3cret" not in message and "Canary" not in message, message


def test_safe_url_does_not_show_a_password_that_urlsplit_cannot_find() -> None:
    # urlsplit ends the netloc at "#": it sees host "user", port 1234 and no password, so the
    # URL validates; safe_url (logged by the worker and in "cannot connect" errors) must still
    # not show what follows "user:".
    settings = build(ConnectionSettings, redis_url="redis://user:1234#Canary@127.0.0.1:6379/0")
    assert "Canary" not in settings.safe_url, settings.safe_url


# -- environment ----------------------------------------------------------------------------


def test_check_environment_rejects_a_misspelt_streamflow_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        config.check_environment({"STREAMFLOW_CONCURENCY": "4", "PATH": "/bin"})
    message = str(caught.value)
    assert "unknown environment variable STREAMFLOW_CONCURENCY;" in message
    assert "STREAMFLOW_CONCURRENCY" in message  # the known names are listed


def test_check_environment_lists_every_unknown_variable() -> None:
    with pytest.raises(ConfigError, match="variables STREAMFLOW_A, STREAMFLOW_B;"):
        config.check_environment({"STREAMFLOW_B": "1", "STREAMFLOW_A": "1"})


def test_check_environment_accepts_every_known_variable_and_other_prefixes() -> None:
    environ = {name: "x" for name in config.ENV_VARS}
    environ |= {"PATH": "/bin", "SFTEST_RECORD": "/tmp/r", "streamflow_lower": "1"}
    config.check_environment(environ)
    for name in (
        "STREAMFLOW_REDIS_URL",
        "STREAMFLOW_NAMESPACE",
        "STREAMFLOW_APP",
        "STREAMFLOW_ROLES",
        "STREAMFLOW_CONCURRENCY",
        "STREAMFLOW_PROCESSES",
        "STREAMFLOW_LOG_LEVEL",
    ):
        assert name in config.ENV_VARS


# -- load_app -------------------------------------------------------------------------------


def test_load_app_returns_the_app() -> None:
    app = config.load_app("tests.apps:app")
    assert isinstance(app, App)
    assert {"record", "sleepy"} <= set(app.roles)


def test_load_app_missing_module_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"cannot import app module 'nosuch\.module'"):
        config.load_app("nosuch.module:app")


def test_load_app_missing_attribute_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"module 'tests\.apps' has no attribute 'missing'"):
        config.load_app("tests.apps:missing")


def test_load_app_object_that_is_not_an_app_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"'tests\.apps:RECORD_ENV' is a str, not a streamflow"):
        config.load_app("tests.apps:RECORD_ENV")


@pytest.mark.parametrize("path", ["tests.apps", ":app", "tests.apps:"])
def test_load_app_path_without_module_and_attribute_is_a_config_error(path: str) -> None:
    with pytest.raises(ConfigError, match=r"expected 'package\.module:attribute'"):
        config.load_app(path)
