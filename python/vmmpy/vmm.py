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
import dataclasses
import enum
import functools
import logging
import os
import queue
import selectors
import threading
from typing import Any, Callable

from . import __version__, _native
from .config import SerialConfig, VmConfig, from_peer
from .console import ConsoleBackend
from .errors import (
    InvalidConfig,
    InvalidState,
    MigrationCancelled,
    VmAlreadyCreated,
    VmMigrating,
    VmmError,
    VmmShutDown,
    VmNotCreated,
)
from .events import EventMonitor
from .lifecycle import LifecycleLatch, PostMigrationLifecycleEvent
from .migration import transport
from .migration.destination import CAPABILITIES, Incoming, ReceiveHooks, Receiver
from .migration.protocol import Capability
from .migration.progress import ProgressTracker
from .migration.handles import MigrationHandle, ReceiveHandle
from .migration.source import PAUSE_TIMEOUT_S, MigrationOptions, SourceMigration
from .payload import BootPayload, check_description
from .testhooks import NO_HOOKS, TestHooks
from .vsock import native_vsock
from .snapshot import (
    CONFIG_FILE,
    STATE_FILE,
    SnapshotDir,
    decode_state,
    encode_state,
    parse_file_url,
    read_memory,
    read_payload,
    write_snapshot,
)

