"""A minimal Django project's settings: no database, no apps, one URLconf.

Configured by environment, like a worker: ``STREAMFLOW_REDIS_URL`` and
``STREAMFLOW_NAMESPACE`` (the same variables `streamflow worker` reads).
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "recipe-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
ROOT_URLCONF = "examples.django_view.urls"
INSTALLED_APPS: list[str] = []
# No CsrfViewMiddleware: POST /orders/ is an API for other services, not a form (a site that
# serves forms keeps the middleware and marks such views @csrf_exempt).
MIDDLEWARE: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

STREAMFLOW_REDIS_URL = os.environ.get("STREAMFLOW_REDIS_URL", "redis://localhost:6379/0")
STREAMFLOW_NAMESPACE = os.environ.get("STREAMFLOW_NAMESPACE", "sf")
