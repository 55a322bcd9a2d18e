"""virtio-blk end to end: the test guest's polling driver (guest/blk.c) against vmmpy's PCI
virtio-blk device, on real KVM with real image files. The host checks the image's bytes itself
(tests/sector_format.py), so neither the guest's nor the device's word is taken for the data."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from helpers import BANNER, SerialClient
from migration_helpers import free_port, send, start_receive, url_for, wait_progress
from sector_format import generations, make_image, read_sectors, sector, sha256

# A dirtying guest with a disk load converges by itself on loopback, so the tests that must act in
# pre-copy slow the link down (each Memory frame waits).
SLOW_LINK = "frame-delay-ms=100"
LOAD_MIB = 8
LOAD_SECTORS = LOAD_MIB * 2048
# A range written once before a migration, outside the load's area: it must survive unchanged.
KEPT_START, KEPT_COUNT, KEPT_GEN = LOAD_SECTORS + 1000, 256, 424242
INFO = rb"BLK info disks=(\d+) capacity=(\d+) ro=([01]) id=(\S+) disk=(\d+) msix=(0x[0-9a-f]+)"
BLK_STATUS = rb"BLK STATUS load=(on|off) reads=(\d+) writes=(\d+) inflight=(\d+) bad=([01])([^\r]*)\r\n"


def disk_arg(path, readonly=False, disk_id="disk0") -> str:
    return f"path={path}" + (",readonly=on" if readonly else "") + f",id={disk_id}"


def _boot(vmm_process, image, *extra, name="src", vcpus=2, memory="384M", hooks="", readonly=False):
    vmm = vmm_process(
        "--cpus",
        f"boot={vcpus}",
        "--memory",
        f"size={memory}",
        "--disk",
        disk_arg(image, readonly),
        *extra,
        name=name,
        hooks=hooks,
    )
    boot_id, _ = vmm.serial.wait_ready()
    return vmm, boot_id


def _destination(vmm_process, image, name="dst"):
    """A destination whose own operator names the backing of disk0 (never the peer)."""
    return vmm_process("--disk", disk_arg(image), name=name)


def blk_status(serial) -> dict:
    m = serial.command("blk status", BLK_STATUS)
    return {
        "on": m.group(1) == b"on",
        "reads": int(m.group(2)),
        "writes": int(m.group(3)),
        "inflight": int(m.group(4)),
        "bad": m.group(6).decode() if m.group(5) == b"1" else None,
    }


def wait_load_progress(serial, reads=50, writes=50, timeout=120.0) -> dict:
    """Polls `blk status` until the load has done `reads` and `writes` more requests than now."""
    import time

    start = blk_status(serial)
    assert start["on"] and start["bad"] is None, start
    deadline = time.monotonic() + timeout
    while True:
        s = blk_status(serial)
        assert s["bad"] is None, f"the guest found a bad sector: {s['bad']}"
        if s["reads"] >= start["reads"] + reads and s["writes"] >= start["writes"] + writes:
            return s
        assert s["on"], f"the load stopped by itself: {s}"
        assert time.monotonic() < deadline, f"the disk load makes no progress: {start} -> {s}"
        time.sleep(0.05)


def start_load(serial):
    serial.command(f"blk write {KEPT_START} {KEPT_COUNT} {KEPT_GEN}", rf"BLK WRITE OK {KEPT_COUNT} gen={KEPT_GEN}\r\n")
    serial.command(f"blk load {LOAD_MIB}", rf"BLK LOAD STARTED mib={LOAD_MIB} depth=16\r\n")
    wait_load_progress(serial)


def check_disk(serial, image, same_boot=True):
    """The guest reads the load area back (against its own table of what it wrote when it is the
    same boot) and the kept range; then the host checks every sector of both in the file."""
    m = serial.command(
        f"blk verify 0 {LOAD_SECTORS}", rb"BLK VERIFY (OK (\d+) unknown=(\d+) empty=(\d+)|[^\r]*)\r\n", timeout=120
    )
    assert m.group(2) is not None, m.group(0)
    if same_boot:
        assert int(m.group(2)) > 0  # sectors with a generation the guest knows it wrote
    serial.command(f"blk verify {KEPT_START} {KEPT_COUNT} {KEPT_GEN}", rf"BLK VERIFY OK {KEPT_COUNT} ".encode())
    serial.command("blk flush", rb"BLK FLUSH OK\r\n")
    gens = generations(image, 0, LOAD_SECTORS)  # every sector whole, in its place (or never written)
    assert any(gens), "the load wrote nothing to the image"
    assert generations(image, KEPT_START, KEPT_COUNT) == [KEPT_GEN] * KEPT_COUNT


# ---------------------------------------------------------------- a disk on one VM


def test_info_shows_capacity_and_both_disks(vmm_process, tmp_path):
    a = make_image(tmp_path / "a.raw", 16)
    b = make_image(tmp_path / "b.raw", 3)
    vmm, _ = _boot(vmm_process, a, "--disk", disk_arg(b, readonly=True, disk_id="data1"), vcpus=1)
    vmm.serial.send("blk info")
    first = vmm.serial.expect(INFO)
    second = vmm.serial.expect(INFO)
    assert first.group(1) == second.group(1) == b"2"
    by_disk = {int(m.group(5)): m for m in (first, second)}
    assert int(by_disk[0].group(2)) == 16 * 2048 and by_disk[0].group(3) == b"0"
    assert int(by_disk[1].group(2)) == 3 * 2048 and by_disk[1].group(3) == b"1"
    assert (by_disk[0].group(4), by_disk[1].group(4)) == (b"disk0", b"data1")  # GET_ID: each disk's id=


def test_writes_land_in_the_image_and_read_back_after_a_reboot(vmm_process, tmp_path):
    image = make_image(tmp_path / "disk.raw", 16)
    vmm, boot_id = _boot(vmm_process, image, vcpus=1)
    vmm.serial.command("blk write 100 300 7", rb"BLK WRITE OK 300 gen=7\r\n")
    vmm.serial.command("blk flush", rb"BLK FLUSH OK\r\n")
    # the host's view: exactly those sectors, exactly those bytes
    assert read_sectors(image, 100, 300) == [sector(100 + i, 7) for i in range(300)]
    assert generations(image, 99, 1) == [0] and generations(image, 400, 1) == [0]
    vmm.serial.command("blk verify 100 300", rb"BLK VERIFY OK 300 unknown=0 empty=0\r\n")

    vmm.serial.command("reboot kbd", "REBOOTING")
    m = vmm.serial.expect(BANNER, 60)
    vmm.serial.expect(rb"READY\r?\n", 60)
    assert m.group(1).decode() != boot_id
    vmm.serial.command("blk verify 100 300 7", rb"BLK VERIFY OK 300 unknown=0 empty=0\r\n")
    vmm.serial.command("blk verify 98 2", rb"BLK VERIFY OK 0 unknown=0 empty=2\r\n")
    # a wrong expectation is noticed: the check can fail
    vmm.serial.command("blk verify 100 1 8", rb"BLK VERIFY BAD lba=100 want_gen=8 got_gen=7 reason=gen\r\n")


def test_read_only_disk_answers_writes_with_ioerr_and_stays_unchanged(vmm_process, tmp_path):
    image = tmp_path / "ro.raw"
    with open(image, "wb") as f:
        for lba in range(2048):
            f.write(sector(lba, 3))
    before = sha256(image)
    vmm, _ = _boot(vmm_process, image, vcpus=1, readonly=True)
    vmm.serial.command("blk info", rb"BLK info disks=1 capacity=2048 ro=1 ")
    vmm.serial.command("blk write 10 4 9", rb"BLK WRITE IOERR lba=10\r\n")
    vmm.serial.command("blk verify 0 2048 3", rb"BLK VERIFY OK 2048 ")  # reads still work
    vmm.serial.command("blk flush", rb"BLK FLUSH (OK|IOERR)\r\n")
    assert sha256(image) == before


def test_msix_delivery_shows_in_the_lapic_irr(vmm_process, tmp_path):
    """The guest runs with IF=0 and never takes the interrupt: a completion's MSI-X message stays
    pending in vCPU 0's LAPIC, where the saved state (KVM_GET_LAPIC) shows it."""
    image = make_image(tmp_path / "disk.raw", 4)
    vmm, _ = _boot(vmm_process, image, vcpus=1)
    vmm.serial.command("blk info", rb"BLK info disks=1 capacity=8192 ro=0 id=\S+ disk=0 msix=0x40 ")
    vmm.serial.command("blk write 0 8", rb"BLK WRITE OK 8 ")
    assert vmm.api.request("PUT", "/api/v1/vm.pause")[0] == 204
    snap = tmp_path / "snap"
    status, body = vmm.api.request("PUT", "/api/v1/vm.snapshot", {"destination_url": f"file://{snap}"})
    assert status == 204, body
    lapic = base64.b64decode(json.loads((snap / "state.json").read_text())["vcpus"][0]["lapic"])
    assert len(lapic) == 1024
    irr = [struct.unpack_from("<I", lapic, 0x200 + 0x10 * i)[0] for i in range(8)]
    assert irr[0x40 // 32] & (1 << (0x40 % 32)), f"vector 0x40 not pending; IRR {[hex(x) for x in irr]}"
    assert not irr[0x41 // 32] & (1 << (0x41 % 32)), "a vector nobody programmed is pending"


# ---------------------------------------------------------------- migration and snapshots


@pytest.mark.parametrize("transport", ["tcp", "unix", "local"])
def test_migrate_while_the_disk_load_runs(vmm_process, tmp_path, transport):
    image = make_image(tmp_path / "disk.raw", 32)
    src, boot_id = _boot(vmm_process, image)
    dst = _destination(vmm_process, image)
    start_load(src.serial)
    src.serial.command("dirty 64", "DIRTY STARTED")
    url = url_for("unix" if transport == "local" else transport, tmp_path, free_port())
    receiver = start_receive(dst, url)
    send(src, url, local=(transport == "local"))
    assert src.wait_exit(180) == 0
    receiver.join(60)
    assert receiver.result["answer"][0] == 204
    m = dst.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16}) cpus=2 dirty=on")
    assert m.group(1).decode() == boot_id, "the guest rebooted: it should have moved"
    wait_load_progress(dst.serial)  # the device continues from the saved indices
    check_disk(dst.serial, image)
    dst.serial.command("verify", rb"VERIFY OK \d+\r\n", timeout=60)


