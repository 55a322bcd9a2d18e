"""Resource leaks on real KVM: many reboots in one VMM, and many whole VMMs in one process, must not
grow this process's open fds, threads or resident memory.

Every VM rebuild opens a KVM VM fd, vCPU fds, a memfd for guest RAM and its mapping, eventfds and
vCPU threads, and for its disk the image file, kick/irq eventfds and the device thread; a reboot
must give all of them back.
"""

from __future__ import annotations

import os
import threading
import time

from vmmpy import Vmm
from vmmpy.config import DiskConfig, SerialConfig, VmConfig

from helpers import SerialClient

REBOOTS = 50
WARMUP = 3
RSS_BUDGET_KIB = 32 << 10
DIRTY_MIB = 4  # x 50 reboots: a leaked guest RAM mapping would add 200 MiB of RSS


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/self/status")


def snapshot() -> dict[str, int]:
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "maps": maps,
        "py_threads": threading.active_count(),
        "os_threads": _status("Threads"),
        "rss_kib": _status("VmRSS"),
    }


THREAD_KEYS = ("py_threads", "os_threads")
#: Mappings may come and go a little without a leak: glibc caches the stacks of exited threads and
#: gives new threads malloc arenas. A leaked guest RAM mapping per VM would exceed this many times.
MAPS_SLACK = 8


def baseline(window: float = 0.5) -> dict[str, int]:
    """A snapshot whose thread counts are the smallest seen over `window` s: a thread that was
    joined a moment ago can linger in /proc/self/task for a little while, and must not inflate the
    baseline (that would hide a leak of one thread)."""
    low = snapshot()
    deadline = time.monotonic() + window
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = snapshot()
        low = {**now, **{k: min(now[k], low[k]) for k in THREAD_KEYS}}
    return low


def settled(baseline: dict[str, int], timeout: float = 2.0) -> dict[str, int]:
    """A snapshot, retaken for up to `timeout` s while fds or threads are above `baseline` (an
    exiting thread may take a moment to be reaped). A leak never settles."""
    deadline = time.monotonic() + timeout
    while True:
        now = snapshot()
        if all(now[k] <= baseline[k] for k in ("fds", *THREAD_KEYS)) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def report(title: str, before: dict[str, int], after: dict[str, int]) -> None:
    print(f"\n{title}:")
    for k in before:
        print(f"  {k:10} before {before[k]:8}  after {after[k]:8}  growth {after[k] - before[k]:+}")


def test_fifty_reboots_leak_nothing(guest_vmm, tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    vmm, serial = guest_vmm(vcpus=1, memory_mib=96, disks=[DiskConfig(path=str(image))])
    boot_id, _ = serial.wait_ready()
    seen = {boot_id}

    def reboot(i: int) -> None:
        # Make the guest touch DIRTY_MIB of its RAM first, so a guest memory mapping that a reboot
        # failed to unmap would show in RSS, not only in /proc/self/maps.
        serial.command(f"dirty {DIRTY_MIB}", f"DIRTY STARTED mib={DIRTY_MIB}")
        # A fresh guest's first run writes generation 1; once the slowest vCPU (min_gen) is at 2, every
        # page of the area has been written.
        while True:
            m = serial.command("status", rb"STATUS [^\r\n]* dirty=on mib=\d+ gen=(\d+)(?: min_gen=(\d+))?\r\n")
            if int(m.group(2) or m.group(1)) >= 2:
                break
        seq = vmm.events.seq
        if i % 2 == 0:
            serial.command("reboot acpi", "REBOOTING acpi")  # guest-initiated: ACPI reset register
        else:
            vmm.reboot()  # host-initiated
        vmm.wait_for_event("vm.rebooted", 30, after=seq)
        new_id, cpus = serial.wait_ready()
        assert new_id not in seen and cpus == 1, (i, new_id)
        seen.add(new_id)

    for i in range(WARMUP):
        reboot(i)
    serial.command("echo measure", rb"measure\r\n")
    before = baseline()
    start = time.monotonic()
    for i in range(WARMUP, WARMUP + REBOOTS):
        reboot(i)
    elapsed = time.monotonic() - start
    serial.command("echo measure again", rb"measure again\r\n")
    after = settled(before)
    report(f"{REBOOTS} reboots in {elapsed:.2f} s", before, after)

    assert vmm.boot_count == 1 + WARMUP + REBOOTS
    assert len(vmm.events.events("vm.rebooted")) == WARMUP + REBOOTS
    assert vmm.info()["state"] == "Running"
    assert after["fds"] <= before["fds"], f"fds grew over {REBOOTS} reboots: {before} -> {after}"
    assert after["maps"] <= before["maps"] + MAPS_SLACK, f"memory mappings grew: {before} -> {after}"
    assert after["py_threads"] <= before["py_threads"], f"Python threads grew: {before} -> {after}"
    assert after["os_threads"] <= before["os_threads"], f"OS threads grew: {before} -> {after}"
    assert after["rss_kib"] - before["rss_kib"] < RSS_BUDGET_KIB, f"RSS grew: {before} -> {after}"


def _one_vmm(path: str, i: int) -> None:
    vmm = Vmm(serial=SerialConfig(mode="Socket", socket=path))
    serial = SerialClient(path)
    try:
        vmm.create(VmConfig(memory_mib=64, vcpus=1))
        vmm.boot()
        serial.wait_ready()
        serial.command(f"echo vmm {i}", f"vmm {i}\r\n".encode())
    finally:
        serial.close()
        vmm.close()
    assert not vmm.running, "the control loop outlived close()"
    assert not os.path.exists(path), "close() left the console socket file behind"


def test_twenty_vmm_objects_leak_nothing(tmp_path):
    path = str(tmp_path / "console.sock")
    _one_vmm(path, -1)  # warm-up: lazy imports, the native module's one-time state
    before = baseline()
    start = time.monotonic()
    for i in range(20):
        _one_vmm(path, i)
    elapsed = time.monotonic() - start
    after = settled(before)
    report(f"20 Vmm objects created, booted and closed in {elapsed:.2f} s", before, after)
    assert after["fds"] <= before["fds"], f"fds grew over 20 Vmm objects: {before} -> {after}"
    assert after["maps"] <= before["maps"] + MAPS_SLACK, f"memory mappings grew: {before} -> {after}"
    assert after["py_threads"] <= before["py_threads"], f"Python threads grew: {before} -> {after}"
    assert after["os_threads"] <= before["os_threads"], f"OS threads grew: {before} -> {after}"
    assert after["rss_kib"] - before["rss_kib"] < RSS_BUDGET_KIB, f"RSS grew: {before} -> {after}"
