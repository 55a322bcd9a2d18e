"""The VMM's serial console backend: where guest output goes and where input comes from.

It belongs to the VMM, not to a VM: the native ``Console`` outlives guest reboots, so a client
connected to the console socket stays connected while the VM under it is rebuilt. Input sources
(the terminal, socket clients) are read by the VMM's control loop through ``register``.

A console is made before the `vmmpy` command boots its VM, ahead of the rest of the VMM: what only
the terminal and socket modes (or the control loop) need is imported where they need it.
"""

from __future__ import annotations

import os
import sys

from . import _native
from .config import SerialConfig
from .errors import InvalidConfig

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: annotations only
if TYPE_CHECKING:
    import selectors
    import socket


class ConsoleBackend:
    def __init__(self, serial: SerialConfig):
        self.config = serial
        self._listener: socket.socket | None = None
        self._clients: list[socket.socket] = []
        self._selector: selectors.BaseSelector | None = None
        self._tty_saved = None
        self._tty_in: int | None = None
        mode = serial.mode
        if mode in ("Off", "Null"):
            self.native = _native.Console(None)
        elif mode == "File":
            try:
                # The guest's output is the owner's: a file vmmpy creates is 0600.
                fd = os.open(serial.file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise InvalidConfig(f"serial file {serial.file}: {e.strerror}", e.errno) from None
            try:
                self.native = _native.Console(fd)
            finally:
                os.close(fd)
        elif mode == "Tty":
            import termios
            import tty

            self.native = _native.Console(sys.stdout.fileno())
            if sys.stdin.isatty():
                self._tty_in = sys.stdin.fileno()
                self._tty_saved = termios.tcgetattr(self._tty_in)
                tty.setraw(self._tty_in)
        elif mode == "Socket":
            from . import unix_socket

            # Output written before a client connects waits for it: a late client sees the boot banner.
            self.native = _native.Console(None, keep_backlog=True)
            self._listener = unix_socket.listen(serial.socket, 8, "serial socket")
            self._listener.setblocking(False)
        else:
            raise InvalidConfig(f"unsupported serial mode {mode!r}")

    # The control loop calls these with its selector; each key's data is the callback to run.
    def register(self, sel: selectors.BaseSelector) -> None:
        from selectors import EVENT_READ

        self._selector = sel
        if self._listener is not None:
            sel.register(self._listener, EVENT_READ, self._accept)
        if self._tty_in is not None:
            sel.register(self._tty_in, EVENT_READ, self._read_tty)

    def _accept(self) -> None:
        from selectors import EVENT_READ

        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self.native.add_client(conn.fileno())
        self._clients.append(conn)
        self._selector.register(conn, EVENT_READ, lambda c=conn: self._read_client(c))

    def _read_client(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._push(data)
        else:
            self._selector.unregister(conn)
            self._clients.remove(conn)
            conn.close()

    def _read_tty(self) -> None:
        data = os.read(self._tty_in, 4096)
        if data:
            self._push(data)

    def _push(self, data: bytes) -> None:
        if self.native.push_input(data) < len(data):
            import logging

            logging.getLogger("vmmpy.console").debug(
                "console: the guest is not reading its input; dropped what did not fit"
            )

    def close(self) -> None:
        if self._selector is not None:
            for obj in [self._listener, self._tty_in, *self._clients]:
                if obj is not None:
                    try:
                        self._selector.unregister(obj)
                    except (KeyError, ValueError):
                        pass
        for c in self._clients:
            c.close()
        self._clients.clear()
        if self._listener is not None:
            path = self.config.socket
            self._listener.close()
            self._listener = None
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if self._tty_saved is not None:
            import termios

            termios.tcsetattr(self._tty_in, termios.TCSADRAIN, self._tty_saved)
            self._tty_saved = None
        self.native.close()
