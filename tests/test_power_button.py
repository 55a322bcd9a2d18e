"""The ACPI power button on real KVM with the test guest: a press goes through the Generic Event
Device (event bit + GSI 5 edge), the guest reads the GED's event register from its idle loop, prints
`POWER BUTTON` and powers off through ACPI S5, and the VMM ends the VM as for any guest power-off.
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import time

import pytest

from vmmpy import _native
from vmmpy.errors import InvalidState, VmNotCreated

from helpers import SerialClient, native_vm

GED_GSI = 5
PIC_IRR = 8 + 1  # kvm_irqchip: chip_id, pad, then kvm_pic_state {last_irr, irr, ...}


def _pic_master(vm) -> bytes:
    return base64.b64decode(json.loads(vm.save_state())["machine"]["pic_master"])


def test_power_button_through_the_python_api(guest_vmm):
    vmm, serial = guest_vmm(vcpus=2)
    serial.wait_ready()
    serial.command("echo no press yet", rb"no press yet\r\n")
    seq = vmm.events.seq
    vmm.power_button()
    serial.expect(rb"POWER BUTTON\r\n")
    vmm.wait_for_event("vm.shutdown", 30, after=seq)
    assert vmm.wait(30) == 0
    assert b"did not happen" not in serial.buf


def test_power_button_reaches_a_guest_busy_dirtying_memory(guest_vmm):
    vmm, serial = guest_vmm(vcpus=2)
    serial.wait_ready()
    serial.command("dirty 8", rb"DIRTY STARTED mib=8 rate=0\r\n")
    seq = vmm.events.seq
    vmm.power_button()
    serial.expect(rb"POWER BUTTON\r\n")
    vmm.wait_for_event("vm.shutdown", 30, after=seq)
    assert vmm.wait(30) == 0


def test_power_button_through_the_rest_api(vmm_process):
    p = vmm_process("--cpus", "boot=1", "--memory", "size=128M")
    p.serial.wait_ready()
    status, body = p.api.request("PUT", "/api/v1/vm.power-button")
    assert (status, body) == (204, None)
    p.serial.expect(rb"POWER BUTTON\r\n")
    assert p.wait_exit(30) == 0
    names = p.event_names()
    assert "vm.shutdown" in names and names[-1] == "vmm.shutdown"


def test_a_paused_vm_takes_the_press_on_resume(vmm_process):
    p = vmm_process("--cpus", "boot=2", "--memory", "size=128M", "--no-shutdown")
    p.serial.wait_ready()
    assert p.api.request("PUT", "/api/v1/vm.pause")[0] == 204
    assert p.api.request("PUT", "/api/v1/vm.power-button")[0] == 204
    status, body = p.api.request("GET", "/api/v1/vm.info")
    assert body["state"] == "Paused" and set(body["vcpu_states"]) == {"paused"}
    assert p.api.request("PUT", "/api/v1/vm.resume")[0] == 204
    p.serial.expect(rb"POWER BUTTON\r\n")
    p.wait_event("vm.shutdown")
    assert p.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Shutdown"
    # Nothing runs now: the press is refused with the state named.
    status, body = p.api.request("PUT", "/api/v1/vm.power-button")
    assert status == 405 and "Shutdown" in str(body), (status, body)
    assert p.api.request("PUT", "/api/v1/vmm.shutdown")[0] == 204
    assert p.wait_exit(30) == 0


def test_no_vm_or_a_vm_not_booted_has_no_button_to_press(vmm_process, tmp_path):
    from vmmpy import Vmm
    from vmmpy.config import VmConfig

    with Vmm() as vmm:
        with pytest.raises(VmNotCreated, match="no VM has been created"):
            vmm.power_button()
        vmm.create(VmConfig(memory_mib=128, vcpus=1))
        with pytest.raises(InvalidState, match="state Created"):
            vmm.power_button()

    p = vmm_process()
    status, body = p.api.request("PUT", "/api/v1/vm.power-button")
    assert status == 404 and "no VM has been created" in str(body), (status, body)


def test_the_press_raises_the_ged_interrupt_line(tmp_path):
    """At the native layer: the press pulses GSI 5, which KVM's PIC latches (the test guest never
    acknowledges interrupts), and the guest finds the event in the GED's register after resume."""
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
    path = str(tmp_path / "native.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    console = _native.Console(None)
    vm = native_vm(fds, console, memory_mib=128)
    client = SerialClient(path)
    conn, _ = listener.accept()
    try:
        console.add_client(conn.fileno())
        vm.boot()
        client.wait_ready()
        vm.pause()
        irr = _pic_master(vm)[PIC_IRR]
        assert not irr & (1 << GED_GSI), f"GSI {GED_GSI} pending before the press (PIC IRR {irr:#04x})"
        vm.power_button()
        # KVM injects an irqfd's interrupt from a kernel worker, shortly after the eventfd write.
        deadline = time.monotonic() + 10
        while not (irr := _pic_master(vm)[PIC_IRR]) & (1 << GED_GSI):
            assert time.monotonic() < deadline, f"the press did not raise GSI {GED_GSI} (PIC IRR {irr:#04x})"
            time.sleep(0.01)
        vm.resume()
        client.expect(rb"POWER BUTTON\r\n")
        readable, _, _ = select.select([fds[1]], [], [], 30)
        assert readable, "the guest's power-off did not reach the guest-exit eventfd in 30 s"
        assert vm.lifecycle_request() == "shutdown"
    finally:
        vm.stop()
        console.close()
        client.close()
        conn.close()
        listener.close()
        for fd in fds:
            os.close(fd)
