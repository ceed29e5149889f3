"""DAG tasks: graphs of nodes whose output streams as batches to their successors.

A wing of the package, beside the delivery core: the core delivers a node's job like any other
job (:mod:`streamflow.nodes` is the worker's side of a node run); what turns workers' events
into task state and fans out work lives here.

- :mod:`~streamflow.dag.graph`: the task graph a user submits, validated and indexed.
- :mod:`~streamflow.dag.tasks`: the task and node state machines (pure).
- :mod:`~streamflow.dag.store`: a task's state in Redis.
- :mod:`~streamflow.dag.stepper`: one step of one task (load, apply events, commit).
- :mod:`~streamflow.dag.outbox`: a committed step's decisions as typed items, carried out.
- :mod:`~streamflow.dag.coordinator`: the process that drives tasks.
- :mod:`~streamflow.dag.demo`: the example app of ``streamflow demo``.
"""
