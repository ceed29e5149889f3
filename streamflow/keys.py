"""Names of every Redis key, stream and consumer group streamflow uses.

Nothing else in the package builds a key by hand. Every key has the form
``<namespace>:{<tag>}:<part>``: the part in braces is the Redis Cluster hash tag, so all keys that
one Lua script or pipeline touches together share a slot. A role's stream, its dead-letter stream
its delayed schedule and its dedup markers share the tag ``{role:<name>}`` because
dead-lettering, retry scheduling, promotion of due retries, replay and publishing with a dedup key
are single scripts over them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from streamflow.errors import InvalidNameError

#: Role, namespace, consumer, task and node names: letters, digits, ``_``, ``-`` and ``.``,
#: starting with a letter or digit, at most 64 characters. This excludes the separator ``:``,
#: the hash-tag braces and the ``SCAN MATCH`` glob characters ``* ? [ ]``.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")

#: The consumer group every role stream has; one per stream, shared by all workers of the role.
GROUP = "workers"


def validate_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it may appear in a key, else raise :class:`InvalidNameError`.

    Args:
        value: The name to check.
        what: What the name is ("role", "namespace", ...), used in the error message.

    Raises:
        InvalidNameError: The name is empty, too long or contains a forbidden character.
    """
    if not isinstance(value, str) or NAME_PATTERN.fullmatch(value) is None:
        raise InvalidNameError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one namespace.

    Args:
        namespace: The prefix of every key; validated like a role name.
    """

    namespace: str = "sf"

    def __post_init__(self) -> None:
        validate_name(self.namespace, "namespace")

    def role_stream(self, role: str) -> str:
        """The stream that carries a role's jobs."""
        return f"{self.namespace}:{{role:{validate_name(role, 'role')}}}:stream"

    def dead_letters(self, role: str) -> str:
        """The role's dead-letter stream."""
        return f"{self.namespace}:{{role:{validate_name(role, 'role')}}}:dead"

    def delayed(self, role: str) -> str:
        """The role's delayed schedule: a sorted set of messages scored by due time (ms)."""
        return f"{self.namespace}:{{role:{validate_name(role, 'role')}}}:delayed"

    def consumer_alive(self, consumer: str) -> str:
        """The liveness key held by the one live process using a consumer name."""
        return f"{self.namespace}:{{consumer:{validate_name(consumer, 'consumer name')}}}:alive"

    def starts(self, role: str, entry_id: str) -> str:
        """How many times an entry delivered more than once was started (poison detection)."""
        return f"{self.namespace}:{{role:{validate_name(role, 'role')}}}:starts:{entry_id}"

    def signals(self) -> str:
        """The signals stream every worker reads (a broadcast, not a consumer group)."""
        return f"{self.namespace}:{{signals}}:stream"

    def cancel_marker(self, target: str, target_id: str) -> str:
        """The persistent marker of a cancel of a ``task``, ``message`` or ``any`` id.

        It shares the ``{signals}`` tag with the stream, so setting it and announcing the cancel
        are one script.
        """
        return f"{self.namespace}:{{signals}}:cancel:{target}:{target_id}"

    def cancel_marker_pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for every cancel marker of the namespace."""
        return f"{self.namespace}:{{signals}}:cancel:*"

    def cancel_report(self, signal_id: str) -> str:
        """Where workers report what a cancel stopped (a hash: consumer -> report)."""
        return f"{self.namespace}:{{signals}}:report:{signal_id}"

    def consumer_alive_pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for the liveness keys of every live worker."""
        return f"{self.namespace}:{{consumer:*}}:alive"

    def consumer_of_alive_key(self, key: str) -> str | None:
        """The consumer name of a liveness key, or None."""
        prefix, suffix = f"{self.namespace}:{{consumer:", "}:alive"
        if key.startswith(prefix) and key.endswith(suffix):
            return key[len(prefix) : -len(suffix)] or None
        return None

    def dedup(self, role: str, dedup_key: str) -> str:
        """The marker that makes publishing with ``dedup_key`` happen at most once.

        The user's key is hashed, so it may hold any characters.
        """
        digest = hashlib.blake2b(dedup_key.encode(), digest_size=16).hexdigest()
        return f"{self.namespace}:{{role:{validate_name(role, 'role')}}}:dedup:{digest}"

    def role_pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for every role stream of the namespace."""
        return f"{self.namespace}:{{role:*}}:stream"

    def role_of_stream(self, key: str) -> str | None:
        """The role name of a role stream key, or None if ``key`` is not one."""
        prefix, suffix = f"{self.namespace}:{{role:", "}:stream"
        if key.startswith(prefix) and key.endswith(suffix):
            return key[len(prefix) : -len(suffix)] or None
        return None
