"""The claims ledger: which names this host owns, is claiming, must look at again, or cannot run.

Implements the claiming side of "Notifications and their loss" in :mod:`batchloop.protocol`:
claims never wait, go in batches of up to ``CLAIM_BATCH`` names per ``claim_many`` (together
with the unlocks that go first), give back whatever they took if anything fails after the
lock, and a released name is re-checked in the same statement that unlocks it. Owning a name
is holding its session lock on the current control session (:mod:`.session`); the loop it
starts is :mod:`.loop`'s.
"""

from __future__ import annotations

import logging

import anyio

from .. import observe
from ..drivers.errors import server_error
from ..registry import lookup, main_help, main_refs
from . import decide
from .iteration import CallableMissing, LoadedWorker
from .loop import LoopContext, NameLoop
from .session import Control, CurrentSession, Shares

log = logging.getLogger("batchloop")

CLAIM_BATCH = 50
"""Names claimed per statement: a burst of pings costs one round trip and one commit per this
many names, each statement stays far below the control connection's statement timeout, and
its subtransactions (one per name claimed) stay within PostgreSQL's per-backend cache of 64."""


class Claims:
    """The names this host owns and their loops, and the claims that make them so."""

    def __init__(self, current: CurrentSession, host_id: str) -> None:
        self._current = current
        self._host_id = host_id
        self.ctx: LoopContext | None = None
        """What the loops claimed get; set once the host has its pool."""
        self.loops: dict[str, NameLoop] = {}
        """The names owned, each with its loop."""
        self.claiming: set[str] = set()
        """Names a claim statement is out for."""
        self.recheck: set[str] = set()
        """Names to claim again once their current claim is done: a wake-up for them came
        while that claim was out, and may have committed after it looked."""
        self.lacking_callables: set[str] = set()
        """Names whose callables this process does not have: their wake-ups are left to other
        hosts (until the monitor finds the name runnable here)."""
        self._warned: set[tuple[str, str]] = set()
        """(work query, worker) pairs already explained in the log as not runnable here."""
        self.emptied = anyio.Event()
        """Set when the last loop ends (a fresh one for each drain)."""
        self._released: list[tuple[str | None, int]] = []
        """Names whose loops ended (None: not to be re-checked) with their lock keys, waiting
        for the statement that unlocks and re-checks them."""
        self._releasing = False
        """A task is sending the releases (it takes those that queue up meanwhile along)."""
        self.shares = Shares(owned=lambda: len(self.loops))
        """This host's names against the other hosts', refreshed by the heartbeat."""

    async def drain(self, grace: float) -> None:
        """Ask every loop to stop after its iteration in flight; wait up to ``grace`` seconds
        for them all to end."""
        if not self.loops:
            return
        self.emptied = anyio.Event()
        for loop in list(self.loops.values()):
            loop.stopping = True
            loop.wake()
        with anyio.move_on_after(grace):
            await self.emptied.wait()

    def forget_all(self) -> None:
        """The session ended: its locks, and so every name, are gone."""
        self.loops.clear()
        self.claiming.clear()
        self.recheck.clear()
        self._released.clear()

    async def explain_main_module_workers(self, control: Control) -> None:
        """Name the names whose callables live in another program's ``__main__``, which no
        host can import: said once, at the first session."""
        try:
            rows = await control.fetch("main_module_workers")
        except Exception as exc:  # only a diagnostic: never a reason to fail the start
            log.debug("host %s: main_module_workers failed: %s", self._host_id, exc)
            return
        for row in rows:
            self.runnable(row["work_query"], row["worker"], row["name"])

    def runnable(self, query_ref: str, worker_ref: str, name: str | None = None) -> bool:
        """Whether both callables are registered here; if not, say why once per pair."""
        if registered(query_ref, worker_ref):
            return True
        if (query_ref, worker_ref) not in self._warned:
            self._warned.add((query_ref, worker_ref))
            unimportable = [
                ref
                for ref in main_refs(query_ref, worker_ref)
                if not lookup(ref, "worker") and not lookup(ref, "work_query")
            ]
            if unimportable:
                log.error(
                    "host %s cannot run %s: %s",
                    self._host_id,
                    repr(name) if name else "a worker",
                    main_help(unimportable),
                )
                return False
            log.warning(
                "host %s does not run %s / %s: not registered here (pass their module in "
                "Host(modules=...))",
                self._host_id,
                query_ref,
                worker_ref,
            )
        return False

    def claim_delay(self) -> float:
        """How long to hold back a claim of new names (:func:`.decide.claim_delay`)."""
        shares = self.shares
        return decide.claim_delay(len(self.loops), shares.others, shares.others_owned)

    async def claim_new(self, names: list[str], *, handoff: bool = False) -> NameLoop | None:
        """Claim names found without an owner (told by a wake-up, or found by the monitor);
        over an even share, only after letting the other hosts claim first: what they leave,
        we take. ``handoff`` as for :meth:`claim`."""
        if not names:
            return None
        if (delay := self.claim_delay()) > 0:
            await anyio.sleep(delay)
        return await self.claim(names, handoff=handoff)

    async def claim(
        self, names: list[str], unlock: list[int] | None = None, *, handoff: bool = False
    ) -> NameLoop | None:
        """Claim ``names`` (those not already ours), after unlocking ``unlock``: one statement
        per ``CLAIM_BATCH`` names; start their loops. With ``handoff``, one loop is returned
        for the caller to run instead of being started."""
        if not self._current.alive():
            return None
        names = list(dict.fromkeys(names))
        # A name being claimed already may have been looked at before this wake-up's ping
        # committed: look again once that claim is done (instead of waiting for the monitor).
        self.recheck.update(n for n in names if n in self.claiming)
        wanted = [n for n in names if n not in self.loops and n not in self.claiming]
        self.claiming.update(wanted)
        kept = None
        try:
            for i in range(0, max(len(wanted), 1), CLAIM_BATCH):
                chunk, first = wanted[i : i + CLAIM_BATCH], i == 0
                loop = await self._claim_batch(chunk, unlock if first else None, handoff and first)
                kept = kept or loop
        finally:
            self.claiming.difference_update(wanted)
        done = {n for n in self.recheck if n not in self.claiming}
        self.recheck -= done
        again = [n for n in done if n not in self.loops]
        if again:
            await self.claim(again)
        return kept

    async def _claim_batch(
        self, names: list[str], unlock: list[int] | None, handoff: bool
    ) -> NameLoop | None:
        control, tasks = self._current.control, self._current.tasks
        if (not names and not unlock) or not self._current.alive():
            return None
        assert control is not None and tasks is not None and self.ctx is not None
        try:
            rows = await control.fetch("claim_many", names, self._host_id, unlock or [])
        except Exception as exc:
            log.warning("host %s: claim of %s failed: %s", self._host_id, _some(names), exc)
            if not server_error(exc):
                # Did it take locks? Unknown: drop the session, and every lock.
                control.fail()
            elif unlock:
                # The claims gave back what they took; the unlocks may not have happened.
                await self.unlock(control, unlock)
            return None
        if not self._current.alive():
            await self.unlock(control, [row["lock_key"] for row in rows])
            return None
        refused: list[int] = []
        kept = None
        for row in rows:
            name = row["name"]
            try:
                bound = LoadedWorker.from_row(row)
            except Exception as exc:
                if isinstance(exc, CallableMissing):
                    self.runnable(row["work_query"], row["worker"], name)
                    self.lacking_callables.add(name)
                else:
                    log.error("host %s: cannot run %r: %s", self._host_id, name, exc)
                refused.append(row["lock_key"])
                continue
            loop = NameLoop.claimed(self.ctx, name, row, bound)
            self.loops[name] = loop
            log.debug(
                "host %s claimed %r generation %d",
                self._host_id,
                name,
                loop.generation,
                extra={"batchloop_name": name, "batchloop_generation": loop.generation},
            )
            if observe.observers:
                observe.emit_ownership(
                    observe.OwnershipEvent("claim", self._host_id, name, loop.generation)
                )
            if handoff and kept is None:
                kept = loop
            else:
                tasks.start_soon(loop.run, name=f"batchloop:{name}")
        if refused:
            await self.unlock(control, refused)
        return kept

    async def unlock(self, control: Control, keys: list[int]) -> None:
        try:
            await control.fetchval("unlock", keys)
        except Exception as exc:
            log.warning("host %s: unlock failed (%s); dropping the session", self._host_id, exc)
            control.fail()

    async def release(self, loop: NameLoop) -> None:
        """A loop ended: unlock its name and re-check it in one statement (a ping may have
        raced the loop's end)."""
        if self.loops.get(loop.name) is loop:
            del self.loops[loop.name]
            if observe.observers:
                observe.emit_ownership(
                    observe.OwnershipEvent("release", self._host_id, loop.name, loop.generation)
                )
        if not self.loops:
            self.emptied.set()
        if not self._current.alive():
            return  # closing keeps locks for the goodbye; a dying session loses them anyway
        self._released.append((None if loop.unrunnable else loop.name, loop.lock_key))
        if self._releasing:
            return
        # Loops ending together (a burst of names going idle) share one statement per
        # CLAIM_BATCH: the control connection runs one statement at a time, and a release
        # apiece would queue them up behind each other and behind the claims of new work.
        self._releasing = True
        try:
            while self._released and self._current.alive():
                batch = self._released[:CLAIM_BATCH]
                del self._released[:CLAIM_BATCH]
                names = [name for name, _ in batch if name is not None]
                await self.claim(names, unlock=[key for _, key in batch])
        finally:
            self._releasing = False
            if not self._current.alive():
                self._released.clear()


def registered(query_ref: str, worker_ref: str) -> bool:
    """Whether both callables are registered in this process."""
    return bool(lookup(query_ref, "work_query") and lookup(worker_ref, "worker"))


def _some(names: list[str]) -> str:
    return repr(names[0]) if len(names) == 1 else f"{len(names)} names"