def test_device_writes_during_precopy_are_marked_dirty(tmp_path):
    """With a slow link the load's reads land in guest RAM through many pre-copy iterations; with
    the source kept paused after success and the destination completed paused, every byte of RAM
    is equal on both sides, and the destination's guest finds its read buffers intact. Without
    dirty marking of device writes both fail (the buffers are written only by the device)."""
    from vmmpy import Vmm
    from vmmpy.config import DiskConfig, SerialConfig, VmConfig
    from vmmpy.testhooks import TestHooks

    image = make_image(tmp_path / "disk.raw", 32)
    src_sock, dst_sock = str(tmp_path / "src.sock"), str(tmp_path / "dst.sock")
    src = Vmm(
        serial=SerialConfig(mode="Socket", socket=src_sock),
        no_shutdown=True,
        test_hooks=TestHooks(keep_source=True, frame_delay_ms=100),
    )
    dst = Vmm(serial=SerialConfig(mode="Socket", socket=dst_sock), test_hooks=TestHooks(complete_paused=True))
    serial = SerialClient(src_sock)
    dserial = SerialClient(dst_sock)
    try:
        src.create(VmConfig(memory_mib=256, vcpus=1, disks=[DiskConfig(path=str(image), id="disk0")]))
        src.boot()
        serial.wait_ready()
        start_load(serial)
        url = f"unix:{tmp_path}/m.sock"
        receive = _receive_in_process(dst, url, image)
        handle = src.send_migration(url, downtime_ms=1, auto_converge=False, timeout_s=4, timeout_strategy="ignore")
        handle.wait(180)
        assert receive.wait(60)
        assert src.info()["state"] == "Paused" and dst.info()["state"] == "Paused"
        (a,), (b,) = src.memory_regions(), dst.memory_regions()
        va, vb = memoryview(a), memoryview(b)
        chunk = 1 << 20
        bad = [i for i in range(0, len(va), chunk) if va[i : i + chunk] != vb[i : i + chunk]]
        va.release()
        vb.release()
        assert not bad, f"{len(bad)} MiB differ, first at {bad[0]:#x}"
        dst.resume()
        check_disk(dserial, image)
    finally:
        serial.close()
        dserial.close()
        dst.close()
        src.close()


