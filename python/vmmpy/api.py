"""vmmpy's REST API: Cloud Hypervisor's HTTP API, over a Unix socket.

Paths, methods, bodies and status codes follow Cloud Hypervisor's OpenAPI description for every
endpoint vmmpy implements, so ``ch-remote`` and libvirt's CH driver can drive vmmpy. vmmpy's own
description is ``openapi/vmmpy.yaml``.

Status codes
------------
Success: ``200`` with a JSON body (``vmm.ping``, ``vm.info``), ``204`` without one (all PUTs).

Errors raised by the VMM are mapped by :data:`ERROR_STATUS` (the one table; first match wins):

=====================  ======  ==============================================================
exception              status  why
=====================  ======  ==============================================================
VmNotCreated           404     CH spec: "not created"
VmMigrating            409     the VM is owned by a migration; retry later (CH itself: 500)
VmAlreadyCreated       405     vm.create while a VM exists: the VMM's state does not allow it
InvalidState           405     CH spec: "not in a state that allows it" (not booted/paused...)
InvalidConfig          400     bad VmConfig body (CH answers 400 for config validation errors)
PayloadError           400     kernel/initramfs/command line that cannot be loaded
PauseTimeout           500     the vCPUs did not stop in time; the request failed inside
KvmError               500     a host call failed
VmmShutDown            503     the VMM's control loop has ended
VmmError (other)       500
any other exception    500     a bug; logged with its traceback
=====================  ======  ==============================================================

Protocol errors: unknown path ``404``; known path, wrong method ``405`` (with ``Allow``; CH
answers 400 here); body that is not JSON, or a body sent to an endpoint that takes none, or no
body for ``vm.create`` ``400``; body over 1 MiB ``413``.

Every error response has a JSON body like Cloud Hypervisor's: an array of strings from the
outermost description to the root cause, e.g. ``["vm.pause failed", "VM is not running"]``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import socketserver
import stat
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable
from urllib.parse import urlsplit

from vmmpy.config import VmConfig
from vmmpy.errors import (
    InvalidConfig,
    InvalidState,
    KvmError,
    MigrationError,
    PauseTimeout,
    PayloadError,
    VmAlreadyCreated,
    VmMigrating,
    VmmError,
    VmmShutDown,
    VmNotCreated,
)

from vmmpy.migration.source import MigrationOptions

log = logging.getLogger("vmmpy.api")

API_ROOT = "/api/v1/"
MAX_BODY = 1 << 20
#: An oversized body up to this size is read and dropped before the 413 answer goes out.
DISCARD_LIMIT = 16 << 20
#: How long :meth:`ApiServer.close` lets requests in progress finish before cutting them off.
CLOSE_GRACE = 5.0
#: An idle keep-alive connection is dropped after this many seconds.
IDLE_TIMEOUT = 60.0

# The one exception → status table. Order matters: subclasses before their bases.
ERROR_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (VmNotCreated, 404),
    (VmMigrating, 409),
    (VmAlreadyCreated, 405),
    (InvalidState, 405),
    (InvalidConfig, 400),
    (PayloadError, 400),
    (PauseTimeout, 500),
    (MigrationError, 500),
    (KvmError, 500),
    (VmmShutDown, 503),
    (VmmError, 500),
)


def status_for(exc: BaseException) -> int:
    """The HTTP status for an exception raised while serving a request."""
    for cls, status in ERROR_STATUS:
        if isinstance(exc, cls):
            return status
    return 500


# ------------------------------------------------------------------------------------------
# Endpoints
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    method: str  # "GET" or "PUT"
    call: Callable[[Any, Any], Any]  # (vmm, parsed body) -> JSON-able result or None
    takes_body: bool = False  # True: a JSON body is required; False: no body allowed


def _create(vmm: Any, body: Any) -> None:
    vmm.create(VmConfig.from_api(body))


def _fields(body: Any, name: str, allowed: set[str], required: str) -> dict:
    """A JSON object body with only `allowed` keys (unknown ones refused by name) and `required`."""
    if not isinstance(body, dict):
        raise InvalidConfig(f"{name} takes a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidConfig(f"unsupported {name} fields: {', '.join(unknown)}")
    if required not in body:
        raise InvalidConfig(f"{name} needs {required}")
    return body


def _send_migration(vmm: Any, body: Any) -> None:
    vmm.send_migration(**_fields(body, "SendMigrationData", set(MigrationOptions.__dataclass_fields__),
                                 "destination_url"))


def _receive_migration(vmm: Any, body: Any) -> None:
    """Blocks until a migration completed here, as Cloud Hypervisor's does."""
    handle = vmm.receive_migration(**_fields(body, "ReceiveMigrationData", {"receiver_url", "tls_dir"}, "receiver_url"))
    if not handle.wait():
        raise MigrationError(f"no migration was received: {handle.receiver.last_error or 'receive stopped'}")


