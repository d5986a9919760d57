"""A minimal Django settings module for tests/test_django.py: the database comes from
``BATCHLOOP_TEST_DJANGO_DSN`` (a ``postgresql://`` URL from the test fixtures)."""

from __future__ import annotations

import os
from urllib.parse import parse_qs, unquote, urlsplit


def database(url: str) -> dict[str, object]:
    """Django's DATABASES entry for a ``postgresql://`` URL (a unix socket in ``?host=``)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or query.get("host", [""])[0],
        "PORT": str(parts.port or query.get("port", [""])[0]),
    }


SECRET_KEY = "tests-only"
USE_TZ = True
INSTALLED_APPS = ["batchloop.django"]
DATABASES = {"default": database(os.environ.get("BATCHLOOP_TEST_DJANGO_DSN", "postgresql:///x"))}
BATCHLOOP_MODULES = ["jobs"]
