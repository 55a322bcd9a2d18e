"""vmmpy's HTTP/1.1 server: h11 framing on a listening Unix stream socket, with every resource a
client can make it hold bounded.

Framing (request line, headers, Content-Length, chunked bodies, keep-alive, pipelining) is h11's:
it refuses what RFC 9112 says a server must refuse (conflicting Content-Length headers, bad chunk
sizes, obsolete line folding, oversized heads). This module adds the I/O and the bounds.

One selector thread owns every connection: it accepts, reads, feeds h11 and writes answers. A
complete request goes to a fixed pool of worker threads (a VMM call may block, a receive-migration
until the migration has arrived); while it is there, its connection is not read. Bounds:

* at most ``max_connections`` connections are served. When that many are open, the one idle the
  longest (no request in progress, quiet for ``evict_idle_s``) is closed to make room; if none is,
  the newcomer is *refused*: up to ``max_refusing`` such connections are read until their request
  head (or for ``refuse_wait_s``) and answered ``503`` with a JSON message; beyond that a
  connection is closed at once.
* request heads are at most h11's 16 KiB, bodies at most ``max_body`` (``413``).
* a connection quiet for ``idle_timeout_s`` is closed, whatever it was doing.
* ``workers`` threads run handlers; every connection has at most one request with them.

Answers look like Cloud Hypervisor's (micro_http): the status line has no reason phrase
(``HTTP/1.1 200 ``, which ch-remote parses as a number), error bodies are JSON arrays of strings.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable

import h11

log = logging.getLogger("vmmpy.http")

SERVER_NAME = "vmmpy"
#: h11's limit on an incomplete request head (and chunk header), in bytes.
MAX_HEAD = 16 << 10


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Reply:
    status: int
    body: bytes | None = None  # JSON, or None for no body
    headers: list[tuple[str, str]] = field(default_factory=list)


def error_reply(status: int, *messages: str, headers: list[tuple[str, str]] | None = None) -> Reply:
    """An error answer in Cloud Hypervisor's shape: a JSON array of messages, outermost first."""
    return Reply(status, json.dumps(list(messages)).encode(), headers or [])


@dataclass(frozen=True)
class Limits:
    max_connections: int = 64
    max_refusing: int = 64
    workers: int = 8
    max_body: int = 1 << 20
    idle_timeout_s: float = 60.0
    evict_idle_s: float = 5.0
    refuse_wait_s: float = 2.0
    linger_s: float = 1.0


class _Conn:
    """One accepted connection; touched only by the selector thread."""

    def __init__(self, sock: socket.socket, refusing: bool, now: float):
        self.sock = sock
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.refusing = refusing
        self.opened = now
        self.active = now  # last byte in or out
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.busy = False  # its request is with a worker
        self.out = bytearray()
        self.closing = False  # answered for the last time: flush, half-close, drain, close
        self.linger_until: float | None = None
        self.events = 0  # what the selector watches for

    def fileno(self) -> int:
        return self.sock.fileno()


