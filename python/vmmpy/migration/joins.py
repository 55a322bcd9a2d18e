"""The extra connections of a migration with `connections` = N > 1, on the destination.

While the attempt being served waits for them, serve() hands every new connection to its join
window instead of answering it busy. Each is vetted on a thread of its own (its TLS handshake and
its Join, by the join deadline), so a stranger that stalls delays no other; one that fails is
answered Error and closed. A well-formed Join comes back through the window, and the waiting
attempt takes it unless its index has joined already.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time

from ..errors import MigrationError, VmmError
from . import transport
from .protocol import MESSAGE_MAX, Command, Connection, Status

JOIN_TIMEOUT_S = 10.0  # for all extra connections of a migration to arrive and present the token
MAX_VETTING = 16  # connections whose handshake and Join are read at once while joins are awaited


class JoinWindow:
    """Open while an attempt waits for its extra connections. The window's queue carries new
    sockets from serve(), vetted (index, connection) pairs back, and None when the receiver is
    closed."""

    def __init__(self, tls, emit):
        self._tls = tls  # _native.TlsContext ("server"), or None for plaintext
        self._emit = emit  # emit(event, properties): a vm.<event> of the receiving VMM
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue | None = None

    def open(self) -> None:
        with self._lock:
            self._queue = queue.SimpleQueue()

    def offer(self, sock: socket.socket) -> bool:
        """Hands a new connection to the attempt waiting for joins; False if none waits."""
        with self._lock:
            if self._queue is None:
                return False
            self._queue.put(sock)
            return True

    def interrupt(self) -> None:
        """The receiver is closed: an attempt waiting for joins stops waiting."""
        with self._lock:
            if self._queue is not None:
                self._queue.put(None)

    def close(self) -> None:
        with self._lock:
            window, self._queue = self._queue, None
        while window is not None and not window.empty():  # handed over after the last take
            item = window.get()
            if item is not None:
                (item[1] if isinstance(item, tuple) else item).close()

    def take(self, count: int, token: str) -> list[Connection]:
        """The `count` extra connections presenting `token`, within JOIN_TIMEOUT_S (a
        MigrationError otherwise, with those taken so far closed)."""
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        wanted = set(range(1, count + 1))
        window = self._queue
        assert window is not None
        joined: list[Connection] = []
        vetting: list[tuple[threading.Thread, socket.socket]] = []
        taken: set[socket.socket] = set()  # handed over by their vetting: never cut short below
        try:
            while wanted:
                try:
                    item = window.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    raise MigrationError(
                        f"{len(wanted)} of {count} extra connections did not join within {JOIN_TIMEOUT_S:g} s"
                    ) from None
                if item is None:
                    raise MigrationError("the receiver was closed while extra connections were joining")
                if not isinstance(item, tuple):
                    vetting = [(t, sock) for t, sock in vetting if t.is_alive()]
                    t = threading.Thread(
                        target=self._vet,
                        args=(item, count, token, deadline, window),
                        name="migration-join",
                        daemon=True,
                    )
                    try:
                        if len(vetting) >= MAX_VETTING:
                            raise RuntimeError("too many connections joining at once")
                        t.start()
                    except RuntimeError as e:  # too many, or no thread to be had
                        item.close()
                        self._emit("migration-join-refused", {"error": str(e)})
                        continue
                    vetting.append((t, item))
                    continue
                index, extra = item
                taken.add(extra.sock)
                try:
                    if index not in wanted:
                        raise MigrationError(f"connection {index} has joined already")
                    extra.respond(Status.OK)
                except Exception as e:  # noqa: BLE001 - the joiner may be gone
                    self._refuse(extra, e)
                    continue
                wanted.discard(index)
                # Idle between frames as long as the first connection lives: that one ends them.
                transport.set_timeouts(extra.sock, 0, transport.IO_TIMEOUT_S)
                joined.append(extra)
        except BaseException:
            for extra in joined:
                extra.close()
            raise
        finally:
            for t, sock in vetting:  # still vetting: cut short (what they hand over is closed)
                if t.is_alive() and sock not in taken:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            for t, _ in vetting:
                t.join()
        return joined

    def _vet(self, sock: socket.socket, count: int, token: str, deadline: float, window) -> None:
        """One connection's handshake and Join (by `deadline`): a well-formed Join with `token`
        goes back through `window`."""
        try:
            extra = transport.secure(sock, self._tls)
        except VmmError as e:
            self._emit("migration-join-refused", {"error": str(e)})
            return
        try:
            extra.deadline = deadline
            command, _, length, fds = extra.read_request()
            for fd in fds:
                os.close(fd)
            doc = extra.read_json(length, MESSAGE_MAX) if command == Command.JOIN else {}
            index = doc.get("index")
            import hmac  # here, not at the top: a VMM that only boots never loads it

            if (
                not hmac.compare_digest(str(doc.get("token", "")).encode(), token.encode())
                or type(index) is not int
                or not 1 <= index <= count
            ):
                raise MigrationError("not a connection of the migration being received")
            extra.deadline = None
        except Exception as e:  # noqa: BLE001 - whatever a stranger sends, only it is refused
            self._refuse(extra, e)
            return
        window.put((index, extra))

    def _refuse(self, extra: Connection, error: Exception) -> None:
        try:
            extra.respond_error(str(error))
        except Exception:  # noqa: BLE001 - the stranger may be gone
            pass
        extra.close()
        self._emit("migration-join-refused", {"error": str(error)})
