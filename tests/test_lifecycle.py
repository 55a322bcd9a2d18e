"""Guest-initiated reboot and power-off, parked vCPUs, and unhandled exits, on real KVM."""

import os
import time

import pytest

from vmmpy import _native

from helpers import SerialClient, int3_elf, native_vm


@pytest.mark.parametrize("method", ["acpi", "kbd", "cmos", "triple"])
def test_guest_reboot_methods(guest_vmm, method):
    vmm, serial = guest_vmm(vcpus=2)
    first_id, _ = serial.wait_ready()
    seq = vmm.events.seq
    serial.command(f"reboot {method}", f"REBOOTING {method}")
    vmm.wait_for_event("vm.rebooting", 30, after=seq)
    vmm.wait_for_event("vm.rebooted", 30, after=seq)
    second_id, cpus = serial.wait_ready()
    assert second_id != first_id and cpus == 2
    serial.command("echo after reboot", rb"after reboot\r\n")
    assert vmm.info()["state"] == "Running"
    assert vmm.boot_count == 2


def test_poweroff_ends_the_vmm_with_exit_code_0(vmm_process):
    p = vmm_process("--cpus", "boot=2", "--memory", "size=128M")
    p.serial.wait_ready()
    p.serial.command("poweroff", "POWEROFF")
    assert p.wait_exit(30) == 0
    names = p.event_names()
    assert names[0] == "vmm.starting" and "vm.shutdown" in names and names[-1] == "vmm.shutdown"
    assert not os.path.exists(p.api_path)


def test_poweroff_with_no_shutdown_keeps_the_api(vmm_process):
    p = vmm_process("--cpus", "boot=1", "--memory", "size=128M", "--no-shutdown")
    p.serial.wait_ready()
    p.serial.command("poweroff", "POWEROFF")
    p.wait_event("vm.shutdown")
    status, body = p.api.request("GET", "/api/v1/vmm.ping")
    assert status == 200 and body["pid"] == p.proc.pid
    status, body = p.api.request("GET", "/api/v1/vm.info")
    assert status == 200 and body["state"] == "Shutdown"
    # It boots again from the same config.
    assert p.api.request("PUT", "/api/v1/vm.boot")[0] == 204
    p.serial.wait_ready()
    assert p.api.request("PUT", "/api/v1/vmm.shutdown")[0] == 204
    assert p.wait_exit(30) == 0


def _native_vm(tmp_path, vcpus=2, kernel=None):
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
    path = str(tmp_path / "native.sock")
    import socket

    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    console = _native.Console(None)
    vm = native_vm(fds, console, memory_mib=128, vcpus=vcpus, kernel=kernel)
    client = SerialClient(path)
    conn, _ = listener.accept()
    console.add_client(conn.fileno())
    return vm, console, fds, client, (listener, conn)


