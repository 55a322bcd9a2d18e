"""The lifecycle latch: a guest's reboot or power-off request that arrives while a migration worker
owns the VM.

The control loop cannot act on a VM it does not own, so it records the request here instead:
first event wins, later ones are consumed and logged. The latch travels with the migration (the
state document's `post_migration_lifecycle_event`) and is replayed where the VM ends up: on the
destination after Complete, or on the source when the migration fails or is cancelled. Only
guest-induced events are latched; a host stop request cancels the migration instead.
"""

from __future__ import annotations

import enum
import logging
import threading

log = logging.getLogger("vmmpy.lifecycle")


class PostMigrationLifecycleEvent(str, enum.Enum):
    VM_REBOOT = "VmReboot"
    VM_SHUTDOWN = "VmShutdown"

    @classmethod
    def from_request(cls, request: str) -> "PostMigrationLifecycleEvent":
        """From the native VM's recorded request ("reset" / "shutdown")."""
        return cls.VM_REBOOT if request == "reset" else cls.VM_SHUTDOWN

    @property
    def request(self) -> str:
        """The native request to replay ("reset" / "shutdown")."""
        return "reset" if self is PostMigrationLifecycleEvent.VM_REBOOT else "shutdown"


class LifecycleLatch:
    """Shared by the control loop and the migration worker."""

    def __init__(self):
        self._lock = threading.Lock()
        self._event: PostMigrationLifecycleEvent | None = None

    def latch(self, event: PostMigrationLifecycleEvent) -> bool:
        """Records `event` unless one is latched already (first wins). True if it was recorded."""
        with self._lock:
            if self._event is None:
                self._event = event
                return True
            first = self._event
        if first is not event:
            log.info(
                "lifecycle event %s during migration: %s is latched already, this one is dropped",
                event.value,
                first.value,
            )
        return False

    @property
    def event(self) -> PostMigrationLifecycleEvent | None:
        with self._lock:
            return self._event

    def clear(self) -> None:
        with self._lock:
            self._event = None
