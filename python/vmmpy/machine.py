"""The VM a VMM runs and its state machine: created, booted, paused, rebooted, shut down, deleted.

Every method runs on the control loop (``ControlLoop.call`` from other threads). The guest's own
requests arrive on eventfds its vCPU threads write: *reset* and *guest-exit* (reboot, power-off)
and *error* (an unhandled vCPU exit).

VM ownership is explicit: ``Owned`` (the VMM may act on its VM), ``Migration`` (a migration worker
holds it; mutating calls answer ``VmMigrating``) and ``None`` (no VM).
"""

from __future__ import annotations

import enum

from . import _native
from .config import SerialConfig, VmConfig
from .console import ConsoleBackend
from .control_loop import ControlLoop, drain
from .errors import InvalidState, VmAlreadyCreated, VmmError, VmMigrating, VmNotCreated
from .events import EventMonitor
from .native_vm import BootedVm, VmWires, start
from .payload import BootPayload

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: annotations only
if TYPE_CHECKING:
    from typing import Callable


PAUSE_TIMEOUT_S = 5.0  # for every vCPU to stop and park (pause, migration, snapshot restore)
RELEASE_TIMEOUT_S = 10.0  # for the kernel to destroy the VMs a closing VMM stopped (~15 ms each)


class Ownership(enum.Enum):
    OWNED = "Owned"
    MIGRATION = "Migration"
    NONE = "None"


class VmState(str, enum.Enum):
    CREATED = "Created"
    RUNNING = "Running"
    PAUSED = "Paused"
    SHUTDOWN = "Shutdown"
    ERROR = "Error"  # a vCPU hit an exit vmmpy cannot handle; vm.info says Running plus the error

    @property
    def api(self) -> str:
        """The state as Cloud Hypervisor's VmState enum spells it (vm.info)."""
        return VmState.RUNNING.value if self is VmState.ERROR else self.value


