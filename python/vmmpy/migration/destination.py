"""The receiving side: an explicit state machine over one connection at a time.

Anything out of order, unknown, oversized, outside guest RAM or cut short gets an Error response;
the half-built VM is discarded and the listener waits for the next attempt.
"""

from __future__ import annotations

import enum
import json
import logging
import socket
import threading
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


CAPABILITIES = [Capability.LOCAL.value, Capability.ZERO_RANGES.value, Capability.LIFECYCLE_EVENT.value]


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
    def __init__(self, listener: socket.socket, hooks: ReceiveHooks, capabilities: list[str] | None = None):
        self.listener = listener
        self.hooks = hooks
        self.capabilities = CAPABILITIES if capabilities is None else capabilities
        self.state = ReceiveState.ESTABLISHED
        self.closed = threading.Event()
        self.last_error: str | None = None
        self._active: Connection | None = None  # the source being served, for close()

    def serve(self) -> bool:
        """Accepts sources until one migration completes (True) or the listener closes (False)."""
        while not self.closed.is_set():
            try:
                conn = Connection(transport.accept(self.listener))
            except OSError:
                return False
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

    def _serve_connection(self, conn: Connection) -> bool:
        self.state = ReceiveState.ESTABLISHED
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
            incoming = self.hooks.build_vm(doc.get("config") or {}, memory_fds)
            conn.respond(Status.OK)
            self.state = ReceiveState.CONFIGURED
            return incoming, False
        if command == Command.MEMORY and st is ReceiveState.CONFIGURED:
            incoming.vm.receive_memory(conn.fileno(), length)
            conn.respond(Status.OK)
            return incoming, False
        if command == Command.STATE and st is ReceiveState.CONFIGURED:
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


def _close(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
