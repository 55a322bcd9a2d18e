"""The receiving side: an explicit state machine over one connection at a time.

Anything out of order, unknown, oversized, outside guest RAM or cut short gets an Error response;
the half-built VM is discarded and the listener waits for the next attempt.

With a TLS context every accepted connection first passes a mutual TLS handshake; one that fails is
closed before any request is read. A Start asking for `connections` = N > 1 (tcp only) is answered
with a random connection token; the receiver then accepts the N - 1 extra connections, each of
which must present that token (Join). After Config each extra connection gets a thread that takes
only Memory frames; State stops them (all memory is in by then) before the VM state is loaded.
"""

from __future__ import annotations

import enum
import hmac
import json
import logging
import secrets
import select
import socket
import threading
import time
from dataclasses import dataclass

from ..errors import MigrationError, VmmError
from ..snapshot import decode_state
from . import transport
from .protocol import JSON_MAX, MESSAGE_MAX, VERSION, Capability, Command, Connection, Status

log = logging.getLogger("vmmpy.migration")


class ReceiveState(enum.Enum):
    ESTABLISHED = "Established"
    STARTED = "Started"
    CONFIGURED = "Configured"
    STATE_RECEIVED = "StateReceived"
    COMPLETED = "Completed"
    ABORTED = "Aborted"


CAPABILITIES = [Capability.LOCAL.value, Capability.ZERO_RANGES.value, Capability.LIFECYCLE_EVENT.value,
                Capability.CONNECTIONS.value]
MAX_CONNECTIONS = 128
JOIN_TIMEOUT_S = 10.0  # for all extra connections of a migration to arrive and present the token


class Abandoned(MigrationError):
    """The source abandoned the migration."""


@dataclass
class Incoming:
    """The VM being received: the native VM and the config it was built from."""

    vm: object
    config: object


class ReceiveHooks:
    """What the receiver needs from its VMM (implemented by Vmm; runs on the VMM's control loop)."""

    def build_vm(self, config_api: dict, memory_fds: list[int] | None) -> Incoming:
        raise NotImplementedError

    def complete(self, incoming: Incoming, fields: dict) -> None:
        raise NotImplementedError

    def emit(self, event: str, properties: dict | None = None) -> None:
        raise NotImplementedError


