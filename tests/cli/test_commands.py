"""The ``streamflow`` command line, run as real subprocesses against a private redis-server."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import orjson
import psutil
import pytest
import redis
from pydantic import SecretStr

from streamflow import config
from streamflow.cli import main
from streamflow.cli.worker import worker as worker_command
from streamflow.cli.worker import worker_settings
from streamflow.config import WorkerSettings
from streamflow.keys import Keys
from tests.helpers import (
    CLI,
    ROOT,
    clean_env,
    free_port,
    kill_tree,
    recorded,
    run_cli,
    wait_for,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]


CANARY = "S3cretCanary"


# -- the worker's options are its settings ----------------------------------------------------


def _worker_options() -> dict[str | None, click.Option]:
    return {p.name: p for p in worker_command.params if isinstance(p, click.Option)}


def test_worker_settings_and_options_are_one_to_one() -> None:
    names = [p.name for p in worker_command.params]
    assert sorted(n or "" for n in names) == sorted(WorkerSettings.model_fields)
    assert len(names) == len(set(names))


def test_every_settings_variable_is_one_worker_option_or_a_root_option() -> None:
    variables = [option.envvar for option in _worker_options().values() if option.envvar]
    variables += [p.envvar for p in main.params if isinstance(p, click.Option) and p.envvar]
    assert sorted(variables + list(config.COMMAND_VARS)) == sorted(config.ENV_VARS)


@pytest.mark.parametrize(("variable", "command"), sorted(config.COMMAND_VARS.items()))
def test_each_command_variable_is_an_option_of_its_command(variable: str, command: str) -> None:
    main.load_all()
    found = main.commands[command]
    assert variable in [p.envvar for p in found.params if isinstance(p, click.Option)]


@pytest.mark.parametrize("name", sorted(WorkerSettings.model_fields))
def test_each_worker_option_is_spelled_as_its_setting_with_help(name: str) -> None:
    option, field = _worker_options()[name], WorkerSettings.model_fields[name]
    if field.annotation is bool:
        # A flag states the value that is not the default: --strict, --no-server-checks.
        assert option.opts == [f"--{'no-' if field.default else ''}{name.replace('_', '-')}"]
    else:
        assert option.opts == [config.option_name(name)]
    assert option.envvar == config.env_var(name)
    assert option.hidden == (name in config.CHILD_FIELDS)
    assert option.required == field.is_required()
    assert option.hidden or option.help


@pytest.mark.parametrize("name", sorted(WorkerSettings.model_fields))
def test_each_worker_option_defaults_to_its_setting_default(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in config.ENV_VARS:
        monkeypatch.delenv(variable, raising=False)
    with worker_command.make_context("worker", ["--app", "tests.apps:app"]) as ctx:
        parsed = worker_settings(ctx.params)
    assert getattr(parsed, name) == getattr(WorkerSettings(app="tests.apps:app"), name)
    # What --help shows as the default is the setting's default too.
    default = WorkerSettings.model_fields[name].default
    shown = default.get_secret_value() if isinstance(default, SecretStr) else default
    if not WorkerSettings.model_fields[name].is_required():
        assert ctx.params.get(name, shown) == shown


def _reference_rows() -> list[list[str]]:
    """The rows of the configuration reference table in docs/operations.md, as cells."""
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text.split("| Option | Variable |", 1)[1].split("\n\n", 1)[0]
    return [row.strip("| ").split(" | ") for row in table.splitlines()[2:]]


def test_the_configuration_reference_names_every_option_with_its_variable() -> None:
    documented = {}
    for row in _reference_rows():
        options, variables = re.findall(r"`(--[a-z-]+)`", row[0]), re.findall(r"`(\w+)`", row[1])
        assert len(options) == len(variables), row
        documented.update(zip(options, variables, strict=True))
    expected = {o.opts[0]: o.envvar for o in _worker_options().values() if not o.hidden}
    expected |= {
        p.opts[0]: p.envvar for p in main.params if isinstance(p, click.Option) and p.envvar
    }
    assert documented == expected


def test_the_configuration_reference_states_each_default() -> None:
    fields = {
        config.option_name(name): field for name, field in WorkerSettings.model_fields.items()
    }
    checked = []
    for options, _, cell, *_ in _reference_rows():
        field = fields.get(re.findall(r"`(--[a-z-]+)`", options)[0])
        if field is None or field.is_required():
            continue
        default = field.default
        default = default.get_secret_value() if isinstance(default, SecretStr) else default
        if default is None or default is False or default == ():
            continue  # said in words: off, every role of the app, lease TTL / 3, ...
        number = re.fullmatch(r"([\d,.]+)( s)?", cell)
        assert (float(number[1].replace(",", "")) if number else cell.strip("`")) == default, cell
        checked.append(cell)
    assert len(checked) >= 12


@dataclass
class WorkerProcess:
    """A ``streamflow worker`` subprocess whose stderr goes to ``log``."""

    process: subprocess.Popen[bytes]
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Wait until the worker logs that it is serving; fail at once if it exits."""

        def serving() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.stderr()}")
            return "serving" in self.stderr()

        wait_for(serving, timeout, "worker logs 'serving'")


StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def record_file(tmp_path: Path) -> Path:
    return tmp_path / "record.txt"


@pytest.fixture
def start_worker(
    tmp_path: Path, redis_url: str, namespace: str, record_file: Path
) -> Iterator[StartWorker]:
    """Start ``streamflow worker --app tests.apps:app ARGS``; every one is killed at teardown."""
    started: list[WorkerProcess] = []

    def start(*args: str) -> WorkerProcess:
        log = tmp_path / f"worker-{len(started)}.log"
        connection = ["--redis-url", redis_url, "--namespace", namespace]
        with open(log, "wb") as err:
            process = subprocess.Popen(
                [*CLI, "worker", "--app", "tests.apps:app", *connection, *args],
                cwd=ROOT,
                env=clean_env(SFTEST_RECORD=str(record_file)),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        worker = WorkerProcess(process, log)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        kill_tree(worker.process)


# -- publish -> handle ----------------------------------------------------------------------


def test_cli_published_jobs_are_handled_and_worker_exits_0_on_sigterm(
    start_worker: StartWorker, redis_url: str, namespace: str, record_file: Path
) -> None:
    worker = start_worker("--role", "record")
    worker.wait_ready()
    conn = ["--redis-url", redis_url, "--namespace", namespace]

    single = run_cli("publish", "record", "--json", '{"n": 1}', *conn)
    assert single.returncode == 0, single.stderr
    [first_id] = single.stdout.split()
    wait_for(lambda: first_id in recorded(record_file), 10, "the --json job is recorded")

    lines = '{"n": 2}\n{"n": 3}\n\n{"n": 4}\n'
    many = run_cli("publish", "record", "--file", "-", *conn, stdin=lines)
    assert many.returncode == 0, many.stderr
    ids = many.stdout.split()
    assert len(ids) == 3 and len(set(ids)) == 3 and first_id not in ids
    wait_for(lambda: set(ids) <= set(recorded(record_file)), 10, "the 3 --file jobs are recorded")
    assert sorted(recorded(record_file)) == sorted([first_id, *ids])

    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=10) == 0
    assert "Traceback" not in worker.stderr()


# -- schema ---------------------------------------------------------------------------------


def test_schema_prints_json_schema_of_every_message_kind() -> None:
    result = run_cli("schema")
    assert result.returncode == 0, result.stderr
    schemas = json.loads(result.stdout)
    kinds = {"job", "dead_letter", "cancel", "event", "result", "lifecycle", "lifecycle_jobs"}
    kinds |= {"submission", "submission_result"}
    assert set(schemas) == kinds
    for kind in kinds:
        assert isinstance(schemas[kind]["properties"], dict), kind
        assert schemas[kind]["properties"]


def test_schema_kind_job_prints_only_the_job_schema() -> None:
    result = run_cli("schema", "--kind", "job")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert "properties" in schema
    assert {"id", "role", "payload"} <= set(schema["properties"])
    assert "job" not in schema and "dead_letter" not in schema


# -- configuration errors -------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    redis_url: str
    namespace: str
    closed_port: int


def _worker(t: Target, *args: str) -> list[str]:
    return ["worker", "--app", "tests.apps:app", "--namespace", t.namespace, *args]


def _publish(t: Target, *args: str) -> list[str]:
    return ["publish", "record", "--namespace", t.namespace, *args]


#: id -> (arguments, extra environment, substrings the one error line must contain; ``{port}``
#: stands for the closed port)
CONFIG_ERRORS: dict[str, tuple[Callable[[Target], list[str]], dict[str, str], list[str]]] = {
    "worker-bad-scheme": (
        lambda t: _worker(t, "--redis-url", "http://x"),
        {},
        ["--redis-url", "scheme"],
    ),
    "publish-bad-scheme": (
        lambda t: _publish(t, "--json", "1", "--redis-url", "http://x"),
        {},
        ["--redis-url", "scheme"],
    ),
    "publish-unreachable-redis": (
        lambda t: _publish(t, "--json", "1", "--redis-url", f"redis://127.0.0.1:{t.closed_port}/0"),
        {},
        ["cannot connect to Redis", "127.0.0.1:{port}"],
    ),
    "worker-unknown-role": (
        lambda t: _worker(t, "--role", "nope", "--redis-url", t.redis_url),
        {},
        ["unknown role", "nope", "record", "sleepy"],
    ),
    "worker-missing-module": (
        lambda t: ["worker", "--app", "nosuch.module:app", "--redis-url", t.redis_url],
        {},
        ["nosuch.module"],
    ),
    "worker-missing-attribute": (
        lambda t: ["worker", "--app", "tests.apps:missing", "--redis-url", t.redis_url],
        {},
        ["tests.apps", "missing"],
    ),
    "misspelt-env-var": (
        lambda t: _worker(t, "--redis-url", t.redis_url),
        {"STREAMFLOW_CONCURENCY": "4"},
        ["STREAMFLOW_CONCURENCY", "STREAMFLOW_CONCURRENCY"],
    ),
    "worker-invalid-namespace": (
        lambda t: [
            "worker",
            "--app",
            "tests.apps:app",
            "--namespace",
            "a:b",
            "--redis-url",
            t.redis_url,
        ],
        {},
        ["--namespace", "a:b"],
    ),
    "publish-without-payload": (
        lambda t: _publish(t, "--redis-url", t.redis_url),
        {},
        ["--json", "--file"],
    ),
    "publish-invalid-json": (
        lambda t: _publish(t, "--json", "{bad", "--redis-url", t.redis_url),
        {},
        ["--json", "invalid JSON"],
    ),
}


