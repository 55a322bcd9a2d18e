"""The receiving side: an explicit state machine over one connection at a time.

Anything out of order, unknown, oversized, outside guest RAM or cut short gets an Error response;
the half-built VM is discarded and the listener waits for the next attempt. While one source is
served, every other one is answered "busy" at once; a source has a short handshake timeout until
its Config is accepted (docs/security.md).
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

from ..config import VmConfig, from_peer
from ..errors import MigrationError, VmmError
from ..payload import PARTS, BootPayload, check_description, verify
from ..snapshot import decode_state
from . import transport
from .protocol import JSON_MAX, MESSAGE_MAX, VERSION, Capability, Command, Connection, PeerTimeout, Status

log = logging.getLogger("vmmpy.migration")


class ReceiveState(enum.Enum):
    ESTABLISHED = "Established"
    STARTED = "Started"
    CONFIGURED = "Configured"
    STATE_RECEIVED = "StateReceived"
    COMPLETED = "Completed"
    ABORTED = "Aborted"


CAPABILITIES = [Capability.LOCAL.value, Capability.ZERO_RANGES.value, Capability.LIFECYCLE_EVENT.value,
                Capability.PAYLOAD.value]
MAX_MEMORY_FDS = 2  # guest RAM has at most two regions: below the 4 GiB hole and above it
BUSY_MAX = 64  # sources answered "busy" whose connection stays open until they hang up
BUSY_MESSAGE = "busy: this destination is receiving another migration; try again later"


class Abandoned(MigrationError):
    """The source abandoned the migration."""


@dataclass
class Incoming:
    """The VM being received: the native VM, the config it was built from, and its boot payload
    (described in Config, received in Payload frames, checked by size and sha256)."""

    vm: object
    config: object
    described: dict = field(default_factory=dict)
    received: dict = field(default_factory=dict)
    payload: BootPayload = field(default_factory=BootPayload)


class ReceiveHooks:
    """What the receiver needs from its VMM (implemented by Vmm; runs on the VMM's control loop)."""

    def build_vm(self, cfg: VmConfig, memory_fds: list[int] | None) -> Incoming:
        raise NotImplementedError

    def complete(self, incoming: Incoming, fields: dict) -> None:
        raise NotImplementedError

    def emit(self, event: str, properties: dict | None = None) -> None:
        raise NotImplementedError


class Receiver:
    def __init__(self, listener: socket.socket, hooks: ReceiveHooks, capabilities: list[str] | None = None):
        self.listener = listener
        self.hooks = hooks
        self.capabilities = CAPABILITIES if capabilities is None else capabilities
        self.state = ReceiveState.ESTABLISHED
        self.closed = threading.Event()
        self.last_error: str | None = None
        self._active: Connection | None = None  # the source being served, for close()
        self._worker: threading.Thread | None = None  # serves the active source
        self._worker_done = threading.Event()
        self._completed = False
        # Written by close() and by the worker as its last act; serve() owns and closes it.
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.Lock()
        self._wake_closed = False

    def serve(self) -> bool:
        """Accepts sources until one migration completes (True) or the receiver is closed (False).
        One source is served at a time (on a worker thread); others are answered busy."""
        sel = selectors.DefaultSelector()
        busy: dict[socket.socket, float] = {}  # answered busy: open until they hang up or expire
        try:
            self.listener.setblocking(False)
            sel.register(self.listener, selectors.EVENT_READ, "accept")
            sel.register(self._wake, selectors.EVENT_READ, "wake")
            while not self.closed.is_set():
                timeout = max(0.0, min(busy.values()) - time.monotonic()) if busy else None
                for key, _ in sel.select(timeout):
                    if key.data == "accept":
                        if self._accept(sel, busy):
                            return True
                    elif key.data == "wake":
                        _drain(self._wake)
                        if self._reap():
                            return True
                    else:
                        self._drain_busy(sel, busy, key.fileobj)
                now = time.monotonic()
                for conn in [c for c, deadline in busy.items() if deadline <= now]:
                    _drop(sel, busy, conn)
            return False
        finally:
            for conn in list(busy):
                _drop(sel, busy, conn)
            sel.close()
            if self._worker is not None:
                active = self._active
                if active is not None:
                    active.shutdown()
                self._worker.join()
                self._worker = None
            self.listener.close()
            with self._wake_lock:
                self._wake_closed = True
                os.close(self._wake)

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
            conn = Connection(sock)
            self._active = conn
            self._worker_done = threading.Event()
            self._worker = threading.Thread(target=self._run, args=(conn, self._worker_done),
                                            name="migration-receive-conn", daemon=True)
            self._worker.start()
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

    def _run(self, conn: Connection, done: threading.Event) -> None:
        try:
            self._completed = self._serve_connection(conn, done)
        finally:
            self._active = None
            conn.close()
            done.set()
            self._wake_up()

    def _wake_up(self) -> None:
        with self._wake_lock:
            if not self._wake_closed:
                os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        """Stops listening and cuts off a source being served (its attempt fails)."""
        self.closed.set()
        self._wake_up()
        active = self._active
        if active is not None:
            active.shutdown()

    def _serve_connection(self, conn: Connection, done: threading.Event) -> bool:
        """Serves one source. `done` is set once the attempt has released what it held (before
        its last answer goes out), so a source that heard the answer and reconnects is served."""
        self.state = ReceiveState.ESTABLISHED
        incoming: Incoming | None = None
        fds: dict[int, int] = {}
        fields: dict = {}
        last_answer = None  # sent after the cleanup
        try:
            while True:
                try:
                    command, arg, length, got_fds = conn.read_request()
                except EOFError:
                    raise MigrationError(f"source closed the connection in state {self.state.value}") from None
                except PeerTimeout:
                    if self.state in (ReceiveState.ESTABLISHED, ReceiveState.STARTED):
                        raise PeerTimeout(f"handshake timed out: no Start and Config within "
                                          f"{transport.HANDSHAKE_TIMEOUT_S:g} s") from None
                    raise
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
            self.hooks.emit("migration-receive-failed", {"error": self.last_error})
            return False
        except Exception as e:  # noqa: BLE001 - any failure ends this attempt, not the receiver
            if not isinstance(e, (VmmError, OSError, ValueError)):
                log.exception("migration receive failed unexpectedly")
            self.last_error = str(e)
            self.state = ReceiveState.ABORTED
            message = str(e)
            last_answer = lambda: conn.respond_error(message)  # noqa: E731
            self.hooks.emit("migration-receive-failed", {"error": str(e)})
            return False
        finally:
            if self.state is not ReceiveState.COMPLETED and incoming is not None:
                incoming.vm.stop()
            for fd in fds.values():
                _close(fd)
            if self.state is not ReceiveState.COMPLETED:
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
            doc = self._json(conn, length, MESSAGE_MAX)
            if doc.get("version") != VERSION:
                raise MigrationError(f"source speaks protocol {doc.get('version')!r}, this destination {VERSION}")
            conn.respond(Status.OK, json.dumps({"version": VERSION, "capabilities": self.capabilities}).encode())
            self.state = ReceiveState.STARTED
            self.hooks.emit("migration-receive-started", {"capabilities": doc.get("capabilities", [])})
            return incoming, False
        if command == Command.MEMORY_FD and st is ReceiveState.STARTED:
            conn.read_payload(length, 0)
            conn.respond(Status.OK)
            return incoming, False
        if command == Command.CONFIG and st is ReceiveState.STARTED:
            doc = self._json(conn, length)
            local = bool(doc.get("local"))
            if local and (not fds or sorted(fds) != list(range(len(fds)))):
                raise MigrationError(f"local migration needs memory fds for regions 0..n-1, got {sorted(fds)}")
            memory_fds = [fds[i] for i in range(len(fds))] if local else None
            described = doc.get("payload")
            cfg = from_peer(doc.get("config") or {}, described if isinstance(described, dict) else {})
            described = check_description(described, cfg.memory_bytes)
            incoming = self.hooks.build_vm(cfg, memory_fds)
            incoming.described = described
            transport.set_timeout(conn.sock, transport.IO_TIMEOUT_S)  # the handshake is over
            conn.respond(Status.OK)
            self.state = ReceiveState.CONFIGURED
            return incoming, False
        if command == Command.PAYLOAD and st is ReceiveState.CONFIGURED:
            part = PARTS[arg] if arg < len(PARTS) else f"#{arg}"
            expected = incoming.described.get(part)
            if expected is None or part in incoming.received:
                raise MigrationError(f"Payload {part}: not described in Config, or sent twice")
            if length != expected["size"]:
                raise MigrationError(f"payload {part}: a frame of {length} bytes; its described size is "
                                     f"{expected['size']}")
            data = conn.read_payload(length, expected["size"])
            verify(part, data, expected)
            incoming.received[part] = data
            conn.respond(Status.OK)
            return incoming, False
        if command == Command.MEMORY and st is ReceiveState.CONFIGURED:
            incoming.vm.receive_memory(conn.fileno(), length)
            conn.respond(Status.OK)
            return incoming, False
        if command == Command.STATE and st is ReceiveState.CONFIGURED:
            missing = sorted(set(incoming.described) - set(incoming.received))
            if missing:
                raise MigrationError(f"State before the described payload arrived: {', '.join(missing)} missing")
            incoming.payload = BootPayload(**incoming.received)
            decoded = decode_state(self._json(conn, length))
            incoming.vm.restore_state(decoded.native)
            fields.update(decoded.fields)
            conn.respond(Status.OK)
            self.state = ReceiveState.STATE_RECEIVED
            return incoming, False
        if command == Command.COMPLETE and st is ReceiveState.STATE_RECEIVED:
            conn.read_payload(length, 0)
            self.hooks.complete(incoming, fields)
            # From here the VMM owns the VM and runs it: whatever happens to this reply.
            self.state = ReceiveState.COMPLETED
            try:
                conn.respond(Status.OK)
            except Exception as e:  # noqa: BLE001 - the source may be gone; the guest runs here
                log.warning("migration completed, but the source was not told: %s", e)
            return incoming, True
        try:
            name = Command(command).name
        except ValueError:
            raise MigrationError(f"unknown command {command}") from None
        raise MigrationError(f"command {name} is not allowed in state {st.value}")

    @staticmethod
    def _json(conn: Connection, length: int, bound: int = JSON_MAX) -> dict:
        data = conn.read_payload(length, bound)
        try:
            doc = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MigrationError(f"malformed JSON payload: {e}") from None
        if not isinstance(doc, dict):
            raise MigrationError("JSON payload is not an object")
        return doc


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
