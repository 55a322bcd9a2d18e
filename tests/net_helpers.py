"""A network for virtio-net tests: a namespace with a bridge (the "switch", 10.77.0.1/24) that
joins persistent taps the VMMs open, the host's real `ping` run inside it, and raw AF_PACKET
sockets to see what the guest sent (ARP on a tap) and when each echo request left the host and
its reply came back (kernel timestamps on the bridge)."""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import itertools
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

import pytest

from helpers import BANNER
from migration_helpers import free_port, send, start_receive, url_for

HOST_IP = "10.77.0.1"
GUEST_IP = "10.77.0.2"
GUEST_MAC = "52:54:00:4e:45:54"
ETH_P_ARP = 0x0806
ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35
PACKET_OUTGOING = 4
ICMP_ECHO_REPLY, ICMP_ECHO = 0, 8
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


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

    def open_tap(self, name: str) -> int:
        """A descriptor attached to this namespace's tap `name` (IFF_TAP | IFF_NO_PI), as an
        orchestrator opens one to pass to a VMM."""

        def attach() -> int:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
            except BaseException:
                os.close(fd)
                raise
            return fd

        return self.in_ns(attach)

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

    def capture(self, dev: str, prog: list[tuple[int, int, int, int]]) -> socket.socket:
        """A raw socket that receives the frames through `dev` that the classic BPF `prog` keeps.
        It listens to all protocols (a socket bound to one protocol sees nothing a bridge port
        hands to its bridge); the kernel filter keeps a ping flood from filling its buffer."""

        def make():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            code = b"".join(struct.pack("HBBI", *insn) for insn in prog)
            buf = ctypes.create_string_buffer(code)
            s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", len(prog), ctypes.addressof(buf)))
            s.bind((dev, ETH_P_ALL))
            return s

        return self.in_ns(make)

    def arp_capture(self, tap: str) -> socket.socket:
        """Every ARP frame through `tap`."""
        # ldh [12]; jeq #ETH_P_ARP, keep, drop.
        return self.capture(tap, [(0x28, 0, 0, 12), (0x15, 0, 1, ETH_P_ARP), (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0)])


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


class EchoProbe:
    """Echo requests of its own to `ip` every `interval` seconds, whether or not the last ones were
    answered, and when each left the host and its reply came back, and when the guest's
    gratuitous ARPs came (kernel timestamps on the bridge): the time the guest could not be
    reached, to about one interval. `ping` cannot give that: while a request is unanswered it
    waits up to 10 ms (its MININTERVAL) before the next, and on a busy host it may not run at all
    for a while."""

    ID = 0x7E57

    def __init__(self, net: Network, ip: str, interval: float, dev: str = "br0"):
        # ldh [12]; jeq #ARP -> keep; jeq #IPv4 else drop; ldb [23]; jeq #ICMP -> keep; drop.
        prog = [
            (0x28, 0, 0, 12),
            (0x15, 3, 0, ETH_P_ARP),
            (0x15, 0, 3, 0x0800),
            (0x30, 0, 0, 23),
            (0x15, 0, 1, 1),
            (0x06, 0, 0, 0xFFFF),
            (0x06, 0, 0, 0),
        ]
        self.sock = net.capture(dev, prog)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.settimeout(0.2)
        self.out = net.in_ns(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
        self.ip, self.interval = ip, interval
        self.sent: list[tuple[float, int]] = []  # (time, seq) of requests, in order
        self.answered: dict[int, float] = {}  # seq -> when its reply came
        self.garps: list[float] = []  # when the guest announced itself
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._read, self._send)]
        for t in self._threads:
            t.start()

    def _send(self) -> None:
        try:  # this thread at SCHED_FIFO, so that it sends on time on a busy host (if it may)
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except OSError:
            pass
        next_at = time.monotonic()
        for seq in itertools.count():
            if self._stop.is_set():
                return
            head = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, self.ID, seq & 0xFFFF)
            body = b"vmmpy-probe-pad!" * 2
            check = _inet_checksum(head + body)
            try:
                self.out.sendto(head[:2] + struct.pack("!H", check) + head[4:] + body, (self.ip, 0))
            except OSError:
                pass  # no route or neighbour yet: the request counts as lost
            next_at += self.interval
            self._stop.wait(max(next_at - time.monotonic(), 0))

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                frame, anc, _, addr = self.sock.recvmsg(64, 64)
            except socket.timeout:
                continue
            except OSError:
                return
            stamp = next((struct.unpack("qq", d[:16]) for _, t, d in anc if t == SO_TIMESTAMPNS), None)
            if stamp is not None and frame[12:14] == struct.pack("!H", ETH_P_ARP):
                guest = socket.inet_aton(self.ip)
                if frame[20:22] == b"\x00\x01" and frame[28:32] == guest and frame[38:42] == guest:
                    self.garps.append(stamp[0] + stamp[1] / 1e9)
                continue
            ihl = (frame[14] & 15) * 4
            icmp = frame[14 + ihl : 14 + ihl + 8]
            if stamp is None or len(icmp) < 8 or struct.unpack("!H", icmp[4:6])[0] != self.ID:
                continue
            when, seq = stamp[0] + stamp[1] / 1e9, struct.unpack("!H", icmp[6:8])[0]
            if icmp[0] == ICMP_ECHO and addr[2] == PACKET_OUTGOING:
                self.sent.append((when, seq))
            elif icmp[0] == ICMP_ECHO_REPLY and addr[2] != PACKET_OUTGOING:
                self.answered.setdefault(seq, when)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        self.sock.close()
        self.out.close()

    def waits(self, start: float, end: float) -> list[tuple[float, float]]:
        """(sent, answered) of the requests sent between `start` and `end` (wall clock), where
        answered is when it or a later request got its reply: a lost request is answered, in
        effect, by the next one that gets through."""
        later = float("inf")  # the earliest reply to this request or any later one
        out = []
        for when, seq in reversed(self.sent):
            later = min(later, self.answered.get(seq, float("inf")))
            if start <= when <= end and later != float("inf"):
                out.append((when, later))
        return out[::-1]

    def outage(self, start: float, end: float) -> float:
        """The migration's outage, in seconds: the longest wait of a request sent before the
        guest's first gratuitous ARP after `start` (its destination announcing it) and answered
        after it."""
        garp = next((t for t in self.garps if t >= start), None)
        assert garp is not None, "the bridge saw no gratuitous ARP from the guest"
        return max((b - a for a, b in self.waits(start, end) if a <= garp <= b), default=0.0)

    def worst_wait(self, start: float, end: float) -> float:
        """The longest any request sent between `start` and `end` waited, in seconds (on a busy
        host also a guest slow to answer while both VMMs work)."""
        return max((b - a for a, b in self.waits(start, end)), default=0.0)

    def send_hole(self, start: float, end: float) -> float:
        """The longest time between two requests leaving, in seconds (the prober's own lateness)."""
        times = [t for t, _ in self.sent]
        times = times[max(bisect.bisect_left(times, start) - 1, 0) : bisect.bisect_right(times, end) + 1]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def _inet_checksum(data: bytes) -> int:
    """RFC 1071, of an even number of bytes."""
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from [\d.]+: icmp_seq=(\d+)")
SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")