def _snapshot(vmm: Any, body: Any) -> None:
    vmm.snapshot(_fields(body, "VmSnapshotConfig", {"destination_url"}, "destination_url")["destination_url"])


def _restore(vmm: Any, body: Any) -> None:
    body = _fields(body, "RestoreConfig", {"source_url", "resume", "prefault"}, "source_url")
    vmm.restore(body["source_url"], resume=bool(body.get("resume", False)))


ENDPOINTS: dict[str, Endpoint] = {
    "vmm.ping": Endpoint("GET", lambda vmm, _: vmm.ping()),
    "vmm.shutdown": Endpoint("PUT", lambda vmm, _: vmm.shutdown_vmm()),
    "vm.create": Endpoint("PUT", _create, takes_body=True),
    "vm.boot": Endpoint("PUT", lambda vmm, _: vmm.boot()),
    "vm.pause": Endpoint("PUT", lambda vmm, _: vmm.pause()),
    "vm.resume": Endpoint("PUT", lambda vmm, _: vmm.resume()),
    "vm.reboot": Endpoint("PUT", lambda vmm, _: vmm.reboot()),
    "vm.shutdown": Endpoint("PUT", lambda vmm, _: vmm.shutdown()),
    "vm.delete": Endpoint("PUT", lambda vmm, _: vmm.delete()),
    "vm.power-button": Endpoint("PUT", lambda vmm, _: vmm.power_button()),
    "vm.info": Endpoint("GET", lambda vmm, _: vmm.info()),
    "vm.send-migration": Endpoint("PUT", _send_migration, takes_body=True),
    "vm.receive-migration": Endpoint("PUT", _receive_migration, takes_body=True),
    "vm.migration-progress": Endpoint("GET", lambda vmm, _: vmm.migration_progress()),
    "vm.cancel-migration": Endpoint("PUT", lambda vmm, _: vmm.cancel_migration()),
    "vm.snapshot": Endpoint("PUT", _snapshot, takes_body=True),
    "vm.restore": Endpoint("PUT", _restore, takes_body=True),
}


def _json_default(obj: Any) -> Any:
    to_api = getattr(obj, "to_api", None)
    if callable(to_api):
        return to_api()
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


class _HttpError(Exception):
    """A protocol-level failure: answered with ``status`` and the message chain."""

    def __init__(self, status: int, *messages: str, close: bool = False, allow: str | None = None):
        super().__init__(": ".join(messages))
        self.status = status
        self.messages = list(messages)
        self.close = close
        self.allow = allow


