# The streamflow image: the package and its `streamflow` command, for workers, coordinators,
# the exporter and the operator commands (see docker-compose.yml and docs/deployment.md).
# Build context: the repository root.
#
# Your own handlers: build an image FROM this one that installs or copies your package, and
# point --app (or STREAMFLOW_APP) at it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The metrics and health server (--metrics-port) listens on loopback unless told otherwise; in a
# container the scraper is outside it.
ENV STREAMFLOW_METRICS_HOST=0.0.0.0

WORKDIR /app

# The package, with its example app (streamflow.dag.demo), installed from a copy of the source
# that is then removed. Installing it before copying the examples keeps this layer when only
# the examples change. No extras: a YAML task graph (`streamflow submit graph.yaml`) needs
# `pip install 'streamflow[yaml]'` in an image built FROM this one; JSON graphs need nothing.
COPY pyproject.toml README.md LICENSE CHANGELOG.md MANIFEST.in /tmp/src/
COPY streamflow /tmp/src/streamflow
RUN pip install /tmp/src && rm -rf /tmp/src

# The examples are importable as examples.<name>.app:app (the working directory is on the path).
COPY examples ./examples

RUN useradd --system --uid 10001 --no-create-home streamflow
USER streamflow

# streamflow handles SIGTERM as a graceful shutdown: stop reading, let running handlers finish
# within --shutdown-grace, then release the rest to other workers.
STOPSIGNAL SIGTERM
CMD ["streamflow", "worker", "--app", "streamflow.dag.demo:app"]
