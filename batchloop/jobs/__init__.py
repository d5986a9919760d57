"""batchloop.jobs: typed background jobs with a lifecycle, on one batchloop loop per queue.

See ``docs/jobs.md``. ``batchloop migrate`` creates the jobs table.

>>> import batchloop.jobs as jobs
>>> sorted(jobs.__all__)[:4]
['DEFAULT_RETENTION', 'Job', 'JobContext', 'JobRun']
"""

from .admin import cancel, get, list_jobs, queue_counts, retry
from .context import JobContext
from .model import JobRun, Status
from .queue import queue_name
from .registry import DEFAULT_RETENTION, Job, NonRetryable, job

__all__ = [
    "DEFAULT_RETENTION",
    "Job",
    "JobContext",
    "JobRun",
    "NonRetryable",
    "Status",
    "cancel",
    "get",
    "job",
    "list_jobs",
    "queue_counts",
    "queue_name",
    "retry",
]
