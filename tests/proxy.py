"""A loopback TCP proxy for network-fault tests: freeze (half-open), cut, resume.

``Proxy(target_port)`` listens on 127.0.0.1 and a free port and forwards every connection to
127.0.0.1:``target_port``. It runs its own asyncio loop in a daemon thread, so it keeps
forwarding while the test's own event loop (or the test thread) is blocked, and its methods are
plain synchronous calls that return once the change is in effect.

* ``freeze()``: forward nothing more, in either direction, and keep every socket open: the peers
  see a silent, half-open connection (a partition, a dead switch). Bytes already read are held;
  end-of-stream and closes are held too. New connections are accepted but not connected
  upstream until ``resume()``.
* ``resume()``: forward again, held bytes and closes first.
* ``cut()``: abort every current connection on both sides (the peers see a reset); new
  connections are still accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")


class Proxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.accepted = 0
        """Connections accepted so far (useful to wait until a client came through)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread.start()
        self._call(self._start())

    # ------------------------------------------------------------------ synchronous surface

    def dsn(self, dsn: str) -> str:
        """``dsn`` (a ``postgresql://`` URL) pointed at this proxy instead."""
        parts = urlsplit(dsn)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def freeze(self) -> None:
        self._call(self._set_flowing(False))

    def resume(self) -> None:
        self._call(self._set_flowing(True))

    def cut(self) -> int:
        """Abort every open connection; returns how many there were."""
        return self._call(self._cut())

    def open_connections(self) -> int:
        return self._call(self._count())

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the proxy's own loop

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _count(self) -> int:
        return len(self._conns)

    async def _cut(self) -> int:
        conns = list(self._conns)
        for client, upstream in conns:
            client.transport.abort()
            if upstream is not None:
                upstream.transport.abort()
        return len(conns)

    async def _shutdown(self) -> None:
        assert self._server is not None and self._flowing is not None
        self._server.close()
        self._flowing.set()
        await self._cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        entry: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (c_writer, None)
        self._conns.add(entry)
        try:
            await self._flowing.wait()  # a partition: nothing reaches the server
            try:
                u_reader, u_writer = await asyncio.open_connection(*self.target)
            except OSError:
                c_writer.transport.abort()  # like a refused connection, as far as a client cares
                return
            self._conns.discard(entry)
            entry = (c_writer, u_writer)
            self._conns.add(entry)
            await asyncio.gather(self._pump(c_reader, u_writer), self._pump(u_reader, c_writer))
        finally:
            self._conns.discard(entry)
            self._tasks.discard(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                data = await src.read(65536)
                if not data:
                    break
                await self._flowing.wait()  # bytes read just before a freeze are held
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await self._flowing.wait()  # so is the close
            with contextlib.suppress(Exception):
                dst.close()