def _receive_in_process(dst, url, image):
    """The in-process destination's operator names disk0's backing for the receive."""
    return dst.receive_migration(url, disks={"disk0": str(image)})


REBOOTS = {"acpi": "reboot acpi", "kbd": "reboot kbd", "cmos": "reboot cmos", "triple": "reboot triple"}


@pytest.mark.parametrize("method", sorted(REBOOTS))
def test_reboot_in_the_middle_of_a_migration_with_io_in_flight(vmm_process, tmp_path, method):
    image = make_image(tmp_path / "disk.raw", 32)
    src, boot_id = _boot(vmm_process, image, hooks="frame-delay-ms=150")
    dst = _destination(vmm_process, image)
    start_load(src.serial)
    src.serial.command("dirty 64", "DIRTY STARTED")
    url = f"tcp:127.0.0.1:{free_port()}"
    receiver = start_receive(dst, url)
    send(src, url, downtime_ms=1, auto_converge=False)
    wait_progress(src, lambda p: p["iteration"] >= 1)
    assert blk_status(src.serial)["inflight"] > 0  # requests in flight as the guest asks to reboot
    src.serial.send(REBOOTS[method])
    src.wait_event("vm.migration-lifecycle-latched")
    assert src.wait_exit(180) == 0
    receiver.join(60)
    assert receiver.result["answer"][0] == 204
    fin = [e for e in src.events() if e["event"] == "migration-finished"][0]["properties"]
    assert fin["lifecycle_replayed_on"] == "destination"
    dst.wait_event("vm.rebooted")
    m = dst.serial.expect(BANNER, 60)
    dst.serial.expect(rb"READY\r?\n", 60)
    assert m.group(1).decode() != boot_id
    # A fresh boot: the device was reset with the machine; what was written before is all there
    # and no sector of the load is torn (the host reads the file too).
    dst.serial.command("blk info", rb"BLK info disks=1 capacity=65536 ro=0 ")
    check_disk(dst.serial, image, same_boot=False)
    start_load(dst.serial)  # the reset device takes a new driver
    dst.serial.command("blk stop", rb"BLK LOAD STOPPED ")


