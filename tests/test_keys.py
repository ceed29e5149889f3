"""Unit tests of key names (no Redis)."""

from __future__ import annotations

import re

import pytest

from streamflow.errors import InvalidNameError
from streamflow.keys import (
    CONSUMER_ALIVE,
    KINDS,
    ROLE_STREAM,
    STARTS,
    TASKS_INDEX,
    Keys,
    validate_name,
)


def hash_tag(key: str) -> str:
    match = re.search(r"\{([^}]*)\}", key)
    assert match, key
    return match.group(1)


def test_all_keys_of_a_role_share_one_hash_tag() -> None:
    keys = Keys("sf")
    names = [keys.role_stream("ocr"), keys.dead_letters("ocr"), keys.dedup("ocr", "any key {}*")]
    assert {hash_tag(k) for k in names} == {"role:ocr"}
    assert keys.role_stream("ocr") == "sf:{role:ocr}:stream"
    assert keys.role_of_stream(keys.role_stream("ocr")) == "ocr"
    assert keys.role_of_stream("sf:{role:ocr}:dead") is None


def test_different_roles_have_different_tags() -> None:
    keys = Keys("sf")
    assert hash_tag(keys.role_stream("a")) != hash_tag(keys.role_stream("b"))


@pytest.mark.parametrize(
    "bad", ["", "a:b", "a{b", "a}b", "a*", "a?", "a[1]", "a b", "-a", "é", "x" * 65, "a\n"]
)
def test_names_with_separators_globs_or_tags_are_refused(bad: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid role"):
        validate_name(bad, "role")
    with pytest.raises(InvalidNameError):
        Keys("sf").role_stream(bad)


def test_invalid_namespace_is_refused() -> None:
    with pytest.raises(InvalidNameError, match="namespace"):
        Keys("a:b")


@pytest.mark.parametrize("good", ["a", "ocr-v2", "etl.load", "A_1", "9" * 64])
def test_valid_names_pass(good: str) -> None:
    assert validate_name(good) == good


def test_a_key_kind_is_its_keys_with_wildcards() -> None:
    keys = Keys("sf")
    assert keys.starts("r", "1-0") == "sf:" + STARTS.form("r", "1-0")
    assert STARTS.pattern == "{role:*}:starts:*" and TASKS_INDEX.pattern == "{tasks}:index"
    assert keys.role_pattern() == f"sf:{ROLE_STREAM.pattern}"
    assert keys.consumer_alive_pattern() == f"sf:{CONSUMER_ALIVE.pattern}"
    assert len({kind.pattern for kind in KINDS}) == len(KINDS)
    with pytest.raises(ValueError, match="does not fit"):
        STARTS.form("r")
    with pytest.raises(ValueError, match="does not fit"):
        TASKS_INDEX.form("t")
