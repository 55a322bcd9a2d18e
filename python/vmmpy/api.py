"""vmmpy's REST API: Cloud Hypervisor's HTTP API, over a Unix socket.

Paths, methods, bodies and status codes follow Cloud Hypervisor's OpenAPI description and its
server for every endpoint vmmpy implements, so ``ch-remote`` and libvirt's CH driver can drive
vmmpy. vmmpy's own description is ``openapi/vmmpy.yaml``. The HTTP side (framing, bounds) is
:mod:`vmmpy.httpserver`.

Status codes
------------
Success: ``200`` with a JSON body (the GETs), ``204`` without one (all PUTs).

Errors raised by the VMM are mapped by :data:`ERROR_STATUS` (the one table; first match wins):

=====================  ======  ==============================================================
exception              status  why
=====================  ======  ==============================================================
VmNotCreated           404     CH: "not created"
VmMigrating            409     the VM is owned by a migration; retry later (CH itself: 500)
InvalidState           405/500 the VM's state does not allow the request: the endpoint's
                               ``wrong_state`` status, 405 where CH's spec documents 405 for
                               it, else 500 as CH's server answers
InvalidConfig          400     a body vmmpy cannot honour (CH: 400 for config validation)
PayloadError           400     kernel/initramfs/command line that cannot be loaded
PauseTimeout           500     the vCPUs did not stop in time; the request failed inside
KvmError               500     a host call failed
VmmShutDown            503     the VMM's control loop has ended
VmmError (other)       500
any other exception    500     a bug; logged with its traceback
=====================  ======  ==============================================================

Protocol errors: unknown path ``404``; known path, wrong method ``405`` (with ``Allow``; CH
answers 400 here); a body that is not JSON (or nested deeper than :data:`MAX_JSON_DEPTH`, or with
an integer over Python's digit limit), a body sent to an endpoint that takes none, or no body
for an endpoint that needs one ``400``; framing errors ``400`` (h11); body over 1 MiB ``413``;
more connections than the server serves ``503``.

Every error response has a JSON body like Cloud Hypervisor's: an array of strings from the
outermost description to the root cause, e.g. ``["vm.pause failed", "VM is not running"]``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from vmmpy.config import VmConfig, read_request_body
from vmmpy.errors import (
    InvalidConfig,
    InvalidState,
    KvmError,
    MigrationError,
    PauseTimeout,
    PayloadError,
    VmMigrating,
    VmmError,
    VmmShutDown,
    VmNotCreated,
)
from vmmpy.httpserver import HttpServer, Limits, Reply, Request, error_reply
from vmmpy import unix_socket

log = logging.getLogger("vmmpy.api")

API_ROOT = "/api/v1/"  # Cloud Hypervisor's; the client (vmmpy.client) takes it from here
MAX_BODY = 1 << 20
#: Deepest JSON nesting a request body may have (CH's bodies need 4); deeper is refused before
#: parsing, so no parser or later walk over the value can recurse without bound.
MAX_JSON_DEPTH = 32
#: How long :meth:`ApiServer.close` lets requests in progress finish before cutting them off.
CLOSE_GRACE = 5.0
#: Connections served at once; more are answered 503 (see vmmpy.httpserver).
MAX_CONNECTIONS = 64

# The one exception → status table. Order matters: subclasses before their bases. None: the
# endpoint's own wrong_state status.
ERROR_STATUS: tuple[tuple[type[BaseException], int | None], ...] = (
    (VmNotCreated, 404),
    (VmMigrating, 409),
    (InvalidState, None),
    (InvalidConfig, 400),
    (PayloadError, 400),
    (PauseTimeout, 500),
    (MigrationError, 500),
    (KvmError, 500),
    (VmmShutDown, 503),
    (VmmError, 500),
)


# ------------------------------------------------------------------------------------------
# Endpoints
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    method: str  # "GET" or "PUT"
    call: Callable[[Any, Any], Any]  # (vmm, parsed body) -> JSON-able result or None
    takes_body: bool = False  # True: a JSON body is required; False: no body allowed
    #: Status for InvalidState: 405 where CH's spec documents it for this endpoint, else 500
    #: (what CH's server answers for every wrong-state error).
    wrong_state: int = 500


def status_for(exc: BaseException, endpoint: Endpoint | None = None) -> int:
    """The HTTP status for an exception raised while serving a request to ``endpoint``."""
    for cls, status in ERROR_STATUS:
        if isinstance(exc, cls):
            if status is None:
                return endpoint.wrong_state if endpoint is not None else 500
            return status
    return 500


def _create(vmm: Any, body: Any) -> None:
    vmm.create(VmConfig.from_api(body))


def _send_migration(vmm: Any, body: Any) -> None:
    vmm.send_migration(**read_request_body("SendMigrationData", body))


def _receive_migration(vmm: Any, body: Any) -> None:
    """Blocks until a migration completed here, as Cloud Hypervisor's does."""
    handle = vmm.receive_migration(**read_request_body("ReceiveMigrationData", body))
    if not handle.wait():
        raise MigrationError(f"no migration was received: {handle.receiver.last_error or 'receive stopped'}")


