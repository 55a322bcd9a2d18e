"""The sending side: a worker thread that owns the VM while it migrates it.

Pre-copy: iteration 0 sends all RAM (zero pages as ranges without bytes); each later iteration
sends what the dirty log reports, until the estimated downtime (bytes left / measured bandwidth)
fits `downtime_ms` or nothing is dirty. Then the final phase: pause, last dirty pass, State,
Complete. Same-host (`local`): the memory fds travel instead of the memory, and the VM pauses
right after Config.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, fields

from ..errors import InvalidConfig, MigrationCancelled, MigrationError
from ..lifecycle import LifecycleLatch, PostMigrationLifecycleEvent
from ..payload import PARTS, BootPayload
from ..snapshot import encode_state
from . import transport
from .progress import ProgressTracker
from .protocol import VERSION, Capability, Command, Connection, PeerError

CHUNK_BYTES = 64 << 20  # one Memory frame; cancel and timeouts are checked between frames
THROTTLE_STEP = 10
THROTTLE_MAX = 99
THROTTLE_SLICE_S = 0.1
PAUSE_TIMEOUT_S = 5.0


@dataclass
class MigrationOptions:
    destination_url: str
    local: bool = False
    downtime_ms: int = 300
    timeout_s: int = 3600
    timeout_strategy: str = "cancel"
    auto_converge: bool = True

    @classmethod
    def from_dict(cls, body: dict) -> "MigrationOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise InvalidConfig(f"unknown migration options: {', '.join(unknown)}")
        if "destination_url" not in body:
            raise InvalidConfig("migration needs destination_url")
        opts = cls(**{k: _coerce(k, v) for k, v in body.items()})
        transport.parse_url(opts.destination_url)
        if opts.downtime_ms < 1 or opts.timeout_s < 1:
            raise InvalidConfig("downtime_ms and timeout_s must be positive")
        if opts.timeout_strategy not in ("cancel", "ignore"):
            raise InvalidConfig(f"timeout_strategy={opts.timeout_strategy!r}: expected cancel or ignore")
        if opts.local and not opts.destination_url.startswith("unix:"):
            raise InvalidConfig("local=on needs a unix: destination_url (the memory fds travel over it)")
        return opts


def _coerce(key: str, value):
    if key in ("local", "auto_converge"):
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("on", "true", "1", "yes"):
            return True
        if str(value).lower() in ("off", "false", "0", "no"):
            return False
        raise InvalidConfig(f"{key}={value!r}: expected on or off")
    if key in ("downtime_ms", "timeout_s"):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise InvalidConfig(f"{key}={value!r}: expected an integer") from None
    return str(value)


class Throttle:
    """Auto-converge: takes the vCPUs off the CPU for `percent` of each time slice."""

    def __init__(self, vm):
        self.vm = vm
        self.percent = 0
        self.error: Exception | None = None  # why throttling stopped early, if it did
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def raise_by(self, step: int) -> int:
        self.percent = min(THROTTLE_MAX, self.percent + step)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vcpu-throttle", daemon=True)
            self._thread.start()
        return self.percent

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                off = THROTTLE_SLICE_S * self.percent / 100
                try:
                    self.vm.pause(1.0)
                    self._stop.wait(off)
                finally:
                    self.vm.resume()  # never leave the guest stopped, whatever failed
                self._stop.wait(THROTTLE_SLICE_S - off)
        except Exception as e:  # noqa: BLE001 - throttling is best effort; the migration goes on
            self.error = e

    def stop(self) -> None:
        """Ends throttling with the vCPUs running."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class SourceMigration:
    """Runs one outgoing migration on the caller's thread (the VMM's migration worker)."""

    def __init__(self, vm, config_api: dict, memory_size: int, options: MigrationOptions, events,
                 progress: ProgressTracker, latch: LifecycleLatch, hooks: dict[str, str] | None = None,
                 payload: BootPayload | None = None):
        self.vm = vm
        self.payload = payload or BootPayload()  # the content the destination reboots from
        self.latch = latch
        # Test hooks (vmmpy.testhooks): timing windows tests must hit deliberately.
        self.hooks = hooks or {}
        self.config_api = config_api
        self.memory_size = memory_size
        self.opts = options
        self.events = events
        self.progress = progress
        self.cancel_requested = threading.Event()
        self.paused = False  # whether this worker paused the VM (and so who resumes it on failure)
        self.complete_sent = False
        self._in_frame = False  # a Memory frame is being written: no other request may start
        self.pause_time: float | None = None
        self._start = time.monotonic()
        self._dirty_logging = False
        self._throttle: Throttle | None = None
        self._conn: Connection | None = None

    def cancel(self) -> None:
        """Stops the migration at once: a worker blocked on a destination that does not answer is
        woken by shutting its connection down (the destination discards a cut frame)."""
        self.cancel_requested.set()
        conn = self._conn
        if conn is not None:
            conn.shutdown()

    def _check_cancel(self) -> None:
        if self.cancel_requested.is_set():
            raise MigrationCancelled("migration cancelled")

    def run(self) -> None:
        url = transport.parse_url(self.opts.destination_url)
        self.progress.update(status="active", total=self.memory_size)
        conn = Connection(transport.connect(url))
        self._conn = conn
        try:
            self._check_cancel()  # a cancel that came while connecting
            self._migrate(conn)
        except BaseException as e:
            if self.cancel_requested.is_set() and not isinstance(e, MigrationCancelled):
                raise MigrationCancelled("migration cancelled") from e
            if not self._in_frame and not isinstance(e, PeerError):
                conn.abandon()  # at a frame boundary; a refusing peer has dropped the attempt already
            raise
        finally:
            self._cleanup()
            self._conn = None
            conn.close()

    def _migrate(self, conn: Connection) -> None:
        caps = [Capability.ZERO_RANGES.value, Capability.LIFECYCLE_EVENT.value]
        if self.opts.local:
            caps.append(Capability.LOCAL.value)
        answer = json.loads(conn.request_json(Command.START, {"version": VERSION, "capabilities": caps}) or b"{}")
        self.peer_capabilities = set(answer.get("capabilities", []))
        if answer.get("version") != VERSION:
            raise MigrationError(f"destination speaks migration protocol {answer.get('version')}, we speak {VERSION}")
        if self.opts.local:
            if Capability.LOCAL.value not in self.peer_capabilities:
                raise MigrationError("destination does not accept memory fds (local migration)")
            self.progress.update(phase="memory-fds", local=True)
            for i, (gpa, fd, size) in enumerate(self.vm.memory_fds()):
                conn.request(Command.MEMORY_FD, arg=i, fds=[fd])
        parts = self.payload.parts()
        if parts and Capability.PAYLOAD.value not in self.peer_capabilities:
            raise MigrationError("destination cannot take the kernel/initramfs as content (no payload capability)")
        config = {"config": self.config_api, "memory_size": self.memory_size, "local": self.opts.local}
        if parts:
            config["payload"] = self.payload.describe()
        conn.send_request(Command.CONFIG, json.dumps(config).encode())
        if not self.opts.local:
            # While the destination builds its VM, turn dirty logging on here.
            self.vm.start_dirty_log()
            self._dirty_logging = True
        conn.read_response()
        self._check_cancel()
        for name, data in parts.items():
            conn.request(Command.PAYLOAD, data, arg=PARTS.index(name))
        remaining = None
        if not self.opts.local:
            remaining = self._precopy(conn)
        self._final_phase(conn, remaining)

    # ---- pre-copy ---------------------------------------------------------------------------

    def _precopy(self, conn: Connection):
        self.progress.update(phase="precopy")
        table = self.vm.all_ram_ranges()
        bandwidth = 0.0  # bytes/s
        iteration = 0
        while True:
            if iteration > 0:
                left = table.total_bytes
                expected_ms = left / bandwidth * 1000 if bandwidth else float("inf")
                self.progress.update(expected_downtime_ms=expected_ms)
                if left == 0 or expected_ms <= self.opts.downtime_ms:
                    return table
            if self._timed_out():
                if self.opts.timeout_strategy == "cancel":
                    raise MigrationCancelled(f"migration did not converge within timeout_s={self.opts.timeout_s}")
                return table
            if self._shortcut():
                return table
            t0 = time.monotonic()
            sent = self._send(conn, table)
            elapsed = max(time.monotonic() - t0, 1e-6)
            if sent:
                bandwidth = sent / elapsed
            self.progress.update(iteration=iteration + 1, mbps=bandwidth * 8 / 1e6)
            self.events.emit("vm", "migration-memory-iteration", {"iteration": iteration, "bytes": sent,
                                                                   "ranges": len(table)})
            iteration += 1
            table = self.vm.dirty_ranges()
            dirtied = table.total_bytes
            self.progress.update(dirty_pages_rate=dirtied / 4096 / elapsed)
            # Auto-converge: the guest dirtied more than half of what the link moved meanwhile.
            if self.opts.auto_converge and iteration >= 2 and dirtied > sent / 2:
                if self._throttle is None:
                    self._throttle = Throttle(self.vm)
                self.progress.update(cpu_throttle_percentage=self._throttle.raise_by(THROTTLE_STEP))

    def _timed_out(self) -> bool:
        return time.monotonic() - self._start > self.opts.timeout_s

    def latch_event(self, event: PostMigrationLifecycleEvent) -> None:
        """Latches a guest lifecycle event (first wins) and makes it visible."""
        phase = self.progress.get("phase")
        if self.latch.latch(event):
            self.progress.update(lifecycle_event=event.value, lifecycle_event_phase=phase)
            self.events.emit("vm", "migration-lifecycle-latched", {"event": event.value, "phase": phase})

    def _shortcut(self) -> bool:
        """A latched reboot or power-off ends pre-copy: the guest's RAM is about to be discarded."""
        return self.latch.event is not None

    def _send(self, conn: Connection, table) -> int:
        """Sends `table` as Memory frames of at most CHUNK_BYTES, stopping early (at a frame
        boundary, never inside a frame) when an event is latched. Returns page bytes sent."""
        total = 0
        chunks = table.split(CHUNK_BYTES)
        left = table.total_bytes
        frame_delay = int(self.hooks.get("frame-delay-ms", 0)) / 1000
        for chunk in chunks:
            if frame_delay and not self.paused:
                self.cancel_requested.wait(frame_delay)
            self._check_cancel()
            if self._shortcut():
                break
            self.progress.update(remaining=left)
            self._in_frame = True
            sent, pages, zero_pages = self.vm.send_memory(conn.fileno(), chunk)
            self._in_frame = False
            conn.read_response()
            total += sent
            left -= chunk.total_bytes
            self.progress.add(transferred=sent, normal=pages, duplicate=zero_pages)
        self.progress.update(remaining=0)
        return total

    # ---- final phase ------------------------------------------------------------------------

    def _final_phase(self, conn: Connection, remaining) -> None:
        self.progress.update(phase="completing")
        self.cancel_requested.wait(int(self.hooks.get("final-phase-delay-ms", 0)) / 1000)
        self._check_cancel()
        if self._throttle is not None:
            self._throttle.stop()
        self.pause_time = time.monotonic()
        self.paused = True  # even if the pause fails half-way, the failure path resumes the vCPUs
        self.vm.pause(PAUSE_TIMEOUT_S)
        if "request-at-pause" in self.hooks:
            # The window of Cloud Hypervisor issue 8917: a request made as the vCPUs stop.
            self.vm.inject_request(self.hooks["request-at-pause"])
        # A request a vCPU made just before parking may still sit unread in its eventfd: the VM's
        # own record of its first request is what counts (it is written before the eventfd).
        request = self.vm.lifecycle_request()
        if request is not None:
            self.latch_event(PostMigrationLifecycleEvent.from_request(request))
        event = self.latch.event
        if event is not None and Capability.LIFECYCLE_EVENT.value not in self.peer_capabilities:
            raise MigrationError(f"the destination cannot carry the guest's {event.value} (no "
                                 f"'{Capability.LIFECYCLE_EVENT.value}' capability); it is replayed here")
        if self._dirty_logging and event is None:
            # With an event latched the destination rebuilds or stops the VM: its RAM is not needed.
            table = self.vm.dirty_ranges()
            if remaining is not None:
                table.extend(remaining)
            self._send(conn, table)
        extra = {"post_migration_lifecycle_event": event.value} if event is not None else {}
        state = encode_state(self.vm.save_state(), **extra)
        conn.request_json(Command.STATE, state)
        self.cancel_requested.wait(int(self.hooks.get("complete-delay-ms", 0)) / 1000)
        self._check_cancel()
        # From here on, a failure leaves it unknown whether the destination runs the guest.
        self.complete_sent = True
        try:
            conn.request(Command.COMPLETE)
        except PeerError:
            self.complete_sent = False  # a clear refusal: the destination does not run the guest
            raise
        now = time.monotonic()
        self.progress.update(status="completed", phase="done", downtime_ms=(now - self.pause_time) * 1000,
                             total_time_ms=(now - self._start) * 1000)

    def _cleanup(self) -> None:
        if self._throttle is not None:
            self._throttle.stop()
        if self._dirty_logging:
            try:
                self.vm.stop_dirty_log()
            except Exception:  # noqa: BLE001 - the VM may be gone with a failed KVM call
                pass
            self._dirty_logging = False
