"""Handles a caller gets for a migration: an outgoing one (progress, cancel, wait) and a listening
receiver (wait, close)."""

from __future__ import annotations

import threading

from .destination import Receiver
from .source import SourceMigration


class MigrationHandle:
    """An outgoing migration: `progress()`, `cancel()`, `wait()`."""

    def __init__(self, job: SourceMigration, thread: threading.Thread, settled: threading.Event):
        self._job = job
        self._thread = thread
        self._settled = settled  # set once the VMM has handled the outcome
        self.error: BaseException | None = None

    def progress(self) -> dict:
        return self._job.progress.snapshot()

    def cancel(self) -> None:
        self._job.cancel()

    def wait(self, timeout: float | None = None) -> dict:
        """Waits for the outcome; returns the final progress or raises the migration's error."""
        if not self._settled.wait(timeout):  # set once the VMM has handled the outcome
            raise TimeoutError("the migration is still running")
        if self.error is not None:
            raise self.error
        return self.progress()


class ReceiveHandle:
    def __init__(self, receiver: Receiver, thread: threading.Thread):
        self.receiver = receiver
        self._thread = thread
        self.completed = False

    def wait(self, timeout: float | None = None) -> bool:
        """True once a migration completed here; False if the receive was stopped first."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("still receiving")
        return self.completed

    def close(self) -> None:
        self.receiver.close()
        self._thread.join()
