"""Listening Unix sockets that only their owner can connect to (serial console, migration).

The socket's mode is set on the socket itself before bind (Linux creates the node with the
socket inode's mode minus the umask), so there is no moment at which the node exists with the
umask's looser mode, and no process-wide umask change races with other threads.
"""

from __future__ import annotations

import os
import socket
import stat

from .errors import InvalidConfig

MODE = 0o600


def listen(path: str, backlog: int, what: str) -> socket.socket:
    """A socket listening at `path` with mode 0600. A stale socket there is replaced; any other
    kind of file is left alone and refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise InvalidConfig(f"{what} {path}: {e.strerror}", e.errno) from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise InvalidConfig(f"{what} {path}: exists and is not a socket; vmmpy replaces only a stale socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), MODE)
        sock.bind(path)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise InvalidConfig(f"{what} {path}: {e.strerror}", e.errno) from None
    return sock
