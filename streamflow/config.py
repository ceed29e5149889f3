"""Settings: one frozen, validated object built from CLI options and STREAMFLOW_* variables."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from streamflow import connect
from streamflow.app import App
from streamflow.errors import ConfigError
from streamflow.keys import validate_name
from streamflow.leases import LeaseSettings

ENV_PREFIX = "STREAMFLOW_"
#: Settings fields whose CLI option has another name.
_OPTION_NAMES = {"roles": "role"}
#: Settings only the supervisor of ``--processes N`` gives its children: hidden options, no
#: environment variable.
CHILD_FIELDS = frozenset({"server_checks", "parent_pid", "parent_fd"})
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class ConnectionSettings(BaseModel):
    """Where Redis is, how to reach it over TLS, and which namespace to use.

    The URL is held as a secret: its password never shows in a repr, log or error. The TLS
    key file is a path: streamflow checks that it is a readable file and hands the path to
    OpenSSL, and never reads, logs or copies the key itself.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    redis_url: SecretStr = SecretStr(DEFAULT_REDIS_URL)
    namespace: str = "sf"
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, value: SecretStr) -> SecretStr:
        try:
            connect.validate_url(value.get_secret_value())
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        return validate_name(value, "namespace")

    @field_validator("tls_ca_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _check_tls_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                connect.check_tls_file(value, "file")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> Self:
        try:
            connect.tls_arguments(self.url, **self.tls)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def tls(self) -> connect.TLSFiles:
        """The TLS files given, as keyword arguments of :func:`connect.connect`."""
        files = connect.TLSFiles()
        if self.tls_ca_file is not None:
            files["tls_ca_file"] = self.tls_ca_file
        if self.tls_cert_file is not None:
            files["tls_cert_file"] = self.tls_cert_file
        if self.tls_key_file is not None:
            files["tls_key_file"] = self.tls_key_file
        return files

    def environment(self) -> dict[str, str]:
        """These settings as STREAMFLOW_* variables, for a child process (password included)."""
        env = {"STREAMFLOW_REDIS_URL": self.url, "STREAMFLOW_NAMESPACE": self.namespace}
        files = {"CA": self.tls_ca_file, "CERT": self.tls_cert_file, "KEY": self.tls_key_file}
        for which, path in files.items():
            if path is not None:
                env[f"{ENV_PREFIX}TLS_{which}_FILE"] = str(path)
        return env

    @property
    def url(self) -> str:
        """The Redis URL, password included: pass it to a client, never to a log."""
        return self.redis_url.get_secret_value()

    @property
    def safe_url(self) -> str:
        """The Redis URL with its password masked."""
        return connect.redact_url(self.url)


class WorkerSettings(ConnectionSettings):
    """Everything ``streamflow worker`` needs."""

    app: Annotated[str, Field(pattern=r"^[\w.]+:[\w.]+$")]
    roles: tuple[str, ...] = ()
    concurrency: Annotated[int, Field(ge=1, le=100_000)] = 64
    consumer_name: str | None = None
    processes: Annotated[int, Field(ge=1, le=256)] = 1
    read_count: Annotated[int, Field(ge=1, le=100_000)] = 1000
    prefetch: int | Literal["auto"] = "auto"
    block_ms: Annotated[int, Field(ge=10, le=60_000)] = 1000
    max_message_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    shutdown_grace: Annotated[float, Field(ge=0)] = 30.0
    dead_letter_max_len: Annotated[int, Field(ge=1)] = 100_000
    lease_ttl: Annotated[float, Field(gt=0)] = 30.0
    renew_interval: Annotated[float, Field(gt=0)] | None = None
    reclaim_interval: Annotated[float, Field(gt=0)] = 2.0
    metrics_port: Annotated[int, Field(ge=0, le=65_535)] | None = None
    #: The address the metrics server listens on (loopback unless told otherwise).
    metrics_host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    #: Refuse to start when the start-up checks of the Redis server warn of anything.
    strict: bool = False
    #: Run the start-up checks (off in the children of ``--processes N``: the parent ran them).
    server_checks: bool = True
    #: In a child of ``--processes N``: the supervising parent's pid, and the read end of the
    #: pipe that reaches EOF when the parent dies (the child then stops).
    parent_pid: Annotated[int, Field(ge=1)] | None = None
    parent_fd: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _check_lease(self) -> Self:
        if self.renew_interval is not None and self.renew_interval > self.lease_ttl / 3:
            raise ValueError(
                f"--renew-interval {self.renew_interval}s must be at most a third of "
                f"--lease-ttl {self.lease_ttl}s, or a live worker's entries could be adopted"
            )
        return self

    def lease_settings(self) -> LeaseSettings:
        """The lease timing of these settings."""
        return LeaseSettings(
            ttl=self.lease_ttl,
            renew_interval=self.renew_interval,
            reclaim_interval=self.reclaim_interval,
        )

    @field_validator("roles")
    @classmethod
    def _check_roles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(validate_name(role, "role") for role in value)

    @field_validator("prefetch", mode="before")
    @classmethod
    def _check_prefetch(cls, value: object) -> object:
        if value == "auto":
            return value
        number = int(value) if isinstance(value, str) and value.strip().isdigit() else value
        if type(number) is int and 0 <= number <= 100_000:
            return number
        raise ValueError(f"must be 'auto' or a whole number from 0 to 100,000, not {value!r}")

    @field_validator("consumer_name")
    @classmethod
    def _check_consumer(cls, value: str | None) -> str | None:
        return None if value is None else validate_name(value, "consumer name")


#: Every environment variable streamflow reads: one per setting, and the root group's logging
#: options. Any other STREAMFLOW_* is a start-up error, so a misspelt setting is never silently
#: ignored.
#: Variables of one command's own options, not worker settings: the command they belong to.
COMMAND_VARS = {
    # `streamflow dashboard --token`: a secret, so better passed in the environment.
    "STREAMFLOW_DASHBOARD_TOKEN": "dashboard",
}
ENV_VARS = frozenset(
    {f"{ENV_PREFIX}{name.upper()}" for name in set(WorkerSettings.model_fields) - CHILD_FIELDS}
    | {"STREAMFLOW_LOG_LEVEL", "STREAMFLOW_LOG_FORMAT"}
    | set(COMMAND_VARS)
)


def option_name(field: str) -> str:
    """The command-line option of settings field ``field``: ``--read-count`` for ``read_count``."""
    return "--" + _OPTION_NAMES.get(field, field).replace("_", "-")


def env_var(field: str) -> str | None:
    """The environment variable of settings field ``field`` (None: set by no variable)."""
    return None if field in CHILD_FIELDS else f"{ENV_PREFIX}{field.upper()}"


def command_line(settings: WorkerSettings) -> list[str]:
    """The options of ``streamflow worker`` that give ``settings``, save the connection ones.

    Parsed by ``streamflow worker`` with :meth:`ConnectionSettings.environment` in its
    environment, they give ``settings`` back. The connection settings are left out: the Redis
    URL may hold a password, which a command line would show to every user of the host.
    """
    argv: list[str] = []
    for name, field in WorkerSettings.model_fields.items():
        if name not in ConnectionSettings.model_fields:
            argv += _arguments(name, getattr(settings, name), field.default)
    return argv


def _arguments(name: str, value: object, default: object) -> list[str]:
    option = option_name(name)
    if isinstance(value, bool):
        # A flag is given only against its default: --strict, --no-server-checks.
        return [] if value == default else [option if value else f"--no-{option[2:]}"]
    if value is None:
        return []
    if isinstance(value, tuple):
        return [word for item in value for word in (option, str(item))]
    return [option, str(value)]


def build(model: type[ConnectionSettings], **values: object) -> ConnectionSettings:
    """Build settings, turning validation errors into one readable :class:`ConfigError`."""
    try:
        return model(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            message = str(err.get("ctx", {}).get("error") or err["msg"]).removeprefix(
                "Value error, "
            )
            where = ".".join(str(p) for p in err["loc"])
            if where:
                message = f"{option_name(where)}: {message}"
            problems.append(message)
        raise ConfigError("; ".join(problems)) from None


def check_environment(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse unknown STREAMFLOW_* variables (likely misspelt settings)."""
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in ENV_VARS)
    if unknown:
        raise ConfigError(
            f"unknown environment variable{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)}; known: {', '.join(sorted(ENV_VARS))}"
        )


def load_app(path: str) -> App:
    """Import ``module:attribute`` and return the :class:`App` it names.

    The current directory is importable, as with ``python -m``.

    Raises:
        ConfigError: The module or attribute is missing, or it is not an App.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"invalid app {path!r}: expected 'package.module:attribute'")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import app module {module_name!r}: {exc}") from None
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, App):
        raise ConfigError(f"{path!r} is a {type(obj).__name__}, not a streamflow.App")
    return obj
