"""The VMM: what an API server, the CLI or a Python program drives.

A facade over its parts, each with one job: the control loop (``control_loop.py``: the one thread
that builds, changes and destroys the VM, over eventfds), the VM and its state machine
(``machine.py``), the hand-over of the VM to an outgoing migration and back
(``migration/handover.py``), the receiving side (``migration/reception.py``), and snapshots
(``snapshotting.py``). Every call that touches the VM runs on the control loop.
"""

from __future__ import annotations

import functools
import os

from . import __version__
from .backings import HostBackings
from .config import SerialConfig, VmConfig
from .control_loop import ControlLoop, drain
from .events import EventMonitor
from .machine import Machine, Ownership, VmState
from .testhooks import NO_HOOKS, TestHooks

# Migration and snapshot modules are imported by the calls that use them, so that a VMM that only
# boots does not load them (~10 ms of the `vmmpy` command's start-up); annotations only here.
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from .migration.handles import MigrationHandle, ReceiveHandle
    from .migration.handover import Handover
    from .migration.reception import Reception
    from .native_vm import BootedVm

__all__ = ["Ownership", "VmState", "Vmm"]


class _ClassOrInstance:
    """`Vmm.restore(dir)` builds a new VMM; `vmm.restore(dir)` restores into an existing one."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj, cls):
        return functools.partial(self.fn, obj, cls)


class Vmm:
    def __init__(
        self,
        *,
        serial: SerialConfig | None = None,
        event_monitor: EventMonitor | None = None,
        no_shutdown: bool = False,
        test_hooks: TestHooks = NO_HOOKS,
        disk_backings: dict[str, str] | None = None,
        net_backings: dict[str, str] | None = None,
        vsock_socket: str | None = None,
        booted: BootedVm | None = None,
    ):
        """`disk_backings` (disk id -> path), `net_backings` (net id -> tap name) and
        `vsock_socket`: this host's own files, taps and vsock socket for the devices of a VM it
        receives or restores, unless the receive or restore call names its own. `booted`: a VM
        already running (``native_vm.boot_first``), which this VMM adopts as if it had booted it."""
        self._backings = HostBackings(vsock_socket=vsock_socket).overridden(
            disks=disk_backings or {}, net=net_backings or {}
        )
        self.events = event_monitor or EventMonitor()
        self.test_hooks = test_hooks
        test_hooks.announce()
        self.exit_code = 0
        self._loop = ControlLoop()
        self._exit_fd = self._loop.eventfd(self._on_exit)
        self._machine = Machine(self._loop, self.events, serial, no_shutdown, booted and booted.wires)
        self._handover: Handover | None = None  # built by the first migration call
        self._reception: Reception | None = None  # built by the first receive
        self.events.emit("vmm", "starting")
        if booted is not None:
            # Before the loop runs: lifecycle eventfds the guest may have written already are
            # handled with the VM in place.
            self._machine.adopt_booted(booted)
        self._loop.start(on_teardown=self._teardown, on_closed=lambda: self.events.emit("vmm", "shutdown"))

    @property
    def ownership(self) -> Ownership:
        return self._machine.ownership

    @property
    def boot_count(self) -> int:
        return self._machine.boot_count

    def _outgoing(self) -> Handover:
        """The outgoing side (loop thread: it registers an eventfd with the loop)."""
        if self._handover is None:
            from .migration.handover import Handover

            self._handover = Handover(self._loop, self._machine, self.events, self.test_hooks)
        return self._handover

    def _incoming(self) -> Reception:
        if self._reception is None:
            from .migration.reception import Reception

            self._reception = Reception(self._loop, self._machine, self.events, self.test_hooks)
        return self._reception

    def _on_exit(self) -> None:
        drain(self._exit_fd)
        if self._handover is not None:
            self._handover.abort()
        if self._machine.vm is not None:
            self._machine.destroy_vm()
            self.events.emit("vm", "shutdown")
        self._loop.stop()

    def _teardown(self) -> None:
        # Queued calls have failed by now: a receiver thread waiting on the loop is not left
        # waiting while it is joined here.
        if self._reception is not None:
            self._reception.close()
        self._machine.close()

    # ---- the VM's state machine -------------------------------------------------------------

    def ping(self) -> dict:
        return {"build_version": __version__, "version": __version__, "pid": os.getpid(), "features": []}

    def create(self, config: VmConfig) -> None:
        self._loop.call(lambda: self._machine.create(config))

    def boot(self) -> None:
        self._loop.call(self._machine.boot)

    def info(self) -> dict:
        def do():
            at_start = self._handover.info_at_start if self._handover is not None else None
            if self._machine.ownership is Ownership.MIGRATION and at_start is not None:
                return at_start  # the worker owns the VM: what it was when handed over
            return self._machine.info()

        return self._loop.call(do)

    def pause(self) -> None:
        self._loop.call(self._machine.pause)

    def resume(self) -> None:
        self._loop.call(self._machine.resume)

    def reboot(self) -> None:
        self._loop.call(self._machine.reboot)

    def shutdown(self) -> None:
        """As Cloud Hypervisor: the VM instance goes, its config stays (state Created)."""
        self._loop.call(self._machine.shutdown)

    def counters(self) -> dict:
        return self._loop.call(self._machine.counters)

    def delete(self) -> None:
        self._loop.call(self._machine.delete)

    def power_button(self) -> None:
        """Presses the guest's ACPI power button; the guest decides what to do."""
        self._loop.call(self._machine.power_button)

    def memory_regions(self) -> list:
        """The current VM's RAM regions as read-only buffers (tests and tooling)."""
        return self._loop.call(self._machine.memory_regions)

    # ---- migration ----------------------------------------------------------------------------

    def send_migration(self, destination_url: str | None = None, **options) -> MigrationHandle:
        """Starts migrating the running VM; returns at once with a handle."""
        if destination_url is not None:
            options["destination_url"] = destination_url
        from .migration.source import MigrationOptions

        opts = MigrationOptions.from_dict(options)
        return self._loop.call(lambda: self._outgoing().start(opts))

    def migration_progress(self) -> dict:
        return self._loop.call(lambda: self._outgoing().progress())

    def cancel_migration(self) -> None:
        self._loop.call(lambda: self._outgoing().cancel())

    def receive_migration(
        self,
        receiver_url: str,
        tls_dir: str | None = None,
        disks: dict[str, str] | None = None,
        net: dict[str, str] | None = None,
        vsock_socket: str | None = None,
    ) -> ReceiveHandle:
        """Listens for an incoming migration; returns once listening, with a handle to wait on.
        With `tls_dir` (tcp only, docs/tls.md) every connection must pass mutual TLS. `disks` maps
        each disk id to this host's file for it (default: the VMM's `disk_backings`), `net` each net
        id to this host's tap (default: `net_backings`), `vsock_socket` names this host's socket
        for the VM's vsock device (default: the VMM's `vsock_socket`)."""
        from .migration import transport

        url = transport.parse_url(receiver_url)
        backings = self._backings.overridden(disks, net, vsock_socket)
        tls = transport.tls_context(tls_dir, url, "server")
        return self._loop.call(lambda: self._incoming().listen(url, receiver_url, tls, backings))

    # ---- snapshots ----------------------------------------------------------------------------

    def snapshot(self, destination_url: str) -> None:
        """Writes the paused VM's config, state and memory into a directory (file:// URL or path)."""
        from .snapshot import parse_file_url
        from .snapshotting import take_snapshot

        directory = parse_file_url(destination_url)
        self._loop.call(lambda: take_snapshot(self._machine, self.events, directory))

    @_ClassOrInstance
    def restore(
        self,
        cls,
        source_url: str,
        *,
        resume: bool = False,
        disks: dict[str, str] | None = None,
        net: dict[str, str] | None = None,
        vsock_socket: str | None = None,
        **vmm_kwargs,
    ):
        """`vmm.restore(dir)` restores a snapshot into this empty VMM, paused unless `resume`;
        `Vmm.restore(dir, **kwargs)` does that in a new VMM and returns it."""
        if self is None:
            vmm = cls(**vmm_kwargs)
            try:
                vmm.restore(source_url, resume=resume, disks=disks, net=net, vsock_socket=vsock_socket)
            except BaseException:
                vmm.close()
                raise
            return vmm
        from .snapshot import SnapshotDir, parse_file_url
        from .snapshotting import restore_snapshot

        directory = parse_file_url(source_url)
        backings = self._backings.overridden(disks, net, vsock_socket)
        with SnapshotDir(directory) as snap:
            restore_snapshot(self._loop, self._machine, self.events, snap, directory, backings)
        if resume:
            self.resume()

    # ---- the VMM itself -----------------------------------------------------------------------
    def shutdown_vmm(self) -> None:
        self.request_exit()

    def request_exit(self) -> None:
        """The host's stop request. Only writes an eventfd, so it is safe in a signal handler."""
        self._loop.signal(self._exit_fd)

    @property
    def running(self) -> bool:
        """Whether the control loop still runs (it ends with the VMM)."""
        return self._loop.alive

    def wait(self, timeout: float | None = None) -> int:
        self._loop.join(timeout)
        return self.exit_code

    def wait_for_event(self, name: str, timeout: float, after: int = 0) -> dict:
        return self.events.wait_for_event(name, timeout, after=after)

    def close(self) -> None:
        """Stops the VMM and waits for its control loop."""
        self.request_exit()
        self.wait()

    def __enter__(self) -> "Vmm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
