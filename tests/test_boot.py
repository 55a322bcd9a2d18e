"""Boot the embedded test guest on real KVM and talk to it over the serial console."""


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


def test_guest_memory_is_readable_from_python(guest_vmm):
    """The zero page vmmpy wrote is visible through the zero-copy buffer, and it is read-only."""
    vmm, serial = guest_vmm()
    serial.wait_ready()
    (region,) = vmm.memory_regions()
    view = memoryview(region)
    assert view.readonly and len(view) == 128 << 20
    zero_page = view[0x7000:0x8000]
    assert bytes(zero_page[0x202:0x206]) == b"HdrS"
    cmd_ptr = int.from_bytes(zero_page[0x228:0x22C], "little")
    cmdline = bytes(view[cmd_ptr:cmd_ptr + 200]).split(b"\0")[0]
    assert cmdline.startswith(b"console=ttyS0") and b"vmmpy.cpus=1" in cmdline
    with pytest.raises(TypeError):
        view[0] = 1
    view.release()


def test_kvm_check_reports_api_version():
    assert "KVM API 12" in _native.kvm_check()
