"""vmmpy's migration wire format (docs/migration-protocol.md): fixed 16-byte little-endian headers.

The Memory frame's table and page bytes are written and read by the native core straight from
and into guest memory; everything else is small and handled here. Over TLS every byte goes through
the connection's native TlsChannel (rust/tls.rs) instead of the socket.
"""

from __future__ import annotations

import array
import enum
import errno
import json
import select
import socket
import struct
import time

from .. import _native
from ..errors import MigrationError

VERSION = 1
HEADER = struct.Struct("<HHIQ")  # command/status, reserved, arg, length
JSON_MAX = 64 << 20  # Config and State documents
MESSAGE_MAX = 64 << 10  # error messages and Start answers


class Command(enum.IntEnum):
    START = 1
    CONFIG = 2
    STATE = 3
    MEMORY = _native.CMD_MEMORY  # the native core writes and reads Memory frames
    COMPLETE = 5
    ABANDON = 6
    MEMORY_FD = 7
    JOIN = 8  # an extra connection of a migration with connections > 1
    PAYLOAD = 9  # one boot payload part (kernel, initramfs) as content


class Status(enum.IntEnum):
    OK = 1
    ERROR = 2


class Capability(str, enum.Enum):
    LOCAL = "local"  # memory fds over SCM_RIGHTS
    ZERO_RANGES = "zero-ranges"
    LIFECYCLE_EVENT = "lifecycle-event"  # state may carry a latched guest reboot/power-off
    CONNECTIONS = "connections"  # Memory frames may also come over extra connections (Join)
    PAYLOAD = "payload"  # kernel/initramfs travel as content (Payload frames), never as paths
    PRIVATE_MEMORY = "private-memory"  # the source's Config memory.shared=false means private RAM
    STATE_COMPLETES = "state-completes"  # a State with arg STATE_COMPLETES is also the Complete


STATE_COMPLETES = 1  # State's arg: run the guest once the state is loaded; no Complete follows


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; not every Python names it
OK_ANSWER = HEADER.pack(Status.OK, 0, 0, 0)  # packed once: the answers inside a downtime are these


class PeerError(MigrationError):
    """The other side answered with an Error response."""


class PeerTimeout(MigrationError):
    """The other side sent or took nothing for the socket's timeout."""


def set_timeouts(sock: socket.socket, receive_s: float | None, send_s: float | None) -> None:
    """SO_RCVTIMEO / SO_SNDTIMEO (0 = wait without a bound, None = leave as it is)."""
    for opt, seconds in ((socket.SO_RCVTIMEO, receive_s), (socket.SO_SNDTIMEO, send_s)):
        if seconds is not None:
            sock.setsockopt(socket.SOL_SOCKET, opt, struct.pack("ll", int(seconds), int((seconds % 1) * 1e6)))


