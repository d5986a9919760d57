"""Wake-ups: the NOTIFY payload codec, and the dispatcher that hands each wake-up to its loop.

Implements "Notifications and their loss" of :mod:`batchloop.protocol`, the receiving side:
a wake-up for an owned name wakes (or stops) its loop, a cooling one runs its polling loop at
once (other hosts ignore it), one for a name nobody here owns is
claimed (the notifications that arrived together in one ``claim_many``), and a dropped one is
made up for by the monitor, which re-arms every owned loop after an overflow.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Literal

import anyio
from anyio.abc import TaskGroup

from .. import observe
from ..observe import logs as observe_logs
from .claims import CLAIM_BATCH, Claims
from .session import CurrentSession

Kind = Literal["w", "s", "r", "c"]
"""wake (a ping found the name idle or waiting), stop, released (a host let the name go),
cooling (a ping found the name running while its loop polls: only the owner acts on it)."""

INBOX_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Wakeup:
    kind: Kind
    name: str


def encode(kind: Kind, name: str) -> str:
    """``<kind>::<name>``: the three fields every release of batchloop splits a payload into.

    The middle one is empty: no host ever read it. The SQL functions of migrations/0001 still
    put the name's lock key there (changing them takes a migration); :func:`decode` skips it."""
    return f"{kind}::{name}"


def decode(payload: str) -> Wakeup | None:
    """The wake-up in a payload; None if it is none of ours. A name may hold ':' (only the
    first two split the fields)."""
    kind, colon, rest = payload.partition(":")
    _lock_key, colon2, name = rest.partition(":")
    if not (colon and colon2) or kind not in ("w", "s", "r", "c"):
        return None
    return Wakeup(kind, name)  # type: ignore[arg-type]  # checked just above


class Dispatcher:
    """Receives the control connection's notifications and acts on them in batches."""

    def __init__(self, current: CurrentSession, claims: Claims) -> None:
        self._current = current
        self._claims = claims
        self._send, self._inbox = anyio.create_memory_object_stream[str](INBOX_SIZE)
        self._dropped = False

    def on_notify(self, payload: str) -> None:
        try:
            self._send.send_nowait(payload)
        except anyio.WouldBlock:
            # A dropped wake-up may have been for a name we own and sleep on (waiting); the
            # next monitor tick re-arms every owned loop from the database.
            self._dropped = True

    def take_dropped(self) -> bool:
        """Whether a wake-up was dropped since the last call (the inbox was full)."""
        dropped, self._dropped = self._dropped, False
        return dropped

    async def run(self) -> None:
        """Dispatch until the session ends, or until this task goes on into a claimed loop."""
        loops = self._claims.loops
        async for payload in self._inbox:
            arrived = time.perf_counter()
            # Whatever else has arrived goes with it: a burst of pings is claimed in batches.
            payloads = [payload]
            with contextlib.suppress(anyio.WouldBlock):
                while len(payloads) < CLAIM_BATCH:
                    payloads.append(self._inbox.receive_nowait())
            wanted: list[str] = []
            for wakeup in filter(None, map(decode, payloads)):
                loop = loops.get(wakeup.name)
                if wakeup.kind == "c":
                    if loop is not None:  # another host's loop: nothing to claim
                        loop.work_arrived()
                elif wakeup.kind == "s":
                    if loop is not None:
                        loop.stopping = True
                        loop.wake()
                elif loop is not None:
                    loop.wake()
                elif wakeup.name not in self._claims.lacking_callables:
                    wanted.append(wakeup.name)
            claimed = await self._claims.claim_new(wanted, handoff=True)
            if claimed is not None:
                if observe.observers:
                    # The host's task tree carries its id in the log context.
                    context = observe_logs.current.get()
                    observe.emit_wake(
                        observe.WakeEvent(
                            claimed.name,
                            context.host if context is not None else None,
                            time.perf_counter() - arrived,
                        )
                    )
                # A wake-up is latency-bound: this task goes on into the loop it claimed at
                # once, and a new task takes over the dispatching (started after the loop's
                # first statement is on its way: starting a task costs more than sending it).
                asyncio.get_running_loop().call_soon(self._start_replacement, self._current.tasks)
                await claimed.run()
                return

    def _start_replacement(self, tasks: TaskGroup | None) -> None:
        """Start the dispatcher that replaces one which went on into a loop, unless the session
        it was dispatching for has ended meanwhile."""
        current = self._current.tasks
        if tasks is not None and tasks is current and not tasks.cancel_scope.cancel_called:
            tasks.start_soon(self.run)
