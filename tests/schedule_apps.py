"""Schedules declared in code, for the scheduler processes of tests/test_scheduler.py.

``every_second`` publishes to the ``record`` role of ``tests/apps.py``, whose handler appends
each message id (``sched.<schedule>.<tick ms>``) to the external record.
"""

from __future__ import annotations

from streamflow.schedules import Schedule

#: Every second (cron, seconds field first); catch_up covers a machine too busy to poll on time.
every_second = [Schedule(id="every-second", role="record", cron="* * * * * *", catch_up=5)]
