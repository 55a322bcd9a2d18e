"""Helpers for migration tests: a source and a destination VMM process and the calls between them."""

from __future__ import annotations

import os
import threading
import time

from helpers import VmmProcess
from vmmpy.migration.protocol import HEADER, Command


def start_receive(dst: VmmProcess, url: str, **options) -> threading.Thread:
    """PUT vm.receive-migration on `dst` (it answers only at the end) and waits until it listens."""
    result: dict = {}

    def call():
        try:
            result["answer"] = dst.api.request("PUT", "/api/v1/vm.receive-migration", {"receiver_url": url, **options})
        except OSError as e:  # the destination was killed or shut down: the test checks that itself
            result["answer"] = (None, str(e))

    seen = dst.event_names().count("vm.migration-receive-ready")
    t = threading.Thread(target=call, daemon=True)
    t.result = result
    t.start()
    deadline = time.monotonic() + 90
    while True:
        answered = not t.is_alive()  # before the look at the events: an answer follows its ready event
        if dst.event_names().count("vm.migration-receive-ready") > seen:
            break
        assert not answered, f"vm.receive-migration answered before it listened: {result['answer']}"
        assert time.monotonic() < deadline, f"not listening within 90 s; events: {dst.event_names()}"
        time.sleep(0.02)
    return t


def send(src: VmmProcess, url: str, **options) -> None:
    status, body = src.api.request("PUT", "/api/v1/vm.send-migration", {"destination_url": url, **options})
    assert status == 204, (status, body)


def progress(vmm: VmmProcess) -> dict:
    status, body = vmm.api.request("GET", "/api/v1/vm.migration-progress")
    assert status == 200, (status, body)
    return body


def wait_progress(vmm: VmmProcess, pred, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        p = progress(vmm)
        if pred(p):
            return p
        assert time.monotonic() < deadline, f"progress never matched: {p}"
        time.sleep(0.01)


def url_for(kind: str, tmp, port: int) -> str:
    return f"tcp:127.0.0.1:{port}" if kind == "tcp" else f"unix:{tmp}/mig.sock"


# Below the kernel's ephemeral range (32768-60999), where no outgoing connection takes a port, and
# a block of 100 per test process: test runs side by side (several worktrees) rarely pick the same
# port between the check here and the destination's listen.
_next_port = [10000 + os.getpid() % 200 * 100]


def free_port() -> int:
    import socket

    while True:
        _next_port[0] += 1
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", _next_port[0]))
            return _next_port[0]
        except OSError:
            continue
        finally:
            s.close()


def trickled_start_answer(s) -> tuple[int | None, bytes]:
    """Sends a Start header announcing 1000 bytes on `s`, then a byte of them a second (a TLS
    socket: a record a second), until the peer answers; that answer (`read_response`)."""
    s.sendall(HEADER.pack(Command.START, 0, 0, 1000))
    stop = threading.Event()

    def trickle():
        while not stop.wait(1.0):
            try:
                s.sendall(b" ")
            except OSError:
                return

    t = threading.Thread(target=trickle)
    t.start()
    try:
        return read_response(s)
    finally:
        stop.set()
        t.join()


def read_response(s) -> tuple[int | None, bytes]:
    """One raw protocol response (status, payload) from socket `s`; (None, b"") if the peer closed
    the connection before a header, a shorter payload if it closed inside one."""
    head = b""
    while len(head) < HEADER.size:
        chunk = s.recv(HEADER.size - len(head))
        if not chunk:
            return None, b""
        head += chunk
    status, _, _, length = HEADER.unpack(head)
    body = b""
    while len(body) < length:
        chunk = s.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return status, body
