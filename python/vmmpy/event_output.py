"""Where the event monitor writes (``--event-monitor path=FILE|fd=N``), opened and checked before
anything starts: a bad path is a usage error, and a FIFO blocks here until its reader opens it
(what libvirt expects). On the ``vmmpy`` command's early boot path: it imports nothing heavy.
"""

from __future__ import annotations

import os
import stat

from vmmpy.errors import InvalidConfig
from vmmpy.options import parse_path_or_fd


def parse_event_monitor(text: str) -> dict:
    """``--event-monitor path=<file>|fd=<n>|<file>`` → keyword arguments of :func:`open_event_output`
    (and of :class:`vmmpy.events.EventMonitor`)."""
    path, fd = parse_path_or_fd(text, "--event-monitor")
    return {"path": path} if path is not None else {"fd": fd}


def open_event_output(path: str | None = None, fd: int | None = None) -> int:
    """`path` opened for writing, created if missing and truncated (as Cloud Hypervisor does), or
    `fd` checked to be an open non-directory descriptor; the descriptor to write."""
    if path is not None and fd is not None:
        raise InvalidConfig("event monitor: give a path or an fd, not both")
    if path is not None:
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise InvalidConfig(f"event monitor path={path!r}: {e.strerror}", e.errno) from e
    if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
        raise InvalidConfig(f"event monitor fd={fd!r}: not a file descriptor")
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise InvalidConfig(f"event monitor fd={fd}: {e.strerror}", e.errno) from e
    if stat.S_ISDIR(mode):
        raise InvalidConfig(f"event monitor fd={fd}: is a directory")
    return fd
