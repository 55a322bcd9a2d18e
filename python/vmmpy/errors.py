"""vmmpy's one exception hierarchy.

The native core raises these classes too (it looks them up here by name), so a KVM ioctl failure
reaches Python as ``KvmError`` with the kernel's errno kept in ``.errno``.
"""

from __future__ import annotations


class VmmError(Exception):
    """Base of every error vmmpy raises. ``errno`` is set when an OS call failed."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.message = message
        self.errno = errno

    def __str__(self) -> str:
        if self.errno:
            return f"{self.message} (errno {self.errno})"
        return self.message


class InvalidConfig(VmmError):
    """A VM config, CLI flag or API body that vmmpy cannot honour."""


class PayloadError(VmmError):
    """A kernel, initramfs or command line that cannot be loaded."""


class KvmError(VmmError):
    """A KVM ioctl or other host call failed."""


class PauseTimeout(VmmError):
    """The vCPUs did not all acknowledge a pause in time."""


class InvalidState(VmmError):
    """The request does not fit the VM's state (pause when not running, ...)."""


class VmNotCreated(InvalidState):
    """There is no VM to act on."""


class VmAlreadyCreated(InvalidState):
    """A VM exists already."""


class VmMigrating(InvalidState):
    """The VM is owned by a migration worker; mutating calls are refused."""


class VmmShutDown(VmmError):
    """The VMM's control loop has ended."""


class MigrationError(VmmError):
    """A migration failed: connection, protocol, or the peer's refusal."""


class MigrationCancelled(MigrationError):
    """The migration was cancelled (by request, or by its timeout with timeout_strategy=cancel)."""
