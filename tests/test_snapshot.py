"""Snapshot and restore on real KVM with the real test guest; the state document's versioning."""

import copy
import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from vmmpy import Vmm, _native
from vmmpy.config import SerialConfig
from vmmpy.errors import InvalidConfig, InvalidState
from vmmpy.snapshot import FORMAT_MAJOR, FORMAT_MINOR, check_version, decode_state, encode_state, state_head

from helpers import SerialClient, native_vm

FIXTURE = Path(__file__).parent / "fixtures" / "snapshot-1.0"


@pytest.mark.parametrize("shared", ["on", "off"])
def test_snapshot_restore_in_a_new_process_keeps_the_dirtying_guest(vmm_process, tmp_path, shared):
    src = vmm_process("--cpus", "boot=2", "--memory", f"size=128M,shared={shared}", name="src")
    boot_id, _ = src.serial.wait_ready()
    src.serial.command("dirty 16", "DIRTY STARTED")
    src.serial.wait_dirty_pass()
    assert src.api.request("PUT", "/api/v1/vm.pause")[0] == 204
    snap = tmp_path / "snap"
    status, body = src.api.request("PUT", "/api/v1/vm.snapshot", {"destination_url": f"file://{snap}"})
    assert status == 204, body
    assert {p.name for p in snap.iterdir()} == {"config.json", "state.json", "memory-0.bin"}
    # Zero pages are holes: far less disk than 128 MiB.
    assert (snap / "memory-0.bin").stat().st_blocks * 512 < 64 << 20
    src.api.request("PUT", "/api/v1/vmm.shutdown")
    assert src.wait_exit() == 0

    dst = vmm_process("--restore", f"source_url=file://{snap},resume=on", name="dst")
    dst.wait_event("vm.restored")
    # The restored RAM is of the kind the snapshot's config names (private RAM: no memfd).
    assert dst.api.request("GET", "/api/v1/vm.info")[1]["config"]["memory"]["shared"] is (shared == "on")
    assert dst.ram_memfds() == (1 if shared == "on" else 0)
    m = dst.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16}) cpus=2 dirty=on")
    assert m.group(1).decode() == boot_id  # the same boot: no reboot happened
    dst.serial.command("verify", rb"VERIFY OK \d+\r\n", timeout=60)
    dst.serial.command("echo restored", rb"restored\r\n")
    assert dst.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Running"


def test_snapshot_needs_a_paused_vm(guest_vmm, tmp_path):
    vmm, serial = guest_vmm()
    serial.wait_ready()
    with pytest.raises(InvalidState):
        vmm.snapshot(str(tmp_path / "s"))


def test_restore_the_oldest_format_fixture(tmp_path):
    snap = tmp_path / "snap"
    snap.mkdir()
    for name in ("config.json", "state.json"):
        shutil.copy(FIXTURE / name, snap / name)
    with gzip.open(FIXTURE / "memory-0.bin.gz") as src, open(snap / "memory-0.bin", "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert json.loads((snap / "state.json").read_text())["format_version"] == "1.0"
    assert json.loads((snap / "config.json").read_text())["memory"]["shared"] is False
    sock = str(tmp_path / "console.sock")
    vmm = Vmm.restore(f"file://{snap}", serial=SerialConfig(mode="Socket", socket=sock))
    serial = SerialClient(sock)
    try:
        assert vmm.info()["state"] == "Paused"
        # Before 1.4 "shared": false was written for memfd RAM: the RAM is built as it ran.
        assert vmm.info()["config"]["memory"]["shared"] is True
        vmm.resume()
        m = serial.command("status", rb"STATUS boot_id=([0-9a-f]{16}) cpus=1")
        assert m.group(1).decode() == (FIXTURE / "boot_id").read_text().strip()
        serial.command("echo old snapshot", rb"old snapshot\r\n")
    finally:
        serial.close()
        vmm.close()


def _doc():
    return json.loads((FIXTURE / "state.json").read_text())


def _encoded(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def test_versioning_rules():
    doc = _doc()
    assert decode_state(_encoded(doc)).format_version == "1.0"
    newer_minor = copy.deepcopy(doc)
    newer_minor["format_version"] = f"{FORMAT_MAJOR}.{FORMAT_MINOR + 1}"
    check_version(newer_minor)  # nothing this reader cannot honour: accepted
    newer_minor["teleport_mode"] = "on"
    with pytest.raises(InvalidConfig, match="teleport_mode"):
        decode_state(_encoded(newer_minor))
    newer_major = copy.deepcopy(doc)
    newer_major["format_version"] = f"{FORMAT_MAJOR + 1}.0"
    with pytest.raises(InvalidConfig, match="not supported"):
        decode_state(_encoded(newer_major))
    # Another major is named as such even when its native sections are not this major's.
    del newer_major["vcpus"]
    with pytest.raises(InvalidConfig, match="not supported"):
        decode_state(_encoded(newer_major))
    broken = copy.deepcopy(doc)
    broken["vcpus"][0]["sregs"] = "not base64!"
    with pytest.raises(InvalidConfig, match="malformed state document: vcpus: not base64"):
        decode_state(_encoded(broken))
    with pytest.raises(ValueError, match="vcpus"):
        state_head(vcpus=[])  # a native section is the native core's to write
    for junk in (b"[1]", b"\xff{", b'{"format_version": "1.0"}'):
        with pytest.raises(InvalidConfig, match="malformed state document"):
            decode_state(junk)


def test_state_restores_into_waiting_vcpu_threads_but_never_after_they_ran():
    """A migration's destination starts its vCPU threads at Config, held before any guest code,
    and restores the state into them at State: allowed until a vCPU first ran, refused after."""
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
    source = native_vm(fds, _native.Console(None))
    source.boot(paused=True)
    source.resume()
    source.pause()
    saved = source.save_state()
    source.stop()
    state, _ = _native.parse_state(encode_state(saved, state_head()))
    vm = native_vm(fds, _native.Console(None), restore=True)
    try:
        vm.boot(paused=True)
        vm.restore_state(state)
        vm.pause()  # returns once the thread holds still: its state can be read
        restored, original = json.loads(vm.save_state())["vcpus"][0], json.loads(saved)["vcpus"][0]
        assert (restored["regs"], restored["sregs"]) == (original["regs"], original["sregs"])
        vm.resume()
        # Let go: it runs (or, on its all-zero RAM, already asked for a reset and parked).
        assert vm.vcpu_states() in (["running"], ["parked"])
        vm.pause()
        with pytest.raises(InvalidState, match="before any vCPU ran"):
            vm.restore_state(state)
    finally:
        vm.stop()
        for fd in fds:
            os.close(fd)
