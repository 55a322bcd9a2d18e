"""The VMM's side of receiving a migration: a listening receiver on its own thread, and the steps
it asks the control loop for (build an empty VM at Config, its vCPU threads held, reserving the
VMM for it; take it over at Complete, once the receiver thread has let its vCPUs run and
answered)."""

from __future__ import annotations

import logging
import threading

from ..backings import HostBackings
from ..config import VmConfig
from ..control_loop import ControlLoop
from ..errors import InvalidState, VmmShutDown
from ..events import EventMonitor
from ..lifecycle import PostMigrationLifecycleEvent
from ..machine import Machine, VmState
from ..native_vm import start
from ..payload import BootPayload
from ..testhooks import TestHooks
from . import transport
from .destination import CAPABILITIES, GuestRanHere, Incoming, Receiver
from .handles import ReceiveHandle
from .protocol import Capability
from .receive_hooks import ReceiveHooks

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: annotations only
if TYPE_CHECKING:
    from typing import Callable

log = logging.getLogger("vmmpy.migration.reception")
HOOK_WAIT_S = 60.0  # answer-complete-after-close: how long the answer waits for the VMM to end


class Reception(ReceiveHooks):
    def __init__(self, loop: ControlLoop, machine: Machine, events: EventMonitor, test_hooks: TestHooks):
        self._loop = loop
        self._machine = machine
        self._events = events
        self._test_hooks = test_hooks
        self._current: ReceiveHandle | None = None
        self._receiver_closed = threading.Event()  # close() has cut what it cuts (answer-complete-after-close)

    def listen(self, url, receiver_url: str, tls, backings: HostBackings) -> ReceiveHandle:
        """Listens on `url` (parsed) and serves it on a receiver thread (loop thread)."""
        self._machine.require_empty("this VMM already has a VM; a receiving VMM must be empty")
        if self._current is not None:
            raise InvalidState("already receiving a migration")
        caps = None
        if self._test_hooks.no_lifecycle_capability:
            caps = [c for c in CAPABILITIES if c != Capability.LIFECYCLE_EVENT.value]
        receiver = Receiver(
            transport.listen(url),
            self,
            caps,
            tls,
            disk_backings=backings.disks,
            net_backings=backings.net,
            vsock_socket=backings.vsock_socket,
        )
        thread = threading.Thread(target=lambda: self._worker(handle), name="migration-receiver", daemon=True)
        handle = ReceiveHandle(receiver, thread)
        self._current = handle
        thread.start()
        self._events.emit("vm", "migration-receive-ready", {"receiver_url": receiver_url})
        return handle

    def close(self) -> None:
        """At the VMM's end: stops listening and joins the receiver thread."""
        handle = self._current
        if handle is not None:
            handle.receiver.close()
            self._receiver_closed.set()
            handle.close()

    def _worker(self, handle: ReceiveHandle) -> None:
        try:
            handle.completed = handle.receiver.serve()
        finally:
            handle.receiver.close()
            if self._current is handle:
                self._current = None

    # ReceiveHooks: called by the receiver thread; the work runs on the control loop.
    def build_vm(self, cfg: VmConfig, memory_fds: list[int] | None) -> Incoming:
        def do():
            m = self._machine
            m.reserve_for_incoming()
            try:
                own = m.own_serial(cfg)
                # No payload is loaded into a VM built to receive state; the content arrives later.
                vm = m.new_native_vm(own, BootPayload(), restore=True, memory_fds=memory_fds)
                # Its vCPU threads start now and wait: State restores into them, Complete only
                # lets them run (no thread start inside the downtime).
                return Incoming(start(vm, paused=True), own)
            except BaseException:
                m.release_incoming()
                raise

        return self._loop.call(do)

    def discard(self, incoming: Incoming) -> None:
        incoming.vm.stop()
        try:
            self._loop.call(self._machine.release_incoming)
        except VmmShutDown:
            pass  # the VMM is ending: nothing is created on it any more

    def complete(
        self, incoming: Incoming, fields: dict, commit: Callable[[], None], answer: Callable[[], None]
    ) -> None:
        vm = incoming.vm
        event: PostMigrationLifecycleEvent | None = fields.get("post_migration_lifecycle_event")
        if event is None and not self._test_hooks.complete_paused:
            # The guest runs here, and the source hears so, before the loop takes the VM over:
            # the loop's round trip stays out of the downtime (the VMM was reserved for this VM
            # at Config). The take-over is queued first, ahead of any call the answer leads to,
            # and the loop woken only after the answer (with two host CPUs it would take one from
            # the source's thread that waits for that answer).
            commit()
            vm.resume()
            if self._test_hooks.request_on_arrival is not None:
                vm.inject_request(self._test_hooks.request_on_arrival)
            try:
                adopted = self._loop.submit(lambda: self._adopt_running(incoming), wake=False)
            except VmmShutDown as e:
                vm.stop()  # discarded, but it has run: the source must not take this for a refusal
                raise GuestRanHere(f"the VMM shut down as the guest arrived: {e}") from None
            try:
                answer()
            finally:
                self._loop.wake()
            try:
                adopted.result()
            except VmmShutDown:
                # The VMM ended right after the guest arrived, as if just after taking it over.
                vm.stop()
                log.warning("the VMM shut down as the migrated guest arrived: the guest was stopped")
            return

        def do():
            commit()  # the VMM may end right after (a replayed power-off): the source is told Ok first
            # An event came along: the guest asked for reboot/power-off on the source, so it is
            # not resumed here; its request is replayed through the eventfd the device would have
            # written. (The complete-paused test hook also takes the VM over without running it.)
            m = self._machine
            m.adopt(incoming.config, vm, incoming.payload, VmState.PAUSED)
            if event is None:
                self._events.emit("vm", "migration-receive-finished")
                return
            self._events.emit("vm", "migration-receive-finished", {"lifecycle_event": event.value})
            m.replay(event.request)

        self._loop.call(do)
        if self._test_hooks.answer_complete_after_close:
            self._receiver_closed.wait(HOOK_WAIT_S)
        answer()

    def _adopt_running(self, incoming: Incoming) -> None:
        self._events.emit("vm", "migration-receive-finished")
        self._machine.adopt_running(incoming.config, incoming.vm, incoming.payload)

    def emit(self, event: str, properties: dict | None = None) -> None:
        self._events.emit("vm", event, properties)
