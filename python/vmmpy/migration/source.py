"""The sending side: a worker thread that owns the VM while it migrates it.

Pre-copy: iteration 0 sends all RAM (zero pages as ranges without bytes); each later iteration
sends what the dirty log reports, until the estimated downtime (bytes left / the bandwidth measured
over the whole pre-copy) fits `downtime_ms` and another pass would not shorten it much
(`another_pass`), or nothing is dirty. Then the final phase: pause, last dirty pass, a State
that carries the Complete (to a destination without `state-completes`: State, then Complete).
Same-host (`local`): the memory fds travel instead of the memory, and the VM pauses right after
Config.

With `connections` = N > 1 (tcp only) the source opens N - 1 extra connections after Start, each
presenting the destination's connection token (Join); Memory frames are then spread over all N,
one sender thread per connection (the page bytes move in the native core with the GIL released),
while State and Complete stay on the first. `max_bandwidth` caps the sum of all connections.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field, fields

from .. import _native
from ..errors import InvalidConfig, MigrationCancelled, MigrationError
from ..lifecycle import LifecycleLatch, PostMigrationLifecycleEvent
from ..machine import PAUSE_TIMEOUT_S
from ..options import parse_size
from ..payload import PARTS, BootPayload
from ..snapshot import encode_state, state_head
from ..testhooks import NO_HOOKS, TestHooks
from . import transport
from .progress import ProgressTracker
from .protocol import STATE_COMPLETES, VERSION, Capability, Command, Connection, PeerError, json_object

CHUNK_BYTES = _native.CHUNK_MAX  # one Memory frame; cancel and timeouts are checked between frames
CHUNK_MIN = 256 << 10
CHUNK_TIME_S = 2.0  # under a max_bandwidth, a frame takes about this long on its connection
MAX_CONNECTIONS = 128  # Cloud Hypervisor's bound
THROTTLE_STEP = 10
THROTTLE_MAX = 99
THROTTLE_SLICE_S = 0.1
# A final pass this small costs no more than the rest of the downtime (~1 ms): passes beyond
# the budget stop there.
SMALL_FINAL_PASS = 256 << 10
EXTRA_PASSES = 4  # at most this many passes once the budget is met
ANSWER_SPIN_S = 0.002  # the downtime's last answer is awaited awake for this long (~0.3 ms due)


def another_pass(left: int, last_sent: int, expected_ms: float, budget_ms: int, extra_passes: int) -> bool:
    """Whether pre-copy goes on with `left` dirty bytes, after a pass that sent `last_sent`.
    Over the budget it does (timeouts and auto-converge bound that); within it, only while
    another pass is likely to shrink the final one to under half (the guest dirtied less than
    half of what the last pass moved), the final pass is not small already, and fewer than
    EXTRA_PASSES such passes were made: a guest that dirties slower than the link drains gets a
    short final pass at the cost of a pass or two, one that dirties faster is not chased."""
    if left == 0:
        return False
    if expected_ms > budget_ms:
        return True
    return left > SMALL_FINAL_PASS and 2 * left <= last_sent and extra_passes < EXTRA_PASSES


@dataclass
class MigrationOptions:
    destination_url: str
    local: bool = False
    downtime_ms: int = 300
    timeout_s: int = 3600
    timeout_strategy: str = "cancel"
    auto_converge: bool = True
    tls_dir: str | None = None  # mutual TLS (docs/tls.md)
    connections: int = 1
    max_bandwidth: int = 0  # bytes/s over all connections; 0 = unlimited
    tls: object = field(default=None, init=False, repr=False, compare=False)  # loaded from tls_dir

    @classmethod
    def from_dict(cls, body: dict) -> "MigrationOptions":
        known = {f.name for f in fields(cls) if f.init}
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
        if not 1 <= opts.connections <= MAX_CONNECTIONS:
            raise InvalidConfig(f"connections={opts.connections}: expected 1..{MAX_CONNECTIONS}")
        if opts.connections > 1 and not opts.destination_url.startswith("tcp:"):
            raise InvalidConfig("connections > 1 needs a tcp: destination_url (not unix: or local=on)")
        if opts.max_bandwidth < 0:
            raise InvalidConfig("max_bandwidth must be 0 (unlimited) or positive")
        opts.tls = transport.tls_context(opts.tls_dir, transport.parse_url(opts.destination_url), "client")
        return opts

    def chunk_bytes(self) -> int:
        """Bytes of RAM per Memory frame: under a cap, small enough that every connection finishes
        a frame every CHUNK_TIME_S (cancel, progress and the destination's idle first connection
        hear from it that often)."""
        if not self.max_bandwidth:
            return CHUNK_BYTES
        per_connection = int(self.max_bandwidth * CHUNK_TIME_S / self.connections)
        return max(CHUNK_MIN, min(CHUNK_BYTES, per_connection)) & ~4095


def _coerce(key: str, value):
    """A Python caller's option value, checked as the API checks it (a boolean is a bool, never a
    string); `max_bandwidth` also takes a size string (K, M, G: powers of 1024, as QEMU's
    max-bandwidth=32M)."""
    if key in ("local", "auto_converge"):
        if not isinstance(value, bool):
            raise InvalidConfig(f"{key}={value!r}: must be a boolean")
        return value
    if key == "max_bandwidth" and isinstance(value, str):
        return parse_size(value, key)
    if key in ("downtime_ms", "timeout_s", "connections", "max_bandwidth"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidConfig(f"{key}={value!r}: must be an integer")
        return value
    if key == "tls_dir" and value is None:
        return None
    if not isinstance(value, str):
        raise InvalidConfig(f"{key}={value!r}: must be a string")
    return value


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

    def __init__(
        self,
        vm,
        config_api: dict,
        memory_size: int,
        options: MigrationOptions,
        events,
        progress: ProgressTracker,
        latch: LifecycleLatch,
        hooks: TestHooks = NO_HOOKS,
        payload: BootPayload | None = None,
    ):
        self.vm = vm
        self.payload = payload or BootPayload()  # the content the destination reboots from
        self.latch = latch
        self.hooks = hooks  # timing windows tests must hit deliberately
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
        self._lap_at = self._start
        # Milliseconds per phase (connect, start, memory_fds, config, payload, precopy, pause,
        # last_pass, save_state, state, complete): where the total and the downtime went.
        self.phases_ms: dict[str, float] = {}
        self._dirty_logging = False
        self._throttle: Throttle | None = None
        self._conn: Connection | None = None
        self._extra: list[Connection] = []  # connections 2..N
        self._opening: list[socket.socket] = []  # sockets in their TLS handshake
        self.pacer = _native.Pacer(options.max_bandwidth)
        progress.live = lambda: {"current_rate": self.pacer.rate()}

    def cancel(self) -> None:
        """Stops the migration at once: a worker blocked on a destination that does not answer is
        woken by shutting its connections down (the destination discards a cut frame)."""
        self.cancel_requested.set()
        self.pacer.cancel()
        conn = self._conn
        if conn is not None:
            conn.shutdown()
        for extra in list(self._extra):
            extra.shutdown()
        for sock in list(self._opening):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # ends a handshake at once, not at its timeout
            except OSError:
                pass

    def _open(self, url: transport.Url) -> Connection:
        """Connects to the destination and runs the TLS handshake (with tls_dir); cancel() shuts a
        socket in its handshake down."""
        sock = transport.connect(url)
        self._opening.append(sock)
        try:
            if self.cancel_requested.is_set():
                sock.close()
                raise MigrationCancelled("migration cancelled")
            return transport.secure(sock, self.opts.tls, url.host)
        except BaseException as e:
            if self.cancel_requested.is_set() and not isinstance(e, MigrationCancelled):
                raise MigrationCancelled("migration cancelled") from e
            raise
        finally:
            self._opening.remove(sock)

    def _lap(self, phase: str | None = None, arrived: float | None = None) -> float:
        """Adds the time since the previous lap to `phase` (None: to the previous lap's phase);
        returns now, or with `arrived` (a time.time() in the past) that moment instead."""
        now = time.monotonic()
        if arrived is not None:  # on the monotonic clock, between the previous lap and now
            now = max(self._lap_at, min(now, now - (time.time() - arrived)))
        phase = phase or next(reversed(self.phases_ms))
        self.phases_ms[phase] = self.phases_ms.get(phase, 0.0) + (now - self._lap_at) * 1000
        self._lap_at = now
        return now

    def _check_cancel(self) -> None:
        if self.cancel_requested.is_set():
            raise MigrationCancelled("migration cancelled")

    def run(self) -> None:
        url = transport.parse_url(self.opts.destination_url)
        self.progress.update(
            status="active",
            total=self.memory_size,
            connections=self.opts.connections,
            tls=self.opts.tls is not None,
            max_bandwidth=self.opts.max_bandwidth,
        )
        conn = self._open(url)
        self._lap("connect")
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
            for extra in self._extra:
                extra.close()
            self._extra = []
            conn.close()

    def _migrate(self, conn: Connection) -> None:
        caps = [Capability.ZERO_RANGES.value, Capability.LIFECYCLE_EVENT.value, Capability.PRIVATE_MEMORY.value]
        if self.opts.local:
            caps.append(Capability.LOCAL.value)
        start = {"version": VERSION, "capabilities": caps}
        if self.opts.connections > 1:
            caps.append(Capability.CONNECTIONS.value)
            start["connections"] = self.opts.connections
        answer = json_object(conn.request_json(Command.START, start) or b"{}")
        peer_caps = answer.get("capabilities", [])
        if not isinstance(peer_caps, list) or not all(isinstance(c, str) for c in peer_caps):
            raise MigrationError(f"destination's capabilities {peer_caps!r}: expected a list of strings")
        self.peer_capabilities = set(peer_caps)
        if answer.get("version") != VERSION:
            raise MigrationError(f"destination speaks migration protocol {answer.get('version')}, we speak {VERSION}")
        if self.opts.connections > 1:
            self._join(answer)
        self._lap("start")
        if self.opts.local:
            if Capability.LOCAL.value not in self.peer_capabilities:
                raise MigrationError("destination does not accept memory fds (local migration)")
            self.progress.update(phase="memory-fds", local=True)
            for i, (gpa, fd, size) in enumerate(self.vm.memory_fds()):
                conn.request(Command.MEMORY_FD, arg=i, fds=[fd])
            self._lap("memory_fds")
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
        self._lap("config")
        self._check_cancel()
        for name, data in parts.items():
            conn.request(Command.PAYLOAD, data, arg=PARTS.index(name))
        if parts:
            self._lap("payload")
        remaining = None
        if not self.opts.local:
            remaining = self._precopy(conn)
            self._lap("precopy")
        self._final_phase(conn, remaining)

    def _join(self, answer: dict) -> None:
        """Opens connections 2..N; each presents the token the destination gave the first."""
        token = answer.get("connection_token")
        if Capability.CONNECTIONS.value not in self.peer_capabilities or not isinstance(token, str):
            raise MigrationError("the destination does not accept parallel connections")
        url = transport.parse_url(self.opts.destination_url)
        for index in range(1, self.opts.connections):
            self._check_cancel()
            extra = self._open(url)
            self._extra.append(extra)
            extra.request_json(Command.JOIN, {"token": token, "index": index})

    # ---- pre-copy ---------------------------------------------------------------------------

    def _precopy(self, conn: Connection):
        self.progress.update(phase="precopy")
        table = self.vm.all_ram_ranges()
        # bytes/s over the whole pre-copy, not the last pass: a small pass's rate is mostly the
        # link's per-frame latency, and estimating the final pass from it may never converge.
        bandwidth = 0.0
        sent_total, sending_s = 0, 0.0
        iteration = 0
        sent = 0  # page bytes of the last pass
        extra_passes = 0  # passes made with the budget already met
        while True:
            if iteration > 0:
                left = table.total_bytes
                expected_ms = left / bandwidth * 1000 if bandwidth else float("inf")
                self.progress.update(expected_downtime_ms=expected_ms)
                if not another_pass(left, sent, expected_ms, self.opts.downtime_ms, extra_passes):
                    return table
                if expected_ms <= self.opts.downtime_ms:
                    if self._timed_out():
                        return table  # a pass the budget does not need never runs past timeout_s
                    extra_passes += 1
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
                sent_total, sending_s = sent_total + sent, sending_s + elapsed
                bandwidth = sent_total / sending_s
            self.progress.update(iteration=iteration + 1, mbps=bandwidth * 8 / 1e6)
            self.events.emit(
                "vm",
                "migration-memory-iteration",
                {
                    "iteration": iteration,
                    "bytes": sent,
                    "ranges": len(table),
                    "table_bytes": table.total_bytes,
                    "duration_ms": elapsed * 1000,
                },
            )
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
        """Sends `table` as Memory frames, spread over all connections (one sender thread each,
        taking the next chunk when its last one is acknowledged), stopping early (at a frame
        boundary, never inside a frame) when an event is latched. Returns page bytes sent."""
        chunk_bytes = self.opts.chunk_bytes()
        chunks = iter(table.split(chunk_bytes))
        # A table of one frame (a final pass, mostly) goes on the first connection alone: starting
        # sender threads for it would cost more, inside the downtime, than it saves.
        extras = self._extra if table.total_bytes > chunk_bytes else []
        lock = threading.Lock()
        sent = [0, table.total_bytes]  # page bytes sent, range bytes not yet sent
        errors: list[BaseException] = []
        self.progress.update(remaining=table.total_bytes)

        def next_chunk():
            with lock:
                return None if errors else next(chunks, None)

        def sender(c: Connection, first: bool) -> None:
            try:
                self._send_chunks(c, first, next_chunk, lock, sent)
            except BaseException as e:  # noqa: BLE001 - re-raised by the worker below
                with lock:
                    errors.append(e)
                for extra in self._extra:  # the other senders stop at once, not after a timeout
                    extra.shutdown()

        threads = [
            threading.Thread(target=sender, args=(c, False), name=f"migration-send-{i + 1}", daemon=True)
            for i, c in enumerate(extras)
        ]
        for t in threads:
            t.start()
        sender(conn, True)
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        self.progress.update(remaining=0)
        return sent[0]

    def _send_chunks(self, conn: Connection, first: bool, next_chunk, lock, sent) -> None:
        frame_delay = self.hooks.frame_delay_ms / 1000
        while True:
            if frame_delay and not self.paused:
                self.cancel_requested.wait(frame_delay)
            self._check_cancel()
            if self._shortcut():
                return
            chunk = next_chunk()
            if chunk is None:
                return
            n, pages, zero_pages = self._write_frame(conn, chunk, first)
            conn.read_response()
            with lock:
                sent[0] += n
                sent[1] -= chunk.total_bytes
                left = sent[1]
            self.progress.add(transferred=n, normal=pages, duplicate=zero_pages)
            self.progress.update(remaining=left)

    def _write_frame(self, conn: Connection, chunk, first: bool):
        """Writes one Memory frame (its answer is the caller's to read): (bytes, pages, zero pages)."""
        # Only the first connection carries requests besides Memory: Abandon needs it at a frame
        # boundary.
        if first:
            self._in_frame = True
        sent = self.vm.send_memory(conn.memory_link(), chunk, self.pacer)
        if first:
            self._in_frame = False
        return sent

    # ---- final phase ------------------------------------------------------------------------

    def _final_phase(self, conn: Connection, remaining) -> None:
        self.progress.update(phase="completing")
        self.cancel_requested.wait(self.hooks.final_phase_delay_ms / 1000)
        self._check_cancel()
        if self._throttle is not None:
            self._throttle.stop()
        head = state_head()  # made ahead: only a latched event changes it after the pause
        completes = Capability.STATE_COMPLETES.value in self.peer_capabilities
        if completes:
            self._check_peer(conn)  # before the pause, too: a peer gone already is no reason to pause
        conn.stamp_arrivals()  # the downtime ends when the last answer arrives, not when it is read
        answers_due = 0  # answers to Memory frames that the State follows before they are read
        self.pause_time = self._lap()  # the moments before the pause count to the phase before
        self.paused = True  # even if the pause fails half-way, the failure path resumes the vCPUs
        self.vm.pause(PAUSE_TIMEOUT_S)
        self._lap("pause")
        if self.hooks.request_at_pause is not None:
            # The window of Cloud Hypervisor issue 8917: a request made as the vCPUs stop.
            self.vm.inject_request(self.hooks.request_at_pause)
        # A request a vCPU made just before parking may still sit unread in its eventfd: the VM's
        # own record of its first request is what counts (it is written before the eventfd).
        request = self.vm.lifecycle_request()
        if request is not None:
            self.latch_event(PostMigrationLifecycleEvent.from_request(request))
        event = self.latch.event
        if event is not None and Capability.LIFECYCLE_EVENT.value not in self.peer_capabilities:
            raise MigrationError(
                f"the destination cannot carry the guest's {event.value} (no "
                f"'{Capability.LIFECYCLE_EVENT.value}' capability); it is replayed here"
            )
        if self._dirty_logging and event is None:
            # With an event latched the destination rebuilds or stops the VM: its RAM is not needed.
            table = self.vm.dirty_ranges()
            if remaining is not None:
                table.extend(remaining)
            if completes and 0 < len(table) and table.total_bytes <= self.opts.chunk_bytes():
                # One frame, on this connection: its answer is read after the State's write, so
                # the destination writes the pages while this side saves the state.
                n, pages, zero_pages = self._write_frame(conn, table, True)
                self.progress.add(transferred=n, normal=pages, duplicate=zero_pages)
                answers_due = 1
            elif len(table):  # an idle guest often left nothing dirty
                self._send(conn, table)
            self._lap("last_pass")
        if event is not None:
            head = state_head(post_migration_lifecycle_event=event.value)
        state = encode_state(self.vm.save_state(), head)
        self._lap("save_state")
        # Only a Complete that left whole can be acted on (complete_sent): from then on a failure
        # leaves it unknown whether the destination runs the guest.
        if completes:
            self._check_peer(conn)
            conn.send_request(Command.STATE, state, arg=STATE_COMPLETES)  # one round trip
            self.complete_sent = True
            self.progress.update(phase="state-sent")
            self.cancel_requested.wait(self.hooks.complete_delay_ms / 1000)  # no cancel from here
        else:
            conn.request(Command.STATE, state)
            self._lap("state")
            self.progress.update(phase="state-sent")
            self.cancel_requested.wait(self.hooks.complete_delay_ms / 1000)
            self._check_cancel()
            conn.send_request(Command.COMPLETE)
            self.complete_sent = True
        try:
            conn.await_bytes(ANSWER_SPIN_S)
            for _ in range(answers_due):
                conn.read_response()  # a refused frame ended the attempt: the State was never read
            _, arrived = conn.read_response_arrival()
        except PeerError:
            self.complete_sent = False  # a clear refusal: the destination does not run the guest
            raise
        now = self._lap("complete", arrived)
        self.progress.update(
            status="completed",
            phase="done",
            downtime_ms=(now - self.pause_time) * 1000,
            total_time_ms=(now - self._start) * 1000,
        )

    @staticmethod
    def _check_peer(conn: Connection) -> None:
        """With the Complete riding on the State, a peer already gone would leave the source
        paused after the State's write (a write alone does not notice it): fail before."""
        if conn.peer_hung_up():
            raise MigrationError("the destination closed the migration connection")

    def _cleanup(self) -> None:
        if self._throttle is not None:
            self._throttle.stop()
        if self._dirty_logging:
            try:
                self.vm.stop_dirty_log()
            except Exception:  # noqa: BLE001 - the VM may be gone with a failed KVM call
                pass
            self._dirty_logging = False
