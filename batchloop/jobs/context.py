"""What a handler gets besides its payload: :class:`JobContext`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runner import Attempt


class JobContext:
    """The running attempt of a job, as its handler sees it.

    ``id``, ``type``, ``queue``; ``attempt`` (1 on the first run) of ``max_attempts``.
    """

    __slots__ = ("_attempt", "attempt", "id", "max_attempts", "queue", "type")

    def __init__(self, attempt: Attempt) -> None:
        self._attempt = attempt
        self.id = attempt.id
        self.type = attempt.spec.type
        self.queue = attempt.spec.queue
        self.attempt = attempt.attempt
        self.max_attempts = attempt.max_attempts

    def __repr__(self) -> str:
        return f"<JobContext {self.type!r} id={self.id} attempt={self.attempt}>"

    async def progress(self, percent: int) -> None:
        """Record ``percent`` (an int, 0..100); :func:`batchloop.jobs.get` sees it at once.

        A no-op once this attempt has lost its lease (another attempt may be running)."""
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
            raise ValueError(f"progress is an int from 0 to 100, got {percent!r}")
        await self._attempt.runtime.progress(self._attempt, percent)

    async def cancelled(self) -> bool:
        """Whether the job was canceled while this attempt runs (it then ends canceled,
        whatever the handler returns), or this attempt lost its lease: either way, stop."""
        return await self._attempt.runtime.cancelled(self._attempt)