class Pinger:
    """The host's `ping` at a fixed interval from the namespace; replies with their wall-clock
    times (ping -D), kept as they arrive."""

    DEADLINE_S = 90  # for a ping with a count to get its replies

    def __init__(self, net: Network, ip: str, interval: float, count: int | None = None):
        cmd = ["ip", "netns", "exec", net.ns, "ping", "-n", "-D", "-i", str(interval)]
        if count is not None:
            # Until `count` replies came, or the deadline: with -W instead, iputils waits only about
            # 2 RTT after its last probe, so one late reply on a busy host would count as lost.
            cmd += ["-c", str(count), "-w", str(self.DEADLINE_S)]
        else:
            cmd += ["-W", "1"]
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

    def stop_when_done(self, timeout: float = DEADLINE_S + 30.0) -> tuple[int, int]:
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


def ping_answered(net: Network, ip: str, count: int, interval: float = 0.05) -> int:
    """Pings `ip` until `count` replies came (a late one counts); how many requests went out
    (more than `count` when a reply was later than the next probe)."""
    sent, received = Pinger(net, ip, interval, count=count).stop_when_done()
    assert received == count, f"{received} of {count} ping replies ({sent} sent) within {Pinger.DEADLINE_S} s"
    return sent


NET_UP = rb"NET UP mac=([0-9a-f:]{17}) ip=([\d.]+)\r?\n"
STATS = (
    rb"NET STATS rx=(\d+) tx=(\d+) arp_in=(\d+) arp_out=(\d+) echo=(\d+) garp=(\d+) acks=(\d+) "
    rb"ignored=(\d+) tx_full=(\d+)\r?\n"
)
STAT_NAMES = ("rx", "tx", "arp_in", "arp_out", "echo", "garp", "acks", "ignored", "tx_full")
# A ping every 2 ms: fine-grained enough to see the migration's pause, light enough for a busy
# 2-core host.
INTERVAL = 0.002
_tags = itertools.count()


@pytest.fixture
def network():
    """A fresh namespace with its bridge for one test, deleted after it (taps and all)."""
    why = missing_capability()
    if why:
        pytest.skip(f"virtio-net tests need a tap network: {why}")
    try:
        net = make_network(f"{os.getpid() % 100000}-{next(_tags)}")
    except PermissionError as e:
        pytest.skip(f"cannot make a network namespace here: {e}")
    try:
        yield net
    finally:
        delete_network(net)


