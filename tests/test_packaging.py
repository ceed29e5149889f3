"""Packaging: the sdist and the wheel carry what they must, and the wheel installs a command.

The distributions are built once for the module with PyPA's ``build`` from a copy of the
working tree without its build leftovers: a checkout's ``streamflow.egg-info`` (which
``pip install -e`` writes) feeds its old file list into the next sdist, and would hide a
file that MANIFEST.in forgot. The wheel is then installed into a fresh venv with its
dependencies from the package index (pip's cache keeps this quick), and the installed
``streamflow`` command and package are checked from there.

These tests need the package index. They are never skipped: on CI a failure to build or to
install is a failure. Deselect them locally with ``-m "not packaging"``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

import pytest

import streamflow
from tests.helpers import ROOT, recorded, wait_for

pytestmark = [pytest.mark.packaging, pytest.mark.slow]

LUA_SCRIPTS = sorted(path.name for path in (ROOT / "streamflow" / "lua").glob("*.lua"))

#: Names left out of the copy of the working tree: VCS data, caches and build output.
LEFT_OUT = {".git", "__pycache__", "node_modules", "build", "dist", "site", ".tox", ".nox"}


@dataclass(frozen=True)
class Dists:
    """The built distributions."""

    wheel: Path
    sdist: Path


def _left_out(directory: str, names: list[str]) -> set[str]:
    """The names of `directory` not to copy: build leftovers, caches and any virtualenv."""
    ignored = set()
    for name in names:
        path = Path(directory, name)
        if (
            name in LEFT_OUT
            or name.endswith((".egg-info", "_cache"))
            or (path / "pyvenv.cfg").exists()
        ):
            ignored.add(name)
    return ignored


def _env() -> dict[str, str]:
    """The environment for build and pip: no PYTHONPATH that could reach the source tree."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _call(
    args: list[str | Path], *, timeout: float, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, whatever its exit code."""
    return subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        env=env if env is not None else _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _run(args: list[str | Path], *, timeout: float, cwd: Path) -> str:
    """Run a command; fail with its output when it fails. Returns stdout."""
    done = _call(args, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, (
        f"{' '.join(map(str, args))} exited {done.returncode}\n"
        f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    )
    return done.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    """An sdist and a wheel built by ``python -m build`` from a clean copy of the tree."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=_left_out)
    out = tmp / "dist"
    _run([sys.executable, "-m", "build", "--outdir", out, source], timeout=180, cwd=tmp)
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1, wheels
    assert len(sdists) == 1, sdists
    return Dists(wheel=wheels[0], sdist=sdists[0])


