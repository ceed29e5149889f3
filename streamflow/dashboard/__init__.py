"""The web dashboard (``streamflow dashboard``; the ``dashboard`` extra): a wing of the package.

Nothing outside this package and :mod:`streamflow.cli` imports it. It reads Redis through the
public API (:class:`~streamflow.Client`, :mod:`streamflow.ops.inspect`,
:mod:`streamflow.registry`) and renders pages on the server with autoescaping on: every string
that comes from Redis is untrusted. :mod:`~streamflow.dashboard.settings` checks a bind and
needs no extra; :mod:`~streamflow.dashboard.server` builds the app and serves it.
"""
