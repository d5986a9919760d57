"""In-process registry of work queries and workers.

A database row names callables as ``"module:qualname"``; the host only ever runs what this
process registered with :func:`work_query` or :func:`worker`. Nothing is imported or looked
up by attribute because a row says so.
"""

from __future__ import annotations

import importlib
import inspect
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


_registry: dict[str, Registered] = {}


def ref_of(func: object) -> str:
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise NotRegisteredError(f"{func!r} is not a function; decorate a module-level async def")
    return f"{module}:{qualname}"


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
    if entry is None or entry.func is not func:
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