def test_snapshot_restores_in_a_new_process_with_the_same_disk(vmm_process, tmp_path):
    image = make_image(tmp_path / "disk.raw", 32)
    src, boot_id = _boot(vmm_process, image)
    start_load(src.serial)
    assert src.api.request("PUT", "/api/v1/vm.pause")[0] == 204
    snap = tmp_path / "snap"
    status, body = src.api.request("PUT", "/api/v1/vm.snapshot", {"destination_url": f"file://{snap}"})
    assert status == 204, body
    src.api.request("PUT", "/api/v1/vmm.shutdown")
    assert src.wait_exit() == 0
    dst = vmm_process("--restore", f"source_url=file://{snap},resume=on", "--disk", disk_arg(image), name="dst")
    dst.wait_event("vm.restored")
    m = dst.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16})")
    assert m.group(1).decode() == boot_id
    wait_load_progress(dst.serial)
    check_disk(dst.serial, image)


def test_destination_without_backing_for_a_disk_is_refused_at_config(vmm_process, tmp_path):
    image = make_image(tmp_path / "disk.raw", 32)
    src, boot_id = _boot(vmm_process, image)
    dst = vmm_process(name="dst")  # its operator names no disk
    start_load(src.serial)
    url = f"unix:{tmp_path}/mig.sock"
    start_receive(dst, url)
    send(src, url)
    p = wait_progress(src, lambda p: p["status"] != "active")
    assert p["status"] == "failed" and "disk 'disk0'" in p["error"] and "backing" in p["error"], p
    assert p["phase"] == "starting", p  # refused at Config: no memory was ever sent
    dst.wait_event("vm.migration-receive-failed")
    src.wait_event("vm.migration-failed")
    assert dst.api.request("GET", "/api/v1/vm.info")[0] == 404  # it built no VM (and listens on)
    assert src.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Running"
    m = src.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16})")
    assert m.group(1).decode() == boot_id
    wait_load_progress(src.serial)  # the source's disk keeps working
    check_disk(src.serial, image)
