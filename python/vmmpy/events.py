"""The event monitor: lifecycle events as JSON, to a file or fd and to in-process waiters.

Each event is written as one JSON object on one line, in the shape Cloud Hypervisor's
``--event-monitor`` produces, so consumers written for it (libvirt's CH driver) can read it::

    {"timestamp": {"secs": 0, "nanos": 29228206}, "source": "vm", "event": "booted", "properties": null}

``timestamp`` is the time since the monitor was created (Cloud Hypervisor counts from VMM start;
the VMM creates its monitor at start). Every event also goes into a bounded in-memory history,
numbered from 0, that threads can wait on (:meth:`EventMonitor.wait_for_event`).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import stat
import threading
import time
from typing import Any, Callable

from vmmpy.config import split_options
from vmmpy.errors import InvalidConfig

log = logging.getLogger("vmmpy.events")

DEFAULT_HISTORY = 10_000


class EventMonitor:
    """Writes events to ``path`` or ``fd`` (or nowhere) and keeps the last ``history`` events.

    ``path`` is opened for writing, created if missing and truncated, as Cloud Hypervisor does. A
    FIFO there blocks the constructor until a reader opens it (what libvirt expects). ``fd`` is
    taken over: :meth:`close` closes it unless ``owns_fd=False``.

    Writes are synchronous and unbuffered, one ``write`` per line, done before the event becomes
    visible to waiters: whoever sees an event in the history can also read it from the file.
    If writing fails (the reader of a pipe went away, disk full), the output is dropped with one
    warning and the in-memory history carries on.

    All methods are thread-safe. :meth:`close` ends file output only; the history keeps working.
    """

    def __init__(
        self,
        path: str | None = None,
        fd: int | None = None,
        *,
        history: int = DEFAULT_HISTORY,
        owns_fd: bool = True,
    ):
        if path is not None and fd is not None:
            raise InvalidConfig("event monitor: give a path or an fd, not both")
        if history < 1:
            raise ValueError("history must be at least 1")
        self._start_ns = time.monotonic_ns()
        self._fd: int | None = None
        self._owns_fd = owns_fd
        self.path = path
        if path is not None:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise InvalidConfig(f"event monitor path={path!r}: {e.strerror}", e.errno) from e
            self._owns_fd = True
        elif fd is not None:
            if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
                raise InvalidConfig(f"event monitor fd={fd!r}: not a file descriptor")
            try:
                mode = os.fstat(fd).st_mode
            except OSError as e:
                raise InvalidConfig(f"event monitor fd={fd}: {e.strerror}", e.errno) from e
            if stat.S_ISDIR(mode):
                raise InvalidConfig(f"event monitor fd={fd}: is a directory")
            self._fd = fd
        self._write_lock = threading.Lock()  # orders file writes by sequence number
        self._cond = threading.Condition()  # guards the history
        self._history: collections.deque[dict] = collections.deque(maxlen=history)
        self._next_seq = 0  # assigned under _write_lock
        self._published = 0  # events visible in the history, under _cond

    # ------------------------------------------------------------------------------ writing

    def emit(self, source: str, event: str, properties: dict | None = None) -> dict:
        """Record one event; returns it (with its ``seq``)."""
        with self._write_lock:
            elapsed = max(0, time.monotonic_ns() - self._start_ns)
            record: dict[str, Any] = {
                "timestamp": {"secs": elapsed // 1_000_000_000, "nanos": elapsed % 1_000_000_000},
                "source": source,
                "event": event,
                "properties": None if properties is None else dict(properties),
            }
            if self._fd is not None:
                line = json.dumps(record, default=str) + "\n"
                self._write(line.encode())
            record["seq"] = self._next_seq
            self._next_seq += 1
            with self._cond:
                self._history.append(record)
                self._published = record["seq"] + 1
                self._cond.notify_all()
        return dict(record)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as e:
            log.warning("event monitor: writing failed (%s); no more events go to the file", e)
            self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and self._owns_fd:
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        """Stop writing to the file or fd (closing it if owned). Idempotent."""
        with self._write_lock:
            self._close_fd()

    def __enter__(self) -> "EventMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ reading

    @property
    def seq(self) -> int:
        """How many events have been emitted so far; the ``seq`` the next event will get."""
        with self._cond:
            return self._published

    @staticmethod
    def _split_name(name: str) -> tuple[str, str]:
        source, dot, event = name.partition(".")
        if not dot or not source or not event:
            raise ValueError(f"event name {name!r}: expected 'source.event', e.g. 'vm.booted'")
        return source, event

    def events(self, name: str | None = None) -> list[dict]:
        """A copy of the history, oldest first, optionally only events called ``name``."""
        want = self._split_name(name) if name is not None else None
        with self._cond:
            return [
                dict(ev)
                for ev in self._history
                if want is None or (ev["source"], ev["event"]) == want
            ]

    def wait_for_event(
        self,
        name: str,
        timeout: float,
        after: int = 0,
        predicate: Callable[[dict], bool] | None = None,
    ) -> dict:
        """The first event called ``name`` (``"source.event"``) with ``seq >= after`` that also
        satisfies ``predicate``; waits up to ``timeout`` seconds for it to be emitted.

        Typical use: ``mark = monitor.seq; do_something(); monitor.wait_for_event("vm.paused",
        5, after=mark)``. Raises :class:`TimeoutError` naming the event. Events older than the
        history bound are no longer found.
        """
        source, event = self._split_name(name)
        deadline = time.monotonic() + timeout
        scanned = max(0, after)  # events below this seq have been looked at already
        while True:
            with self._cond:
                while self._published <= scanned:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"timed out after {timeout:g} s waiting for event {name}"
                            + (f" (seq >= {after})" if after else "")
                        )
                    self._cond.wait(remaining)
                candidates = [
                    dict(ev)
                    for ev in self._history
                    if ev["seq"] >= scanned and ev["source"] == source and ev["event"] == event
                ]
                scanned = self._published
            # The predicate runs without the lock held, so it may do anything, even emit.
            for ev in candidates:
                if predicate is None or predicate(ev):
                    return ev


def parse_event_monitor(text: str) -> dict:
    """``--event-monitor path=<file>|fd=<n>`` → keyword arguments for :class:`EventMonitor`."""
    usage = "path=<file> or fd=<n>"
    items = split_options(text, "--event-monitor")
    if len(items) != 1:
        raise InvalidConfig(f"--event-monitor {text!r}: expected {usage}")
    key, value = items[0]
    if value is None:
        # A bare path, as a convenience.
        if key and key not in ("path", "fd"):
            return {"path": key}
        raise InvalidConfig(f"--event-monitor {text!r}: expected {usage}")
    if key == "path" and value:
        return {"path": value}
    if key == "fd":
        if value.strip().isdigit():
            return {"fd": int(value)}
        raise InvalidConfig(f"--event-monitor fd={value!r}: not a file descriptor number")
    raise InvalidConfig(f"--event-monitor {text!r}: expected {usage}")
