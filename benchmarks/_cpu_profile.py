"""Run ``python -m MODULE ARGS...`` under cProfile timed by CPU time, not wall time.

    python benchmarks/_cpu_profile.py OUT.prof -m streamflow coordinator ...

On a shared machine a wall-clock profile charges a function for the time its process waited
for a core (a socket ``send`` that hands the core to redis-server shows as 150 us); CPU time
shows what the process itself spent.
"""

from __future__ import annotations

import cProfile
import runpy
import sys
import time


def main() -> None:
    out, flag, module, *rest = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: _cpu_profile.py OUT.prof -m MODULE [ARGS...]")
    sys.argv = [module, *rest]
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    main()
