"""The application object: roles and the handlers registered for them."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from streamflow.context import Context
from streamflow.errors import ConfigError, PayloadError
from streamflow.keys import validate_name

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])

#: What a handler looks like: ``async def handle(ctx, payload)`` or a plain ``def``.
Handler = Callable[[Context, Any], Awaitable[Any]] | Callable[[Context, Any], Any]


@dataclass(frozen=True, slots=True)
class Role:
    """A role: its name, handler and how its payload is validated.

    Attributes:
        name: The role name (validated; it becomes part of key names).
        handler: The function that handles one message.
        is_async: Whether the handler is a coroutine function (else it runs in a thread).
        payload_type: The declared type of the payload parameter (``Any`` when undeclared).
    """

    name: str
    handler: Handler
    is_async: bool
    payload_type: Any
    _adapter: TypeAdapter[Any] | None

    def validate_payload(self, payload: Any) -> Any:
        """Validate ``payload`` against the handler's declared type.

        Raises:
            PayloadError: The payload does not fit the declared type.
        """
        if self._adapter is None:
            return payload
        try:
            return self._adapter.validate_python(payload)
        except ValidationError as exc:
            raise PayloadError(_first_errors(exc)) from None


class App:
    """A set of roles and their handlers, loaded by ``streamflow worker --app module:attr``.

    Example:
        ```python
        app = streamflow.App()

        @app.role("resize")
        async def resize(ctx: streamflow.Context, job: ResizeJob) -> None:
            ...
        ```
    """

    def __init__(self) -> None:
        self._roles: dict[str, Role] = {}

    def role(self, name: str, *, payload: Any = None) -> Callable[[HandlerT], HandlerT]:
        """Register the decorated function as the handler of role ``name``.

        The function takes ``(ctx, payload)``. The payload parameter's annotation (a pydantic
        model or any type pydantic validates) is checked on every message; a payload that fails
        goes to the dead-letter stream. Plain functions run in worker threads.

        Args:
            name: The role name.
            payload: The payload type, when it cannot be read from the annotation (e.g. a class
                defined inside a function under ``from __future__ import annotations``).

        Raises:
            InvalidNameError: The role name is not valid.
            ConfigError: The role already has a handler, or the function's signature is wrong.
        """
        validate_name(name, "role")

        def register(func: HandlerT) -> HandlerT:
            if name in self._roles:
                raise ConfigError(f"role {name!r} already has a handler")
            self._roles[name] = _make_role(name, func, payload)
            return func

        return register

    @property
    def roles(self) -> Mapping[str, Role]:
        """The registered roles by name."""
        return dict(self._roles)

    def get_role(self, name: str) -> Role:
        """The role called ``name``.

        Raises:
            ConfigError: No handler is registered for it.
        """
        try:
            return self._roles[name]
        except KeyError:
            known = ", ".join(sorted(self._roles)) or "none"
            raise ConfigError(f"unknown role {name!r} (this app has: {known})") from None


def _make_role(name: str, func: Callable[..., Any], payload_type: Any = None) -> Role:
    params = list(inspect.signature(func).parameters.values())
    if len(params) != 2:
        raise ConfigError(
            f"handler {func.__qualname__} of role {name!r} must take (ctx, payload), "
            f"not {len(params)} parameters"
        )
    if payload_type is None:
        payload_type = _annotation(func, params[1].name)
    adapter = None if payload_type is Any else TypeAdapter(payload_type)
    is_async = inspect.iscoroutinefunction(func)
    return Role(name, func, is_async, payload_type, adapter)


def _annotation(func: Callable[..., Any], parameter: str) -> Any:
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:  # a forward reference that cannot be resolved
        raise ConfigError(
            f"cannot resolve the annotations of {func.__qualname__} ({exc}); "
            "pass the payload type explicitly: @app.role(name, payload=Model)"
        ) from None
    return hints.get(parameter, Any)


def _first_errors(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