def assert_one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Exit code 2, nothing on stdout, one ``error:`` line on stderr and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]


@pytest.fixture
def target(redis_url: str, namespace: str) -> Target:
    return Target(redis_url, namespace, free_port())


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_error_is_one_line_on_stderr_with_exit_code_2(case: str, target: Target) -> None:
    build_args, extra_env, expected = CONFIG_ERRORS[case]
    result = run_cli(*build_args(target), env=clean_env(**extra_env))
    line = assert_one_error_line(result)
    for text in expected:
        text = text.format(port=target.closed_port)
        assert text in line, (text, line)


def test_redis_password_never_appears_in_output_when_redis_is_unreachable(
    target: Target,
) -> None:
    url = f"redis://user:{CANARY}@127.0.0.1:{target.closed_port}/0"
    result = run_cli(*_publish(target, "--json", "1", "--redis-url", url))
    line = assert_one_error_line(result)
    assert CANARY not in result.stdout + result.stderr
    assert "cannot connect to Redis" in line and "user:***@" in line


def test_a_worker_waits_for_an_unreachable_redis_and_stops_on_sigterm(
    target: Target, tmp_path: Path
) -> None:
    # Redis not up yet (a deploy, a restart): the worker says so once and keeps trying.
    url = f"redis://user:{CANARY}@127.0.0.1:{target.closed_port}/0"
    log = tmp_path / "worker.log"
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamflow", *_worker(target, "--redis-url", url)],
            cwd=ROOT,
            env=clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        wait_for(lambda: "Redis unavailable" in log.read_text() or process.poll() is not None, 30)
        assert process.poll() is None, log.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert CANARY not in text and "Traceback" not in text, text
    line = next(line for line in text.splitlines() if "Redis unavailable" in line)
    assert f"127.0.0.1:{target.closed_port}" in line and "user:***@" in line, line


def test_publish_reads_redis_url_and_namespace_from_the_environment(
    redis_url: str, namespace: str
) -> None:
    env = clean_env(STREAMFLOW_REDIS_URL=redis_url, STREAMFLOW_NAMESPACE=namespace)
    result = run_cli("publish", "record", "--json", '{"n": 1}', env=env)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 1
    with redis.Redis.from_url(redis_url) as client:
        assert client.xlen(Keys(namespace).role_stream("record")) == 1


# -- idle -----------------------------------------------------------------------------------


def test_idle_worker_does_not_spin(start_worker: StartWorker) -> None:
    worker = start_worker("--role", "record")
    worker.wait_ready()
    proc = psutil.Process(worker.process.pid)
    before = proc.cpu_times()
    time.sleep(2.0)  # the test measures CPU use over this idle time
    after = proc.cpu_times()
    used = (after.user + after.system) - (before.user + before.system)
    assert used < 0.1, f"idle worker used {used:.3f} s of CPU in 2 s"
    assert worker.process.poll() is None


def test_publish_deadline_and_a_visible_dedup_hit(redis_url: str, namespace: str) -> None:
    """``--deadline`` reaches the job (parity with Client.publish); a publish dropped by its
    dedup key prints the first id, says so on stderr and exits 3."""
    conn = ("--redis-url", redis_url, "--namespace", namespace)
    first = run_cli("publish", "record", "--json", "1", "--deadline", "300", *conn)
    assert first.returncode == 0, first.stderr
    at = run_cli(
        "publish", "record", "--json", "2", "--deadline", "2030-01-02T03:04:05+00:00", *conn
    )
    assert at.returncode == 0, at.stderr
    bad = run_cli("publish", "record", "--json", "3", "--deadline", "soon", *conn)
    assert_one_error_line(bad)
    with redis.Redis.from_url(redis_url) as client:
        entries = client.xrange(Keys(namespace).role_stream("record"))
    deadlines = [orjson.loads(fields[b"message"])["deadline_ms"] for _, fields in entries]
    now_ms = time.time() * 1000
    assert now_ms + 200_000 < deadlines[0] <= now_ms + 300_000
    assert deadlines[1] == 1_893_553_445_000

    once = run_cli("publish", "record", "--json", "4", "--dedup-key", "k1", *conn)
    assert once.returncode == 0 and "deduplicated" not in once.stderr, once.stderr
    again = run_cli("publish", "record", "--json", "5", "--dedup-key", "k1", *conn)
    assert again.returncode == 3, again.stderr
    assert again.stdout == once.stdout  # the first message's id
    (note,) = [line for line in again.stderr.splitlines() if not line.startswith("warning:")]
    assert note.startswith("deduplicated: ") and note.endswith("nothing published")