# ------------------------------------------------------------------------------------------
# HTTP plumbing
# ------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # ch-remote looks for "HTTP/1.1" in the status line
    server_version = "vmmpy-api"
    sys_version = ""
    timeout = IDLE_TIMEOUT
    server: "_UnixHTTPServer"

    # -- connection bookkeeping -------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.owner._connection_opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._connection_closed(self.connection)

    def version_string(self) -> str:
        return self.server_version

    def address_string(self) -> str:  # Unix peers have no address
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base class name)
        log.debug("api: " + format, *args)

    # -- methods ----------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def __getattr__(self, name: str) -> Any:
        # Any other method (POST, DELETE, HEAD, ...) exists as far as http.server is concerned,
        # so it is answered 405 (or 404 for an unknown path) rather than 501.
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Used by http.server for requests it cannot parse; answer in our JSON error format.
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        messages = [phrase] + ([message] if message and message != phrase else [])
        if getattr(self, "request_version", None) in (None, "", "HTTP/0.9"):
            self.request_version = self.protocol_version  # never answer without a status line
        self.close_connection = True
        self._reply(code, json.dumps(messages).encode(), close=True)

    # -- request handling -------------------------------------------------------------------

    def _serve(self) -> None:
        owner = self.server.owner
        owner._request_started()
        try:
            try:
                status, payload = self._dispatch()
                self._reply(status, payload)
            except _HttpError as e:
                body = json.dumps(e.messages).encode()
                self._reply(e.status, body, close=e.close, allow=e.allow)
        except (BrokenPipeError, ConnectionResetError) as e:
            log.debug("api: client went away: %s", e)
            self.close_connection = True
        finally:
            owner._request_finished()

    def _dispatch(self) -> tuple[int, bytes | None]:
        path = urlsplit(self.path).path
        name = path[len(API_ROOT) :] if path.startswith(API_ROOT) else None
        endpoint = ENDPOINTS.get(name) if name else None
        if endpoint is None:
            self._drain_body()
            raise _HttpError(404, "Not Found", f"no endpoint {path}")
        if self.command != endpoint.method:
            self._drain_body()
            raise _HttpError(
                405,
                "Method Not Allowed",
                f"{name} takes {endpoint.method}, not {self.command}",
                allow=endpoint.method,
            )

        raw = self._read_body()
        parsed: Any = None
        if endpoint.takes_body:
            if not raw.strip():
                raise _HttpError(400, "Bad Request", f"{name} needs a JSON request body")
            try:
                parsed = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _HttpError(400, "Bad Request", f"request body is not valid JSON: {e}") from e
        elif raw:
            raise _HttpError(400, "Bad Request", f"{name} takes no request body")

        vmm = self.server.owner.vmm
        try:
            result = endpoint.call(vmm, parsed)
        except Exception as e:  # noqa: BLE001 - every failure becomes an HTTP answer
            status = status_for(e)
            if not isinstance(e, VmmError):
                log.exception("api: %s raised an unexpected error", name)
                detail = f"internal error: {type(e).__name__}: {e}"
            else:
                log.info("api: %s failed (%d): %s", name, status, e)
                detail = str(e)
            raise _HttpError(status, f"{name} failed", detail) from e

        if endpoint.method == "GET":
            try:
                return 200, json.dumps(result, default=_json_default).encode()
            except (TypeError, ValueError) as e:
                log.exception("api: %s returned something that is not JSON", name)
                raise _HttpError(500, f"{name} failed", f"internal error: {e}") from e
        return 204, None

    def _read_body(self) -> bytes:
        """The request body, whole (Content-Length or chunked); b"" when there is none."""
        encoding = self.headers.get("Transfer-Encoding")
        if encoding:
            if encoding.strip().lower() != "chunked":
                raise _HttpError(
                    501, "Not Implemented", f"transfer encoding {encoding!r}", close=True
                )
            return self._read_chunked()
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return b""
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError
        except ValueError:
            raise _HttpError(
                400, "Bad Request", f"bad Content-Length {length_text!r}", close=True
            ) from None
        if length > MAX_BODY:
            # Read (and drop) a moderately oversized body before answering, so the client sees
            # the 413 instead of a broken pipe while it is still sending.
            left = length if length <= DISCARD_LIMIT else 0
            while left > 0:
                got = self.rfile.read(min(left, 65536))
                if not got:
                    break
                left -= len(got)
            raise _HttpError(
                413, "Payload Too Large", f"request body over {MAX_BODY} bytes", close=True
            )
        data = self.rfile.read(length)
        if len(data) != length:
            raise _HttpError(400, "Bad Request", "request body cut short", close=True)
        return data

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _HttpError(400, "Bad Request", "malformed chunked body", close=True) from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            total += size
            if total > MAX_BODY:
                raise _HttpError(
                    413, "Payload Too Large", f"request body over {MAX_BODY} bytes", close=True
                )
            chunk = self.rfile.read(size)
            if len(chunk) != size:
                raise _HttpError(400, "Bad Request", "request body cut short", close=True)
            chunks.append(chunk)
            self.rfile.readline(16)  # the CRLF after the chunk

    def _drain_body(self) -> None:
        """Consume a body we will not use, so the next request on the connection parses."""
        try:
            self._read_body()
        except _HttpError:
            self.close_connection = True

    def _reply(
        self,
        status: int,
        body: bytes | None,
        *,
        close: bool = False,
        allow: str | None = None,
    ) -> None:
        self.send_response(status)
        if allow:
            self.send_header("Allow", allow)
        if body is not None:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
        if close:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if body is not None and self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()