@pytest.fixture(scope="module")
def venv(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed, no extras; dependencies from the index."""
    tmp = tmp_path_factory.mktemp("venv")
    env_dir = tmp / "venv"
    _run([sys.executable, "-m", "venv", env_dir], timeout=120, cwd=tmp)
    python = env_dir / "bin" / "python"
    install = [python, "-m", "pip", "install", "--disable-pip-version-check", dists.wheel]
    _run(install, timeout=300, cwd=tmp)
    return env_dir


def test_wheel_carries_py_typed_and_every_lua_script(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as wheel:
        names = set(wheel.namelist())
    expected = {"streamflow/py.typed"} | {f"streamflow/lua/{name}" for name in LUA_SCRIPTS}
    assert LUA_SCRIPTS, "no Lua scripts found in streamflow/lua"
    assert expected <= names, sorted(expected - names)


def test_wheel_metadata_has_the_version_of_streamflow_init(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as wheel:
        [metadata_name] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = HeaderParser().parsestr(wheel.read(metadata_name).decode())
    assert metadata["Version"] == streamflow.__version__
    assert metadata["License-Expression"] == "MIT"
    assert "Typing :: Typed" in metadata.get_all("Classifier", [])
    assert {url.split(",")[0] for url in metadata.get_all("Project-URL", [])} >= {
        "Homepage",
        "Documentation",
        "Changelog",
        "Source",
    }


def test_sdist_carries_changelog_license_readme_and_lua_scripts(dists: Dists) -> None:
    top = dists.sdist.name.removesuffix(".tar.gz") + "/"
    with tarfile.open(dists.sdist) as sdist:
        names = {name.removeprefix(top) for name in sdist.getnames()}
    expected = {"CHANGELOG.md", "LICENSE", "README.md", "streamflow/py.typed"}
    expected |= {f"streamflow/lua/{name}" for name in LUA_SCRIPTS}
    assert expected <= names, sorted(expected - names)


def test_installed_wheel_gives_a_streamflow_command_that_prints_the_version(
    venv: Path, tmp_path: Path
) -> None:
    out = _run([venv / "bin" / "streamflow", "--version"], timeout=60, cwd=tmp_path)
    assert streamflow.__version__ in out


def test_installed_package_version_equals_its_metadata(venv: Path, tmp_path: Path) -> None:
    # -I: isolated mode, so neither PYTHON* variables nor the working directory can put the
    # source tree on the path; the import must find the installed wheel.
    code = (
        "import importlib.metadata, streamflow; "
        "print(streamflow.__version__, importlib.metadata.version('streamflow'), "
        "streamflow.__file__)"
    )
    out = _run([venv / "bin" / "python", "-I", "-c", code], timeout=60, cwd=tmp_path)
    version, metadata_version, module_file = out.split()
    assert version == metadata_version == streamflow.__version__
    assert Path(module_file).is_relative_to(venv), module_file


# -- the base install: no extras -------------------------------------------------------------

#: An app for the installed wheel's worker: each job appends its payload's text to a file.
RECORD_APP = """
import os
from typing import Any

import streamflow

app = streamflow.App()


@app.role("record")
async def record(ctx: streamflow.Context, payload: Any) -> None:
    with open(os.environ["SFTEST_RECORD"], "a", encoding="utf-8") as out:
        out.write(payload["text"] + "\\n")
"""

#: The harness without a redis_url needs the fake Redis of the testing extra.
HARNESS_ON_FAKE_REDIS = """
import anyio, streamflow
from streamflow.errors import MissingExtraError
from streamflow.testing import Harness

async def main() -> None:
    try:
        async with Harness(streamflow.App()):
            print("no error")
    except MissingExtraError as exc:
        print(f"{type(exc).__name__}: {exc}")

anyio.run(main)
"""


def test_the_base_install_has_neither_the_fake_redis_nor_a_yaml_parser(
    venv: Path, tmp_path: Path
) -> None:
    # The premise of the next tests: a production install (no extras) leaves test tooling out.
    code = (
        "import importlib.util as u; "
        "print([m for m in ('fakeredis', 'lupa', 'yaml') if u.find_spec(m) is not None])"
    )
    out = _run([venv / "bin" / "python", "-I", "-c", code], timeout=60, cwd=tmp_path)
    assert out.strip() == "[]"


@pytest.mark.redis
def test_the_base_install_runs_a_worker_that_handles_published_jobs(
    venv: Path, tmp_path: Path, redis_url: str, namespace: str
) -> None:
    (tmp_path / "recordapp.py").write_text(RECORD_APP)
    record = tmp_path / "record.txt"
    env = {**_env(), "SFTEST_RECORD": str(record)}
    env = {key: value for key, value in env.items() if not key.startswith("STREAMFLOW_")}
    cli = venv / "bin" / "streamflow"
    connection = ["--redis-url", redis_url, "--namespace", namespace]
    log = tmp_path / "worker.log"
    with open(log, "wb") as err:
        worker = subprocess.Popen(
            [cli, "worker", "--app", "recordapp:app", *connection],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        for text in ("one", "two"):
            publish = [cli, "publish", "record", "--json", f'{{"text": "{text}"}}', *connection]
            done = _call(publish, timeout=60, cwd=tmp_path, env=env)
            assert done.returncode == 0, done.stderr

        def handled() -> bool:
            assert worker.poll() is None, f"the worker exited:\n{log.read_text()}"
            return sorted(recorded(record)) == ["one", "two"]

        wait_for(handled, 60, "both jobs handled")
    finally:
        worker.terminate()
        code = worker.wait(timeout=60)
    assert code == 0, log.read_text()


def test_a_yaml_graph_without_the_yaml_extra_is_one_clear_error(venv: Path, tmp_path: Path) -> None:
    graph = tmp_path / "graph.yaml"
    graph.write_text("nodes:\n  - {id: a, role: demo.readings}\nedges: []\n")
    # Refused while reading the file, before any connection: the URL names a port that no
    # Redis listens on (never the machine's own Redis).
    submit = [venv / "bin" / "streamflow", "submit", graph, "--redis-url", "redis://127.0.0.1:1"]
    done = _call(submit, timeout=60, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: a YAML task graph needs the yaml extra: pip install 'streamflow[yaml]'\n"
    )


def test_the_harness_on_the_fake_redis_without_the_testing_extra_is_one_clear_error(
    venv: Path, tmp_path: Path
) -> None:
    # Importing streamflow.testing works (a harness on a real Redis needs no extra).
    code = HARNESS_ON_FAKE_REDIS
    out = _run([venv / "bin" / "python", "-I", "-c", code], timeout=60, cwd=tmp_path)
    assert out == (
        "MissingExtraError: streamflow.testing without a redis_url needs the testing extra: "
        "pip install 'streamflow[testing]'\n"
    )


def test_the_demo_without_redis_server_or_the_testing_extra_is_one_clear_error(
    venv: Path, tmp_path: Path
) -> None:
    # A PATH without redis-server: the demo would fall back on the fake Redis.
    env = {**_env(), "PATH": str(venv / "bin")}
    done = _call([venv / "bin" / "streamflow", "demo"], timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: the demo without redis-server on PATH needs the testing extra: "
        "pip install 'streamflow[testing]'\n"
    )


def test_the_dashboard_without_its_extra_is_one_clear_error(venv: Path, tmp_path: Path) -> None:
    # Refused before any connection: the URL names a port that no Redis listens on.
    command = [venv / "bin" / "streamflow", "dashboard", "--redis-url", "redis://127.0.0.1:1"]
    done = _call(command, timeout=60, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: streamflow dashboard needs the dashboard extra: "
        "pip install 'streamflow[dashboard]'\n"
    )
