"""virtio-net benchmarks: the host's ping to the test guest through vmmpy's virtio-net against the
same ping across a host veth pair, bulk UDP each way against the same over the veth pair, and the
outage a ping sees during a migration against the migration's reported downtime.

Run: python -m pytest benches/test_bench_net.py -p no:cacheprovider -s

1. test_ping_rtt_vs_veth          `ping -i 0.005` from the bridge's namespace to the guest (tap,
                                  vmmpy's worker thread, the guest's polling driver woken from the
                                  idle port) and to the far end of a veth pair in a second
                                  namespace (the kernel alone), interleaved in rounds of PINGS;
                                  the median of the rounds' average RTTs, ratio vmmpy / veth.
                                  No target: on this nested PVM host every guest exit costs tens
                                  of microseconds, which the veth path does not pay.
2. test_ping_gap_vs_downtime      1 ms pings across a tcp and a local=on migration, MIGRATIONS of
                                  each: the outage (net_helpers.EchoProbe: echo requests every
                                  1 ms whatever happened to the last ones, kernel timestamps on
                                  the bridge; the longest a request sent before the guest's
                                  gratuitous ARP from the destination waited until it or a later
                                  one was answered after it) against the downtime the source
                                  reports. Also reported: the worst wait of any request during
                                  the migration (the guest answers slowly at times while both
                                  VMMs share the 2 cores with it). Target: the
                                  outage exceeds the downtime by at most one ping interval plus
                                  ARP_MS for the gratuitous ARP (the bridge learns the new port
                                  from it; requests sent to the old one until then are lost).
                                  Also reported: the longest gap in `ping -i 0.001`'s replies,
                                  which this bench used to report as the outage. It is not one:
                                  while a request is unanswered ping waits up to 10 ms (its
                                  MININTERVAL) before sending the next, and on this busy 2-core
                                  host it is often not scheduled for 10-20 ms around a migration;
                                  its sequence numbers show no request lost in those holes.
3. test_udp_throughput_vs_veth    COUNT datagrams of 1472 bytes (one 1500-MTU frame each), guest ->
                                  host (`net blast` in the guest, udp_floor.c receiving in the
                                  bridge's namespace) and host -> guest (udp_floor.c sending,
                                  `net sink` counting in the guest), against the same transfer
                                  between udp_floor.c processes across a veth pair; ROUNDS
                                  interleaved, medians; ratio vmmpy / veth in MB/s. The exit cost
                                  per frame: the guest's queue notifications (kicks: VM exits) per
                                  frame and the time it spent in them. No target (nested host).
"""

from __future__ import annotations

import re
import statistics
import subprocess
from pathlib import Path

import pytest
from net_helpers import GUEST_IP, boot_guest, migrate_under_ping

HOST = "nested PVM host (kvm_pvm)"
PINGS = 200
ROUNDS = 5
RTT = re.compile(r"rtt min/avg/max/mdev = ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")
VETH_NS_IP, VETH_PEER_IP = "10.78.0.1", "10.78.0.2"
MIGRATIONS = 5
ARP_MS = 1.0
COUNT = 20000
UDP_PORT = 5001
PAYLOAD = 1472
BLAST = rb"NET BLAST sent=(\d+) us=(\d+) kicks=(\d+) kick_us=(\d+) inflight=(\d+)\r?\n"
SINK = rb"NET SINK port=(\d+) frames=(\d+) bytes=(\d+) us=(\d+) kicks=(\d+) kick_us=(\d+)\r?\n"
RECEIVED = re.compile(r"frames (\d+) bytes (\d+) seconds ([\d.]+)")


def report(benchmark, name, line, ratio, target, met, **figures):
    benchmark.extra_info.update(figures)
    benchmark.extra_info.update(ratio=round(ratio, 4), target=target, target_met=met, host=HOST)
    verdict = "target met" if met else ("TARGET MISSED" if target else "no target")
    print(f"\n[{name}] {line} | ratio {ratio:.3f} (target {target or '-'}): {verdict} | {HOST}")


def avg_rtt_ms(network, ip: str) -> float:
    r = network.run("ping", "-q", "-n", "-c", str(PINGS), "-i", "0.005", ip, timeout=120)
    m = RTT.search(r.stdout)
    assert r.returncode == 0 and m, r.stdout + r.stderr
    return float(m.group(2))


