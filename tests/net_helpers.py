"""A network for virtio-net tests: a namespace with a bridge (the "switch", 10.77.0.1/24) that
joins persistent taps the VMMs open, the host's real `ping` run inside it, and a raw AF_PACKET
socket on a tap to see what the guest sent."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field

HOST_IP = "10.77.0.1"
GUEST_IP = "10.77.0.2"
GUEST_MAC = "52:54:00:4e:45:54"
ETH_P_ARP = 0x0806
ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def missing_capability() -> str | None:
    """Why this host cannot run the network tests (None: it can)."""
    if shutil.which("ip") is None:
        return "iproute2's ip command is not installed"
    if shutil.which("ping") is None:
        return "iputils' ping is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (tun driver)"
    return None


@dataclass
class Network:
    ns: str
    taps: list[str] = field(default_factory=list)

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *cmd], capture_output=True, text=True, **kw)

    def add_tap(self, name: str) -> str:
        """A persistent tap on the bridge, up (it has carrier once a VMM opens it)."""
        for args in (
            ("tuntap", "add", "dev", name, "mode", "tap"),
            ("link", "set", name, "master", "br0"),
            ("link", "set", name, "up"),
        ):
            r = _ip("-n", self.ns, *args)
            assert r.returncode == 0, f"ip {' '.join(args)}: {r.stderr}"
        self.taps.append(name)
        return name

    def in_ns(self, fn):
        """fn() run on a thread that entered the namespace (sockets it makes stay there)."""
        out: dict = {}

        def body():
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    out["error"] = OSError(ctypes.get_errno(), "setns")
                    return
            finally:
                os.close(fd)
            try:
                out["value"] = fn()
            except BaseException as e:
                out["error"] = e

        t = threading.Thread(target=body)
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    def arp_capture(self, tap: str) -> socket.socket:
        """A raw socket that receives every ARP frame through `tap`. It listens to all protocols
        (a socket bound to one protocol sees nothing a bridge port hands to its bridge), with a
        kernel filter that keeps only ARP, so the ping flood cannot fill its buffer."""

        def make():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            # Classic BPF: ldh [12]; jeq #ETH_P_ARP, keep, drop.
            prog = struct.pack(
                "HBBIHBBIHBBIHBBI", 0x28, 0, 0, 12, 0x15, 0, 1, ETH_P_ARP, 0x06, 0, 0, 0xFFFF, 0x06, 0, 0, 0
            )
            buf = ctypes.create_string_buffer(prog)
            s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", 4, ctypes.addressof(buf)))
            s.bind((tap, ETH_P_ALL))
            return s

        return self.in_ns(make)


def make_network(tag: str) -> Network:
    ns = f"vmmpy-net{tag}"
    r = _ip("netns", "add", ns)
    if r.returncode != 0:
        raise PermissionError(f"ip netns add: {r.stderr.strip()}")
    net = Network(ns)
    for args in (
        ("link", "set", "lo", "up"),
        ("link", "add", "br0", "type", "bridge"),
        ("link", "set", "br0", "up"),
        ("addr", "add", f"{HOST_IP}/24", "dev", "br0"),
    ):
        r = _ip("-n", ns, *args)
        assert r.returncode == 0, f"ip {' '.join(args)}: {r.stderr}"
    # No IPv6 chatter (router solicitations, MLD) in the guest's counters.
    net.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
    net.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
    return net


def delete_network(net: Network) -> None:
    _ip("netns", "del", net.ns)  # takes the bridge and the taps with it


def garp_seen(sock: socket.socket, ip: str, mac: str, timeout: float) -> bytes | None:
    """A gratuitous ARP (sender = target = `ip`, from `mac`) read from `sock` within `timeout`."""
    want_ip = socket.inet_aton(ip)
    want_mac = bytes.fromhex(mac.replace(":", ""))
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            frame = sock.recv(2048)
        except socket.timeout:
            return None
        arp = frame[14:42]
        if len(arp) == 28 and arp[8:14] == want_mac and arp[14:18] == want_ip and arp[24:28] == want_ip:
            return frame


REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from [\d.]+: icmp_seq=(\d+)")
SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")


class Pinger:
    """The host's `ping` at a fixed interval from the namespace; replies with their wall-clock
    times (ping -D), kept as they arrive."""

    def __init__(self, net: Network, ip: str, interval: float, count: int | None = None):
        cmd = ["ip", "netns", "exec", net.ns, "ping", "-n", "-D", "-i", str(interval), "-W", "1"]
        if count is not None:
            cmd += ["-c", str(count)]
        self.interval = interval
        self.started = time.time()
        self.proc = subprocess.Popen([*cmd, ip], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.replies: list[tuple[float, int]] = []
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            m = REPLY.match(line)
            with self._cv:
                self.lines.append(line)
                if m:
                    self.replies.append((float(m.group(1)), int(m.group(2))))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_replies(self, n: int, after: float = 0.0, timeout: float = 60.0) -> None:
        """Until `n` replies arrived later than wall-clock time `after`."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while sum(1 for t, _ in self.replies if t > after) < n:
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    raise AssertionError(f"{n} ping replies after {after} not seen; last output: {self.lines[-5:]}")
                self._cv.wait(min(left, 1.0))

    def stop(self) -> tuple[int, int]:
        """Ends ping (as Ctrl-C does); (transmitted, received) from its summary."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)
        self._reader.join(30)
        m = SUMMARY.search("".join(self.lines))
        assert m, f"no ping summary: {self.lines[-5:]}"
        return int(m.group(1)), int(m.group(2))

    def stop_when_done(self, timeout: float = 120.0) -> tuple[int, int]:
        """Waits for a ping with a count to end by itself; (transmitted, received)."""
        self.proc.wait(timeout)
        return self.stop()

    def longest_gap(self, start: float | None = None, end: float | None = None) -> float:
        """The longest time without a reply, in seconds, between `start` and `end` (wall clock)."""
        times = [t for t, _ in self.replies]
        if start is not None:
            times = [start] + [t for t in times if t > start]
        if end is not None:
            times = [t for t in times if t < end] + [end]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)
