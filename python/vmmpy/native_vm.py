"""Native VMs built from a :class:`VmConfig`, and the wires every VM of a VMM reports on.

The wires are the serial console backend and the *reset*, *guest-exit* and *error* eventfds the
vCPU threads write. They belong to the VMM, not to one VM: a reboot builds a new VM on the same
ones. They can be made before the control loop exists, so that the ``vmmpy`` command boots its
VM first and loads the rest of the VMM while the guest runs (:func:`boot_first`); the loop takes
the eventfds over when the VMM starts, and nothing the guest wrote meanwhile is lost.

This module is on that early path: it imports nothing the boot does not need.
"""

from __future__ import annotations

import os

from . import _native
from .config import SerialConfig, VmConfig
from .console import ConsoleBackend
from .payload import BootPayload


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class VmWires:
    """The console and the lifecycle eventfds. The eventfds are closed by the control loop that
    takes them over, or by :meth:`close` if no VMM ever started on them."""

    def __init__(self) -> None:
        self.reset_fd = new_eventfd()
        self.guest_exit_fd = new_eventfd()
        self.error_fd = new_eventfd()
        self.console: ConsoleBackend | None = None

    def open_console(self, serial: SerialConfig) -> bool:
        """The console on `serial` (kept if it is on that already); True when a new one opened."""
        if self.console is not None and self.console.config == serial:
            return False
        self.close_console()
        self.console = ConsoleBackend(serial)
        return True

    def close_console(self) -> None:
        if self.console is not None:
            self.console.close()
            self.console = None

    def build(
        self, cfg: VmConfig, payload: BootPayload, restore: bool = False, memory_fds: list[int] | None = None
    ) -> _native.Vm:
        """A native VM on the open console; no vCPU runs before its boot()."""
        if cfg.vsock is None:
            return self._build(cfg, payload, restore, memory_fds, None)
        from .vsock import native_vsock  # loaded only for a VM with a vsock device

        with native_vsock(cfg.vsock) as vsock:
            return self._build(cfg, payload, restore, memory_fds, vsock)

    def _build(
        self,
        cfg: VmConfig,
        payload: BootPayload,
        restore: bool,
        memory_fds: list[int] | None,
        vsock: tuple[str, int, int, str] | None,
    ) -> _native.Vm:
        return _native.Vm(
            memory_size=cfg.memory_bytes,
            memory_shared=cfg.memory_shared,
            vcpus=cfg.vcpus,
            kernel=payload.kernel,
            initramfs=payload.initramfs,
            cmdline=cfg.effective_cmdline,
            console=self.console.native,
            reset_fd=self.reset_fd,
            guest_exit_fd=self.guest_exit_fd,
            error_fd=self.error_fd,
            restore=restore,
            memory_fds=memory_fds,
            boot_protocol=cfg.boot_protocol,
            disks=[(d.id, d.path, d.readonly, d.direct) for d in cfg.disks],
            nets=[n.native() for n in cfg.net],
            vsock=vsock,
        )

    def close(self) -> None:
        """Only when no VMM took these wires over."""
        self.close_console()
        for fd in (self.reset_fd, self.guest_exit_fd, self.error_fd):
            os.close(fd)


def start(vm: _native.Vm, paused: bool = False) -> _native.Vm:
    """`vm` booted (its vCPUs held before any guest code with `paused`); stopped again if its
    start fails."""
    try:
        vm.boot(paused=paused)
    except BaseException:
        vm.stop()
        raise
    return vm


class BootedVm:
    """A VM the ``vmmpy`` command booted before its VMM existed, for that VMM to adopt."""

    def __init__(self, wires: VmWires, config: VmConfig, payload: BootPayload, vm: _native.Vm):
        self.wires, self.config, self.payload, self.vm = wires, config, payload, vm

    def discard(self) -> None:
        """The VMM could not start: the VM stops and the wires close."""
        self.vm.stop()
        self.wires.close()


def boot_first(config: VmConfig, serial: SerialConfig | None) -> BootedVm:
    """Boots `config` on `serial` (the config's own when None) ahead of any VMM."""
    wires = VmWires()
    try:
        wires.open_console(serial or config.serial)
        payload = BootPayload.read(config.kernel, config.initramfs)
        return BootedVm(wires, config, payload, start(wires.build(config, payload)))
    except BaseException:
        wires.close()
        raise
