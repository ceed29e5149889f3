"""benchmarks/peers/run.py without the peers: its options, its tables and its load meter.

The measurements themselves need taskiq and dramatiq, which only `make bench-peers` installs
(in .venv-peers); run.py imports them lazily, so that this file runs in the project's venv.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "peers" / "run.py"


@pytest.fixture(scope="module")
def run() -> Iterator[ModuleType]:
    saved = list(sys.path)  # run.py puts benchmarks/ and benchmarks/peers/ first
    spec = importlib.util.spec_from_file_location("peers_run", RUN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    sys.path[:] = saved


def make_run(run: ModuleType, peer: str, round_: int, rate: float) -> object:
    load = run.Load(load1=2.5, others=0.8, steal=0.0)
    return run.Run(peer, round_, 1000, 5000.0, rate, 12.0, 4.0, 0.3, 0.6, load)


def test_quick_mode_measures_fewer_jobs_in_fewer_rounds(run: ModuleType) -> None:
    quick, full = run.parse_args(["--quick"]), run.parse_args([])
    assert (quick.messages, quick.rounds) == (run.QUICK_MESSAGES, run.QUICK_ROUNDS)
    assert (full.messages, full.rounds) == (run.DEFAULT_MESSAGES, run.DEFAULT_ROUNDS)
    assert quick.messages < full.messages and quick.rounds < full.rounds
    assert full.peers == ["bare", "streamflow", "taskiq", "dramatiq"]


def test_explicit_options_win_over_quick_and_bad_ones_are_refused(run: ModuleType) -> None:
    args = run.parse_args(["--quick", "--messages", "500", "--peers", "taskiq", "bare"])
    assert args.messages == 500 and args.peers == ["taskiq", "bare"]
    with pytest.raises(SystemExit):
        run.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        run.parse_args(["--peers", "celery"])


def test_each_cell_is_the_median_and_range_of_the_rounds(run: ModuleType) -> None:
    assert run.spread([3.0, 1.0, 2.0]) == "2 (1\u20133)"
    assert run.spread([1234.5], 1) == "1,234.5"


def test_the_section_states_the_machine_and_compares_with_the_bare_loop(run: ModuleType) -> None:
    runs = [
        make_run(run, "bare", 1, 200_000.0),
        make_run(run, "streamflow", 1, 50_000.0),
        make_run(run, "bare", 2, 100_000.0),
        make_run(run, "streamflow", 2, 100_000.0),
    ]
    meta = {"date": "2026-12-07 14:00 UTC", "argv": " --quick", "latency": "100", "redis": "7"}
    text = run.render_markdown(runs, meta)
    lines = text.splitlines()
    assert lines[0] == run.SECTION
    assert "2 cores, shared machine" in text and "2 rounds" in text
    bare = next(line for line in lines if line.startswith("| bare redis-py loop |"))
    streamflow = next(line for line in lines if line.startswith("| streamflow |"))
    assert "150,000 (100,000\u2013200,000) | 100.0% |" in bare
    assert "75,000 (50,000\u2013100,000) | 50.0% |" in streamflow
    assert "others 0.80 (0.80\u20130.80) cores" in streamflow
    # The every-run table: one line per run, in the order run.
    assert [line.split(" | ")[1] for line in lines if line.startswith("| 1 |")] == [
        "bare",
        "streamflow",
    ]


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="the load meter reads /proc/stat")
def test_the_load_meter_reads_the_machine(run: ModuleType) -> None:
    busy, steal, total = run.proc_stat()
    assert 0 <= busy <= total and 0 <= steal <= total
    meter = run.LoadMeter(redis_cpu=0.0)
    sum(i * i for i in range(200_000))  # some CPU of our own, which is not "others"
    load = meter.read(redis_cpu=0.0)
    assert load.load1 >= 0 and load.others is not None and load.others >= 0
    assert load.steal is not None and 0 <= load.steal <= 1
