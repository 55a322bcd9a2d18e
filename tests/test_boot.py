"""Boot the embedded test guest on real KVM and talk to it over the serial console."""

import struct

import pytest

from vmmpy import _native


@pytest.mark.parametrize("vcpus", [1, 2])
def test_boot_ready_echo(guest_vmm, vcpus):
    vmm, serial = guest_vmm(vcpus=vcpus)
    boot_id, cpus = serial.wait_ready()
    assert cpus == vcpus
    serial.command("echo hello from the host", rb"hello from the host\r\n")
    m = serial.command("status", rb"STATUS boot_id=([0-9a-f]{16}) cpus=(\d+) dirty=off")
    assert m.group(1).decode() == boot_id
    info = vmm.info()
    assert info["state"] == "Running"
    assert info["payload_kind"] == "test-guest"
    assert info["config"]["cpus"]["boot_vcpus"] == vcpus
    assert vmm.events.events("vm.booted")


def test_dirty_then_verify_two_vcpus(guest_vmm):
    vmm, serial = guest_vmm(vcpus=2, memory_mib=256)
    serial.wait_ready()
    serial.command("dirty 32", rb"DIRTY STARTED mib=32")
    serial.wait_dirty_pass()
    m = serial.command("stop", rb"DIRTY STOPPED gen=(\d+)\r\n")
    assert int(m.group(1)) >= 1
    m = serial.command("verify", rb"VERIFY OK (\d+)\r\n", timeout=60)
    assert int(m.group(1)) == 32 * 256


PVH_START_INFO = 0x6000
PVH_MAGIC = 0x336EC578


def start_info_fields(view) -> dict:
    """hvm_start_info (version 1) as vmmpy wrote it at 0x6000."""
    names = (
        "magic",
        "version",
        "flags",
        "nr_modules",
        "modlist_paddr",
        "cmdline_paddr",
        "rsdp_paddr",
        "memmap_paddr",
        "memmap_entries",
    )
    return dict(zip(names, struct.unpack_from("<IIIIQQQQI", view, PVH_START_INFO)))


@pytest.mark.parametrize("boot_protocol", [None, "linux64"])
def test_guest_memory_is_readable_from_python(guest_vmm, boot_protocol):
    """The boot information vmmpy wrote (hvm_start_info for PVH, the test guest's default entry;
    the zero page for the 64-bit entry) is visible through the zero-copy buffer, which is
    read-only; the guest booted from it either way (READY, its command line parsed)."""
    vmm, serial = guest_vmm(boot_protocol=boot_protocol)
    serial.wait_ready()
    assert vmm.info()["boot_protocol"] == (boot_protocol or "pvh")
    (region,) = vmm.memory_regions()
    view = memoryview(region)
    assert view.readonly and len(view) == 128 << 20
    if boot_protocol is None:
        info = start_info_fields(view)
        assert (info["magic"], info["version"], info["nr_modules"]) == (PVH_MAGIC, 1, 0)
        entries = [
            struct.unpack_from("<QQI", view, info["memmap_paddr"] + 24 * i) for i in range(info["memmap_entries"])
        ]
        assert (0x100000, (128 << 20) - 0x100000, 1) in entries  # RAM from 1 MiB (ECAM is reserved too)
        assert bytes(view[info["rsdp_paddr"] : info["rsdp_paddr"] + 8]) == b"RSD PTR "
        cmd_ptr = info["cmdline_paddr"]
        assert bytes(view[0x7000:0x8000]) == bytes(4096)  # no zero page
    else:
        zero_page = view[0x7000:0x8000]
        assert bytes(zero_page[0x202:0x206]) == b"HdrS"
        cmd_ptr = int.from_bytes(zero_page[0x228:0x22C], "little")
        assert start_info_fields(view)["magic"] == 0
    cmdline = bytes(view[cmd_ptr : cmd_ptr + 200]).split(b"\0")[0]
    assert cmdline.startswith(b"console=ttyS0") and b"vmmpy.cpus=1" in cmdline
    with pytest.raises(TypeError):
        view[0] = 1
    view.release()


def test_kvm_check_reports_api_version():
    assert "KVM API 12" in _native.kvm_check()