@pytest.fixture
def veth_peer(network):
    """A veth pair from the bridge's namespace to a namespace of its own."""
    peer = f"{network.ns}-p"
    for cmd in (
        ["ip", "netns", "add", peer],
        ["ip", "-n", network.ns, "link", "add", "vb0", "type", "veth", "peer", "name", "vb1", "netns", peer],
        ["ip", "-n", network.ns, "addr", "add", f"{VETH_NS_IP}/24", "dev", "vb0"],
        ["ip", "-n", network.ns, "link", "set", "vb0", "up"],
        ["ip", "-n", peer, "addr", "add", f"{VETH_PEER_IP}/24", "dev", "vb1"],
        ["ip", "-n", peer, "link", "set", "vb1", "up"],
    ):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}"
    yield peer
    subprocess.run(["ip", "netns", "del", peer], capture_output=True)


def test_ping_rtt_vs_veth(benchmark, vmm_process, network, veth_peer):
    vmm, _ = boot_guest(vmm_process, network, network.add_tap("tap0"))

    def rounds():
        guest, veth = [], []
        for _ in range(ROUNDS):
            guest.append(avg_rtt_ms(network, GUEST_IP))
            veth.append(avg_rtt_ms(network, VETH_PEER_IP))
        return guest, veth

    guest, veth = benchmark.pedantic(rounds, rounds=1, iterations=1)
    g, v = statistics.median(guest), statistics.median(veth)
    report(
        benchmark,
        "ping RTT",
        f"virtio-net {g * 1000:.0f} us vs veth {v * 1000:.0f} us (median of {ROUNDS} x {PINGS} pings)",
        g / v,
        None,
        False,
        guest_rtt_us=[round(x * 1000) for x in guest],
        veth_rtt_us=[round(x * 1000) for x in veth],
    )


@pytest.mark.parametrize("transport", ["tcp", "local"])
def test_ping_gap_vs_downtime(benchmark, vmm_process, network, tmp_path, transport):
    interval = 0.001

    def migrations():
        runs = []
        for i in range(MIGRATIONS):
            d = tmp_path / str(i)
            d.mkdir()
            runs.append(migrate_under_ping(vmm_process, network, d, transport, interval, probe=True, tag=str(i)))
            for tap in ("tapsrc", "tapdst"):
                subprocess.run(["ip", "-n", network.ns, "link", "del", tap], capture_output=True)
        return runs

    runs = benchmark.pedantic(migrations, rounds=1, iterations=1)
    excess = [r["outage_ms"] - r["downtime_ms"] for r in runs]
    med = statistics.median(excess)
    allowed = interval * 1000 + ARP_MS
    outage, downtime = (statistics.median(r[k] for r in runs) for k in ("outage_ms", "downtime_ms"))
    report(
        benchmark,
        f"ping outage, {transport} migration",
        f"outage {outage:.1f} ms vs reported downtime {downtime:.1f} ms, excess {med:+.1f} ms (median of "
        f"{MIGRATIONS}; allowed {allowed:.0f}); ping's longest reply gap "
        f"{statistics.median(r['longest_gap_ms'] for r in runs):.1f} ms, the probe's longest send hole "
        f"{statistics.median(r['probe_send_hole_ms'] for r in runs):.1f} ms, worst wait "
        f"{statistics.median(r['worst_wait_ms'] for r in runs):.1f} ms",
        outage / downtime if downtime else 0.0,
        f"outage - downtime <= {allowed:.0f} ms",
        med <= allowed,
        excess_ms=[round(x, 1) for x in excess],
        runs=runs,
    )


@pytest.fixture(scope="module")
def udp_floor(tmp_path_factory):
    """Builds benches/udp_floor.c; returns its path."""
    exe = tmp_path_factory.mktemp("udp") / "udp_floor"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(Path(__file__).parent / "udp_floor.c")], check=True)
    return str(exe)


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def receive(ns: str, udp_floor: str, send) -> tuple[int, int, float]:
    """udp_floor's receiver in `ns` while send() runs; (frames, bytes, first-to-last seconds)."""
    rx = subprocess.Popen(
        in_ns(ns, udp_floor, "recv", str(UDP_PORT), str(COUNT), "500"), stdout=subprocess.PIPE, text=True
    )
    try:
        assert rx.stdout.readline().strip() == "ready"
        send()
        out, _ = rx.communicate(timeout=120)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    m = RECEIVED.search(out)
    assert m, out
    return int(m.group(1)), int(m.group(2)), float(m.group(3))