def _wait_readable(fd, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            time.sleep(0.005)
    raise AssertionError("eventfd not written in time")


class _Typist:
    """Sends console input straight into the native console (the VMM's control loop is not used here)."""

    def __init__(self, console):
        self.console = console

    def send(self, line):
        self.console.push_input(line.encode() + b"\n")


def test_parked_vcpu_does_not_block_pause(tmp_path):
    vm, console, fds, serial, socks = _native_vm(tmp_path)
    try:
        vm.boot()
        serial.wait_ready()
        _Typist(console).send("reboot acpi")
        assert _wait_readable(fds[0]) == 1
        assert vm.lifecycle_request() == "reset"
        states = vm.vcpu_states()
        assert states[0] == "parked", states
        vm.pause(2.0)  # returns: the parked vCPU acknowledges
        assert vm.vcpu_states() == ["paused", "paused"]
        vm.resume()
        deadline = time.monotonic() + 30
        while vm.vcpu_states()[0] == "paused":  # until it has acted on the resume
            assert time.monotonic() < deadline, "the vCPU never left pause"
            time.sleep(0.005)
        assert vm.vcpu_states()[0] == "parked"  # it runs no more guest code
        assert vm.lifecycle_request() == "reset"
        serial.expect(b"REBOOTING acpi")
        with pytest.raises(AssertionError):
            serial.expect(b"ERR reboot did not happen", timeout=1.0)
    finally:
        vm.stop()
        console.close()
        serial.close()
        for s in socks:
            s.close()
        for fd in fds:
            os.close(fd)


def test_reset_requested_while_pausing_happens_on_resume(guest_vmm):
    """The guest asks for reset, and the VMM pauses before its control loop handled the request:
    the pause succeeds (the parked vCPU acknowledges), and resume carries the reboot out."""
    vmm, serial = guest_vmm(vcpus=2)
    first_id, _ = serial.wait_ready()
    seq = vmm.events.seq

    def park_then_pause():
        # Runs on the control loop thread, so the reset eventfd waits until this returns.
        vmm._machine.console.native.push_input(b"reboot kbd\n")
        deadline = time.monotonic() + 20
        while vmm._machine.vm.vcpu_states()[0] != "parked":
            assert time.monotonic() < deadline, vmm._machine.vm.vcpu_states()
            time.sleep(0.005)
        vmm.pause()

    vmm._loop.call(park_then_pause)
    serial.expect("REBOOTING kbd")
    vmm.info()  # two control-loop round trips: the reset eventfd has been handled
    assert vmm.info()["state"] == "Paused"
    assert not [e for e in vmm.events.events("vm.rebooting") if e["seq"] >= seq]
    vmm.resume()
    vmm.wait_for_event("vm.rebooted", 30, after=seq)
    second_id, _ = serial.wait_ready()
    assert second_id != first_id
    assert len(vmm.events.events("vm.rebooted")) == 1


@pytest.mark.skipif(
    not os.path.exists("/sys/module/kvm_pvm"),
    reason="needs the kvm_pvm host (its emulator refuses int3 in CPL0, see docs/host.md); "
    "hardware KVM delivers the exception instead",
)
def test_unhandled_exit_is_an_error_state_not_a_crash(tmp_path):
    from vmmpy import Vmm
    from vmmpy.config import VmConfig

    kernel = tmp_path / "int3.elf"
    kernel.write_bytes(int3_elf())
    with Vmm() as vmm:
        vmm.create(VmConfig(memory_mib=64, vcpus=1, kernel=str(kernel)))
        vmm.boot()
        ev = vmm.wait_for_event("vm.error", 30)
        assert "internal error" in ev["properties"]["reason"]
        assert ev["properties"]["regs"]["rip"] == hex(0x100000)
        info = vmm.info()
        assert info["state"] == "Running" and info["vmmpy_state"] == "Error" and info["error"]["vcpu"] == 0
        assert vmm.ping()["pid"] == os.getpid()  # the VMM lives on
        vmm.reboot()  # and can rebuild the VM
        vmm.wait_for_event("vm.rebooted", 30)


def test_a_second_reset_arriving_with_the_first_is_drained(guest_vmm):
    """Linux resets through ACPI and then through the i8042: two resets, one reboot."""
    vmm, serial = guest_vmm(vcpus=2)
    first_id, _ = serial.wait_ready()
    seq = vmm.events.seq

    def two_resets():
        # On the control thread: both land before it can look at the eventfd.
        vmm._machine.vm.inject_request("reset")
        vmm._machine.vm.inject_request("reset")

    vmm._loop.call(two_resets)
    vmm.wait_for_event("vm.rebooted", 30, after=seq)
    second_id, _ = serial.wait_ready()
    assert second_id != first_id
    serial.command("echo still here", rb"still here\r\n")
    vmm.info()  # two control-loop round trips: a second reset would have been handled
    vmm.info()
    assert len([e for e in vmm.events.events("vm.rebooted") if e["seq"] >= seq]) == 1


def test_a_console_output_nobody_reads_does_not_stall_the_guest(tmp_path):
    """A terminal or pipe that stops reading loses output; the vCPU writing it never blocks, so
    pause still answers at once."""
    r, w = os.pipe()
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
    console = _native.Console(w)
    vm = native_vm(fds, console)
    try:
        vm.boot()
        for _ in range(2000):  # far more echo output than a pipe holds
            console.push_input(b"echo " + b"x" * 100 + b"\n")
        time.sleep(1.0)
        vm.pause(1.0)
        assert vm.vcpu_states() == ["paused"]
        assert os.get_blocking(w)  # the caller's own descriptor keeps its mode
    finally:
        vm.stop()
        console.close()
        for fd in (r, w, *fds):
            os.close(fd)
