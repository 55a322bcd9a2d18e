"""The control loop: the one thread that builds, changes and destroys a VMM's VM.

It waits (``selectors``) on eventfds. Each eventfd has one handler, run on this thread; other
threads (vCPU threads, the API server, migration workers, signal handlers) only write eventfds or
queue a call (``call``), so VM state changes one at a time.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import selectors
import threading

from .errors import VmmShutDown
from .native_vm import new_eventfd

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: annotations only
if TYPE_CHECKING:
    from typing import Any, Callable

log = logging.getLogger("vmmpy.control_loop")


def drain(fd: int) -> int:
    """Reads and resets an eventfd's count (0 if nothing was written)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class ControlLoop:
    """Owns the selector, the eventfds it hands out, the queue of calls and the thread."""

    def __init__(self, name: str = "vmm-control"):
        self.selector = selectors.DefaultSelector()
        self._fds: list[int] = []
        # Other threads write the eventfds; this lock keeps them from writing a number that
        # teardown has closed (and the process may have reused).
        self._fd_lock = threading.Lock()
        self._closing = False  # no more calls are queued
        self._fds_closed = False
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._api_fd = self.eventfd(self._on_call)
        self._running = True
        self._on_teardown: Callable[[], None] = lambda: None
        self._on_closed: Callable[[], None] = lambda: None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def eventfd(self, handler: Callable[[], None], fd: int | None = None) -> int:
        """A new eventfd (or `fd`, taken over) whose handler runs on the loop when it is written;
        closed at teardown."""
        fd = new_eventfd() if fd is None else fd
        self._fds.append(fd)
        self.selector.register(fd, selectors.EVENT_READ, handler)
        return fd

    def start(self, on_teardown: Callable[[], None], on_closed: Callable[[], None]) -> None:
        """Runs the loop until `stop`. At its end `on_teardown` runs (queued calls have failed, the
        eventfds are still open), then the eventfds are closed and `on_closed` runs."""
        self._on_teardown, self._on_closed = on_teardown, on_closed
        self._thread.start()

    def stop(self) -> None:
        """Ends the loop after the current handler (loop thread only)."""
        self._running = False

    def signal(self, fd: int) -> None:
        """Writes one of the loop's eventfds; safe from any thread, a no-op once they are closed."""
        with self._fd_lock:
            if not self._fds_closed:
                os.eventfd_write(fd, 1)

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[[], Any]) -> Any:
        """Runs `fn` on the loop and returns its result (or raises its exception)."""
        if self.on_loop_thread():
            return fn()
        return self.submit(fn).result()

    def submit(self, fn: Callable[[], Any], wake: bool = True) -> concurrent.futures.Future:
        """Queues `fn` for the loop (not from the loop thread); it runs before any call queued
        after this returns. With `wake` false the loop is not woken for it: it runs at the loop's
        next wake-up (`wake()`), so a caller with something more urgent to do first keeps the loop
        thread off the CPU meanwhile."""
        if not self._running:
            raise VmmShutDown("the VMM has shut down")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._fd_lock:
            if self._closing:
                raise VmmShutDown("the VMM has shut down")
            self._requests.put((fn, fut))
            if wake:
                os.eventfd_write(self._api_fd, 1)
        return fut

    def wake(self) -> None:
        """Lets the loop run what `submit(wake=False)` queued."""
        self.signal(self._api_fd)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while self._running:
                for key, _ in self.selector.select():
                    try:
                        key.data()
                    except Exception:  # noqa: BLE001 - one failed handler must not end the VMM
                        log.exception("control loop: %s failed", getattr(key.data, "__name__", key.data))
                    if not self._running:
                        break
        finally:
            self._teardown()

    def _teardown(self) -> None:
        # First nobody may queue work any more, and what is queued fails: a thread waiting on the
        # loop must not wait forever (the owner may join it in on_teardown).
        with self._fd_lock:
            self._closing = True
        self._fail_queued()
        self._on_teardown()
        self.selector.close()
        with self._fd_lock:
            for fd in self._fds:
                os.close(fd)
            self._fds_closed = True
        self._on_closed()

    def _fail_queued(self) -> None:
        while True:
            try:
                _, fut = self._requests.get_nowait()
            except queue.Empty:
                return
            fut.set_exception(VmmShutDown("the VMM has shut down"))

    def _on_call(self) -> None:
        drain(self._api_fd)
        while True:
            try:
                fn, fut = self._requests.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller's thread
                fut.set_exception(e)