def host_send(ns: str, udp_floor: str, ip: str) -> None:
    r = subprocess.run(in_ns(ns, udp_floor, "send", ip, str(UDP_PORT), str(COUNT)), capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(f"sent {COUNT}"), r.stdout + r.stderr


def guest_sink(serial) -> tuple[int, int, int, int, int]:
    """`net sink` once the guest stopped counting: (frames, bytes, us, kicks, kick_us)."""
    last = None
    while True:
        m = serial.command("net sink", SINK)
        now = tuple(int(g) for g in m.groups()[1:])
        if now == last:
            return now
        last = now


@pytest.mark.parametrize("direction", ["guest_to_host", "host_to_guest"])
def test_udp_throughput_vs_veth(benchmark, vmm_process, network, veth_peer, udp_floor, direction):
    vmm, _ = boot_guest(vmm_process, network, network.add_tap("tap0"))
    # The guest learns the host as its peer (and the host the guest's MAC).
    assert network.run("ping", "-c", "3", "-i", "0.05", GUEST_IP).returncode == 0
    serial = vmm.serial

    def guest_round() -> dict:
        if direction == "guest_to_host":
            blast = {}

            def send():
                m = serial.command(f"net blast {COUNT} {UDP_PORT}", BLAST, timeout=300)
                blast.update(zip(("sent", "us", "kicks", "kick_us", "inflight"), (int(g) for g in m.groups())))

            frames, nbytes, secs = receive(network.ns, udp_floor, send)
            assert blast["sent"] == COUNT, blast
            return dict(frames=frames, mbps=nbytes / secs / 1e6, fps=frames / secs, **blast)
        serial.command(f"net sink {UDP_PORT}", SINK)
        host_send(network.ns, udp_floor, GUEST_IP)
        frames, nbytes, us, kicks, kick_us = guest_sink(serial)
        assert frames > 0, "the guest counted no datagram"
        secs = us / 1e6
        return dict(frames=frames, mbps=nbytes / secs / 1e6, fps=frames / secs, us=us, kicks=kicks, kick_us=kick_us)

    def veth_round() -> dict:
        if direction == "guest_to_host":
            frames, nbytes, secs = receive(network.ns, udp_floor, lambda: host_send(veth_peer, udp_floor, VETH_NS_IP))
        else:
            frames, nbytes, secs = receive(veth_peer, udp_floor, lambda: host_send(network.ns, udp_floor, VETH_PEER_IP))
        return dict(frames=frames, mbps=nbytes / secs / 1e6, fps=frames / secs)

    def rounds():
        guest, veth = [], []
        for _ in range(ROUNDS):
            guest.append(guest_round())
            veth.append(veth_round())
        return guest, veth

    guest, veth = benchmark.pedantic(rounds, rounds=1, iterations=1)
    med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
    g_mbps, v_mbps = med(guest, "mbps"), med(veth, "mbps")
    frames = med(guest, "frames")
    kicks_per_frame = med(guest, "kicks") / frames
    kick_us_per_frame = med(guest, "kick_us") / frames
    report(
        benchmark,
        f"UDP {direction.replace('_', ' ')}",
        f"virtio-net {g_mbps:.1f} MB/s {med(guest, 'fps'):.0f} frames/s ({frames:.0f}/{COUNT} arrived) vs veth "
        f"{v_mbps:.1f} MB/s {med(veth, 'fps'):.0f} frames/s ({med(veth, 'frames'):.0f}/{COUNT}); guest "
        f"{1e6 / med(guest, 'fps'):.1f} us/frame, {kicks_per_frame:.3f} kicks/frame costing "
        f"{kick_us_per_frame:.2f} us/frame (median of {ROUNDS})",
        g_mbps / v_mbps,
        None,
        False,
        guest=guest,
        veth=veth,
        kicks_per_frame=round(kicks_per_frame, 4),
        kick_us_per_frame=round(kick_us_per_frame, 3),
    )
