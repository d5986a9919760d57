"""Drivers for the peer job queues in the drain benchmark (``bench/drain.py``).

Each module exposes ``SETTINGS`` (a one-line description of how it is tuned) and
``async def trial(dsn, rows, batch, options) -> dict``: install the queue's schema in the empty
database ``dsn``, enqueue ``rows`` no-op jobs (timed apart), then drain them with the queue's own
worker (timed) and report ``enqueue_s``, ``drain_s``, ``remaining`` and the settings used.
They import their queue lazily, so the harness runs without the ``bench`` extra installed.
"""
