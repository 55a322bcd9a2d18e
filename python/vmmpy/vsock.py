"""The vsock device's listening socket: bound here with vmmpy's rules for Unix sockets (mode 0600,
a stale socket replaced, a live one refused; :mod:`vmmpy.unix_socket`), then handed to the native
VM, which owns it from then on (and removes its path when the VM goes: a reboot binds it again).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from . import unix_socket
from .config import VsockConfig

#: Host clients waiting to be accepted; the device accepts as many connections as it serves.
BACKLOG = 64


@contextlib.contextmanager
def native_vsock(vsock: VsockConfig) -> Iterator[tuple[str, int, int, str]]:
    """The ``vsock`` argument of the native VM, ``(id, cid, listening fd, path)``, for the duration
    of the block that builds the VM. The VM keeps a copy of the fd; if the block fails, the socket
    and its path are removed."""
    sock = unix_socket.listen(vsock.socket, BACKLOG, "vsock socket")
    try:
        yield (vsock.id, vsock.cid, sock.fileno(), vsock.socket)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(vsock.socket)
        raise
    finally:
        sock.close()
