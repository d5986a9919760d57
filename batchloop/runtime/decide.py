"""The loop's decisions as pure functions: given what happened and the clock, what next.

No I/O here. ``iteration.py`` carries the decisions out inside its transactions, ``loop.py``
the schedule between them; the unit tests exercise every branch without a database. Durations
are float seconds measured with the database's clock (``now()`` deltas), never a host's wall
clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models import Debounce, Idle

RUNNING_THRESHOLD = 1.0
"""An ``Idle(timeout=t)`` with t at most max(this, poll_interval) keeps the worker running."""

FIRST_RETRY = 0.5
"""Backoff base: the first retry comes after 0.25 to 0.5 s."""


@dataclass(frozen=True, slots=True)
class RunAgain:
    """Stay running; run the next iteration after ``delay`` seconds."""

    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class Sleep:
    """Leave the running state: idle until a ping, or waiting until ``timeout`` elapses."""

    timeout: float | None

    @property
    def state(self) -> str:
        return "idle" if self.timeout is None else "waiting"


Decision = RunAgain | Sleep


def after_work(result: Debounce | None) -> RunAgain:
    """A batch committed: drain on at once, or after the worker's debounce."""
    if result is None:
        return RunAgain(0.0, "work")
    return RunAgain(result.seconds, "debounce")


def after_idle(idle: Idle, since_work: float) -> Decision:
    """The query found nothing. ``since_work``: seconds since the last batch or wake."""
    if since_work < idle.cooldown:
        return RunAgain(idle.poll_interval, "cooldown")
    if idle.timeout is not None and idle.timeout <= max(RUNNING_THRESHOLD, idle.poll_interval):
        # Never faster than poll_interval: Idle(timeout=0) must not spin the database.
        return RunAgain(max(idle.timeout, idle.poll_interval), "short timeout")
    return Sleep(idle.timeout)


def lock_first(last: Idle | None, since_work: float) -> bool:
    """Whether a poll takes the wake lock before its query rather than after: the last poll's
    ``Idle``, given ``since_work`` now, would go to sleep. The query under the lock is then the
    go-idle confirmation itself (one query and one statement fewer). A wrong guess costs only
    the lock, held for one poll.

    >>> lock_first(Idle(cooldown=2.0), since_work=2.5)
    True
    >>> lock_first(Idle(cooldown=2.0), since_work=1.0)  # still cooling down: no lock
    False
    >>> lock_first(Idle(timeout=0.5), since_work=9.0)  # a short timeout never sleeps
    False
    """
    return last is not None and isinstance(after_idle(last, since_work), Sleep)


def after_failure(failures: int, cap: float, jitter: float) -> RunAgain:
    """Exponential backoff with jitter. ``failures`` >= 1 counts this one; ``jitter`` in [0, 1)."""
    if failures < 1:
        raise ValueError("failures counts the failure being handled, so it is at least 1")
    if not 0.0 <= jitter < 1.0:
        raise ValueError("jitter must be in [0, 1)")
    base = min(cap, FIRST_RETRY * 2.0 ** min(failures - 1, 60))
    return RunAgain(base * (0.5 + 0.5 * jitter), "retry")


def after_confirm(idle: Idle) -> Sleep:
    """The go-idle step re-ran the query while holding off pings, and it still found nothing
    (had it found work, the worker runs it as any batch: :func:`after_work`)."""
    return Sleep(idle.timeout)


SHARE_SLACK = 0.05
"""How far past an even share a host may go before it lets other hosts claim first."""
CLAIM_DEFER_MAX = 0.05
"""The longest a host over its share holds a claim back (others claim in milliseconds)."""


def claim_delay(mine: int, others: int, others_owned: int) -> float:
    """How long a host owning ``mine`` names holds back a claim of new ones, given ``others``
    live hosts owning ``others_owned`` names between them (as of their last heartbeats).

    A host over an even share waits a little before claiming, in proportion to its excess,
    so that hosts with fewer names win the race for new ones; it still claims what nobody took
    meanwhile, so no name waits for a host that is gone. Alone, or within its share: at once.

    >>> claim_delay(100, 2, 200)  # an even share
    0.0
    >>> claim_delay(300, 2, 300) > 0  # 300 against an even share of 200
    True
    """
    if others <= 0 or mine <= 0:
        return 0.0
    fair = (mine + others_owned) / (others + 1)
    excess = mine - fair * (1 + SHARE_SLACK) - 1
    if excess <= 0:
        return 0.0
    return min(CLAIM_DEFER_MAX, 0.002 + 0.001 * excess / max(1.0, fair) * 100)
