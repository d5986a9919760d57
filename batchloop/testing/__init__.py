"""batchloop's testing kit: a pytest plugin and two helpers, on real PostgreSQL.

Installed with batchloop, the plugin (:mod:`batchloop.testing.plugin`, entry point ``pytest11``
named ``batchloop``) gives every test suite the fixtures ``batchloop_dsn`` (a fresh migrated
database per test, copied from a template migrated once per session) and ``batchloop_host``
(a running ``Host`` for the modules of ``@pytest.mark.batchloop_modules(...)``). The helpers:

- :func:`drain`: run a name's work query and worker on the test's connection, in its
  transaction, until the query says idle; no host needed.
- :func:`wait_idle`: wait until a host has finished a name's work.

See docs/testing.md for a complete example.
"""

from .kit import DrainRefused, UnknownWorkerError, drain, finished, wait_idle

__all__ = ["DrainRefused", "UnknownWorkerError", "drain", "finished", "wait_idle"]
