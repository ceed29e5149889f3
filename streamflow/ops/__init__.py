"""Operations: what an operator runs beside workers, never on a message's path.

- :mod:`~streamflow.ops.inspect`: a namespace's roles, groups, consumers and pending entries.
- :mod:`~streamflow.ops.exporter`: queue gauges for Prometheus, one per namespace.
- :mod:`~streamflow.ops.guard`: start-up checks of the Redis server's settings.
- :mod:`~streamflow.ops.acl`: least-privilege ACL users generated from the key layout.
- :mod:`~streamflow.ops.supervisor`: worker processes kept alive by a parent.
- :mod:`~streamflow.ops.server`: a private redis-server for demos and tests.
"""
