"""The VMM: one control loop thread that owns the VM and reacts to what the guest and the host ask.

The loop waits (``selectors``) on eventfds: *reset* and *guest-exit* (written by vCPU threads when
the guest asks for reboot or power-off), *exit* (the host's own stop request: SIGTERM,
``vmm.shutdown``), *error* (an unhandled vCPU exit) and *api* (a request queued by another thread).
Every VM-mutating call runs on this thread, so VM state changes one at a time.

VM ownership is explicit: ``Owned`` (the VMM may act on its VM), ``Migration`` (a migration worker
holds it; mutating calls answer ``VmMigrating``) and ``None`` (no VM).
"""

from __future__ import annotations

import concurrent.futures
import enum
import os
import queue
import selectors
import threading
from typing import Any, Callable

from . import _native
from .config import SerialConfig, VmConfig
from .console import ConsoleBackend
from .errors import InvalidState, VmAlreadyCreated, VmMigrating, VmmError, VmmShutDown, VmNotCreated
from .events import EventMonitor

from . import __version__
PAUSE_TIMEOUT_S = 5.0
DEFAULT_CMDLINE = "console=ttyS0"


class Ownership(enum.Enum):
    OWNED = "Owned"
    MIGRATION = "Migration"
    NONE = "None"


class VmState(str, enum.Enum):
    CREATED = "Created"
    RUNNING = "Running"
    PAUSED = "Paused"
    SHUTDOWN = "Shutdown"
    ERROR = "Error"


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class Vmm:
    def __init__(self, *, serial: SerialConfig | None = None, event_monitor: EventMonitor | None = None,
                 no_shutdown: bool = False):
        self.events = event_monitor or EventMonitor()
        self.no_shutdown = no_shutdown
        self._serial_override = serial
        self._reset_fd = _eventfd()
        self._guest_exit_fd = _eventfd()
        self._exit_fd = _eventfd()
        self._error_fd = _eventfd()
        self._api_fd = _eventfd()
        # Other threads write the exit and api eventfds; this lock keeps them from writing a number
        # that teardown has closed (and the process may have reused).
        self._fd_lock = threading.Lock()
        self._fds_closed = False
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._console: ConsoleBackend | None = None
        self._vm: _native.Vm | None = None
        self._config: VmConfig | None = None
        self._state: VmState | None = None
        self._reset_pending = False
        self.ownership = Ownership.NONE
        self.boot_count = 0
        self.exit_code = 0
        self._running = True
        self._selector = selectors.DefaultSelector()
        for fd, handler in [(self._reset_fd, self._on_lifecycle), (self._guest_exit_fd, self._on_lifecycle),
                            (self._exit_fd, self._on_exit), (self._error_fd, self._on_error),
                            (self._api_fd, self._on_api)]:
            self._selector.register(fd, selectors.EVENT_READ, handler)
        if serial is not None:
            self._open_console(serial)
        self.events.emit("vmm", "starting")
        self._thread = threading.Thread(target=self._control_loop, name="vmm-control", daemon=True)
        self._thread.start()

    # ---- the control loop -------------------------------------------------------------------

    def _control_loop(self) -> None:
        try:
            while self._running:
                for key, _ in self._selector.select():
                    key.data()
                    if not self._running:
                        break
        finally:
            self._teardown()

    def _teardown(self) -> None:
        self._destroy_vm()
        if self._console is not None:
            self._console.close()
            self._console = None
        self._selector.close()
        with self._fd_lock:
            for fd in (self._reset_fd, self._guest_exit_fd, self._exit_fd, self._error_fd, self._api_fd):
                os.close(fd)
            self._fds_closed = True
        # Fail whatever is still queued (nothing can be queued from now on): nobody will serve it.
        while True:
            try:
                _, fut = self._requests.get_nowait()
            except queue.Empty:
                break
            fut.set_exception(VmmShutDown("the VMM has shut down"))
        self.events.emit("vmm", "shutdown")

    def _on_api(self) -> None:
        _drain(self._api_fd)
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

    def _on_lifecycle(self) -> None:
        _drain(self._reset_fd)
        _drain(self._guest_exit_fd)
        if self._vm is None or self._state not in (VmState.RUNNING, VmState.PAUSED):
            return  # left over from a VM that is gone
        request = self._vm.lifecycle_request()
        if request is None:
            return
        if self.ownership is Ownership.MIGRATION:
            return  # the migration worker's latch handles it (migration issue)
        if request == "shutdown":
            self._guest_shutdown()
        elif self._state is VmState.PAUSED:
            self._reset_pending = True  # the reboot happens on resume
        else:
            self._vm_reboot()

    def _on_exit(self) -> None:
        _drain(self._exit_fd)
        if self._vm is not None:
            self._destroy_vm()
            self.events.emit("vm", "shutdown")
        self._running = False

    def _on_error(self) -> None:
        _drain(self._error_fd)
        if self._vm is None or self._state is VmState.ERROR:
            return
        err = self._vm.error()
        if err is not None:
            self._state = VmState.ERROR
            self.events.emit("vm", "error", err)

    def _guest_shutdown(self) -> None:
        self._destroy_vm()
        self._state = VmState.SHUTDOWN
        self.events.emit("vm", "shutdown")
        if not self.no_shutdown:
            self._running = False

    # ---- VM building blocks (control thread only) -------------------------------------------

    def _open_console(self, serial: SerialConfig) -> None:
        if self._console is not None and self._console.config == serial:
            return
        if self._console is not None:
            self._console.close()
        self._console = ConsoleBackend(serial)
        self._console.register(self._selector)

    def _build_and_boot(self) -> None:
        cfg = self._config
        self._open_console(self._serial_override or cfg.serial)
        vm = _native.Vm(
            memory_size=cfg.memory_mib << 20, vcpus=cfg.vcpus, kernel=cfg.kernel, initramfs=cfg.initramfs,
            cmdline=cfg.cmdline if cfg.cmdline is not None else DEFAULT_CMDLINE,
            console=self._console.native, reset_fd=self._reset_fd, guest_exit_fd=self._guest_exit_fd,
            error_fd=self._error_fd)
        try:
            vm.boot()
        except BaseException:
            vm.stop()
            raise
        self._vm = vm
        self._state = VmState.RUNNING
        self.ownership = Ownership.OWNED
        self.boot_count += 1

    def _destroy_vm(self) -> None:
        """Stops the VM: vCPU threads joined, KVM fds closed, memory unmapped. Any lifecycle
        eventfd count it left behind belongs to it and is dropped with it."""
        if self._vm is not None:
            self._vm.stop()
            self._vm = None
        _drain(self._reset_fd)
        _drain(self._guest_exit_fd)
        _drain(self._error_fd)
        self._reset_pending = False
        self.ownership = Ownership.NONE

    def _vm_reboot(self) -> None:
        self.events.emit("vm", "rebooting")
        self._destroy_vm()
        self._build_and_boot()
        self.events.emit("vm", "rebooted")

    # ---- calls from other threads -----------------------------------------------------------

    def _call(self, fn: Callable[[], Any]) -> Any:
        if threading.current_thread() is self._thread:
            return fn()
        if not self._running:
            raise VmmShutDown("the VMM has shut down")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._fd_lock:
            if self._fds_closed:
                raise VmmShutDown("the VMM has shut down")
            self._requests.put((fn, fut))
            os.eventfd_write(self._api_fd, 1)
        return fut.result()

    def _require_vm(self) -> None:
        if self._config is None:
            raise VmNotCreated("no VM has been created")

    def _require_owned(self) -> None:
        self._require_vm()
        if self.ownership is Ownership.MIGRATION:
            raise VmMigrating("the VM is being migrated")

    def ping(self) -> dict:
        return {"build_version": __version__, "version": __version__, "pid": os.getpid(), "features": []}

    def create(self, config: VmConfig) -> None:
        def do():
            if self._config is not None:
                raise VmAlreadyCreated("a VM has already been created")
            self._config = config
            self._state = VmState.CREATED
        self._call(do)

    def boot(self) -> None:
        def do():
            self._require_owned()
            if self._state not in (VmState.CREATED, VmState.SHUTDOWN):
                raise InvalidState(f"cannot boot a VM in state {self._state.value}")
            self.events.emit("vm", "booting")
            self._build_and_boot()
            self.events.emit("vm", "booted")
        self._call(do)

    def info(self) -> dict:
        def do():
            self._require_vm()
            info = {"config": self._config.to_api(), "state": self._state.value,
                    "memory_actual_size": self._config.memory_mib << 20}
            if self._vm is not None:
                info["payload_kind"] = self._vm.payload_kind
                info["vcpu_states"] = self._vm.vcpu_states()
                err = self._vm.error()
                if err is not None:
                    info["error"] = err
            info["boot_count"] = self.boot_count
            return info
        return self._call(do)

    def pause(self) -> None:
        def do():
            self._require_owned()
            if self._state is not VmState.RUNNING:
                raise InvalidState(f"cannot pause a VM in state {self._state.value}")
            self.events.emit("vm", "pausing")
            try:
                self._vm.pause(PAUSE_TIMEOUT_S)
            except VmmError:
                self._vm.resume()
                raise
            self._state = VmState.PAUSED
            self.events.emit("vm", "paused")
        self._call(do)

    def resume(self) -> None:
        def do():
            self._require_owned()
            if self._state is not VmState.PAUSED:
                raise InvalidState(f"cannot resume a VM in state {self._state.value}")
            self.events.emit("vm", "resuming")
            self._vm.resume()
            self._state = VmState.RUNNING
            self.events.emit("vm", "resumed")
            if self._reset_pending:
                self._vm_reboot()
        self._call(do)

    def reboot(self) -> None:
        def do():
            self._require_owned()
            if self._state not in (VmState.RUNNING, VmState.PAUSED, VmState.ERROR):
                raise InvalidState(f"cannot reboot a VM in state {self._state.value}")
            self._vm_reboot()
        self._call(do)

    def shutdown(self) -> None:
        def do():
            self._require_owned()
            if self._state not in (VmState.RUNNING, VmState.PAUSED, VmState.ERROR):
                raise InvalidState(f"cannot shut down a VM in state {self._state.value}")
            self._destroy_vm()
            self._state = VmState.SHUTDOWN
            self.events.emit("vm", "shutdown")
        self._call(do)

    def delete(self) -> None:
        def do():
            if self._config is None:
                return  # nothing to delete: a no-op, as in Cloud Hypervisor
            self._require_owned()
            had_vm = self._vm is not None
            self._destroy_vm()
            self._config = None
            self._state = None
            if had_vm:
                self.events.emit("vm", "shutdown")
            self.events.emit("vm", "deleted")
        self._call(do)

    def power_button(self) -> None:
        def do():
            self._require_owned()
            raise InvalidState("vmmpy's platform has no ACPI power button device (GED); "
                               "use vm.shutdown, or have the guest power off itself")
        self._call(do)

    def shutdown_vmm(self) -> None:
        self.request_exit()

    def request_exit(self) -> None:
        """The host's stop request. Only writes an eventfd, so it is safe in a signal handler."""
        with self._fd_lock:
            if not self._fds_closed:
                os.eventfd_write(self._exit_fd, 1)

    def wait(self, timeout: float | None = None) -> int:
        self._thread.join(timeout)
        return self.exit_code

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait_for_event(self, name: str, timeout: float, after: int = 0) -> dict:
        return self.events.wait_for_event(name, timeout, after=after)

    def console_input(self, data: bytes) -> None:
        """Types `data` on the serial console (as a socket or terminal client would)."""
        self._call(lambda: self._console.native.push_input(data))

    def memory_regions(self) -> list:
        """The current VM's RAM regions as read-only buffers (tests and tooling)."""
        def do():
            if self._vm is None:
                raise InvalidState("the VM is not running")
            return self._vm.memory_regions()
        return self._call(do)

    def close(self) -> None:
        """Stops the VMM and waits for its control loop."""
        self.request_exit()
        self.wait()

    def __enter__(self) -> "Vmm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
