"""Handing the VM to an outgoing migration's worker thread, and taking it back with the outcome.

Runs on the control loop (the worker thread only runs the job and writes an eventfd at its end).
While the worker holds the VM, the guest's reboot or power-off is latched (``lifecycle.py``); on
the outcome the latched event travels (success), is replayed here (failure before Complete), or
waits for the operator's resume (failure after Complete: the destination may run the guest).
"""

from __future__ import annotations

import logging
import threading

from ..control_loop import ControlLoop, drain
from ..errors import InvalidConfig, InvalidState, MigrationCancelled
from ..events import EventMonitor
from ..lifecycle import LifecycleLatch, PostMigrationLifecycleEvent
from ..machine import Machine, VmState
from ..testhooks import TestHooks
from .handles import MigrationHandle
from .progress import ProgressTracker
from .source import MigrationOptions, SourceMigration

log = logging.getLogger("vmmpy.migration.handover")


class Handover:
    def __init__(self, loop: ControlLoop, machine: Machine, events: EventMonitor, test_hooks: TestHooks):
        self._loop = loop
        self._machine = machine
        self._events = events
        self._test_hooks = test_hooks
        self._done_fd = loop.eventfd(self.on_done)
        self._latch = LifecycleLatch()
        self._current: MigrationHandle | None = None
        self._last_progress: dict | None = None
        # vm.info while the worker holds the VM: what it was when handed over.
        self.info_at_start: dict | None = None

    @property
    def active(self) -> bool:
        return self._current is not None

    def start(self, opts: MigrationOptions) -> MigrationHandle:
        m = self._machine
        m.require_owned()
        if m.state is not VmState.RUNNING:
            raise InvalidState(f"only a running VM can be migrated (state {m.state.value})")
        if opts.local and not m.config.memory_shared:
            raise InvalidConfig(
                "local=on passes guest RAM's memory fds, and this VM's RAM is private (memory shared=off): "
                "start it with --memory shared=on (as Cloud Hypervisor requires)"
            )
        self.info_at_start = m.info()
        self._latch.clear()
        progress = ProgressTracker(
            destination_url=opts.destination_url, local=opts.local, downtime_configured_ms=opts.downtime_ms
        )
        job = SourceMigration(
            m.vm,
            m.config.to_api(),
            m.config.memory_bytes,
            opts,
            self._events,
            progress,
            self._latch,
            self._test_hooks,
            payload=m.payload,
        )
        thread = threading.Thread(target=lambda: self._worker(handle), name="migration-worker", daemon=True)
        handle = MigrationHandle(job, thread, threading.Event())
        m.hand_over(lambda request: job.latch_event(PostMigrationLifecycleEvent.from_request(request)))
        self._current = handle
        self._events.emit("vm", "migration-started", {"destination_url": opts.destination_url, "local": opts.local})
        thread.start()
        return handle

    def progress(self) -> dict:
        if self._current is not None:
            return self._current.progress()
        if self._last_progress is not None:
            return self._last_progress
        raise InvalidState("no migration has run on this VMM")

    def cancel(self) -> None:
        if self._current is None:
            raise InvalidState("no migration is running")
        self._current.cancel()

    def abort(self) -> None:
        """The host stops the VMM: the migration is cancelled and waited for; no latched event
        travels or is replayed (the host asked for the VM to end)."""
        if self._current is not None:
            self._current.cancel()
            self._current._thread.join()
            self.on_done(replay=False)

    def _worker(self, handle: MigrationHandle) -> None:
        job = handle._job
        try:
            job.run()
        except BaseException as e:  # reported through the handle and events
            handle.error = e
            job.progress.update(status="cancelled" if isinstance(e, MigrationCancelled) else "failed", error=str(e))
        finally:
            self._loop.signal(self._done_fd)

    def on_done(self, replay: bool = True) -> None:
        drain(self._done_fd)
        handle = self._current
        if handle is None:
            return
        handle._thread.join()  # it wrote the eventfd as its last act
        self._current = None
        self.info_at_start = None
        self._machine.take_back()
        try:
            if handle.error is None:
                self._succeeded(handle._job)
            else:
                self._failed(handle, replay)
        finally:
            self._latch.clear()  # the outcome is handled: nothing stays latched
            handle._settled.set()

    def _report(self, job: SourceMigration, replayed_on: str | None) -> dict:
        if self._latch.event is not None:
            job.progress.update(lifecycle_replayed_on=replayed_on)
        self._last_progress = job.progress.snapshot()
        return {k: self._last_progress[k] for k in ("lifecycle_event", "lifecycle_replayed_on")}

    def _succeeded(self, job: SourceMigration) -> None:
        report = self._report(job, "destination")
        done = {k: self._last_progress[k] for k in ("downtime_ms", "total_time_ms")}
        done["phases_ms"] = {k: round(v, 3) for k, v in job.phases_ms.items()}
        self._events.emit("vm", "migration-finished", {**done, **report})
        if self._test_hooks.keep_source:
            self._machine.state = VmState.PAUSED  # for comparing memory with the destination's
            return
        # The destination runs the guest now: ours goes, and so does this VMM unless told to stay.
        self._machine.forget()
        self._machine.end_unless_no_shutdown()

    def _failed(self, handle: MigrationHandle, replay: bool) -> None:
        job, m = handle._job, self._machine
        event = self._latch.event
        replay = replay and event is not None and not job.complete_sent
        report = self._report(job, "source" if replay else None)
        kind = "migration-cancelled" if isinstance(handle.error, MigrationCancelled) else "migration-failed"
        self._events.emit("vm", kind, {"error": str(handle.error), "source_paused": job.complete_sent, **report})
        if job.complete_sent:
            # Complete went out but its answer did not come back: the destination may run the
            # guest now. Resuming (or replaying) here could run it twice, so it stays paused for
            # the operator to resume or delete once the destination's state is known.
            m.state = VmState.PAUSED
            log.warning("migration failed after Complete was sent: the source VM stays paused")
            if event is not None:
                m.pending_on_resume = event.request  # carried out if the operator resumes
        elif replay:
            m.replay(event.request)
        elif job.paused:
            m.vm.resume()