class Machine:
    def __init__(
        self,
        loop: ControlLoop,
        events: EventMonitor,
        serial: SerialConfig | None,
        no_shutdown: bool,
        wires: VmWires | None = None,
    ):
        """`serial`: the command line's serial backend, used by every VM here (a config's, a
        peer's or a snapshot's serial never chooses a host file or socket). With `no_shutdown`
        the VMM outlives its guest's power-off. `wires`: those of a VM booted before the VMM
        (taken over: the loop closes the eventfds), else new ones."""
        self._loop = loop
        self._events = events
        self._serial_override = serial
        self._no_shutdown = no_shutdown
        self._wires = wires or VmWires()
        loop.eventfd(self._on_lifecycle, self._wires.reset_fd)
        loop.eventfd(self._on_lifecycle, self._wires.guest_exit_fd)
        loop.eventfd(self._on_error, self._wires.error_fd)
        if self._wires.console is not None:
            self._wires.console.register(loop.selector)
        self.vm: _native.Vm | None = None
        self._receiving = False  # reserved for a migration's VM (reserve_for_incoming)
        self.config: VmConfig | None = None
        # The kernel and initramfs content the VM boots from (read once, or received): reboots,
        # migrations and snapshots use these bytes, never a path again.
        self.payload: BootPayload | None = None
        self.state: VmState | None = None
        # Why the last VM instance ended without being asked to (its rebuild on reboot failed):
        # shown by vm.info until the next boot, shutdown or delete.
        self._failure: dict | None = None
        # A guest request that arrived while paused (or whose migration failed ambiguously): carried
        # out on resume ("reset" or "shutdown").
        self.pending_on_resume: str | None = None
        # A lifecycle request replayed from a migration's latch: carried out even on a paused VM.
        self._replay_pending = False
        self.ownership = Ownership.NONE
        # While a migration worker holds the VM, the guest's lifecycle requests go here (latched).
        self._latch_request: Callable[[str], None] | None = None
        self.boot_count = 0
        if serial is not None:
            self._open_console(serial)

    # ---- ownership ----------------------------------------------------------------------------

    def hand_over(self, latch_request: Callable[[str], None]) -> None:
        """A migration worker holds the VM from now on; the guest's requests go to `latch_request`."""
        self.ownership = Ownership.MIGRATION
        self._latch_request = latch_request

    def take_back(self) -> None:
        self.ownership = Ownership.OWNED
        self._latch_request = None

    def require_vm(self) -> None:
        if self.config is None:
            raise VmNotCreated("no VM has been created")

    def require_owned(self) -> None:
        self.require_vm()
        if self.ownership is Ownership.MIGRATION:
            raise VmMigrating("the VM is being migrated")

    def require_empty(self, message: str) -> None:
        if self.config is not None:
            raise VmAlreadyCreated(message)
        if self._receiving:
            raise VmAlreadyCreated("a migration is being received: this VMM is reserved for its VM")

    def reserve_for_incoming(self) -> None:
        """A migration's VM is built here: nothing else may be created until it is adopted or
        released (its vCPUs may start before the loop adopts it)."""
        self.require_empty("a VM exists on this VMM")
        self._receiving = True

    def release_incoming(self) -> None:
        self._receiving = False

    # ---- building blocks ----------------------------------------------------------------------

    @property
    def console(self) -> ConsoleBackend | None:
        return self._wires.console

    def _open_console(self, serial: SerialConfig) -> None:
        if self._wires.open_console(serial):
            self._wires.console.register(self._loop.selector)

    def own_serial(self, cfg: VmConfig) -> VmConfig:
        """`cfg` (from a migration peer or a snapshot) on this VMM's own serial: the command line's,
        or none. A peer never chooses a host file or socket here."""
        return cfg.replace(serial=self._serial_override or SerialConfig())

    def new_native_vm(
        self, cfg: VmConfig, payload: BootPayload, restore: bool = False, memory_fds: list[int] | None = None
    ) -> _native.Vm:
        """A native VM on the VMM's console (the command line's serial wins over the config's)."""
        self._open_console(self._serial_override or cfg.serial)
        return self._wires.build(cfg, payload, restore, memory_fds)

    def adopt(self, cfg: VmConfig, vm: _native.Vm, payload: BootPayload, state: VmState) -> None:
        """Takes a VM built and started elsewhere on the loop (received or restored) as this VMM's."""
        self.config, self.vm, self.payload, self.state = cfg, vm, payload, state
        self.ownership = Ownership.OWNED
        self.boot_count += 1
        self._receiving = False

    def adopt_running(self, cfg: VmConfig, vm: _native.Vm, payload: BootPayload) -> None:
        """Takes a received VM whose vCPUs were started before this (on the receiver's thread).
        A request or failure its guest made meanwhile found no VM here: their eventfds are written
        again, so that the loop's own handlers act on what the VM recorded (nothing, mostly)."""
        self.adopt(cfg, vm, payload, VmState.RUNNING)
        self._loop.signal(self._wires.reset_fd)
        self._loop.signal(self._wires.error_fd)

    def adopt_booted(self, booted: BootedVm) -> None:
        """The VM the command line booted before this VMM existed (on this machine's wires)."""
        self.require_empty("a VM has already been created")
        self._events.emit("vm", "booting")
        self.adopt(booted.config, booted.vm, booted.payload, VmState.RUNNING)
        self._events.emit("vm", "booted")

    def _build_and_boot(self) -> None:
        cfg = self.config
        # The caller's own files, read on the first boot; held from then on.
        payload = self.payload or BootPayload.read(cfg.kernel, cfg.initramfs)
        vm = start(self.new_native_vm(cfg, payload))
        self._failure = None
        self.adopt(cfg, vm, payload, VmState.RUNNING)

    def destroy_vm(self, release_later: bool = False) -> None:
        """Stops the VM: vCPU threads joined, devices closed, KVM fds closed and memory unmapped
        (with `release_later` those two on the core's own thread while this one goes on). Any
        lifecycle eventfd count it left behind belongs to it and is dropped with it."""
        if self.vm is not None:
            self.vm.stop(release_later)
            self.vm = None
        drain(self._wires.reset_fd)
        drain(self._wires.guest_exit_fd)
        drain(self._wires.error_fd)
        self.pending_on_resume = None
        self._replay_pending = False
        self.ownership = Ownership.NONE
        self._latch_request = None

    def forget(self) -> None:
        """The VM is gone and so is its config (deleted, or migrated away)."""
        self.destroy_vm()
        self.config = None
        self.payload = None
        self.state = None
        self._failure = None

    def close(self) -> None:
        """At the VMM's end: the VM and the console go, and whatever a reboot left to release."""
        self.destroy_vm()
        self._wires.close_console()
        _native.wait_released(RELEASE_TIMEOUT_S)

    def replay(self, request: str) -> None:
        """Carries out a latched guest request through the eventfd the device would have written;
        the guest is not resumed past the instruction that made it."""
        self._replay_pending = True
        self.vm.inject_request(request)

    def _vm_reboot(self) -> None:
        self._events.emit("vm", "rebooting")
        # The kernel's destruction of the old VM (~15 ms on kvm_pvm) overlaps the new one's build.
        self.destroy_vm(release_later=True)
        try:
            self._build_and_boot()
        except Exception as e:
            # As in Cloud Hypervisor the VM is gone and its config kept: state Created, from which
            # boot (after fixing the cause), shutdown and delete work. The failure is reported.
            self.state = VmState.CREATED
            self._failure = {"during": "reboot", "message": str(e)}
            self._events.emit("vm", "reboot-failed", {"error": str(e)})
            raise VmmError(f"the VM could not be rebuilt for its reboot and is now Created: {e}") from e
        self._events.emit("vm", "rebooted")

    def _guest_shutdown(self) -> None:
        self.destroy_vm()
        self.state = VmState.SHUTDOWN
        self._events.emit("vm", "shutdown")
        self.end_unless_no_shutdown()

    def end_unless_no_shutdown(self) -> None:
        """The VM has ended: so does the VMM, unless it was told to outlive its guest."""
        if not self._no_shutdown:
            self._loop.stop()

    # ---- the guest's requests (eventfd handlers) -----------------------------------------------

    def _on_lifecycle(self) -> None:
        drain(self._wires.reset_fd)
        drain(self._wires.guest_exit_fd)
        if self.vm is None or self.state not in (VmState.RUNNING, VmState.PAUSED):
            return  # left over from a VM that is gone
        request = self.vm.lifecycle_request()
        if request is None:
            return
        if self.ownership is Ownership.MIGRATION:
            # The worker owns the VM: latch the event (first wins) for the migration to carry.
            if self._latch_request is not None:
                self._latch_request(request)
            return
        replay, self._replay_pending = self._replay_pending, False
        if request == "shutdown":
            self._guest_shutdown()
        elif self.state is VmState.PAUSED and not replay:
            self.pending_on_resume = "reset"  # the reboot happens on resume
        else:
            self._vm_reboot()

    def _on_error(self) -> None:
        drain(self._wires.error_fd)
        if self.vm is None or self.state is VmState.ERROR:
            return
        err = self.vm.error()
        if err is not None:
            self.state = VmState.ERROR
            self._events.emit("vm", "error", err)

    # ---- the API's calls ----------------------------------------------------------------------

    def create(self, config: VmConfig) -> None:
        self.require_empty("a VM has already been created")
        self.config = config
        self.state = VmState.CREATED

    def boot(self) -> None:
        self.require_owned()
        if self.state not in (VmState.CREATED, VmState.SHUTDOWN):
            raise InvalidState(f"cannot boot a VM in state {self.state.value}")
        self._events.emit("vm", "booting")
        self._build_and_boot()
        self._events.emit("vm", "booted")

    def info(self) -> dict:
        self.require_vm()
        # `state` is always one of CH's VmState values; vmmpy's own detail (an unhandled vCPU
        # exit, a failed reboot) is in `error`, with `vmmpy_state` naming vmmpy's state.
        info = {
            "config": self.config.to_api(),
            "state": self.state.api,
            "vmmpy_state": self.state.value,
            "memory_actual_size": self.config.memory_bytes,
        }
        if self._failure is not None:
            info["error"] = self._failure
        if self.vm is not None:
            info["payload_kind"] = self.vm.payload_kind
            info["boot_protocol"] = self.vm.boot_protocol
            info["vcpu_states"] = self.vm.vcpu_states()
            err = self.vm.error()
            if err is not None:
                info["error"] = err
        info["boot_count"] = self.boot_count
        return info

    def pause(self) -> None:
        self.require_owned()
        if self.state is not VmState.RUNNING:
            raise InvalidState(f"cannot pause a VM in state {self.state.value}")
        self._events.emit("vm", "pausing")
        try:
            self.vm.pause(PAUSE_TIMEOUT_S)
        except VmmError:
            self.vm.resume()
            raise
        self.state = VmState.PAUSED
        self._events.emit("vm", "paused")

    def resume(self) -> None:
        self.require_owned()
        if self.state is not VmState.PAUSED:
            raise InvalidState(f"cannot resume a VM in state {self.state.value}")
        self._events.emit("vm", "resuming")
        self.vm.resume()
        self.state = VmState.RUNNING
        self._events.emit("vm", "resumed")
        pending, self.pending_on_resume = self.pending_on_resume, None
        if pending == "reset":
            self._vm_reboot()
        elif pending == "shutdown":
            self._guest_shutdown()

    def reboot(self) -> None:
        self.require_owned()
        if self.state not in (VmState.RUNNING, VmState.PAUSED, VmState.ERROR):
            raise InvalidState(f"cannot reboot a VM in state {self.state.value}")
        self._vm_reboot()

    def shutdown(self) -> None:
        """As Cloud Hypervisor: the VM instance goes, its config stays (state Created, boot starts
        it again). After a failed reboot (no instance) it acknowledges the failure."""
        self.require_owned()
        if self._failure is not None and self.vm is None:
            self._failure = None
            return
        if self.state not in (VmState.RUNNING, VmState.PAUSED, VmState.ERROR):
            raise InvalidState(f"cannot shut down a VM in state {self.state.value}")
        self.destroy_vm()
        self.state = VmState.CREATED
        self._events.emit("vm", "shutdown")

    def counters(self) -> dict:
        """Per-device counters, as CH's vm.counters: each NIC's rx/tx frames, bytes and drops."""
        if self.ownership is Ownership.MIGRATION:
            raise VmMigrating("the VM is being migrated")
        if self.vm is None:
            raise InvalidState("VM is not running")
        return self.vm.counters()

    def delete(self) -> None:
        if self.config is None:
            return  # nothing to delete: a no-op, as in Cloud Hypervisor
        self.require_owned()
        had_vm = self.vm is not None
        self.forget()
        if had_vm:
            self._events.emit("vm", "shutdown")
        self._events.emit("vm", "deleted")

    def power_button(self) -> None:
        """Presses the guest's ACPI power button; the guest decides what to do (an OS powers off).
        As in Cloud Hypervisor a paused VM takes the press too: the guest sees it on resume."""
        self.require_owned()
        if self.state not in (VmState.RUNNING, VmState.PAUSED):
            raise InvalidState(f"cannot press the power button of a VM in state {self.state.value}")
        self.vm.power_button()

    def memory_regions(self) -> list:
        """The current VM's RAM regions as read-only buffers (tests and tooling)."""
        if self.vm is None:
            raise InvalidState("the VM is not running")
        return self.vm.memory_regions()
