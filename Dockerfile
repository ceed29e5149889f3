# A streamflow worker image. Build context: the repository root.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Install the package first so that editing the examples does not rebuild this layer.
COPY pyproject.toml README.md ./
COPY streamflow ./streamflow
RUN pip install .

# The worker imports the application by module path (examples.quickstart.app:app).
COPY examples ./examples
ENV PYTHONPATH=/app

RUN useradd --system --uid 10001 --no-create-home streamflow
USER streamflow

# streamflow handles SIGTERM as a graceful shutdown: stop reading, finish or release in-flight
# work within the grace period.
STOPSIGNAL SIGTERM
CMD ["streamflow", "worker", "--app", "examples.quickstart.app:app", "--role", "echo", "--concurrency", "32"]
