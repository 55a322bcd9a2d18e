"""Listening Unix sockets that only their owner can connect to (API, serial console, migration).

The socket's mode is set on the socket itself before bind (Linux creates the node with the
socket inode's mode minus the umask), so there is no moment at which the node exists with the
umask's looser mode, and no process-wide umask change races with other threads. The socket is
bound under a temporary name and renamed to its path once it listens: whoever sees the path can
connect (a client polling for the file never meets a refused connection).
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from .errors import InvalidConfig, VmmError

MODE = 0o600
MAX_PATH = 108  # sun_path, NUL included


def listen(path: str, backlog: int, what: str) -> socket.socket:
    """A socket listening at `path` with mode 0600. A stale socket there (nobody accepts on it)
    is replaced; a live one, or any other kind of file, is left alone and refused."""
    _remove_stale(path, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}.tmp"
    if len(os.fsencode(tmp)) >= MAX_PATH:
        tmp = path  # no room for a temporary name beside it: bound where it is
    try:
        os.fchmod(sock.fileno(), MODE)
        try:
            os.unlink(tmp)  # left by a crashed process with this pid
        except FileNotFoundError:
            pass
        sock.bind(tmp)
        sock.listen(backlog)
        if tmp != path:
            os.rename(tmp, path)
    except OSError as e:
        sock.close()
        if tmp != path:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise InvalidConfig(f"{what} {path}: {e.strerror}", e.errno) from None
    return sock


def listen_at(path: str | None, fd: int | None, what: str) -> socket.socket:
    """:func:`listen` at `path`, or `fd` taken over by :func:`adopt_listener`. The backlog is the
    longest the kernel allows (net.core.somaxconn): clients that connect with a timeout (as curl
    does) all get an answer even when a hundred connect at once."""
    if fd is not None:
        return adopt_listener(fd, socket.SOMAXCONN, what)
    return listen(path, socket.SOMAXCONN, what)


def adopt_listener(fd: int, backlog: int, what: str) -> socket.socket:
    """An inherited fd (``fd=N``, as libvirt passes it) taken over as a listening Unix stream
    socket; its mode is the passer's business."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise VmmError(f"{what} fd={fd}: {e.strerror or e}", e.errno) from e
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise VmmError(f"{what} fd={fd}: not a Unix stream socket")
    try:
        sock.listen(backlog)
    except OSError as e:
        sock.detach()
        raise VmmError(f"{what} fd={fd}: cannot listen: {e.strerror or e}", e.errno) from e
    return sock


def _remove_stale(path: str, what: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise InvalidConfig(f"{what} {path}: {e.strerror}", e.errno) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidConfig(f"{what} {path}: exists and is not a socket; vmmpy replaces only a stale socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except socket.timeout:
        raise InvalidConfig(f"{what} {path}: in use by another server (it does not answer)") from None
    except OSError as e:
        raise InvalidConfig(f"{what} {path}: {e.strerror or e}", e.errno) from None
    finally:
        probe.close()
    raise InvalidConfig(f"{what} {path}: in use by another server", errno.EADDRINUSE)