class HttpServer:
    """Serves ``handler(Request) -> Reply`` on ``listener`` (bound and listening, taken over and
    closed by :meth:`close`) from its own thread. ``handler`` runs on a worker thread."""

    def __init__(self, listener: socket.socket, handler: Callable[[Request], Reply], limits: Limits = Limits()):
        self.limits = limits
        self._handler = handler
        self._listener = listener
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_fd, selectors.EVENT_READ, None)
        self._listening = True
        self._conns: set[_Conn] = set()
        self._done: queue.SimpleQueue = queue.SimpleQueue()  # (conn, Reply) from workers
        self._workers = concurrent.futures.ThreadPoolExecutor(limits.workers, thread_name_prefix="vmmpy-api")
        self._worker_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop_at: float | None = None  # close(): busy requests may finish until then
        self._thread = threading.Thread(target=self._run, name="vmmpy-http", daemon=True)

    def start(self) -> "HttpServer":
        self._thread.start()
        return self

    def close(self, grace: float) -> None:
        """No new connections; requests with a worker get ``grace`` seconds to be answered; then
        every connection is closed and the thread joined. From a handler, returns without waiting
        (its own answer is still to go out)."""
        with self._lock:
            if self._stop_at is None:
                self._stop_at = time.monotonic() + grace
        self._wake()
        if threading.get_ident() in self._worker_ids or threading.current_thread() is self._thread:
            return
        self._thread.join(grace + 5.0)

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    # ---- the selector thread -----------------------------------------------------------------

    def _wake(self) -> None:
        # Under the lock: a worker finishing after the loop ended must not write to the closed
        # eventfd's number, which the process may have reused.
        with self._lock:
            if self._wake_fd >= 0:
                os.eventfd_write(self._wake_fd, 1)

    def _run(self) -> None:
        try:
            while True:
                now = time.monotonic()
                if self._stop_at is not None and self._stopping(now):
                    return
                for key, mask in self._selector.select(self._next_deadline(now)):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.data is None:
                        try:
                            os.eventfd_read(self._wake_fd)
                        except BlockingIOError:
                            pass
                    else:
                        conn = key.data
                        if mask & selectors.EVENT_WRITE:
                            self._flush(conn)
                        if mask & selectors.EVENT_READ and conn in self._conns:
                            self._on_readable(conn)
                self._collect_replies()
                self._sweep(time.monotonic())
        except Exception:  # noqa: BLE001 - a bug here must not leave clients hanging silently
            log.exception("http: the server loop failed")
        finally:
            self._shutdown()

    def _stopping(self, now: float) -> bool:
        """close() was called: stop listening, drop what is idle; True once nothing is left."""
        if self._listening:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listening = False
        self._collect_replies()
        for conn in list(self._conns):
            if not conn.busy and not conn.out:
                self._close(conn)
        return not self._conns or now >= self._stop_at

    def _shutdown(self) -> None:
        for conn in list(self._conns):
            self._close(conn)
        if self._listening:
            self._listener.close()
            self._listening = False
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._selector.close()
        with self._lock:
            os.close(self._wake_fd)
            self._wake_fd = -1

    def _next_deadline(self, now: float) -> float:
        timeout = 1.0
        if self._stop_at is not None:
            timeout = min(timeout, max(self._stop_at - now, 0.0), 0.1)
        return timeout

    def _accept(self) -> None:
        for _ in range(64):  # a batch, then serve the others
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # EMFILE and the like: the listener stays, try again next round
                log.warning("http: accept failed: %s", e)
                return
            sock.setblocking(False)
            now = time.monotonic()
            served = sum(1 for c in self._conns if not c.refusing)
            if served >= self.limits.max_connections and not self._evict_one(now):
                refusing = len(self._conns) - served
                if refusing >= self.limits.max_refusing:
                    log.info("http: connection limit reached; closing a new connection")
                    sock.close()
                    continue
                conn = _Conn(sock, True, now)
            else:
                conn = _Conn(sock, False, now)
            self._conns.add(conn)
            self._update(conn)

    def _evict_one(self, now: float) -> bool:
        """Closes the longest idle served connection quiet for evict_idle_s; True if there was one."""
        idle = [
            c
            for c in self._conns
            if not c.refusing
            and not c.busy
            and not c.out
            and not c.closing
            and c.h11.their_state is h11.IDLE
            and now - c.active >= self.limits.evict_idle_s
        ]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.active)
        log.info("http: connection limit reached; closing the longest idle connection")
        self._close(victim)
        return True

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        conn.active = time.monotonic()
        if conn.closing:  # draining after the last answer
            if not data:
                self._close(conn)
            return
        try:
            conn.h11.receive_data(data)
        except RuntimeError:  # bytes after an EOF cannot happen on a stream; be safe anyway
            self._close(conn)
            return
        self._process(conn)

    def _process(self, conn: _Conn) -> None:
        """Runs h11 over what has arrived until a request is complete or more bytes are needed."""
        while not conn.busy and not conn.closing and conn in self._conns:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint  # 400, 431 (head too large) or 501 (transfer coding)
                self._answer_and_close(conn, error_reply(status, HTTPStatus(status).phrase, str(e)))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                self._update(conn)
                return
            if isinstance(event, h11.Request):
                conn.request, conn.body = event, bytearray()
                if conn.refusing:
                    self._refuse(conn)
                    return
                length = _content_length(event)
                if length is not None and length > self.limits.max_body:
                    self._too_large(conn)
                    return
                if conn.h11.they_are_waiting_for_100_continue:
                    self._queue(conn, h11.InformationalResponse(status_code=100, headers=[], reason=b""))
            elif isinstance(event, h11.Data):
                conn.body += event.data
                if len(conn.body) > self.limits.max_body:
                    self._too_large(conn)
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch(conn)
                return
            elif isinstance(event, h11.ConnectionClosed):
                self._close(conn)
                return

    def _dispatch(self, conn: _Conn) -> None:
        req = conn.request
        request = Request(
            req.method.decode("ascii", "replace"),
            req.target.decode("ascii", "replace"),
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers],
            bytes(conn.body),
        )
        conn.busy = True
        conn.body = bytearray()
        self._update(conn)
        try:
            self._workers.submit(self._work, conn, request)
        except RuntimeError:  # the pool is shut down: close() is under way
            conn.busy = False
            self._answer_and_close(conn, error_reply(503, "Service Unavailable", "the API server is closing"))

    def _work(self, conn: _Conn, request: Request) -> None:
        self._worker_ids.add(threading.get_ident())
        try:
            reply = self._handler(request)
        except Exception as e:  # noqa: BLE001 - the handler's bug still gets an answer
            log.exception("http: handler failed")
            reply = error_reply(500, "Internal Server Error", f"{type(e).__name__}: {e}")
        self._done.put((conn, reply))
        self._wake()

    def _collect_replies(self) -> None:
        while True:
            try:
                conn, reply = self._done.get_nowait()
            except queue.Empty:
                return
            conn.busy = False
            if conn in self._conns:
                self._respond(conn, reply)

    # ---- answers -------------------------------------------------------------------------------

    def _refuse(self, conn: _Conn) -> None:
        self._answer_and_close(
            conn,
            error_reply(
                503,
                "Service Unavailable",
                f"the API server is serving its limit of {self.limits.max_connections} connections; retry later",
            ),
        )

    def _too_large(self, conn: _Conn) -> None:
        self._answer_and_close(
            conn, error_reply(413, "Payload Too Large", f"request body over {self.limits.max_body} bytes")
        )

    def _answer_and_close(self, conn: _Conn, reply: Reply) -> None:
        reply.headers.append(("Connection", "close"))
        self._respond(conn, reply)
        conn.closing = True
        self._update(conn)

    def _respond(self, conn: _Conn, reply: Reply) -> None:
        headers = [("Server", SERVER_NAME), *reply.headers]
        if reply.body is not None:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(reply.body)))]
        try:
            self._queue(conn, h11.Response(status_code=reply.status, headers=headers, reason=b""))
            if reply.body:
                self._queue(conn, h11.Data(data=reply.body))
            self._queue(conn, h11.EndOfMessage())
        except h11.LocalProtocolError as e:  # this connection cannot take an answer any more
            log.debug("http: cannot answer: %s", e)
            self._close(conn)
            return
        self._flush(conn)

    def _queue(self, conn: _Conn, event: h11.Event) -> None:
        data = conn.h11.send(event)
        if data:
            conn.out += data

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except BlockingIOError:
                break
            except OSError:
                self._close(conn)
                return
            del conn.out[:sent]
            conn.active = time.monotonic()
        if not conn.out and not conn.busy:
            self._after_answer(conn)
        if conn in self._conns:
            self._update(conn)

    def _after_answer(self, conn: _Conn) -> None:
        """The answer is out: next request on a kept-alive connection, or an orderly close."""
        h = conn.h11
        if conn.closing or h.our_state is h11.MUST_CLOSE or h.their_state in (h11.MUST_CLOSE, h11.CLOSED):
            if conn.linger_until is None:
                conn.closing = True
                conn.linger_until = time.monotonic() + self.limits.linger_s
                try:
                    conn.sock.shutdown(socket.SHUT_WR)  # the client reads our answer, then EOF
                except OSError:
                    self._close(conn)
            return
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
            conn.request = None
            self._process(conn)  # a pipelined request may be buffered already

    def _update(self, conn: _Conn) -> None:
        """Watch for what the connection waits on: bytes to read unless a worker has its request
        (so a client cannot pile up pipelined requests), room to write while an answer is queued."""
        if conn not in self._conns:
            return
        events = 0 if conn.busy else selectors.EVENT_READ
        if conn.out:
            events |= selectors.EVENT_WRITE
        if events == conn.events:
            return
        if conn.events == 0:
            self._selector.register(conn.sock, events, conn)
        elif events == 0:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _sweep(self, now: float) -> None:
        limits = self.limits
        for conn in list(self._conns):
            if conn.busy:
                continue
            if conn.linger_until is not None:
                if now >= conn.linger_until:
                    self._close(conn)
            elif conn.refusing and now - conn.opened >= limits.refuse_wait_s:
                self._refuse(conn)
            elif now - conn.active >= limits.idle_timeout_s:
                log.debug("http: closing a connection idle for %.0f s", now - conn.active)
                self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if conn not in self._conns:
            return
        self._conns.discard(conn)
        if conn.events:
            self._selector.unregister(conn.sock)
            conn.events = 0
        conn.sock.close()


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # h11 has checked it is one valid number
    return None
