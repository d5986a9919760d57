"""The monitor: one query per tick for all names, to claim orphans and take over from frozen hosts.

Implements, of :mod:`batchloop.protocol`, the monitor of "Notifications and their loss" and
the owner-died and owner-frozen cases of "Recovery bounds": every ``monitor_interval`` (and at
once after every (re)connection) claim the running or due names whose lock nobody holds; end
the backends of owners whose heartbeat is older than the name's ``monitor_lag`` (which frees
their session locks and aborts their transactions) and claim their names in the same tick; and
when this host's role may not end them, say so once per frozen host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from .. import observe
from ..drivers.errors import insufficient_privilege, server_error
from ..registry import refs
from .claims import Claims, registered
from .session import Control, CurrentSession

log = logging.getLogger("batchloop")

ORPHANS_PER_TICK = 500
"""The most names one tick looks at (most overdue first); the next tick takes the rest."""


class Monitor:
    """The monitor of one host; ``dropped_wakeups`` tells (and forgets) whether the wake-up
    inbox overflowed since the last tick."""

    def __init__(
        self,
        current: CurrentSession,
        claims: Claims,
        host_id: str,
        interval: float,
        dropped_wakeups: Callable[[], bool],
    ) -> None:
        self._current = current
        self._claims = claims
        self._host_id = host_id
        self._interval = interval
        self._dropped_wakeups = dropped_wakeups
        self._explained: set[str] = set()
        """Frozen hosts this host's role may not terminate, already explained in the log."""

    async def run(self) -> None:
        while True:
            await anyio.sleep(self._interval)
            await self.tick()

    async def tick(self) -> None:
        """One query for all names: claim orphans, and end owners that stopped heartbeating."""
        control = self._current.control
        if control is None or self._current.closing or control.lost.is_set():
            return
        if self._dropped_wakeups():
            for loop in list(self._claims.loops.values()):
                loop.wake()
        try:
            rows = await control.fetch(
                "orphans", ORPHANS_PER_TICK, refs("work_query"), refs("worker")
            )
        except Exception as exc:
            log.warning("host %s: monitor query failed: %s", self._host_id, exc)
            if not server_error(exc):
                control.fail()  # timed out or broken: start a fresh session
            return
        wanted: list[str] = []
        ended: dict[str, bool] = {}
        for row in rows:
            name, stale = row["name"], row["stale_owner"]
            if stale is not None:
                if stale == self._host_id:
                    continue
                if stale not in ended:
                    ended[stale] = await self._end_host(control, stale)
                # Its backends are ended, and with them its session locks: claim now rather
                # than on the next tick. A backend still on its way out holds its lock a little
                # longer; then the claim skips the name and the next tick takes it.
                if ended[stale] and registered(row["work_query"], row["worker"]):
                    self._claims.lacking_callables.discard(name)
                    wanted.append(name)
            elif self._claims.runnable(row["work_query"], row["worker"]):
                self._claims.lacking_callables.discard(name)
                wanted.append(name)
        await self._claims.claim_new(wanted)

    async def _end_host(self, control: Control, host_id: str) -> bool:
        """Terminate a frozen host's backends and forget its row; whether that worked."""
        try:
            ended = await control.fetchval("terminate_host", f"batchloop/{host_id}")
            await control.fetchval("forget_host", host_id)
        except Exception as exc:
            if not insufficient_privilege(exc):
                log.error("host %s: could not end frozen host %s: %s", self._host_id, host_id, exc)
                return False
            if host_id not in self._explained:
                self._explained.add(host_id)
                await self._explain_cannot_end(control, host_id, exc)
            return False
        log.error(
            "host %s stopped heartbeating; terminated its %s backend(s) to take over its names",
            host_id,
            ended,
        )
        if observe.observers:
            observe.emit_ownership(
                observe.OwnershipEvent("takeover", self._host_id, other_host=host_id)
            )
        return True

    async def _explain_cannot_end(self, control: Control, host_id: str, exc: BaseException) -> None:
        """Said once per frozen host: it keeps its names until it resumes, dies or is ended."""
        try:
            row = await control.fetchrow("backend_roles", f"batchloop/{host_id}")
        except Exception:
            row = None
        me = row["me"] if row else "this host's role"
        theirs = row["theirs"] if row and row["theirs"] else "another role"
        log.error(
            "host %s cannot take over the names of frozen host %s: %s. Its backends run as %s, "
            "which %s may not terminate: GRANT pg_signal_backend TO %s (not enough for "
            "superuser backends), or run every host as the same role. Its names stay with it "
            "until it resumes or its connections drop.",
            self._host_id,
            host_id,
            exc,
            theirs,
            me,
            me,
        )
