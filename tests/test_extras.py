"""Optional extras: a feature whose extra is missing says which one to install, in one line.

The fresh-venv checks (a wheel installed without extras) are in tests/test_packaging.py; these
hide a module in-process (``sys.modules[name] = None`` makes its import fail as if it were not
installed).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import anyio
import pytest

import streamflow
from streamflow import extras
from streamflow.dag import graph
from streamflow.errors import ConfigError, MissingExtraError
from streamflow.testing import Harness

YAML_GRAPH = "nodes:\n  - {id: a, role: demo.readings}\nedges: []\n"


def test_a_yaml_graph_without_pyyaml_names_the_yaml_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(MissingExtraError) as caught:
        graph.load(YAML_GRAPH, filename="graph.yml")
    assert str(caught.value) == (
        "a YAML task graph needs the yaml extra: pip install 'streamflow[yaml]'"
    )
    assert isinstance(caught.value, ConfigError)
    assert (caught.value.extra, caught.value.feature) == ("yaml", "a YAML task graph")


def test_a_json_graph_needs_no_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)
    spec = graph.load('{"nodes": [{"id": "a", "role": "demo.readings"}], "edges": []}')
    assert [node.id for node in spec.nodes] == ["a"]


@pytest.mark.anyio
@pytest.mark.parametrize("missing", ["fakeredis", "lupa"])
async def test_the_harness_on_the_fake_redis_without_the_testing_extra_names_it(
    monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    # lupa counts too: without it the fake Redis would fail on the first script call instead.
    monkeypatch.setitem(sys.modules, missing, None)
    with (
        anyio.fail_after(10),
        pytest.raises(MissingExtraError, match=r"pip install 'streamflow\[testing\]'"),
    ):
        async with Harness(streamflow.App()):
            pass


def test_a_broken_install_is_not_reported_as_a_missing_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The extra's module is there but one of its own imports is missing: that error shows as is.
    (tmp_path / "sf_fake_extra.py").write_text("import sf_fake_extra_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(extras.EXTRAS, "fake", ("sf_fake_extra",))
    with pytest.raises(ModuleNotFoundError) as caught:
        extras.require("fake", "a feature")
    assert caught.value.name == "sf_fake_extra_dependency"


def test_a_cron_schedule_without_cronsim_names_the_schedules_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from streamflow.schedules import Schedule, next_tick

    monkeypatch.setitem(sys.modules, "cronsim", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'streamflow\[schedules\]'"):
        Schedule(id="s", role="r", cron="* * * * *")
    # An interval schedule needs no cron parser.
    assert next_tick(Schedule(id="s", role="r", every=5), 0) == 5000


ROOT = Path(__file__).resolve().parent.parent
#: Extras for developers, not for users of a feature: not named on the user-facing pages.
DEVELOPER_EXTRAS = {"test", "docs"}


def _user_extras() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["optional-dependencies"]) - DEVELOPER_EXTRAS


def _demo_extras() -> set[str]:
    """The extras `make demo` installs in .venv-demo, read from the Makefile."""
    [line] = [
        line
        for line in (ROOT / "Makefile").read_text().splitlines()
        if "$(DEMO_VENV)" in line and "pip install" in line
    ]
    found = re.search(r"\.\[([a-z,]+)\]", line)
    assert found, line
    return set(found.group(1).split(","))


def test_every_extra_is_named_with_its_install_line_in_the_readme_and_getting_started() -> None:
    # A feature needing an extra must say so where a new user looks: the README's install
    # block and getting started's table of extras.
    readme = (ROOT / "README.md").read_text()
    started = (ROOT / "docs" / "getting-started.md").read_text()
    for extra in sorted(_user_extras()):
        assert f"pip install '.[{extra}]'" in readme, extra
        assert f"| `{extra}` |" in started, extra


@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md"])
def test_the_demo_venv_is_described_with_the_extras_make_demo_installs(page: str) -> None:
    text = (ROOT / page).read_text()
    # The sentence that says what .venv-demo holds names every extra it holds.
    sentences = [s for s in re.split(r"(?<=\.)\s", text) if "`.venv-demo`" in s]
    assert sentences, page
    for sentence in sentences:
        named = {extra for extra in _user_extras() if f"`{extra}`" in sentence}
        assert named == _demo_extras(), sentence


def test_make_demo_installs_no_test_lint_or_docs_tools() -> None:
    # make demo's venv is for trying streamflow: extras a user may need, not the developer ones
    # (the test extra brought mypy, ruff and the docs tools: 47 s on a first run).
    assert _demo_extras() <= _user_extras(), _demo_extras()
    demo_target = (ROOT / "Makefile").read_text().split("$(DEMO_STAMP): pyproject.toml", 1)[1]
    recipe = demo_target.split("\n\n", 1)[0]
    assert "requirements" not in recipe and recipe.count("pip install") == 1, recipe
