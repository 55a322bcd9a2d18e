"""The event monitor: lifecycle events as JSON, to a file or fd and to in-process waiters.

Each event is written as one JSON object on one line, in the shape Cloud Hypervisor's
``--event-monitor`` produces, so consumers written for it (libvirt's CH driver) can read it::

    {"timestamp": {"secs": 0, "nanos": 29228206}, "source": "vm", "event": "booted", "properties": null}

``timestamp`` is the time since the VMM started, as Cloud Hypervisor counts it (the ``vmmpy``
command passes its start; by default the monitor's creation). Every event also goes into a
bounded in-memory history, numbered from 0, that threads can wait on
(:meth:`EventMonitor.wait_for_event`).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import select
import stat
import threading
import time


from vmmpy.event_output import open_event_output

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2 ms of start-up): annotations only
if TYPE_CHECKING:
    from typing import Any, Callable

log = logging.getLogger("vmmpy.events")

DEFAULT_HISTORY = 10_000
DEFAULT_QUEUE_LIMIT = 4096  # lines waiting for the writer thread
CLOSE_GRACE_S = 2.0  # how long close() lets a slow reader take what is queued


class EventMonitor:
    """Writes events to ``path`` or ``fd`` (or nowhere) and keeps the last ``history`` events.

    ``path`` is opened for writing, created if missing and truncated, as Cloud Hypervisor does. A
    FIFO there blocks the constructor until a reader opens it (what libvirt expects). ``fd`` is
    taken over: :meth:`close` closes it unless ``owns_fd=False``.

    The emitter never blocks on the output: lines go into a bounded queue (``queue_limit``) that
    a writer thread of the monitor's own drains, in sequence order, one ``write`` per line. A reader
    that stops reading a pipe or FIFO stalls only that thread; once the queue is full further lines
    are dropped and counted (:attr:`dropped`), the history still gets every event. If writing fails
    (the reader went away, disk full), the output stops with one warning. :meth:`flush` waits until
    what was emitted so far has been written.

    All methods are thread-safe. :meth:`close` writes what is queued (for at most ``grace``
    seconds), stops the writer thread and ends file output; the history keeps working.
    """

    def __init__(
        self,
        path: str | None = None,
        fd: int | None = None,
        *,
        history: int = DEFAULT_HISTORY,
        owns_fd: bool = True,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        started_ns: int | None = None,
    ):
        if history < 1:
            raise ValueError("history must be at least 1")
        self._start_ns = time.monotonic_ns() if started_ns is None else started_ns
        self._fd: int | None = None
        self._owns_fd = owns_fd or path is not None
        self.path = path
        if path is not None or fd is not None:
            self._fd = open_event_output(path, fd)
        self._write_lock = threading.Lock()  # orders sequence numbers and queued lines
        self._cond = threading.Condition()  # guards the history
        self._history: collections.deque[dict] = collections.deque(maxlen=history)
        self._next_seq = 0  # assigned under _write_lock
        self._published = 0  # events visible in the history, under _cond
        self._out = threading.Condition()  # guards the output queue and the writer's progress
        self._queue: collections.deque[bytes] = collections.deque()
        self._queue_limit = queue_limit
        self._queued = 0  # lines ever queued
        self._written = 0  # lines the writer is done with (written or given up on)
        self.dropped = 0  # lines not queued because the queue was full
        self._stopping = False
        self._give_up_at = float("inf")  # set by close(): the writer's deadline for a stalled reader
        self._writer: threading.Thread | None = None
        if self._fd is not None:
            self._make_nonblocking()
            self._writer = threading.Thread(target=self._write_loop, name="vmmpy-events", daemon=True)
            self._writer.start()

    # ------------------------------------------------------------------------------ writing

    def emit(self, source: str, event: str, properties: dict | None = None) -> dict:
        """Record one event; returns it (with its ``seq``). Never waits for the output."""
        with self._write_lock:
            elapsed = max(0, time.monotonic_ns() - self._start_ns)
            record: dict[str, Any] = {
                "timestamp": {"secs": elapsed // 1_000_000_000, "nanos": elapsed % 1_000_000_000},
                "source": source,
                "event": event,
                "properties": None if properties is None else dict(properties),
            }
            if self._writer is not None:
                self._enqueue((json.dumps(record, default=str) + "\n").encode())
            record["seq"] = self._next_seq
            self._next_seq += 1
            with self._cond:
                self._history.append(record)
                self._published = record["seq"] + 1
                self._cond.notify_all()
        return dict(record)

    def _enqueue(self, line: bytes) -> None:
        with self._out:
            if self._stopping:
                return
            if len(self._queue) >= self._queue_limit:
                if not self.dropped:
                    log.warning("event monitor: output is not being read; dropping events (counted)")
                self.dropped += 1
                return
            self._queue.append(line)
            self._queued += 1
            self._out.notify_all()

    def _make_nonblocking(self) -> None:
        """The writer must be able to give up on a reader that never reads: pipes and FIFOs get a
        non-blocking open file description of the monitor's own (a passed-in fd is reopened
        through /proc, so the caller's description keeps its mode). Regular files never stall."""
        fd = self._fd
        assert fd is not None
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        if self.path is not None:
            os.set_blocking(fd, False)  # opened by us: the description is ours
            return
        try:
            own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # no /proc: writes to this pipe may block the writer thread (never the emitter)
        if self._owns_fd:
            os.close(fd)
        self._fd, self._owns_fd = own, True

    def _write_loop(self) -> None:
        while True:
            with self._out:
                while not self._queue and not self._stopping:
                    self._out.wait()
                if not self._queue:
                    return
                line = self._queue.popleft()
            self._write(line)
            with self._out:
                self._written += 1
                self._out.notify_all()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view and self._fd is not None:
                try:
                    view = view[os.write(self._fd, view) :]
                except BlockingIOError:
                    select.select([], [self._fd], [], 0.1)
                    with self._out:
                        if self._stopping and time.monotonic() > self._give_up_at:
                            raise OSError("the reader did not take the queued events in time") from None
        except OSError as e:
            log.warning("event monitor: writing failed (%s); no more events go to the file", e)
            with self._out:
                self._stopping = True
                self._written += len(self._queue)
                self._queue.clear()

    def flush(self, timeout: float = 30.0) -> bool:
        """Waits until every line emitted so far has been written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._out:
            target = self._queued
            while self._written < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._out.wait(remaining)
        return True

    def close(self, grace: float = CLOSE_GRACE_S) -> None:
        """Write what is queued (for at most ``grace`` s), stop the writer, stop writing to the
        file or fd (closing it if owned). Idempotent."""
        with self._write_lock:
            with self._out:
                self._stopping = True
                self._give_up_at = time.monotonic() + grace
                self._out.notify_all()
            writer, self._writer = self._writer, None
            if writer is not None:
                writer.join(grace + 1.0)
                if writer.is_alive():
                    # Blocked in a write to a socket nobody reads: the fd stays open, so the
                    # thread can never write into a number the process reuses.
                    log.warning("event monitor: output stalled; leaving its fd open")
                    return
            fd, self._fd = self._fd, None
            if fd is not None and self._owns_fd:
                try:
                    os.close(fd)
                except OSError:
                    pass

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
            return [dict(ev) for ev in self._history if want is None or (ev["source"], ev["event"]) == want]

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
