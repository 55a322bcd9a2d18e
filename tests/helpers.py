"""Test helpers shared by tests/ and benches/: a serial console client and a VMM process."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmmpy.client import ApiClient

BANNER = re.compile(rb"vmmpy-testguest boot_id=([0-9a-f]{16}) cpus=(\d+) mem_mib=(\d+)\r?\n")


def connect_unix(path: str, timeout: float) -> socket.socket:
    """A stream socket connected to `path`, retried until the server listens there (or raises
    after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SerialClient:
    """A client on a VMM's console socket: reads guest output, types commands."""

    def __init__(self, path: str, timeout: float = 60.0):
        self.sock = connect_unix(path, timeout)
        self.buf = b""
        self.pos = 0  # what expect() has consumed
        self._lock = threading.Lock()

    def _fill(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return True
        if not data:
            return False
        self.buf += data
        return True

    def expect(self, pattern: bytes | str, timeout: float = 60.0) -> re.Match:
        """Waits for `pattern` in output not yet consumed; consumes up to the end of the match."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(min(left, 0.5)):
                tail = self.buf[self.pos :][-2000:]
                raise AssertionError(f"serial: {pattern!r} not seen in {timeout}s; unconsumed output: {tail!r}")

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def command(self, line: str, answer: bytes | str, timeout: float = 60.0) -> re.Match:
        self.send(line)
        return self.expect(answer, timeout)

    def wait_dirty_pass(self, timeout: float = 90.0) -> None:
        """After `dirty`: polls `status` until every vCPU has swept its whole share at least once
        since this call (its generation is two above the highest one seen at the start)."""
        status = rb"STATUS .* dirty=on mib=\d+ gen=(\d+) min_gen=(\d+)\r\n"
        start = int(self.command("status", status).group(1))
        deadline = time.monotonic() + timeout
        while int(self.command("status", status).group(2)) < start + 2:
            assert time.monotonic() < deadline, "the dirty workload makes no progress"
            time.sleep(0.02)

    def wait_ready(self, timeout: float = 90.0) -> tuple[str, int]:
        m = self.expect(BANNER, timeout)
        self.expect(rb"READY\r?\n", timeout)
        return m.group(1).decode(), int(m.group(2))

    def close(self) -> None:
        self.sock.close()


def raw_exchange(path: str, request: bytes, sock: socket.socket | None = None):
    """Send `request` and read the answer the way ch-remote's client does: up to the end of the
    headers, then Content-Length bytes if there is such a header. Returns (status, headers, body)."""
    own = sock is None
    if own:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(path)
    try:
        sock.sendall(request)
        res = b""
        body_offset = content_length = None
        while True:
            chunk = sock.recv(256)
            if not chunk:
                break
            res += chunk
            end = res.find(b"\r\n\r\n")
            if end >= 0:
                body_offset = end + 4
                m = re.search(rb"Content-Length: (\d+)\r", res[:body_offset])
                content_length = int(m.group(1)) if m else None
                if content_length is None:
                    break
            if body_offset is not None and content_length is not None:
                if len(res) >= body_offset + content_length:
                    break
        head = res[:body_offset].decode()
        status_line, *header_lines = head.strip().split("\r\n")
        assert status_line.startswith("HTTP/1.1 "), status_line  # ch-remote insists on HTTP/1.1
        headers = dict(line.split(": ", 1) for line in header_lines)
        return int(status_line.split()[1]), headers, res[body_offset:]
    finally:
        if own:
            sock.close()


def guest_answers(serial: SerialClient, text: str) -> None:
    """The guest echoes `text` (it runs and its console works)."""
    serial.command(f"echo {text}", f"{text}\r\n".encode(), timeout=20)


def int3_elf() -> bytes:
    """A minimal ELF64 kernel whose entry point is `int3` in CPL0: on kvm_pvm the VM goes to vmmpy's
    Error state at once and stays there, spending no CPU."""
    code = b"\xcc\xeb\xfe"
    entry = 0x100000
    ehdr = struct.pack("<4s5B7x2HI3QI6H", b"\x7fELF", 2, 1, 1, 0, 0, 2, 0x3E, 1, entry, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<2I6Q", 1, 5, 0x1000, entry, entry, len(code), len(code), 0x1000)
    image = ehdr + phdr
    return image + b"\0" * (0x1000 - len(image)) + code


class VmmProcess:
    """A `vmmpy` process with an API socket, a console socket and an event monitor file."""

    def __init__(self, tmp: Path, name: str, *args: str, hooks: str = "", netns: str | None = None):
        self.tmp = tmp
        self.api_path = str(tmp / f"{name}.api")
        self.serial_path = str(tmp / f"{name}.serial")
        self.events_path = str(tmp / f"{name}.events")
        self.log_path = tmp / f"{name}.log"
        cmd = [
            sys.executable,
            "-m",
            "vmmpy.cli",
            "--api-socket",
            self.api_path,
            "--serial",
            f"socket={self.serial_path}",
            "--event-monitor",
            f"path={self.events_path}",
            *args,
        ]
        if hooks:
            cmd += ["--test-hooks", hooks]
        if netns is not None:  # another "host": its own network namespace (the files are shared)
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.api = ApiClient(self.api_path)
        deadline = time.monotonic() + 90
        while not os.path.exists(self.api_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"vmmpy did not start: {self.log_path.read_text()}")
            time.sleep(0.02)
        self._serial: SerialClient | None = None

    @property
    def serial(self) -> SerialClient:
        if self._serial is None:
            self._serial = SerialClient(self.serial_path)
        return self._serial

    def events(self) -> list[dict]:
        try:
            text = Path(self.events_path).read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def event_names(self) -> list[str]:
        return [f"{e['source']}.{e['event']}" for e in self.events()]

    def wait_event(self, name: str, count: int = 1, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while self.event_names().count(name) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"event {name} x{count} not seen; events: {self.event_names()}")
            time.sleep(0.02)

    def wait_exit(self, timeout: float = 90.0) -> int:
        return self.proc.wait(timeout)

    def ram_memfds(self) -> int:
        """Guest RAM memfds mapped in the process (shared RAM: one per region, private: none)."""
        with open(f"/proc/{self.proc.pid}/maps") as maps:
            return sum("memfd:vmmpy-ram" in line for line in maps)

    def close(self) -> None:
        if self._serial is not None:
            self._serial.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def vmm_process(tmp_path):
    made: list[VmmProcess] = []

    def start(*args: str, name: str = "vmm", hooks: str = "", netns: str | None = None) -> VmmProcess:
        p = VmmProcess(tmp_path, name, *args, hooks=hooks, netns=netns)
        made.append(p)
        return p

    yield start
    for p in made:
        p.close()


@pytest.fixture
def guest_vmm(tmp_path):
    """An in-process Vmm with its console on a socket, and a connected SerialClient."""
    from vmmpy import Vmm
    from vmmpy.config import SerialConfig, VmConfig

    made = []

    def start(vcpus: int = 1, memory_mib: int = 128, boot_protocol: str | None = None, disks=(), **kw):
        path = str(tmp_path / f"serial{len(made)}.sock")
        vmm = Vmm(serial=SerialConfig(mode="Socket", socket=path), **kw)
        serial = SerialClient(path)
        vmm.create(VmConfig(memory_mib=memory_mib, vcpus=vcpus, boot_protocol=boot_protocol, disks=list(disks)))
        vmm.boot()
        made.append((vmm, serial))
        return vmm, serial

    yield start
    for vmm, serial in made:
        serial.close()
        vmm.close()


def native_vm(fds: list[int], console, memory_mib: int = 64, vcpus: int = 1, kernel=None, **extra):
    """A native VM of the test guest (or `kernel`) on `console`, with `fds` as its reset,
    guest-exit and error eventfds, for tests below the Python VMM; `extra` goes to _native.Vm
    as it is (restore, disks, ...)."""
    from vmmpy import _native

    return _native.Vm(
        memory_size=memory_mib << 20,
        vcpus=vcpus,
        kernel=kernel,
        initramfs=None,
        cmdline="console=ttyS0",
        console=console,
        reset_fd=fds[0],
        guest_exit_fd=fds[1],
        error_fd=fds[2],
        **extra,
    )
