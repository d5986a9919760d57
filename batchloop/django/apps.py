"""The Django app config of ``batchloop.django`` (it has no models: nothing to migrate)."""

from __future__ import annotations

from django.apps import AppConfig


class BatchloopConfig(AppConfig):  # type: ignore[misc]  # Django ships no type hints
    name = "batchloop.django"
    label = "batchloop"
    verbose_name = "batchloop"