class Receiver:
    def __init__(self, listener: socket.socket, hooks: ReceiveHooks, capabilities: list[str] | None = None,
                 tls=None):
        self.listener = listener
        self.tls = tls  # _native.TlsContext ("server"), or None for plaintext
        self.hooks = hooks
        self.capabilities = CAPABILITIES if capabilities is None else capabilities
        self.state = ReceiveState.ESTABLISHED
        self.closed = threading.Event()
        self.last_error: str | None = None
        self._active: Connection | None = None  # the source being served, for close()
        self._joined: list[Connection] = []  # its extra connections
        self._joined_threads: list[threading.Thread] = []
        self._joined_errors: list[str] = []
        self._joined_done = threading.Event()  # set when they are being stopped: errors no longer count

    def serve(self) -> bool:
        """Accepts sources until one migration completes (True) or the listener closes (False)."""
        while not self.closed.is_set():
            try:
                conn = self._accept()
            except OSError:
                return False
            except VmmError as e:  # the TLS handshake failed: nothing was read from this peer
                self.last_error = str(e)
                self.hooks.emit("migration-receive-failed", {"error": str(e)})
                continue
            self._active = conn
            try:
                if self._serve_connection(conn):
                    return True
            finally:
                self._active = None
                conn.close()
        return False

    def close(self) -> None:
        """Stops listening and cuts off a source being served (its attempt fails)."""
        self.closed.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        active = self._active
        if active is not None:
            active.shutdown()
        for extra in list(self._joined):
            extra.shutdown()

    def _accept(self) -> Connection:
        return transport.secure(transport.accept(self.listener), self.tls)

    def _serve_connection(self, conn: Connection) -> bool:
        self.state = ReceiveState.ESTABLISHED
        self._joined_errors = []
        self._joined_done.clear()
        incoming: Incoming | None = None
        fds: dict[int, int] = {}
        fields: dict = {}
        try:
            while True:
                try:
                    command, arg, length, got_fds = conn.read_request()
                except EOFError:
                    raise MigrationError(f"source closed the connection in state {self.state.value}") from None
                if command == Command.MEMORY_FD and len(got_fds) == 1 and arg not in fds:
                    fds[arg] = got_fds[0]
                else:
                    for fd in got_fds:
                        _close(fd)
                    if command == Command.MEMORY_FD:
                        raise MigrationError(f"MemoryFd {arg} without exactly one new fd")
                incoming, done = self._step(conn, command, arg, length, incoming, fds, fields)
                if done:
                    return True
        except Abandoned:
            self.last_error = "abandoned by the source"
            self.hooks.emit("migration-receive-failed", {"error": self.last_error})
            return False
        except Exception as e:  # noqa: BLE001 - any failure ends this attempt, not the receiver
            if not isinstance(e, (VmmError, OSError, ValueError)):
                log.exception("migration receive failed unexpectedly")
            self.last_error = str(e)
            self.state = ReceiveState.ABORTED
            try:
                conn.respond_error(str(e))
            except Exception:  # noqa: BLE001 - the connection may be what failed
                pass
            self.hooks.emit("migration-receive-failed", {"error": str(e)})
            return False
        finally:
            self._stop_joined()
            if self.state is not ReceiveState.COMPLETED and incoming is not None:
                incoming.vm.stop()
            for fd in fds.values():
                _close(fd)

    def _step(self, conn, command, arg, length, incoming, fds, fields):
        st = self.state
        if command == Command.ABANDON:
            conn.read_payload(length, 0)
            conn.respond(Status.OK)
            self.state = ReceiveState.ABORTED
            raise Abandoned("abandoned")
        if command == Command.START and st is ReceiveState.ESTABLISHED:
            doc = self._json(conn, length, MESSAGE_MAX)
            if doc.get("version") != VERSION:
                raise MigrationError(f"source speaks protocol {doc.get('version')!r}, this destination {VERSION}")
            connections = doc.get("connections", 1)
            if type(connections) is not int or not 1 <= connections <= MAX_CONNECTIONS:
                raise MigrationError(f"connections={connections!r}: expected 1..{MAX_CONNECTIONS}")
            if connections > 1 and (Capability.CONNECTIONS.value not in self.capabilities
                                    or self.listener.family == socket.AF_UNIX):
                raise MigrationError("this destination takes one connection (connections > 1 needs tcp)")
            answer = {"version": VERSION, "capabilities": self.capabilities}
            token = secrets.token_hex(16) if connections > 1 else None
            if token is not None:
                answer["connection_token"] = token
            conn.respond(Status.OK, json.dumps(answer).encode())
            self.state = ReceiveState.STARTED
            if token is not None:
                self._accept_joins(connections - 1, token)
            self.hooks.emit("migration-receive-started", {"capabilities": doc.get("capabilities", []),
                                                          "connections": connections, "tls": self.tls is not None})
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
            incoming = self.hooks.build_vm(doc.get("config") or {}, memory_fds)
            for extra in self._joined:
                t = threading.Thread(target=self._serve_joined, args=(extra, incoming.vm), daemon=True,
                                     name="migration-receive-joined")
                self._joined_threads.append(t)
                t.start()
            conn.respond(Status.OK)
            self.state = ReceiveState.CONFIGURED
            return incoming, False
        if command == Command.MEMORY and st is ReceiveState.CONFIGURED:
            incoming.vm.receive_memory(conn.memory_link(), length)
            conn.respond(Status.OK)
            return incoming, False
        if command == Command.STATE and st is ReceiveState.CONFIGURED:
            # The source sends State once every frame on every connection was answered.
            self._stop_joined()
            if self._joined_errors:
                raise MigrationError(f"an extra connection failed: {self._joined_errors[0]}")
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

    # ---- extra connections (connections > 1) ---------------------------------------------------

    def _accept_joins(self, count: int, token: str) -> None:
        """Accepts `count` extra connections presenting `token` within JOIN_TIMEOUT_S; any other
        connection meanwhile gets an Error answer and is closed."""
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        wanted = set(range(1, count + 1))
        while wanted:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.listener], [], [], left)[0]:
                raise MigrationError(f"{len(wanted)} of {count} extra connections did not join within {JOIN_TIMEOUT_S}s")
            try:
                extra = self._accept()
            except VmmError as e:
                self.hooks.emit("migration-join-refused", {"error": str(e)})
                continue
            try:
                transport.set_timeouts(extra.sock, max(deadline - time.monotonic(), 0.01), transport.IO_TIMEOUT_S)
                command, _, length, fds = extra.read_request()
                for fd in fds:
                    _close(fd)
                doc = self._json(extra, length, MESSAGE_MAX) if command == Command.JOIN else {}
                index = doc.get("index")
                if (not hmac.compare_digest(str(doc.get("token", "")).encode(), token.encode())
                        or type(index) is not int or index not in wanted):
                    raise MigrationError("not a connection of the migration being received")
                extra.respond(Status.OK)
            except (VmmError, OSError, EOFError, ValueError) as e:
                try:
                    extra.respond_error(str(e))
                except Exception:  # noqa: BLE001 - the stranger may be gone
                    pass
                extra.close()
                self.hooks.emit("migration-join-refused", {"error": str(e)})
                continue
            wanted.discard(index)
            # Idle between frames as long as the first connection lives: that one ends them.
            transport.set_timeouts(extra.sock, 0, transport.IO_TIMEOUT_S)
            self._joined.append(extra)

    def _serve_joined(self, conn: Connection, vm) -> None:
        """Memory frames on an extra connection, until State or the end of the attempt stops it."""
        try:
            while True:
                command, _, length, fds = conn.read_request()
                for fd in fds:
                    _close(fd)
                if command != Command.MEMORY:
                    raise MigrationError(f"command {command} on an extra connection (only Memory)")
                vm.receive_memory(conn.memory_link(), length)
                conn.respond(Status.OK)
        except Exception as e:  # noqa: BLE001 - reported through the first connection
            if not self._joined_done.is_set():
                self._joined_errors.append(str(e) or type(e).__name__)
                try:
                    conn.respond_error(str(e))
                except Exception:  # noqa: BLE001 - the connection may be what failed
                    pass

    def _stop_joined(self) -> None:
        self._joined_done.set()
        for extra in self._joined:
            extra.shutdown()
        for t in self._joined_threads:
            t.join()
        for extra in self._joined:
            extra.close()
        self._joined, self._joined_threads = [], []

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


def _close(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