log = logging.getLogger("vmmpy.vmm")


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


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class _ClassOrInstance:
    """`Vmm.restore(dir)` builds a new VMM; `vmm.restore(dir)` restores into an existing one."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj, cls):
        return functools.partial(self.fn, obj, cls)


class Vmm(ReceiveHooks):
    def __init__(
        self,
        *,
        serial: SerialConfig | None = None,
        event_monitor: EventMonitor | None = None,
        no_shutdown: bool = False,
        test_hooks: TestHooks = NO_HOOKS,
        disk_backings: dict[str, str] | None = None,
        vsock_socket: str | None = None,
    ):
        """`disk_backings` (disk id -> path), `vsock_socket`: this host's own files for the disks
        and the vsock device of a VM it receives or restores, unless the call names its own."""
        self._disk_backings = dict(disk_backings or {})
        self._vsock_socket = vsock_socket
        self.events = event_monitor or EventMonitor()
        self.test_hooks = test_hooks
        test_hooks.announce()
        self.no_shutdown = no_shutdown
        self._serial_override = serial
        self._reset_fd = _eventfd()
        self._guest_exit_fd = _eventfd()
        self._exit_fd = _eventfd()
        self._error_fd = _eventfd()
        self._api_fd = _eventfd()
        self._migration_fd = _eventfd()
        # Other threads write the exit and api eventfds; this lock keeps them from writing a number
        # that teardown has closed (and the process may have reused).
        self._fd_lock = threading.Lock()
        self._closing = False  # no more work is queued for the control loop
        self._fds_closed = False
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._console: ConsoleBackend | None = None
        self._vm: _native.Vm | None = None
        self._config: VmConfig | None = None
        # The kernel and initramfs content the VM boots from (read once, or received): reboots,
        # migrations and snapshots use these bytes, never a path again.
        self._payload: BootPayload | None = None
        self._state: VmState | None = None
        # Why the last VM instance ended without being asked to (its rebuild on reboot failed):
        # shown by vm.info until the next boot, shutdown or delete.
        self._failure: dict | None = None
        # A guest request that arrived while paused (or whose migration failed ambiguously): carried
        # out on resume ("reset" or "shutdown").
        self._pending_on_resume: str | None = None
        # A lifecycle request replayed from a migration's latch: carried out even on a paused VM.
        self._replay_pending = False
        self._latch = LifecycleLatch()
        self._migration: MigrationHandle | None = None
        self._last_progress: dict | None = None
        self._info_cache: dict | None = None
        self._receive: ReceiveHandle | None = None
        self.ownership = Ownership.NONE
        self.boot_count = 0
        self.exit_code = 0
        self._running = True
        self._selector = selectors.DefaultSelector()
        for fd, handler in [
            (self._reset_fd, self._on_lifecycle),
            (self._guest_exit_fd, self._on_lifecycle),
            (self._exit_fd, self._on_exit),
            (self._error_fd, self._on_error),
            (self._api_fd, self._on_api),
            (self._migration_fd, self._on_migration_done),
        ]:
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
                    try:
                        key.data()
                    except Exception:  # noqa: BLE001 - one failed handler must not end the VMM
                        log.exception("control loop: %s failed", getattr(key.data, "__name__", key.data))
                    if not self._running:
                        break
        finally:
            self._teardown()

    def _teardown(self) -> None:
        # First nobody may queue work any more, and what is queued fails: a receiver thread
        # waiting on the control loop must not wait forever (we join it below).
        with self._fd_lock:
            self._closing = True
        self._fail_queued()
        receive = self._receive
        if receive is not None:
            receive.close()
        self._destroy_vm()
        if self._console is not None:
            self._console.close()
            self._console = None
        self._selector.close()
        with self._fd_lock:
            for fd in (
                self._reset_fd,
                self._guest_exit_fd,
                self._exit_fd,
                self._error_fd,
                self._api_fd,
                self._migration_fd,
            ):
                os.close(fd)
            self._fds_closed = True
        self.events.emit("vmm", "shutdown")

    def _fail_queued(self) -> None:
        while True:
            try:
                _, fut = self._requests.get_nowait()
            except queue.Empty:
                return
            fut.set_exception(VmmShutDown("the VMM has shut down"))

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
            # The worker owns the VM: latch the event (first wins) for the migration to carry.
            if self._migration is not None:
                self._migration._job.latch_event(PostMigrationLifecycleEvent.from_request(request))
            return
        replay, self._replay_pending = self._replay_pending, False
        if request == "shutdown":
            self._guest_shutdown()
        elif self._state is VmState.PAUSED and not replay:
            self._pending_on_resume = "reset"  # the reboot happens on resume
        else:
            self._vm_reboot()

    def _on_exit(self) -> None:
        _drain(self._exit_fd)
        if self._migration is not None:
            # A host stop cancels the migration and stops the source; no latched event travels
            # or is replayed: the host asked for the VM to end.
            self._migration.cancel()
            self._migration._thread.join()
            self._on_migration_done(replay=False)
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

    def _own_serial(self, cfg: VmConfig) -> VmConfig:
        """`cfg` (from a migration peer or a snapshot) on this VMM's own serial: the command line's,
        or none. A peer never chooses a host file or socket here."""
        return dataclasses.replace(cfg, serial=self._serial_override or SerialConfig())

    def _new_native_vm(
        self, cfg: VmConfig, payload: BootPayload, restore: bool = False, memory_fds: list[int] | None = None
    ):
        """A native VM on the VMM's console (the command line's serial wins over the config's)."""
        self._open_console(self._serial_override or cfg.serial)
        with native_vsock(cfg.vsock) as vsock:
            return _native.Vm(
                memory_size=cfg.memory_bytes,
                vcpus=cfg.vcpus,
                kernel=payload.kernel,
                initramfs=payload.initramfs,
                cmdline=cfg.effective_cmdline,
                console=self._console.native,
                reset_fd=self._reset_fd,
                guest_exit_fd=self._guest_exit_fd,
                error_fd=self._error_fd,
                restore=restore,
                memory_fds=memory_fds,
                boot_protocol=cfg.boot_protocol,
                disks=[(d.id, d.path, d.readonly, d.direct) for d in cfg.disks],
                vsock=vsock,
            )

    def _build_and_boot(self) -> None:
        cfg = self._config
        # The caller's own files, read on the first boot; held from then on.
        payload = self._payload or BootPayload.read(cfg.kernel, cfg.initramfs)
        vm = self._new_native_vm(cfg, payload)
        try:
            vm.boot()
        except BaseException:
            vm.stop()
            raise
        self._vm, self._payload = vm, payload
        self._state = VmState.RUNNING
        self._failure = None
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
        self._pending_on_resume = None
        self._replay_pending = False
        self.ownership = Ownership.NONE

    def _vm_reboot(self) -> None:
        self.events.emit("vm", "rebooting")
        self._destroy_vm()
        try:
            self._build_and_boot()
        except Exception as e:
            # As in Cloud Hypervisor the VM is gone and its config kept: state Created, from which
            # boot (after fixing the cause), shutdown and delete work. The failure is reported.
            self._state = VmState.CREATED
            self._failure = {"during": "reboot", "message": str(e)}
            self.events.emit("vm", "reboot-failed", {"error": str(e)})
            raise VmmError(f"the VM could not be rebuilt for its reboot and is now Created: {e}") from e
        self.events.emit("vm", "rebooted")

    # ---- migration (control thread) ---------------------------------------------------------

    def _migration_worker(self, handle: MigrationHandle) -> None:
        job = handle._job
        try:
            job.run()
        except BaseException as e:  # reported through the handle and events
            handle.error = e
            job.progress.update(status="cancelled" if isinstance(e, MigrationCancelled) else "failed", error=str(e))
        finally:
            with self._fd_lock:
                if not self._fds_closed:
                    os.eventfd_write(self._migration_fd, 1)

    def _on_migration_done(self, replay: bool = True) -> None:
        _drain(self._migration_fd)
        handle = self._migration
        if handle is None:
            return
        handle._thread.join()  # it wrote the eventfd as its last act
        self._migration = None
        self._info_cache = None
        self.ownership = Ownership.OWNED
        try:
            if handle.error is None:
                self._migration_succeeded(handle._job)
            else:
                self._migration_failed(handle, replay)
        finally:
            self._latch.clear()  # the outcome is handled: nothing stays latched
            handle._settled.set()

    def _migration_report(self, job: SourceMigration, replayed_on: str | None) -> dict:
        if self._latch.event is not None:
            job.progress.update(lifecycle_replayed_on=replayed_on)
        self._last_progress = job.progress.snapshot()
        return {k: self._last_progress[k] for k in ("lifecycle_event", "lifecycle_replayed_on")}

    def _migration_succeeded(self, job: SourceMigration) -> None:
        report = self._migration_report(job, "destination")
        self.events.emit(
            "vm",
            "migration-finished",
            {
                "downtime_ms": self._last_progress["downtime_ms"],
                "total_time_ms": self._last_progress["total_time_ms"],
                **report,
            },
        )
        if self.test_hooks.keep_source:
            self._state = VmState.PAUSED  # for comparing memory with the destination's
            return
        # The destination runs the guest now: tear ours down.
        self._destroy_vm()
        self._config = None
        self._payload = None
        self._state = None
        if not self.no_shutdown:
            self._running = False

    def _migration_failed(self, handle: MigrationHandle, replay: bool) -> None:
        job = handle._job
        event = self._latch.event
        replay = replay and event is not None and not job.complete_sent
        report = self._migration_report(job, "source" if replay else None)
        kind = "migration-cancelled" if isinstance(handle.error, MigrationCancelled) else "migration-failed"
        self.events.emit("vm", kind, {"error": str(handle.error), "source_paused": job.complete_sent, **report})
        if job.complete_sent:
            # Complete went out but its answer did not come back: the destination may run the
            # guest now. Resuming (or replaying) here could run it twice, so it stays paused for
            # the operator to resume or delete once the destination's state is known.
            self._state = VmState.PAUSED
            log.warning("migration failed after Complete was sent: the source VM stays paused")
            if event is not None:
                self._pending_on_resume = event.request  # carried out if the operator resumes
        elif replay:
            # The guest's own request, through its eventfd; the guest is not resumed past the
            # instruction that made it.
            self._replay_pending = True
            self._vm.inject_request(event.request)
        elif job.paused:
            self._vm.resume()

    # ReceiveHooks: called by the receiver thread; the work runs on the control loop.
    def build_vm(self, cfg: VmConfig, memory_fds: list[int] | None) -> Incoming:
        def do():
            if self._config is not None:
                raise VmAlreadyCreated("a VM exists on this VMM")
            own = self._own_serial(cfg)
            # No payload is loaded into a VM built to receive state; the content arrives later.
            return Incoming(self._new_native_vm(own, BootPayload(), restore=True, memory_fds=memory_fds), own)

        return self._call(do)

    def complete(self, incoming: Incoming, fields: dict) -> None:
        vm = incoming.vm
        event = fields.get("post_migration_lifecycle_event")
        event = PostMigrationLifecycleEvent(event) if event is not None else None

        def do():
            if self._config is not None:
                raise VmAlreadyCreated("a VM exists on this VMM")
            # An event came along: the guest asked for reboot/power-off on the source, so it is
            # not resumed here; its request is replayed through the eventfd the device would have
            # written. (The complete-paused test hook also takes the VM over without running it.)
            paused = event is not None or self.test_hooks.complete_paused
            vm.boot(paused=paused)
            self._config, self._vm, self._payload = incoming.config, vm, incoming.payload
            self._state = VmState.PAUSED if paused else VmState.RUNNING
            self.ownership = Ownership.OWNED
            self.boot_count += 1
            if event is None:
                self.events.emit("vm", "migration-receive-finished")
                return
            self.events.emit("vm", "migration-receive-finished", {"lifecycle_event": event.value})
            self._replay_pending = True
            vm.inject_request(event.request)

        self._call(do)

    def emit(self, event: str, properties: dict | None = None) -> None:
        self.events.emit("vm", event, properties)

    def _receive_worker(self, handle: ReceiveHandle) -> None:
        try:
            handle.completed = handle.receiver.serve()
        finally:
            handle.receiver.close()
            if self._receive is handle:
                self._receive = None

    # ---- calls from other threads -----------------------------------------------------------

    def _call(self, fn: Callable[[], Any]) -> Any:
        if threading.current_thread() is self._thread:
            return fn()
        if not self._running:
            raise VmmShutDown("the VMM has shut down")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._fd_lock:
            if self._closing:
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
            if self.ownership is Ownership.MIGRATION and self._info_cache is not None:
                return self._info_cache  # the worker owns the VM: what it was when handed over
            self._require_vm()
            # `state` is always one of CH's VmState values; vmmpy's own detail (an unhandled vCPU
            # exit, a failed reboot) is in `error`, with `vmmpy_state` naming vmmpy's state.
            info = {
                "config": self._config.to_api(),
                "state": self._state.api,
                "vmmpy_state": self._state.value,
                "memory_actual_size": self._config.memory_bytes,
            }
            if self._failure is not None:
                info["error"] = self._failure
            if self._vm is not None:
                info["payload_kind"] = self._vm.payload_kind
                info["boot_protocol"] = self._vm.boot_protocol
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
            pending, self._pending_on_resume = self._pending_on_resume, None
            if pending == "reset":
                self._vm_reboot()
            elif pending == "shutdown":
                self._guest_shutdown()

        self._call(do)

    def reboot(self) -> None:
        def do():
            self._require_owned()
            if self._state not in (VmState.RUNNING, VmState.PAUSED, VmState.ERROR):
                raise InvalidState(f"cannot reboot a VM in state {self._state.value}")
            self._vm_reboot()

        self._call(do)

    def shutdown(self) -> None:
        """As Cloud Hypervisor: the VM instance goes, its config stays (state Created, boot starts
        it again). After a failed reboot (no instance) it acknowledges the failure."""

        def do():
            self._require_owned()
            if self._failure is not None and self._vm is None:
                self._failure = None
                return
            if self._state not in (VmState.RUNNING, VmState.PAUSED, VmState.ERROR):
                raise InvalidState(f"cannot shut down a VM in state {self._state.value}")
            self._destroy_vm()
            self._state = VmState.CREATED
            self.events.emit("vm", "shutdown")

        self._call(do)

    def counters(self) -> dict:
        """Per-device counters, as CH's vm.counters; vmmpy's devices keep none: ``{}``."""

        def do():
            if self.ownership is Ownership.MIGRATION:
                raise VmMigrating("the VM is being migrated")
            if self._vm is None:
                raise InvalidState("VM is not running")
            return {}

        return self._call(do)

    def delete(self) -> None:
        def do():
            if self._config is None:
                return  # nothing to delete: a no-op, as in Cloud Hypervisor
            self._require_owned()
            had_vm = self._vm is not None
            self._destroy_vm()
            self._config = None
            self._payload = None
            self._state = None
            self._failure = None
            if had_vm:
                self.events.emit("vm", "shutdown")
            self.events.emit("vm", "deleted")

        self._call(do)

    def power_button(self) -> None:
        """Presses the guest's ACPI power button; the guest decides what to do (an OS powers off).
        As in Cloud Hypervisor a paused VM takes the press too: the guest sees it on resume."""

        def do():
            self._require_owned()
            if self._state not in (VmState.RUNNING, VmState.PAUSED):
                raise InvalidState(f"cannot press the power button of a VM in state {self._state.value}")
            self._vm.power_button()

        self._call(do)

    def send_migration(self, destination_url: str | None = None, **options) -> MigrationHandle:
        """Starts migrating the running VM; returns at once with a handle."""
        if destination_url is not None:
            options["destination_url"] = destination_url
        opts = MigrationOptions.from_dict(options)

        def do():
            self._require_owned()
            if self._state is not VmState.RUNNING:
                raise InvalidState(f"only a running VM can be migrated (state {self._state.value})")
            self._info_cache = self.info()
            self._latch.clear()
            progress = ProgressTracker(
                destination_url=opts.destination_url, local=opts.local, downtime_configured_ms=opts.downtime_ms
            )
            job = SourceMigration(
                self._vm,
                self._config.to_api(),
                self._config.memory_bytes,
                opts,
                self.events,
                progress,
                self._latch,
                self.test_hooks,
                payload=self._payload,
            )
            thread = threading.Thread(
                target=lambda: self._migration_worker(handle), name="migration-worker", daemon=True
            )
            handle = MigrationHandle(job, thread, threading.Event())
            self.ownership = Ownership.MIGRATION
            self._migration = handle
            self.events.emit("vm", "migration-started", {"destination_url": opts.destination_url, "local": opts.local})
            thread.start()
            return handle

        return self._call(do)

    def migration_progress(self) -> dict:
        def do():
            if self._migration is not None:
                return self._migration.progress()
            if self._last_progress is not None:
                return self._last_progress
            raise InvalidState("no migration has run on this VMM")

        return self._call(do)

    def cancel_migration(self) -> None:
        def do():
            if self._migration is None:
                raise InvalidState("no migration is running")
            self._migration.cancel()

        self._call(do)

    def receive_migration(
        self,
        receiver_url: str,
        tls_dir: str | None = None,
        disks: dict[str, str] | None = None,
        vsock_socket: str | None = None,
    ) -> ReceiveHandle:
        """Listens for an incoming migration; returns once listening, with a handle to wait on.
        With `tls_dir` (tcp only, docs/tls.md) every connection must pass mutual TLS. `disks` maps
        each disk id to this host's file for it (default: the VMM's `disk_backings`)."""
        url = transport.parse_url(receiver_url)
        backings = self._checked_backings(disks)
        vsock_socket = vsock_socket or self._vsock_socket
        tls = transport.tls_context(tls_dir, url, "server")

        def do():
            if self._config is not None:
                raise VmAlreadyCreated("this VMM already has a VM; a receiving VMM must be empty")
            if self._receive is not None:
                raise InvalidState("already receiving a migration")
            caps = None
            if self.test_hooks.no_lifecycle_capability:
                caps = [c for c in CAPABILITIES if c != Capability.LIFECYCLE_EVENT.value]
            receiver = Receiver(
                transport.listen(url), self, caps, tls, disk_backings=backings, vsock_socket=vsock_socket
            )
            thread = threading.Thread(
                target=lambda: self._receive_worker(handle), name="migration-receiver", daemon=True
            )
            handle = ReceiveHandle(receiver, thread)
            self._receive = handle
            thread.start()
            self.events.emit("vm", "migration-receive-ready", {"receiver_url": receiver_url})
            return handle

        return self._call(do)

    def snapshot(self, destination_url: str) -> None:
        """Writes the paused VM's config, state and memory into a directory (file:// URL or path)."""
        directory = parse_file_url(destination_url)

        def do():
            self._require_owned()
            if self._state is not VmState.PAUSED:
                raise InvalidState(f"snapshot needs a paused VM (state {self._state.value})")
            if self._pending_on_resume is not None or self._vm.lifecycle_request() is not None:
                # The guest stands past its own reset/power-off request: a snapshot would lose it.
                raise InvalidState("the guest asked for reboot or power-off; resume to carry it out first")
            self.events.emit("vm", "snapshotting")
            state = encode_state(self._vm.save_state(), payload=self._payload.describe() or None)
            write_snapshot(directory, self._config.to_api(), state, self._vm, self._payload)
            self.events.emit("vm", "snapshotted", {"path": str(directory)})

        self._call(do)

    def _checked_backings(self, disks: Any) -> dict[str, str]:
        if disks is None:
            return dict(self._disk_backings)
        if not isinstance(disks, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in disks.items()):
            raise InvalidConfig(f"disks={disks!r}: must map disk ids to paths (strings)")
        return dict(disks)

    @_ClassOrInstance
    def restore(
        self,
        cls,
        source_url: str,
        *,
        resume: bool = False,
        disks: dict[str, str] | None = None,
        vsock_socket: str | None = None,
        **vmm_kwargs,
    ):
        """`vmm.restore(dir)` restores a snapshot into this empty VMM, paused unless `resume`;
        `Vmm.restore(dir, **kwargs)` does that in a new VMM and returns it."""
        if self is None:
            vmm = cls(**vmm_kwargs)
            try:
                vmm.restore(source_url, resume=resume, disks=disks, vsock_socket=vsock_socket)
            except BaseException:
                vmm.close()
                raise
            return vmm
        directory = parse_file_url(source_url)
        backings = self._checked_backings(disks)
        with SnapshotDir(directory) as snap:
            self._restore_from(snap, directory, backings, vsock_socket or self._vsock_socket)
        if resume:
            self.resume()

    def _restore_from(self, snap: SnapshotDir, directory, disk_backings: dict[str, str], vsock_socket=None) -> None:
        """Everything is read and checked (version, config, payload digests) before a VM is built;
        the snapshot's config chooses no host path here (its serial is this VMM's own)."""
        config_api, decoded = snap.read_json(CONFIG_FILE), decode_state(snap.read_json(STATE_FILE))
        described = decoded.fields["payload"] or {}
        cfg = from_peer(config_api, described, disk_backings, vsock_socket)
        payload = read_payload(snap, check_description(described, cfg.memory_bytes))
        cfg = self._own_serial(cfg)

        def do():
            if self._config is not None:
                raise VmAlreadyCreated("this VMM already has a VM")
            self.events.emit("vm", "restoring", {"path": str(directory)})
            vm = self._new_native_vm(cfg, payload, restore=True)
            try:
                read_memory(snap, vm)
                vm.restore_state(decoded.native)
                vm.boot(paused=True)
                vm.pause(PAUSE_TIMEOUT_S)  # returns once every vCPU has parked
            except BaseException:
                vm.stop()
                raise
            self._config, self._vm, self._state, self._payload = cfg, vm, VmState.PAUSED, payload
            self.ownership = Ownership.OWNED
            self.boot_count += 1
            self.events.emit("vm", "restored", {"path": str(directory)})

        self._call(do)

    def shutdown_vmm(self) -> None:
        self.request_exit()

    def request_exit(self) -> None:
        """The host's stop request. Only writes an eventfd, so it is safe in a signal handler."""
        with self._fd_lock:
            if not self._fds_closed:
                os.eventfd_write(self._exit_fd, 1)

    @property
    def running(self) -> bool:
        """Whether the control loop still runs (it ends with the VMM)."""
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> int:
        self._thread.join(timeout)
        return self.exit_code

    def wait_for_event(self, name: str, timeout: float, after: int = 0) -> dict:
        return self.events.wait_for_event(name, timeout, after=after)

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
