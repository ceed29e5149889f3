"""docker-compose.yml: it parses, what it references exists, and its commands are valid.

No Docker engine runs here, so the file is checked, not started: every streamflow command of a
service or health check is run with ``--help`` and the same arguments, and the app it names is
loaded.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamflow import config
from tests.helpers import ROOT, clean_env

COMPOSE = ROOT / "docker-compose.yml"
_DEFAULT = re.compile(r"\$\{(\w+)(?::-([^}]*)|:\?[^}]*)?\}")


def expand(text: str) -> str:
    """Compose's ${VAR:-default} and ${VAR:?message} with no variable set ($$ is a $)."""
    return _DEFAULT.sub(lambda m: m.group(2) or "secret", text).replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


def streamflow_commands(compose: dict[str, Any]) -> list[tuple[str, list[str]]]:
    found = []
    for name, service in compose["services"].items():
        command = service.get("command")
        entry = service.get("entrypoint")
        if isinstance(command, list) and command and command[0] == "streamflow":
            found.append((name, [expand(str(a)) for a in command[1:]]))
        elif entry == ["streamflow"] and isinstance(command, list):
            found.append((name, [expand(str(a)) for a in command]))
        test = service.get("healthcheck", {}).get("test", [])
        if test[:2] == ["CMD", "streamflow"]:
            found.append((f"{name} health check", [expand(str(a)) for a in test[2:]]))
    return found


def test_the_services_of_a_real_deployment(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "worker", "coordinator", "exporter", "prometheus", "grafana"} <= set(services)
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command
    assert "--maxmemory-policy noeviction" in redis_command
    assert services["worker"]["deploy"]["replicas"] == 2  # and docker compose --scale worker=N
    assert "ports" not in services["worker"]  # replicas must not fight over a host port


def test_every_referenced_file_exists(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            assert (context / "Dockerfile").is_file()
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    for item in compose.get("configs", {}).values():
        if "file" in item:
            assert (ROOT / item["file"]).exists(), item["file"]


@pytest.mark.slow
def test_every_streamflow_command_is_valid(compose: dict[str, Any]) -> None:
    commands = streamflow_commands(compose)
    names = {name for name, _ in commands}
    assert {"worker", "coordinator", "exporter", "worker health check"} <= names
    for name, args in commands:
        done = subprocess.run(
            [sys.executable, "-m", "streamflow", *args, "--help"],
            cwd=ROOT,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"{name}: streamflow {' '.join(args)}: {done.stderr}"
        if "--app" in args:
            app = config.load_app(args[args.index("--app") + 1])
            assert app.roles, name


def test_the_dockerfile_runs_an_existing_app() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    assert cmd is not None
    args = yaml.safe_load(cmd.group(1))
    assert args[:2] == ["streamflow", "worker"]
    assert config.load_app(args[args.index("--app") + 1]).roles


@pytest.mark.slow
def test_a_service_command_with_an_unknown_option_would_be_caught(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streamflow", "worker", "--no-such-option", "--help"],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