class _UnixHTTPServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 32

    def __init__(self, owner: "ApiServer", address: str | None, sock: socket.socket | None):
        self.owner = owner
        if sock is None:
            super().__init__(address, _Handler, bind_and_activate=True)
        else:
            super().__init__(None, _Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("api: error while serving a connection", exc_info=True)


# ------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------


class ApiServer:
    """Serves the REST API for ``vmm`` on a Unix socket, from its own daemon thread.

    Give ``socket_path`` (a stale socket file there is replaced; a live server there is an
    error) or ``fd``, an already bound AF_UNIX stream socket (``--api-socket fd=N``, as libvirt
    passes it). The ``fd`` is taken over and closed by :meth:`close`; its path is not unlinked.
    """

    def __init__(self, vmm: Any, socket_path: str | None = None, *, fd: int | None = None):
        if (socket_path is None) == (fd is None):
            raise InvalidConfig("API server: give exactly one of a socket path or an fd")
        self.vmm = vmm
        self.socket_path = socket_path
        self.fd = fd
        self._server: _UnixHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._bound_inode: tuple[int, int] | None = None
        self._lock = threading.Condition()
        self._connections: set[socket.socket] = set()
        self._busy: dict[int, int] = {}  # thread id -> requests in progress on it
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "ApiServer":
        """Bind (in the caller's thread, so errors surface here) and start serving."""
        if self._server is not None or self._closed:
            raise VmmError("API server already started")
        if self.fd is not None:
            sock = self._adopt_fd(self.fd)
            self._server = _UnixHTTPServer(self, None, sock)
        else:
            path = self.socket_path
            assert path is not None
            self._remove_stale_socket(path)
            try:
                self._server = _UnixHTTPServer(self, path, None)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise VmmError(f"API socket {path}: in use by another server") from e
                raise VmmError(f"API socket {path}: {e.strerror or e}", e.errno) from e
            try:
                st = os.stat(path)
                self._bound_inode = (st.st_dev, st.st_ino)
            except OSError:
                self._bound_inode = None
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="vmmpy-api",
            daemon=True,
        )
        self._thread.start()
        log.info("api: serving on %s", self.socket_path or f"fd {self.fd}")
        return self

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop serving: no new connections, requests in progress get ``grace`` seconds to be
        answered, idle connections are dropped, the thread is joined and the socket file removed.
        Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        server = self._server
        if server is None:
            return
        server.shutdown()  # returns once serve_forever has left its loop
        server.server_close()
        self._unlink_socket()
        me = threading.get_ident()
        deadline = time.monotonic() + grace
        with self._lock:
            while any(n for tid, n in self._busy.items() if tid != me):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("api: closing with requests still in progress")
                    break
                self._lock.wait(remaining)
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            deadline = time.monotonic() + 1.0
            while self._connections and not self._busy_elsewhere(me):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _remove_stale_socket(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise VmmError(f"API socket {path}: {e.strerror}", e.errno) from e
        if not stat.S_ISSOCK(st.st_mode):
            raise VmmError(f"API socket {path}: exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("api: removing stale socket %s", path)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        except socket.timeout:
            raise VmmError(f"API socket {path}: in use by another server (it does not answer)")
        except OSError as e:
            raise VmmError(f"API socket {path}: {e.strerror or e}", e.errno) from e
        finally:
            probe.close()
        raise VmmError(f"API socket {path}: in use by another server")

    @staticmethod
    def _adopt_fd(fd: int) -> socket.socket:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise VmmError(f"API socket fd={fd}: {e.strerror or e}", e.errno) from e
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise VmmError(f"API socket fd={fd}: not a Unix stream socket")
        try:
            sock.listen(32)
        except OSError as e:
            sock.detach()
            raise VmmError(f"API socket fd={fd}: cannot listen: {e.strerror or e}", e.errno) from e
        return sock

    def _unlink_socket(self) -> None:
        path = self.socket_path
        if path is None or self._bound_inode is None:
            return
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == self._bound_inode:  # still ours, not a successor's
                os.unlink(path)
        except OSError:
            pass

    def _busy_elsewhere(self, me: int) -> bool:
        return any(n for tid, n in self._busy.items() if tid != me)

    def _connection_opened(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)
            closed = self._closed
        if closed:  # raced with close(): refuse politely by hanging up
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _connection_closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)
            self._lock.notify_all()

    def _request_started(self) -> None:
        tid = threading.get_ident()
        with self._lock:
            self._busy[tid] = self._busy.get(tid, 0) + 1

    def _request_finished(self) -> None:
        tid = threading.get_ident()
        with self._lock:
            left = self._busy.get(tid, 1) - 1
            if left:
                self._busy[tid] = left
            else:
                self._busy.pop(tid, None)
            self._lock.notify_all()
