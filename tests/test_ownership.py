"""VM ownership on real KVM: while a migration worker owns the VM (``Ownership.MIGRATION``), every
mutating call is refused with ``VmMigrating`` (REST: 409), ``info`` keeps answering and the guest
keeps running; once ownership is back to ``Owned`` everything works again.

Ownership is switched the way a migration worker does it: an assignment run on the VMM's control
thread through ``Vmm._call``, so it is ordered with every other VM-mutating call.
"""

from __future__ import annotations

import os

import pytest

from vmmpy.api import ApiServer
from vmmpy.client import ApiClient
from vmmpy.errors import InvalidState, VmMigrating
from vmmpy.vmm import Ownership

MUTATING = ["pause", "resume", "reboot", "shutdown", "delete", "boot", "power_button"]
MUTATING_ENDPOINTS = ["vm.pause", "vm.resume", "vm.reboot", "vm.shutdown", "vm.delete", "vm.boot",
                      "vm.power-button"]


def set_ownership(vmm, ownership: Ownership) -> None:
    vmm._call(lambda: setattr(vmm, "ownership", ownership))


def answers(serial, text: str) -> None:
    serial.command(f"echo {text}", f"{text}\r\n".encode(), timeout=10)


@pytest.fixture
def api(tmp_path):
    """An ApiServer for an in-process Vmm on a temp socket; yields (start(vmm) -> ApiClient)."""
    servers = []

    def start(vmm) -> ApiClient:
        path = str(tmp_path / "api.sock")
        servers.append(ApiServer(vmm, path).start())
        return ApiClient(path, timeout=30)

    yield start
    for s in servers:
        s.close()


def test_mutating_calls_refused_while_migrating(guest_vmm, api):
    vmm, serial = guest_vmm(vcpus=2)
    boot_id, _ = serial.wait_ready()
    client = api(vmm)
    assert vmm.ownership is Ownership.OWNED

    set_ownership(vmm, Ownership.MIGRATION)
    assert vmm.ownership is Ownership.MIGRATION
    mark = vmm.events.seq

    # In-process: every mutating call raises VmMigrating; none changes anything.
    for name in MUTATING:
        with pytest.raises(VmMigrating, match="migrated"):
            getattr(vmm, name)()
    # REST: 409 with the error chain.
    for endpoint in MUTATING_ENDPOINTS:
        status, body = client.request("PUT", endpoint)
        assert status == 409, (endpoint, status, body)
        assert body == [f"{endpoint} failed", "the VM is being migrated"], body
    # vm.create is answered by "a VM exists" (405), not by creating anything.
    status, body = client.request("PUT", "vm.create", {"cpus": {"boot_vcpus": 1}})
    assert status == 405, body

    # Reads still answer, and the guest still runs.
    info = vmm.info()
    assert info["state"] == "Running" and info["boot_count"] == 1
    assert info["vcpu_states"] == ["running", "running"]
    status, body = client.request("GET", "vm.info")
    assert status == 200 and body["state"] == "Running" and body["config"]["cpus"]["boot_vcpus"] == 2
    status, body = client.request("GET", "vmm.ping")
    assert status == 200 and body["pid"] == os.getpid()
    answers(serial, "still running while migrating")
    assert vmm.ownership is Ownership.MIGRATION
    assert [e["event"] for e in vmm.events.events() if e["seq"] >= mark] == [], \
        "a refused call emitted lifecycle events"

    # Back to Owned: the same calls work again, in-process and through REST.
    set_ownership(vmm, Ownership.OWNED)
    vmm.pause()
    assert vmm.info()["state"] == "Paused"
    vmm.resume()
    answers(serial, "owned again")
    assert client.request("PUT", "vm.pause") == (204, None)
    assert client.request("PUT", "vm.resume") == (204, None)
    answers(serial, "owned again via rest")

    seq = vmm.events.seq
    assert client.request("PUT", "vm.reboot") == (204, None)
    vmm.wait_for_event("vm.rebooted", 30, after=seq)
    second_id, cpus = serial.wait_ready()
    assert second_id != boot_id and cpus == 2
    assert vmm.ownership is Ownership.OWNED  # a rebuilt VM is owned by the VMM

    with pytest.raises(InvalidState) as excinfo:  # the platform has no power button: not VmMigrating
        vmm.power_button()
    assert not isinstance(excinfo.value, VmMigrating)
    status, _ = client.request("PUT", "vm.power-button")
    assert status == 405

    vmm.shutdown()
    assert vmm.info()["state"] == "Shutdown"
    assert vmm.ownership is Ownership.NONE
    vmm.boot()
    third_id, _ = serial.wait_ready()
    assert third_id not in (boot_id, second_id)
    assert client.request("PUT", "vm.delete") == (204, None)
    assert client.request("GET", "vm.info")[0] == 404


def test_migrating_refuses_calls_on_a_paused_vm_too(guest_vmm, api):
    """A migration typically starts from a paused (or pausing) VM: resume must be refused as well,
    and the VM stays paused until ownership comes back."""
    vmm, serial = guest_vmm(vcpus=1, memory_mib=64)
    serial.wait_ready()
    client = api(vmm)
    vmm.pause()
    set_ownership(vmm, Ownership.MIGRATION)
    for name in MUTATING:
        with pytest.raises(VmMigrating):
            getattr(vmm, name)()
    assert client.request("PUT", "vm.resume")[0] == 409
    assert vmm.info()["state"] == "Paused"
    set_ownership(vmm, Ownership.OWNED)
    vmm.resume()
    answers(serial, "resumed after migration gave the VM back")


@pytest.mark.xfail(strict=True, reason="product bug: handing ownership back to Owned does not re-examine the reset "
                   "the guest latched while migrating (vmm.py _on_lifecycle drops it); the guest stays parked")
def test_guest_reboot_requested_while_migrating_is_not_lost(guest_vmm):
    """The guest asks for a reset while a migration owns the VM: the control loop leaves the request
    to the migration worker. If the migration is abandoned and ownership returns to the VMM, the
    request must still be carried out, not leave the guest parked for ever."""
    vmm, serial = guest_vmm(vcpus=1, memory_mib=64)
    first_id, _ = serial.wait_ready()
    set_ownership(vmm, Ownership.MIGRATION)
    seq = vmm.events.seq
    serial.command("reboot acpi", "REBOOTING acpi")
    with pytest.raises(TimeoutError):  # refused while migrating: the worker's business
        vmm.wait_for_event("vm.rebooting", 1.0, after=seq)
    assert vmm.info()["vcpu_states"] == ["parked"]  # the request is latched, the guest waits for it
    set_ownership(vmm, Ownership.OWNED)
    try:
        vmm.wait_for_event("vm.rebooted", 3, after=seq)  # a reboot takes ~30 ms here
    except TimeoutError:
        raise AssertionError(f"reset latched while migrating was dropped: vCPUs {vmm.info()['vcpu_states']}, "
                             f"pending request {vmm._vm.lifecycle_request()!r}") from None
    second_id, _ = serial.wait_ready()
    assert second_id != first_id