def net_stats(serial) -> dict:
    m = serial.command("net stats", STATS)
    return dict(zip(STAT_NAMES, (int(g) for g in m.groups())))


def boot_guest(vmm_process, net, tap: str, name="src", hooks="", extra=()):
    vmm = vmm_process(
        "--cpus",
        "boot=1",
        "--memory",
        "size=128M",
        "--cmdline",
        f"console=ttyS0 ip={GUEST_IP}",
        "--net",
        f"tap={tap},mac={GUEST_MAC},id=net0",
        *extra,
        name=name,
        hooks=hooks,
        netns=net.ns,
    )
    m = vmm.serial.expect(BANNER, 90)
    up = vmm.serial.expect(NET_UP, 60)
    assert up.groups() == (GUEST_MAC.encode(), GUEST_IP.encode())
    vmm.serial.expect(rb"READY\r?\n", 60)
    return vmm, m.group(1).decode()


def counters(vmm) -> dict:
    status, body = vmm.api.request("GET", "/api/v1/vm.counters")
    assert status == 200, (status, body)
    return body["net0"]


def agreed_counts(vmm, timeout: float = 30.0) -> tuple[dict, dict]:
    """The guest's `net stats` and the device's counters once they agree on the frames each way:
    a frame in flight while they are read (one the host sent late) shows in the device's count
    first, and in the guest's once it has polled it."""
    deadline = time.monotonic() + timeout
    while True:
        guest, dev = net_stats(vmm.serial), counters(vmm)
        if dev["rx_frames"] == guest["rx"] and dev["tx_frames"] == guest["tx"]:
            return guest, dev
        assert time.monotonic() < deadline, f"the device's and the guest's frame counts never agreed: {dev}, {guest}"


def migrate_under_ping(
    vmm_process, network, tmp_path, transport: str, interval: float = INTERVAL, probe: bool = False, tag: str = ""
) -> dict:
    """A guest migrated (tcp, or local=on) while the host pings it every `interval` seconds: the
    replies resume through the destination, which announced the guest with a gratuitous ARP.
    Returns the migration's reported downtime and the longest gap in the replies; with `probe`,
    also the outage an EchoProbe at the same interval saw. `tag` tells this run's VMMs' files
    from another run's in the same test."""
    src_tap, dst_tap = network.add_tap("tapsrc"), network.add_tap("tapdst")
    src, boot_id = boot_guest(vmm_process, network, src_tap, name=f"src{tag}")
    # The destination's own operator names its tap for net0.
    dst = vmm_process("--net", f"tap={dst_tap},id=net0", name=f"dst{tag}", netns=network.ns)
    capture = network.arp_capture(dst_tap)
    watch = EchoProbe(network, GUEST_IP, interval) if probe else None
    pinger = Pinger(network, GUEST_IP, interval)
    try:
        pinger.wait_replies(50)
        url = url_for("unix" if transport == "local" else transport, tmp_path, free_port())
        receiver = start_receive(dst, url)
        started = time.time()
        send(src, url, local=(transport == "local"))
        assert src.wait_exit(180) == 0
        receiver.join(60)
        assert receiver.result["answer"][0] == 204, receiver.result
        moved = time.time()
        # The guest announced itself from its new port, and replies come through it.
        garp = garp_seen(capture, GUEST_IP, GUEST_MAC, 30)
        assert garp is not None, f"no gratuitous ARP on the destination's tap; guest: {net_stats(dst.serial)}"
        pinger.wait_replies(100, after=moved)
    finally:
        sent, received = pinger.stop()
        capture.close()
        if watch is not None:
            watch.stop()
    fin = [e for e in src.events() if e["event"] == "migration-finished"][0]["properties"]
    gap = pinger.longest_gap(start=started, end=moved)
    report = {
        "transport": transport,
        "downtime_ms": round(fin["downtime_ms"], 1),
        "longest_gap_ms": round(gap * 1000, 1),
        "sent": sent,
        "received": received,
    }
    if watch is not None:
        assert watch.sent and watch.answered, "the bridge saw none of the probe's requests or replies"
        report["outage_ms"] = round(watch.outage(started, moved) * 1000, 1)
        report["worst_wait_ms"] = round(watch.worst_wait(started, moved) * 1000, 1)
        report["probe_send_hole_ms"] = round(watch.send_hole(started, moved) * 1000, 1)
    print(f"ping through a {transport} migration: {report}")
    m = dst.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16})")
    assert m.group(1).decode() == boot_id, "the guest rebooted: it should have moved"
    stats = net_stats(dst.serial)
    assert stats["garp"] >= 1 and stats["acks"] == stats["garp"], stats
    assert counters(dst)["tx_frames"] >= 1
    return report