def json_object(data: bytes) -> dict:
    """A peer's JSON document, which must be an object; anything else is a MigrationError."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MigrationError(f"malformed JSON payload: {e}") from None
    except RecursionError:
        raise MigrationError("malformed JSON payload: nested too deeply") from None
    if not isinstance(doc, dict):
        raise MigrationError("JSON payload is not an object")
    return doc


class Connection:
    """One migration connection. Blocking socket; timeouts come from SO_RCVTIMEO/SO_SNDTIMEO.
    With `tls` (a handshaken _native.TlsChannel on the socket) all bytes go through it.

    `deadline` (time.monotonic(), None = none) bounds every read until it is cleared, however
    the peer spreads its bytes: each read waits only for what is left of it."""

    def __init__(self, sock: socket.socket, tls=None):
        self.sock = sock
        self.tls = tls
        self.deadline: float | None = None
        self._hangup: select.poll | None = None
        self._stamped = False  # stamp_arrivals

    def peer_hung_up(self) -> bool:
        """Whether the peer has closed or reset the connection (a look, without blocking)."""
        if self._hangup is None:
            self._hangup = select.poll()
            self._hangup.register(self.sock, select.POLLRDHUP)  # POLLHUP and POLLERR come unasked
        return bool(self._hangup.poll(0))

    def await_bytes(self, spin_s: float) -> None:
        """For bytes due within `spin_s` (an answer, or the next request): wait for them awake
        (polling, yielding the CPU), not asleep in recv, whose wake-up costs tens of microseconds
        on a nested host. Only where the arrival is not stamped (stamp_arrivals), and never over
        TLS (which may hold them decrypted already); later bytes are read as usual."""
        if self.tls is None and not self._stamped:  # a stamped answer's wait does not count
            _native.await_readable(self.sock.fileno(), spin_s)

    def memory_link(self):
        """What Vm.send_memory / receive_memory take: the socket fd, or the TLS channel."""
        return self.tls if self.tls is not None else self.sock.fileno()

    def close(self) -> None:
        if self.tls is not None:
            self.tls.close()
        self.sock.close()

    def abandon(self, timeout_s: float = 2.0) -> None:
        """Tells the destination to drop this attempt, without waiting long for a dead peer."""
        try:
            set_timeouts(self.sock, timeout_s, timeout_s)
            self.request(Command.ABANDON)
        except (OSError, MigrationError):
            pass  # the connection may be what failed

    def shutdown(self) -> None:
        """Ends both directions now; blocked reads and writes on it return at once."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _time_left(self) -> float | None:
        """Seconds left of the deadline (None without one); PeerTimeout once it has passed."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise PeerTimeout("migration peer timed out")
        return left

    def _arm(self) -> None:
        """Before a socket read: the receive timeout is what is left of the deadline."""
        left = self._time_left()
        if left is not None:
            set_timeouts(self.sock, max(left, 1e-3), None)

    def _recv_exact(self, n: int) -> bytes:
        if self.tls is not None:
            try:
                return self.tls.recv_exact(n, self._time_left())
            except MigrationError as e:
                if e.errno == errno.ETIMEDOUT:
                    raise PeerTimeout("migration peer timed out") from None
                raise
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            self._arm()
            try:
                k = self.sock.recv_into(view[got:])
            except (TimeoutError, BlockingIOError):
                raise PeerTimeout("migration peer timed out") from None
            except OSError as e:
                raise MigrationError(f"migration connection failed: {e.strerror or e}") from None
            if k == 0:
                raise MigrationError(f"migration stream ended inside a frame ({got} of {n} bytes)")
            got += k
        return bytes(buf)

    def _send(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.sendall(data)
            return
        try:
            self.sock.sendall(data)
        except (TimeoutError, BlockingIOError):
            raise PeerTimeout("migration peer timed out") from None
        except OSError as e:
            raise MigrationError(f"migration connection failed: {e.strerror or e}") from None

    # ---- source side ----------------------------------------------------------------------

    def request(self, command: Command, payload: bytes = b"", arg: int = 0, fds: list[int] | None = None) -> bytes:
        """Sends one request and returns the Ok response's payload; raises PeerError on Error."""
        self.send_request(command, payload, arg, fds)
        return self.read_response()

    def send_request(self, command: Command, payload: bytes = b"", arg: int = 0, fds: list[int] | None = None) -> None:
        """Sends one request without waiting for its response (read it with read_response)."""
        header = HEADER.pack(command, 0, arg, len(payload))
        if fds and self.tls is not None:
            raise MigrationError("memory fds cannot travel over a TLS connection")
        if fds:
            try:
                sent = self.sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            except OSError as e:
                raise MigrationError(f"passing memory fds failed: {e.strerror or e}") from None
            if sent < len(header):
                self._send(header[sent:])
        else:
            self._send(header + payload)
            return
        if payload:
            self._send(payload)

    def request_json(self, command: Command, doc: dict) -> bytes:
        return self.request(command, json.dumps(doc).encode())

    def stamp_arrivals(self) -> None:
        """From now on the kernel notes when each answer arrives (plaintext TCP only: a Unix
        socket's stream has no such stamps, and TLS reads its records itself)."""
        if self.tls is None and self.sock.family in (socket.AF_INET, socket.AF_INET6):
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self._stamped = True

    def read_response_arrival(self) -> tuple[bytes, float | None]:
        """read_response, and the time.time() at which its first bytes reached this host (None
        without stamp_arrivals): not when this thread got to read them, which on a busy host
        can be a scheduler time slice later."""
        if not self._stamped:
            return self.read_response(), None
        data, ancdata = self._header_with(socket.CMSG_SPACE(16))
        if data is None:
            raise MigrationError(f"migration stream ended inside a frame (0 of {HEADER.size} bytes)")
        arrival = None
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(cdata) >= 16:
                seconds, nanoseconds = struct.unpack_from("qq", cdata)
                arrival = seconds + nanoseconds / 1e9
        return self._answer(data), arrival

    def _header_with(self, ancillary: int, flags: int = 0) -> tuple[bytes | None, list]:
        """A whole header with the ancillary data that came on its first bytes (plaintext only);
        None for the header when the stream ended before it."""
        self._arm()
        try:
            data, ancdata, _, _ = self.sock.recvmsg(HEADER.size, ancillary, flags)
        except (TimeoutError, BlockingIOError):
            raise PeerTimeout("migration peer timed out") from None
        except OSError as e:
            raise MigrationError(f"migration connection failed: {e.strerror or e}") from None
        if not data:
            return None, ancdata
        if len(data) < HEADER.size:
            data += self._recv_exact(HEADER.size - len(data))
        return data, ancdata

    def read_response(self) -> bytes:
        return self._answer(self._recv_exact(HEADER.size))

    def _answer(self, header: bytes) -> bytes:
        """The rest of the response whose header this is: the Ok payload, or PeerError."""
        status, _, _, length = HEADER.unpack(header)
        if length > MESSAGE_MAX:
            raise MigrationError(f"migration response of {length} bytes is over the bound")
        body = self._recv_exact(length) if length else b""
        if status == Status.OK:
            return body
        if status == Status.ERROR:
            raise PeerError(f"destination: {body.decode(errors='replace')}")
        raise MigrationError(f"unknown response status {status}")

    # ---- destination side -----------------------------------------------------------------

    def read_request(self) -> tuple[int, int, int, list[int]]:
        """(command, arg, length, fds). The payload is left in the stream for the caller."""
        if self.tls is not None:
            command, _, arg, length = HEADER.unpack(self._recv_exact(HEADER.size))
            return command, arg, length, []
        fds = array.array("i")
        # Close-on-exec from the start; fds beyond the buffer's room are discarded by the kernel.
        data, ancdata = self._header_with(socket.CMSG_LEN(4 * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        if data is None:
            raise EOFError("migration stream closed")
        command, _, arg, length = HEADER.unpack(data)
        return command, arg, length, list(fds)

    def read_json(self, length: int, bound: int) -> dict:
        """A request's payload that must be a JSON object (json_object)."""
        return json_object(self.read_payload(length, bound))

    def read_payload(self, length: int, bound: int) -> bytes:
        if length > bound:
            raise MigrationError(f"payload of {length} bytes is over the bound of {bound}")
        return self._recv_exact(length) if length else b""

    def respond(self, status: Status, payload: bytes = b"") -> None:
        self._send(
            OK_ANSWER if status == Status.OK and not payload else HEADER.pack(status, 0, 0, len(payload)) + payload
        )

    def respond_error(self, message: str) -> None:
        self.respond(Status.ERROR, message.encode()[:MESSAGE_MAX])
