"""vmmpy: a KVM virtual machine monitor with a Rust core, driven from Python."""

__version__ = "0.1.0"

from .errors import (
    InvalidConfig,
    InvalidState,
    KvmError,
    PauseTimeout,
    PayloadError,
    VmAlreadyCreated,
    VmMigrating,
    VmmError,
    VmmShutDown,
    VmNotCreated,
)

__all__ = [
    "Vmm",
    "VmConfig",
    "SerialConfig",
    "DiskConfig",
    "NetConfig",
    "EventMonitor",
    "VmmError",
    "InvalidConfig",
    "InvalidState",
    "KvmError",
    "PauseTimeout",
    "PayloadError",
    "VmAlreadyCreated",
    "VmMigrating",
    "VmmShutDown",
    "VmNotCreated",
]


def __getattr__(name):
    # Lazy, so that config/events/client import without the native module being built.
    if name == "Vmm":
        from .vmm import Vmm

        return Vmm
    if name in ("VmConfig", "SerialConfig", "DiskConfig", "NetConfig"):
        from . import config

        return getattr(config, name)
    if name == "EventMonitor":
        from .events import EventMonitor

        return EventMonitor
    raise AttributeError(name)
