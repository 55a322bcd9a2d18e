"""The receiving side: an explicit state machine over one connection at a time.

Anything out of order, unknown, oversized, outside guest RAM or cut short gets an Error response;
the half-built VM is discarded and the listener waits for the next attempt. While one source is
served, every other one is answered "busy" at once; a source has a short handshake timeout until
its Config is accepted (docs/security.md).

With a TLS context every served connection first passes a mutual TLS handshake; one that fails is
closed before any request is read (a busy source on a TLS listener is simply closed: it cannot be
answered in plaintext). A Start asking for `connections` = N > 1 (tcp only) is answered with a
random connection token; new connections then go to the attempt being served (joins.py), and
each of the N - 1 extra ones must present that token (Join). After Config each extra connection gets a thread
that takes only Memory frames; State shuts them (all memory is in by then) and joins their threads
before the VM state is loaded, so nothing writes guest RAM once the vCPUs may run.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from ..config import from_peer
from ..errors import MigrationError, VmmError
from ..payload import PARTS, BootPayload, check_description, verify
from ..snapshot import decode_state
from . import transport
from .joins import JoinWindow
from .receive_hooks import ReceiveHooks
from .protocol import (
    JSON_MAX,
    MESSAGE_MAX,
    STATE_COMPLETES,
    VERSION,
    Capability,
    Command,
    Connection,
    PeerTimeout,
    Status,
)

log = logging.getLogger("vmmpy.migration")


class ReceiveState(enum.Enum):
    ESTABLISHED = "Established"
    STARTED = "Started"
    CONFIGURED = "Configured"
    STATE_RECEIVED = "StateReceived"
    COMPLETED = "Completed"
    ABORTED = "Aborted"


CAPABILITIES = [
    Capability.LOCAL.value,
    Capability.ZERO_RANGES.value,
    Capability.LIFECYCLE_EVENT.value,
    Capability.PAYLOAD.value,
    Capability.CONNECTIONS.value,
    Capability.STATE_COMPLETES.value,
]
MAX_CONNECTIONS = 128
NEXT_REQUEST_SPIN_S = 0.002  # after a Memory frame, the next request is awaited awake this long
MAX_MEMORY_FDS = 2  # guest RAM has at most two regions: below the 4 GiB hole and above it
BUSY_MAX = 64  # sources answered "busy" whose connection stays open until they hang up
BUSY_MESSAGE = "busy: this destination is receiving another migration; try again later"


class Abandoned(MigrationError):
    """The source abandoned the migration."""


class GuestRanHere(MigrationError):
    """The attempt failed after the guest had run on this destination: the source must get no
    answer (an Error would let it resume the guest there too), so it stays paused, as when an
    answer is lost."""


@dataclass
class Incoming:
    """The VM being received: the native VM, the config it was built from, and its boot payload
    (described in Config, received in Payload frames, checked by size and sha256)."""

    vm: object
    config: object
    described: dict = field(default_factory=dict)
    received: dict = field(default_factory=dict)
    payload: BootPayload = field(default_factory=BootPayload)


class Receiver:
    def __init__(
        self,
        listener: socket.socket,
        hooks: ReceiveHooks,
        capabilities: list[str] | None = None,
        tls=None,
        disk_backings: dict[str, str] | None = None,
        net_backings: dict[str, str] | None = None,
        vsock_socket: str | None = None,
    ):
        self.listener = listener
        # This host's operator's file for each disk id; the peer's config names none that is used.
        self.disk_backings = dict(disk_backings or {})
        # And its tap for each net id.
        self.net_backings = dict(net_backings or {})
        # And its own socket for the vsock device.
        self.vsock_socket = vsock_socket
        self.tls = tls  # _native.TlsContext ("server"), or None for plaintext
        self.hooks = hooks
        self.capabilities = CAPABILITIES if capabilities is None else capabilities
        self.state = ReceiveState.ESTABLISHED
        self.closed = threading.Event()
        self.last_error: str | None = None
        self._active: Connection | None = None  # the source being served, for close()
        self._active_sock: socket.socket | None = None  # its socket, cut by close() even mid-handshake
        self._joined: list[Connection] = []  # its extra connections
        self._joined_threads: list[threading.Thread] = []
        self._joined_errors: list[str] = []
        self._frames_arriving = 0  # Memory frames begun and not yet answered on extra connections
        self._joined_done = threading.Event()  # set when they are being stopped: errors no longer count
        # Open while the attempt being served waits for its extra connections: serve() hands new
        # connections to it instead of answering them busy.
        self._joins = JoinWindow(tls, hooks.emit)
        self._frames_lock = threading.Lock()  # for _frames_arriving
        self._worker: threading.Thread | None = None  # serves the active source
        self._worker_done = threading.Event()
        self._completed = False
        # Set at Complete right before the VM runs here: from then on the attempt cannot fail by
        # being cut off, so close() leaves its last answer alone (and the receiver reports it
        # completed). The lock orders that against close().
        self._commit_lock = threading.Lock()
        self._committed = False
        # Written by close() and by the worker as its last act; serve() owns and closes it.
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.Lock()
        self._wake_closed = False

    def serve(self) -> bool:
        """Accepts sources until one migration completes (True) or the receiver is closed (False).
        One source is served at a time (on a worker thread); others are answered busy. What it
        returns is the outcome of the last attempt, once its worker has ended: a close() that
        comes while a completed attempt is still answering Complete does not turn it into False."""
        sel = selectors.DefaultSelector()
        busy: dict[socket.socket, float] = {}  # answered busy: open until they hang up or expire
        try:
            self._select(sel, busy)
        finally:
            for conn in list(busy):
                _drop(sel, busy, conn)
            sel.close()
            if self._worker is not None:
                self._cut_off()
                self._worker.join()
                self._worker = None
            self.listener.close()
            with self._wake_lock:
                self._wake_closed = True
                os.close(self._wake)
        return self._completed

    def _select(self, sel: selectors.BaseSelector, busy: dict) -> None:
        """Runs until an attempt completed the migration or the receiver is closed."""
        self.listener.setblocking(False)
        sel.register(self.listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake, selectors.EVENT_READ, "wake")
        while not self.closed.is_set():
            timeout = max(0.0, min(busy.values()) - time.monotonic()) if busy else None
            for key, _ in sel.select(timeout):
                if key.data == "accept":
                    if self._accept(sel, busy):
                        return
                elif key.data == "wake":
                    _drain(self._wake)
                    if self._reap():
                        return
                else:
                    self._drain_busy(sel, busy, key.fileobj)
            now = time.monotonic()
            for conn in [c for c, deadline in busy.items() if deadline <= now]:
                _drop(sel, busy, conn)

    def _reap(self) -> bool:
        """Joins a worker whose attempt is over (it may still be sending its last answer); True
        if that attempt completed the migration."""
        if self._worker is None or not self._worker_done.is_set():
            return False
        self._worker.join()
        self._worker = None
        return self._completed

    def _accept(self, sel: selectors.BaseSelector, busy: dict) -> bool:
        """Takes the next source: served if none is, else answered busy. True once a migration
        has completed (the receiver ends; this source is not taken)."""
        try:
            sock = transport.accept(self.listener)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:  # e.g. EMFILE: this source is not taken; the next may be
            log.warning("migration accept failed: %s", e)
            return False
        if self._reap():
            sock.close()
            return True
        if self._worker is None:
            self._active_sock = sock
            self._worker_done = threading.Event()
            self._worker = threading.Thread(
                target=self._run, args=(sock, self._worker_done), name="migration-receive-conn", daemon=True
            )
            self._worker.start()
            return False
        if self._joins.offer(sock):
            return False
        if self.tls is not None:  # a busy answer in plaintext would mean nothing to a TLS peer
            sock.close()
            return False
        # Busy: the answer goes out at once; the socket stays open (our side shut for writing)
        # so that the source can still send its Start and then read the answer.
        try:
            Connection(sock).respond_error(BUSY_MESSAGE)
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        except (OSError, MigrationError):
            sock.close()
            return False
        if len(busy) >= BUSY_MAX:
            sock.close()
            return False
        busy[sock] = time.monotonic() + transport.HANDSHAKE_TIMEOUT_S
        sel.register(sock, selectors.EVENT_READ, "busy")
        return False

    def _drain_busy(self, sel: selectors.BaseSelector, busy: dict, sock: socket.socket) -> None:
        try:
            if sock.recv(MESSAGE_MAX):
                return  # whatever a busy source sends is discarded
        except BlockingIOError:
            return
        except OSError:
            pass
        _drop(sel, busy, sock)

    def _run(self, sock: socket.socket, done: threading.Event) -> None:
        conn = None
        try:
            try:
                conn = transport.secure(sock, self.tls)
            except VmmError as e:  # the TLS handshake failed: nothing was read from this peer
                self.last_error = str(e)
                self.hooks.emit("migration-receive-failed", {"error": str(e)})
                return
            self._active = conn
            self._completed = self._serve_connection(conn, done)
        finally:
            self._active = self._active_sock = None
            if conn is not None:
                conn.close()
            else:
                sock.close()
            done.set()
            self._wake_up()

    def _wake_up(self) -> None:
        with self._wake_lock:
            if not self._wake_closed:
                os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        """Stops listening and cuts off a source being served (its attempt fails), unless its VM
        is already being taken over: then that attempt still completes and answers its source."""
        self.closed.set()
        self._wake_up()
        self._cut_off()
        self._joins.interrupt()
        for extra in list(self._joined):
            extra.shutdown()

    def _cut_off(self) -> None:
        """Shuts the connection being served, unless its attempt has committed."""
        with self._commit_lock:
            if self._committed:
                return
            active, sock = self._active, self._active_sock
            if active is not None:
                active.shutdown()
            elif sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _commit(self) -> None:
        """Called by the VMM right before it runs the received VM: the attempt can no longer be
        cut off. Refused once the receiver is closed."""
        with self._commit_lock:
            if self.closed.is_set():
                raise MigrationError("the receiver was closed before the migration completed")
            self._committed = True

    def _serve_connection(self, conn: Connection, done: threading.Event) -> bool:
        """Serves one source. `done` is set once the attempt has released what it held (before
        its last answer goes out), so a source that heard the answer and reconnects is served."""
        self.state = ReceiveState.ESTABLISHED
        with self._commit_lock:  # an earlier attempt may have committed and then failed
            self._committed = False
        self._joined_errors = []
        self._frames_arriving = 0
        self._joined_done.clear()
        # Start and Config within the handshake timeout in all, however the peer spreads its bytes.
        conn.deadline = time.monotonic() + transport.HANDSHAKE_TIMEOUT_S
        self._private_memory = False  # the source said what memory.shared=false means (at Start)
        incoming: Incoming | None = None
        fds: dict[int, int] = {}
        fields: dict = {}
        last_answer = None  # sent after the cleanup
        command = None
        try:
            while True:
                if command == Command.MEMORY:
                    # The next frame follows its answer at once, and the State a pause and a
                    # state save later: awake, this thread takes it without a wake-up.
                    conn.await_bytes(NEXT_REQUEST_SPIN_S)
                try:
                    command, arg, length, got_fds = conn.read_request()
                except EOFError:
                    raise MigrationError(f"source closed the connection in state {self.state.value}") from None
                try:
                    if command == Command.MEMORY_FD and self.state is ReceiveState.STARTED:
                        _check_memory_fd(arg, got_fds, fds)
                        fds[arg] = got_fds.pop()
                finally:
                    for fd in got_fds:  # any fd not taken, on every path
                        _close(fd)
                incoming, completed = self._step(conn, command, arg, length, incoming, fds, fields)
                if completed:
                    return True
        except Abandoned:
            self.last_error = "abandoned by the source"
            last_answer = lambda: conn.respond(Status.OK)  # noqa: E731
            return False
        except Exception as e:  # noqa: BLE001 - any failure ends this attempt, not the receiver
            if not isinstance(e, (VmmError, OSError, ValueError)):
                log.exception("migration receive failed unexpectedly")
            message = str(e)
            if isinstance(e, PeerTimeout) and self.state in (ReceiveState.ESTABLISHED, ReceiveState.STARTED):
                message = f"handshake timed out: no Start and Config within {transport.HANDSHAKE_TIMEOUT_S:g} s"
            self.last_error = message
            self.state = ReceiveState.ABORTED
            if not isinstance(e, GuestRanHere):  # no answer at all: the source stays paused
                last_answer = lambda: conn.respond_error(message)  # noqa: E731
            return False
        finally:
            self._stop_joined()
            if self.state is not ReceiveState.COMPLETED and incoming is not None:
                self.hooks.discard(incoming)
            for fd in fds.values():
                _close(fd)
            if self.state is not ReceiveState.COMPLETED:
                # Only now, with the VMM free again: whoever acts on the event finds it so.
                self.hooks.emit("migration-receive-failed", {"error": self.last_error})
                done.set()
            if last_answer is not None:
                try:
                    last_answer()
                except Exception:  # noqa: BLE001 - the connection may be what failed
                    pass

    def _step(self, conn, command, arg, length, incoming, fds, fields):
        st = self.state
        if command == Command.ABANDON:
            conn.read_payload(length, 0)
            self.state = ReceiveState.ABORTED
            raise Abandoned("abandoned")  # answered Ok once the attempt is cleaned up
        if command == Command.START and st is ReceiveState.ESTABLISHED:
            doc = conn.read_json(length, MESSAGE_MAX)
            if doc.get("version") != VERSION:
                raise MigrationError(f"source speaks protocol {doc.get('version')!r}, this destination {VERSION}")
            connections = doc.get("connections", 1)
            if type(connections) is not int or not 1 <= connections <= MAX_CONNECTIONS:
                raise MigrationError(f"connections={connections!r}: expected 1..{MAX_CONNECTIONS}")
            if connections > 1 and (
                Capability.CONNECTIONS.value not in self.capabilities or self.listener.family == socket.AF_UNIX
            ):
                raise MigrationError("this destination takes one connection (connections > 1 needs tcp)")
            answer = {"version": VERSION, "capabilities": self.capabilities}
            token = None
            if connections > 1:
                import secrets  # here, not at the top: a VMM that only boots never loads it

                token = secrets.token_hex(16)
            if token is not None:
                answer["connection_token"] = token
                self._joins.open()  # before the answer: the joins follow it at once
            try:
                conn.respond(Status.OK, json.dumps(answer).encode())
                self.state = ReceiveState.STARTED
                if token is not None:
                    self._joined = self._joins.take(connections - 1, token)
                    conn.deadline = time.monotonic() + transport.HANDSHAKE_TIMEOUT_S  # then Config
            finally:
                if token is not None:
                    self._joins.close()
            source_caps = doc.get("capabilities", [])
            self._private_memory = isinstance(source_caps, list) and Capability.PRIVATE_MEMORY.value in source_caps
            self.hooks.emit(
                "migration-receive-started",
                {"capabilities": source_caps, "connections": connections, "tls": self.tls is not None},
            )
            return incoming, False
        if command == Command.MEMORY_FD and st is ReceiveState.STARTED:
            conn.read_payload(length, 0)
            conn.respond(Status.OK)
            return incoming, False
        if command == Command.CONFIG and st is ReceiveState.STARTED:
            doc = conn.read_json(length, JSON_MAX)
            local = doc.get("local", False)
            if not isinstance(local, bool):
                raise MigrationError(f"Config local={local!r}: must be a JSON boolean")
            if local and (not fds or sorted(fds) != list(range(len(fds)))):
                raise MigrationError(f"local migration needs memory fds for regions 0..n-1, got {sorted(fds)}")
            memory_fds = [fds[i] for i in range(len(fds))] if local else None
            described = doc.get("payload")
            cfg = from_peer(
                doc.get("config") or {},
                described if isinstance(described, dict) else {},
                self.disk_backings,
                self.net_backings,
                self.vsock_socket,
                private_memory=self._private_memory and not local,
            )
            described = check_description(described, cfg.memory_bytes)
            incoming = self.hooks.build_vm(cfg, memory_fds)
            try:
                incoming.described = described
                conn.deadline = None  # the handshake is over: each read has the transfer timeout
                transport.set_timeouts(conn.sock, transport.IO_TIMEOUT_S, transport.IO_TIMEOUT_S)
                conn.respond(Status.OK)
                for extra in self._joined:  # their frames wait in the socket until then
                    t = threading.Thread(
                        target=self._serve_joined,
                        args=(extra, incoming.vm),
                        daemon=True,
                        name="migration-receive-joined",
                    )
                    t.start()
                    self._joined_threads.append(t)  # only started ones: they are joined
            except BaseException:
                # Not the attempt's yet: its cleanup would not see it. The readers go first: one
                # inside a frame holds the VM that the discard stops.
                self._stop_joined()
                self.hooks.discard(incoming)
                raise
            self.state = ReceiveState.CONFIGURED
            return incoming, False
        if command == Command.PAYLOAD and st is ReceiveState.CONFIGURED:
            part = PARTS[arg] if arg < len(PARTS) else f"#{arg}"
            expected = incoming.described.get(part)
            if expected is None or part in incoming.received:
                raise MigrationError(f"Payload {part}: not described in Config, or sent twice")
            if length != expected["size"]:
                raise MigrationError(
                    f"payload {part}: a frame of {length} bytes; its described size is {expected['size']}"
                )
            data = conn.read_payload(length, expected["size"])
            verify(part, data, expected)
            incoming.received[part] = data
            conn.respond(Status.OK)
            return incoming, False
        if command == Command.MEMORY and st is ReceiveState.CONFIGURED:
            incoming.vm.receive_memory(conn.memory_link(), length)
            conn.respond(Status.OK)
            return incoming, False
        if command == Command.STATE and st is ReceiveState.CONFIGURED:
            completes = arg == STATE_COMPLETES
            if completes:  # the vCPU threads wake now, while the state is loaded, not at the end
                incoming.vm.stand_by()
            if (
                arg not in (0, STATE_COMPLETES)
                or completes
                and Capability.STATE_COMPLETES.value not in self.capabilities
            ):
                raise MigrationError(f"State with arg {arg}: this destination takes 0 or {STATE_COMPLETES}")
            # The source sends State once every frame on every connection was answered: the extra
            # connections are shut and their readers joined, so no byte lands in guest RAM after
            # the state is loaded.
            self._stop_joined()
            if self._joined_errors:
                raise MigrationError(f"an extra connection failed: {self._joined_errors[0]}")
            if self._frames_arriving:  # a frame its reader began and, shut, never finished
                raise MigrationError("State while a Memory frame was still arriving on an extra connection")
            missing = sorted(set(incoming.described) - set(incoming.received))
            if missing:
                raise MigrationError(f"State before the described payload arrived: {', '.join(missing)} missing")
            incoming.payload = BootPayload(**incoming.received)
            decoded = decode_state(conn.read_payload(length, JSON_MAX))
            event = decoded.fields["post_migration_lifecycle_event"]
            if event is not None and Capability.LIFECYCLE_EVENT.value not in self.capabilities:
                raise MigrationError(
                    f"State carries the guest's {event.value}: this destination did not offer to replay it"
                )
            incoming.vm.restore_state(decoded.native)
            fields.update(decoded.fields)
            self.state = ReceiveState.STATE_RECEIVED
            if completes:  # one round trip less inside the downtime
                return self._complete(conn, incoming, fields)
            conn.respond(Status.OK)
            return incoming, False
        if command == Command.COMPLETE and st is ReceiveState.STATE_RECEIVED:
            conn.read_payload(length, 0)
            return self._complete(conn, incoming, fields)
        try:
            name = Command(command).name
        except ValueError:
            raise MigrationError(f"unknown command {command}") from None
        raise MigrationError(f"command {name} is not allowed in state {st.value}")

    def _complete(self, conn: Connection, incoming, fields: dict):
        """Runs the guest here (the state is loaded) and answers Ok: the attempt is complete."""

        def answer() -> None:
            # The guest is this VMM's from here, whatever happens to this reply.
            self.state = ReceiveState.COMPLETED
            try:
                conn.respond(Status.OK)
            except Exception as e:  # noqa: BLE001 - the source may be gone; the guest runs here
                log.warning("migration completed, but the source was not told: %s", e)

        self.hooks.complete(incoming, fields, self._commit, answer)
        return incoming, True

    # ---- extra connections (connections > 1) ---------------------------------------------------

    def _serve_joined(self, conn: Connection, vm) -> None:
        """Memory frames on an extra connection, until State or the end of the attempt stops it."""
        try:
            while True:
                command, _, length, fds = conn.read_request()
                for fd in fds:
                    _close(fd)
                if command != Command.MEMORY:
                    raise MigrationError(f"command {command} on an extra connection (only Memory)")
                with self._frames_lock:
                    self._frames_arriving += 1
                vm.receive_memory(conn.memory_link(), length)
                conn.respond(Status.OK)
                with self._frames_lock:
                    self._frames_arriving -= 1
        except Exception as e:  # noqa: BLE001 - reported through the first connection
            if not self._joined_done.is_set():
                self._joined_errors.append(str(e) or type(e).__name__)
                try:
                    conn.respond_error(str(e))
                except Exception:  # noqa: BLE001 - the connection may be what failed
                    pass

    def _stop_joined(self) -> None:
        """Ends the extra connections (their readers see the end and return) and joins them."""
        if not self._joined:
            return  # one connection (nothing to stop, and nothing cold to run inside the downtime)
        self._joined_done.set()  # from here their errors no longer count
        for extra in self._joined:
            extra.shutdown()
        for t in self._joined_threads:
            t.join()
        for extra in self._joined:
            extra.close()
        self._joined, self._joined_threads = [], []


def _check_memory_fd(arg: int, got_fds: list[int], fds: dict[int, int]) -> None:
    if len(got_fds) != 1:
        raise MigrationError(f"MemoryFd needs exactly one fd, {len(got_fds)} came")
    if arg >= MAX_MEMORY_FDS:
        raise MigrationError(f"MemoryFd for RAM region {arg}: guest RAM has at most {MAX_MEMORY_FDS} regions")
    if arg in fds:
        raise MigrationError(f"MemoryFd for RAM region {arg} came twice")


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _drop(sel: selectors.BaseSelector, busy: dict, sock: socket.socket) -> None:
    sel.unregister(sock)
    del busy[sock]
    sock.close()
