"""batchloop: one loop per named queue, cluster-wide, over PostgreSQL.

See README.md for usage and :mod:`batchloop.protocol` for how it works.
"""

from . import cursor
from ._version import __version__
from .api import list_hosts, list_workers, migrate, ping, start, status, stop, wake
from .errors import (
    BatchloopError,
    NotRegisteredError,
    SchemaMissingError,
    SchemaTooNewError,
    SessionRequiredError,
)
from .models import (
    Config,
    Debounce,
    Health,
    HostStatus,
    Idle,
    Owner,
    TickReport,
    Work,
    WorkerStatus,
)
from .registry import work_query, worker
from .runtime.host import Host
from .runtime.tick import tick

__all__ = [
    "BatchloopError",
    "Config",
    "Debounce",
    "Health",
    "Host",
    "HostStatus",
    "Idle",
    "NotRegisteredError",
    "Owner",
    "SchemaMissingError",
    "SchemaTooNewError",
    "SessionRequiredError",
    "TickReport",
    "Work",
    "WorkerStatus",
    "__version__",
    "cursor",
    "list_hosts",
    "list_workers",
    "migrate",
    "ping",
    "start",
    "status",
    "stop",
    "tick",
    "wake",
    "work_query",
    "worker",
]
