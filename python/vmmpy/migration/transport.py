"""Migration transports: `tcp:<host>:<port>` and `unix:<path>` URLs, as Cloud Hypervisor spells them,
and mutual TLS on tcp connections (`tls_dir`, docs/tls.md)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from .. import _native, unix_socket
from ..errors import InvalidConfig, MigrationError
from .protocol import Connection, set_timeouts

IO_TIMEOUT_S = 30.0  # a peer that stops answering for this long is gone
HANDSHAKE_TIMEOUT_S = 5.0  # for a new source's TLS handshake, then again for its Start and Config
BACKLOG = 64  # sources that may wait for accept(): each then gets an answer (busy, if one is served)


@dataclass(frozen=True)
class Url:
    kind: str  # "tcp" | "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        return f"tcp:{self.host}:{self.port}" if self.kind == "tcp" else f"unix:{self.path}"


def parse_url(url: str) -> Url:
    if url.startswith("tcp:"):
        host, sep, port = url[4:].rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidConfig(f"migration URL {url!r}: expected tcp:<host>:<port>")
        return Url("tcp", host=host.strip("[]"), port=int(port))
    if url.startswith("unix:"):
        path = url[5:]
        if not path:
            raise InvalidConfig(f"migration URL {url!r}: expected unix:<path>")
        return Url("unix", path=path)
    raise InvalidConfig(f"migration URL {url!r}: expected tcp:<host>:<port> or unix:<path>")


def _tune(sock: socket.socket, timeout_s: float = IO_TIMEOUT_S) -> None:
    sock.setblocking(True)
    # Unix sockets get large buffers; TCP gets TCP_NODELAY (a request's header and payload must
    # not wait on Nagle) and keeps the kernel's autotuned buffers, which measured as fast.
    _native.tune_socket(sock.fileno())
    set_timeouts(sock, timeout_s, timeout_s)


def tls_context(tls_dir: str | None, url: Url, role: str):
    """The _native.TlsContext of `tls_dir` for `role` ("client" / "server"), or None without one.
    Bad or missing files are an InvalidConfig naming them."""
    if tls_dir is None:
        return None
    if url.kind != "tcp":
        raise InvalidConfig("tls_dir needs a tcp: URL (a unix socket never leaves the host)")
    return _native.TlsContext(tls_dir, role)


def secure(sock: socket.socket, tls, server_name: str = "") -> Connection:
    """The connection on `sock`: plaintext without `tls`, else after a mutual TLS handshake (the
    client checks that the server's certificate names `server_name`). A failed handshake closes
    `sock` and raises MigrationError."""
    if tls is None:
        return Connection(sock)
    try:
        channel = tls.handshake(sock.fileno(), HANDSHAKE_TIMEOUT_S, server_name)
    except BaseException:
        sock.close()
        raise
    return Connection(sock, channel)


def connect(url: Url, timeout: float = 10.0) -> socket.socket:
    if url.kind == "tcp":
        try:
            sock = socket.create_connection((url.host, url.port), timeout=timeout)
        except OSError as e:
            raise MigrationError(f"cannot connect to {url}: {e.strerror or e}", e.errno) from None
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(url.path)
        except OSError as e:
            sock.close()
            raise MigrationError(f"cannot connect to {url}: {e.strerror or e}", e.errno) from None
    _tune(sock)
    return sock


def listen(url: Url) -> socket.socket:
    if url.kind == "tcp":
        family = socket.AF_INET6 if ":" in url.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        address: object = (url.host, url.port)
    else:
        return unix_socket.listen(url.path, BACKLOG, "migration socket")
    try:
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise InvalidConfig(f"cannot listen on {url}: {e.strerror or e}", e.errno) from None
    return sock


def accept(listener: socket.socket) -> socket.socket:
    """The next source, with the short handshake timeout (raise it once its Config is accepted)."""
    conn, _ = listener.accept()
    _tune(conn, HANDSHAKE_TIMEOUT_S)
    return conn
