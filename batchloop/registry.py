"""In-process registry of work queries and workers.

A database row names callables as ``"module:qualname"``; the host only ever runs what this
process registered with :func:`work_query` or :func:`worker`. Nothing is imported or looked
up by attribute because a row says so.

A program's main module is ``__main__`` whatever its file is called, and no other process can
import a module under that name. Under ``python -m pkg.mod`` Python knows the real name
(``__main__.__spec__.name``), so callables defined there are registered as ``pkg.mod:fn``,
exactly as a host importing ``pkg.mod`` registers them. A script run as ``python x.py`` has no
such name: its callables stay ``__main__:fn``, runnable only by a host in a process that runs
the same script, which ``ping`` (when no host runs in its process) and the hosts that see such
a name say in the log, with the fix: move the callables into an importable module.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import TypeAdapter

from .errors import NotRegisteredError

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
Kind = Literal["work_query", "worker"]


@dataclass(frozen=True, slots=True)
class Registered:
    ref: str
    kind: Kind
    func: Callable[..., Awaitable[Any]]
    batch_adapter: TypeAdapter[Any] | None
    """Validates a batch against the worker's annotated ``batch`` parameter, if any."""


log = logging.getLogger("batchloop")

_registry: dict[str, Registered] = {}
_aliases: dict[str, list[Callable[..., Awaitable[Any]]]] = {}
"""For ``python -m pkg.mod`` whose own code also imports ``pkg.mod``: the module then runs twice
(as ``__main__`` and as ``pkg.mod``) and both copies of a function are the same callable."""

MAIN_PREFIX = "__main__:"
_hosts_running = 0
_warned: set[tuple[str, str]] = set()


def _module_name(module: str) -> str:
    """``module``, or for the main module the name it was run as (``python -m pkg.mod``)."""
    if module != "__main__":
        return module
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    # "pkg.__main__" (python -m pkg) is importable too; a spec named "__main__" is not.
    return name if isinstance(name, str) and name and name != "__main__" else module


def ref_of(func: object) -> str:
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise NotRegisteredError(f"{func!r} is not a function; decorate a module-level async def")
    return f"{_module_name(module)}:{qualname}"


MAIN_HELP = (
    "{refs} {verb} defined in a script run as `python file.py`, whose module is `__main__` in "
    "every process: no host in another process can import or run them. Move them into an "
    "importable module (e.g. myapp/jobs.py), import them from there, and run hosts with "
    "Host(dsn, modules=['myapp.jobs']) or `batchloop run myapp.jobs` (or run the script as "
    "`python -m myapp.script`)"
)


def main_refs(*refs_: str) -> list[str]:
    """The refs among ``refs_`` that name the unimportable ``__main__`` module."""
    return [ref for ref in refs_ if ref.startswith(MAIN_PREFIX)]


def host_running(delta: int) -> None:
    """A Host in this process started (+1) or stopped (-1)."""
    global _hosts_running
    _hosts_running += delta


def warn_unhostable(query_ref: str, worker_ref: str) -> None:
    """Warn (once per pair, per process) when ``ping`` stores ``__main__`` callables that only
    a host in this very process could run, and none runs here: a warning, not an error,
    because a script that also runs a Host (or identical scripts on several machines, each
    with its Host) runs them fine."""
    found = main_refs(query_ref, worker_ref)
    if not found or _hosts_running > 0 or (query_ref, worker_ref) in _warned:
        return
    _warned.add((query_ref, worker_ref))
    log.warning(
        "ping: %s; unless this process starts a Host, the worker stays 'running' with no host",
        main_help(found),
    )


def main_help(found: list[str]) -> str:
    return MAIN_HELP.format(refs=" and ".join(found), verb="are" if len(found) > 1 else "is")


def _check_registrable(func: Callable[..., Any], decorator: str) -> str:
    ref = ref_of(func)
    if not inspect.iscoroutinefunction(func):
        raise TypeError(f"@batchloop.{decorator} needs an `async def`, got {ref}")
    qualname = ref.split(":", 1)[1]
    if "<" in qualname or "." in qualname:
        raise TypeError(
            f"@batchloop.{decorator} needs a module-level function, got {ref}: lambdas, "
            "closures and methods cannot be found again by another process"
        )
    return ref


def _batch_adapter(func: Callable[..., Any]) -> TypeAdapter[Any] | None:
    params = list(inspect.signature(func).parameters.values())
    if len(params) < 2:
        raise TypeError(f"a worker takes (conn, batch); {ref_of(func)} takes {len(params)} args")
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # unresolvable forward refs: skip validation rather than refuse
        return None
    annotation = hints.get(params[1].name)
    if annotation is None or annotation is Any:
        return None
    return TypeAdapter(annotation)


def _register(func: F, kind: Kind) -> F:
    ref = _check_registrable(func, kind)
    existing = _registry.get(ref)
    if existing is not None and existing.kind != kind:
        raise TypeError(f"{ref} is already registered as a {existing.kind}")
    adapter = _batch_adapter(func) if kind == "worker" else None
    if existing is not None and "__main__" in (existing.func.__module__, func.__module__):
        _aliases.setdefault(ref, []).append(existing.func)
    _registry[ref] = Registered(ref, kind, func, adapter)
    return func


def work_query(func: F) -> F:
    """Register ``async def q(conn, name) -> Work[T] | Idle`` as a work query."""
    return _register(func, "work_query")


def worker(func: F) -> F:
    """Register ``async def w(conn, batch: T) -> Debounce | None`` as a worker."""
    return _register(func, "worker")


def resolve_callable(func: object, kind: Kind) -> str:
    """The registered ref of ``func``; raises with a fix-it message when it is not registered."""
    ref = ref_of(func)
    entry = _registry.get(ref)
    if entry is None or (entry.func is not func and func not in _aliases.get(ref, ())):
        decorator = f"@batchloop.{kind}"
        raise NotRegisteredError(
            f"{ref} is not a registered {kind}: decorate a module-level `async def` with "
            f"{decorator} (lambdas, closures and undecorated functions cannot run on a host)"
        )
    if entry.kind != kind:
        raise NotRegisteredError(f"{ref} is registered as a {entry.kind}, not a {kind}")
    return ref


def lookup(ref: str, kind: Kind) -> Registered | None:
    entry = _registry.get(ref)
    return entry if entry is not None and entry.kind == kind else None


def refs(kind: Kind) -> list[str]:
    """Every ref registered in this process as ``kind``."""
    return [ref for ref, entry in _registry.items() if entry.kind == kind]


def import_modules(modules: Iterable[str]) -> None:
    """Import the modules whose decorators register this host's callables."""
    for module in modules:
        importlib.import_module(module)