def _snapshot(vmm: Any, body: Any) -> None:
    vmm.snapshot(**read_request_body("VmSnapshotConfig", body))


def _restore(vmm: Any, body: Any) -> None:
    vmm.restore(**read_request_body("RestoreConfig", body))


ENDPOINTS: dict[str, Endpoint] = {
    "vmm.ping": Endpoint("GET", lambda vmm, _: vmm.ping()),
    "vmm.shutdown": Endpoint("PUT", lambda vmm, _: vmm.shutdown_vmm()),
    "vm.create": Endpoint("PUT", _create, takes_body=True),
    "vm.boot": Endpoint("PUT", lambda vmm, _: vmm.boot()),
    "vm.pause": Endpoint("PUT", lambda vmm, _: vmm.pause(), wrong_state=405),
    "vm.resume": Endpoint("PUT", lambda vmm, _: vmm.resume(), wrong_state=405),
    "vm.reboot": Endpoint("PUT", lambda vmm, _: vmm.reboot(), wrong_state=405),
    "vm.shutdown": Endpoint("PUT", lambda vmm, _: vmm.shutdown(), wrong_state=405),
    "vm.delete": Endpoint("PUT", lambda vmm, _: vmm.delete()),
    "vm.power-button": Endpoint("PUT", lambda vmm, _: vmm.power_button(), wrong_state=405),
    "vm.info": Endpoint("GET", lambda vmm, _: vmm.info()),
    "vm.counters": Endpoint("GET", lambda vmm, _: vmm.counters()),
    "vm.send-migration": Endpoint("PUT", _send_migration, takes_body=True),
    "vm.receive-migration": Endpoint("PUT", _receive_migration, takes_body=True),
    "vm.migration-progress": Endpoint("GET", lambda vmm, _: vmm.migration_progress()),
    "vm.cancel-migration": Endpoint("PUT", lambda vmm, _: vmm.cancel_migration()),
    "vm.snapshot": Endpoint("PUT", _snapshot, takes_body=True, wrong_state=405),
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
    """A request that is answered with ``status`` and the message chain."""

    def __init__(self, status: int, *messages: str, allow: str | None = None):
        super().__init__(": ".join(messages))
        self.reply = error_reply(status, *messages, headers=[("Allow", allow)] if allow else None)


def json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether the JSON text nests arrays/objects deeper than ``limit`` (brackets inside strings
    do not count). A linear scan that stops at the first level too deep."""
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_body(raw: bytes) -> Any:
    """A request body as JSON, or a 400 saying why not (never a recursion or digit-limit error)."""
    if json_depth_exceeds(raw, MAX_JSON_DEPTH):
        raise _HttpError(400, "Bad Request", f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:  # the depth check makes this unreachable; belt and braces
        raise _HttpError(400, "Bad Request", "request body nests too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, int digit limit, NaN
        raise _HttpError(400, "Bad Request", f"request body is not valid JSON: {e}") from None


def handle(vmm: Any, request: Request) -> Reply:
    """One API request → its answer (runs on an HTTP worker thread)."""
    try:
        return _dispatch(vmm, request)
    except _HttpError as e:
        return e.reply


def _dispatch(vmm: Any, request: Request) -> Reply:
    path = urlsplit(request.target).path
    name = path[len(API_ROOT) :] if path.startswith(API_ROOT) else None
    endpoint = ENDPOINTS.get(name) if name else None
    if endpoint is None:
        raise _HttpError(404, "Not Found", f"no endpoint {path}")
    if request.method != endpoint.method:
        raise _HttpError(
            405, "Method Not Allowed", f"{name} takes {endpoint.method}, not {request.method}", allow=endpoint.method
        )
    parsed: Any = None
    if endpoint.takes_body:
        if not request.body.strip():
            raise _HttpError(400, "Bad Request", f"{name} needs a JSON request body")
        parsed = parse_json_body(request.body)
    elif request.body:
        raise _HttpError(400, "Bad Request", f"{name} takes no request body")

    try:
        result = endpoint.call(vmm, parsed)
    except Exception as e:  # noqa: BLE001 - every failure becomes an HTTP answer
        status = status_for(e, endpoint)
        if not isinstance(e, VmmError):
            log.exception("api: %s raised an unexpected error", name)
            detail = f"internal error: {type(e).__name__}: {e}"
        else:
            log.info("api: %s failed (%d): %s", name, status, e)
            detail = str(e)
        raise _HttpError(status, f"{name} failed", detail) from e

    if endpoint.method == "GET":
        try:
            return Reply(200, json.dumps(result, default=_json_default).encode())
        except (TypeError, ValueError) as e:
            log.exception("api: %s returned something that is not JSON", name)
            raise _HttpError(500, f"{name} failed", f"internal error: {e}") from e
    return Reply(204)


# ------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------


class ApiServer:
    """Serves the REST API for ``vmm`` on a Unix socket, from its own threads.

    Give ``socket_path`` (a stale socket file there is replaced; a live server there is an
    error; the socket is created 0600, owner only, whatever the umask) or ``fd``, an already
    bound AF_UNIX stream socket (``--api-socket fd=N``, as libvirt passes it; its mode is the
    passer's business). The ``fd`` is taken over and closed by :meth:`close`; its path is not
    unlinked. ``listener``: that socket, already listening (``unix_socket.listen_at``: the
    command line binds it before its VM boots); taken over.
    """

    def __init__(
        self,
        vmm: Any,
        socket_path: str | None = None,
        *,
        fd: int | None = None,
        listener: socket.socket | None = None,
        limits: Limits | None = None,
    ):
        if (socket_path is None) == (fd is None):
            raise InvalidConfig("API server: give exactly one of a socket path or an fd")
        self.vmm = vmm
        self.socket_path = socket_path
        self.fd = fd
        self._listener = listener
        self.limits = limits or Limits(max_connections=MAX_CONNECTIONS, max_body=MAX_BODY)
        self._http: HttpServer | None = None
        self._bound_inode: tuple[int, int] | None = None
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "ApiServer":
        """Bind (in the caller's thread, so errors surface here) and start serving."""
        if self._http is not None or self._closed:
            raise VmmError("API server already started")
        sock = self._listener or unix_socket.listen_at(self.socket_path, self.fd, "API socket")
        self._listener = None
        if self.socket_path is not None:
            st = os.stat(self.socket_path)
            self._bound_inode = (st.st_dev, st.st_ino)
        self._http = HttpServer(sock, lambda request: handle(self.vmm, request), self.limits).start()
        log.info("api: serving on %s", self.socket_path or f"fd {self.fd}")
        return self

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop serving: no new connections, requests in progress get ``grace`` seconds to be
        answered, idle connections are dropped, the threads end and the socket file is removed.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._unlink_socket()
        if self._http is not None:
            self._http.close(grace)

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------------

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
