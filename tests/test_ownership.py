"""VM ownership on real KVM: while a migration owns the VM (``Ownership.MIGRATION``), every mutating
call is refused with ``VmMigrating`` (REST: 409), ``info`` keeps answering and the guest keeps
running; once ownership is back to ``Owned`` everything works again.

Two ways into the Migration state:

* by hand, on the control thread (``vmm._loop.call(...)``), exactly as ``send_migration`` flips it: a
  deterministic check of the refusal table and of the way back;
* through the real migration worker, ``send_migration`` to a *stalled destination*: a Unix socket
  that accepts the connection and reads the Start request but never answers, so the worker holds
  the VM for as long as the test wants. Hanging up on it makes the migration fail, which must hand
  the VM back to the VMM (and replay a reboot the guest asked for meanwhile).
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from vmmpy.api import ApiServer
from vmmpy.client import ApiClient
from vmmpy.errors import InvalidState, MigrationError, VmMigrating
from vmmpy.vmm import Ownership

MUTATING = ["pause", "resume", "reboot", "shutdown", "delete", "boot", "power_button"]
MUTATING_ENDPOINTS = ["vm.pause", "vm.resume", "vm.reboot", "vm.shutdown", "vm.delete", "vm.boot", "vm.power-button"]


def set_ownership(vmm, ownership: Ownership) -> None:
    vmm._loop.call(lambda: setattr(vmm._machine, "ownership", ownership))


def answers(serial, text: str) -> None:
    serial.command(f"echo {text}", f"{text}\r\n".encode())


def wait_owned(vmm, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while vmm.ownership is not Ownership.OWNED:
        assert time.monotonic() < deadline, (
            f"ownership is still {vmm.ownership} {timeout} s after the migration ended; "
            f"last events: {[e['event'] for e in vmm.events.events()][-4:]}"
        )
        time.sleep(0.01)


def widen_handback_window(vmm, seconds: float = 0.2) -> None:
    """Keeps each migration worker thread alive `seconds` longer after it has reported its end.

    A thread can always be preempted for that long between its last statement and its exit; this
    makes that happen every time instead of now and then, so a hand-back that depends on the
    worker thread being gone already is caught deterministically rather than by luck."""
    handover = vmm._loop.call(vmm._outgoing)  # built on the loop, as the first migration would
    run = handover._worker

    def worker(handle):
        try:
            run(handle)
        finally:
            time.sleep(seconds)

    handover._worker = worker


@pytest.fixture
def api(tmp_path):
    """An ApiServer for an in-process Vmm on a temp socket: start(vmm) -> ApiClient."""
    servers = []

    def start(vmm) -> ApiClient:
        path = str(tmp_path / "api.sock")
        servers.append(ApiServer(vmm, path).start())
        return ApiClient(path, timeout=30)

    yield start
    for s in servers:
        s.close()


class StalledDestination:
    """Accepts a migration connection, takes the Start request, never answers."""

    def __init__(self, path: str):
        self.url = f"unix:{path}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.listener.settimeout(10)
        self.conns: list[socket.socket] = []

    def take(self) -> socket.socket:
        conn, _ = self.listener.accept()
        self.conns.append(conn)
        conn.settimeout(10)
        got = b""
        while b'"version"' not in got:  # the Start request (header, then JSON): the worker now waits for us
            data = conn.recv(4096)
            assert data, f"the migration connection closed after {got!r}"
            got += data
        return conn

    def hang_up(self) -> None:
        while self.conns:
            self.conns.pop().close()

    def close(self) -> None:
        self.hang_up()
        self.listener.close()


@pytest.fixture
def stalled(tmp_path):
    made = []

    def start() -> StalledDestination:
        d = StalledDestination(str(tmp_path / f"dest{len(made)}.sock"))
        made.append(d)
        return d

    yield start
    for d in made:  # before the Vmm closes: a worker blocked on us would hold up vmm.close()
        d.close()


# ------------------------------------------------------------------------------------------
# Ownership flipped by hand on the control thread
# ------------------------------------------------------------------------------------------


def test_mutating_calls_refused_while_migrating(guest_vmm, api):
    vmm, serial = guest_vmm(vcpus=2)
    boot_id, _ = serial.wait_ready()
    client = api(vmm)
    assert vmm.ownership is Ownership.OWNED

    set_ownership(vmm, Ownership.MIGRATION)
    assert vmm.ownership is Ownership.MIGRATION
    mark = vmm.events.seq

    # In-process: every mutating call raises VmMigrating.
    for name in MUTATING:
        with pytest.raises(VmMigrating, match="migrated"):
            getattr(vmm, name)()
    # REST: 409 with the error chain.
    for endpoint in MUTATING_ENDPOINTS:
        status, body = client.request("PUT", endpoint)
        assert status == 409, (endpoint, status, body)
        assert body == [f"{endpoint} failed", "the VM is being migrated"], body
    # vm.create is answered by "a VM exists" (500, as CH's server), not by creating anything.
    status, body = client.request("PUT", "vm.create", {"cpus": {"boot_vcpus": 1}})
    assert status == 500, body

    # Reads still answer, and the guest still runs.
    info = vmm.info()
    assert info["state"] == "Running" and info["boot_count"] == 1
    status, body = client.request("GET", "vm.info")
    assert status == 200 and body["state"] == "Running" and body["config"]["cpus"]["boot_vcpus"] == 2
    status, body = client.request("GET", "vmm.ping")
    assert status == 200 and body["pid"] == os.getpid()
    answers(serial, "still running while migrating")
    assert vmm._machine.vm.vcpu_states() == ["running", "running"]
    assert vmm.ownership is Ownership.MIGRATION
    assert [e["event"] for e in vmm.events.events() if e["seq"] >= mark] == [], (
        "a refused call emitted lifecycle events"
    )

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

    vmm.shutdown()
    assert vmm.info()["state"] == "Created"  # as CH: the instance is dropped, the config kept
    assert vmm.ownership is Ownership.NONE
    with pytest.raises(InvalidState) as excinfo:  # nothing to press: not running, and not VmMigrating
        vmm.power_button()
    assert not isinstance(excinfo.value, VmMigrating)
    assert client.request("PUT", "vm.power-button")[0] == 405
    vmm.boot()
    third_id, _ = serial.wait_ready()
    assert third_id not in (boot_id, second_id)
    assert client.request("PUT", "vm.delete") == (204, None)
    assert client.request("GET", "vm.info")[0] == 404


def test_migrating_refuses_calls_on_a_paused_vm_too(guest_vmm, api):
    """The VM stays paused while a migration owns it; resume is refused until ownership is back."""
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
    assert vmm._machine.vm.vcpu_states() == ["paused"]
    set_ownership(vmm, Ownership.OWNED)
    vmm.resume()
    answers(serial, "resumed after migration gave the VM back")


# ------------------------------------------------------------------------------------------
# Ownership held by the real migration worker
# ------------------------------------------------------------------------------------------


def test_migration_worker_holds_the_vm(guest_vmm, api, stalled):
    vmm, serial = guest_vmm(vcpus=2)
    serial.wait_ready()
    client = api(vmm)
    dest = stalled()
    vmm.send_migration(dest.url)
    dest.take()
    assert vmm.ownership is Ownership.MIGRATION
    for name in MUTATING:
        with pytest.raises(VmMigrating):
            getattr(vmm, name)()
    for endpoint in MUTATING_ENDPOINTS:
        status, body = client.request("PUT", endpoint)
        assert status == 409 and body[1] == "the VM is being migrated", (endpoint, status, body)
    status, body = client.request("GET", "vm.info")
    assert status == 200 and body["state"] == "Running"
    progress = vmm.migration_progress()
    assert progress["status"] == "active" and progress["destination_url"] == dest.url
    answers(serial, "the guest runs on during the migration")


def test_failed_migration_hands_the_vm_back(guest_vmm, api, stalled):
    """Regression: the worker used to report its end (eventfd) while its thread was still alive, and
    the control loop, seeing it alive, dropped the report: ownership stayed Migration for good."""
    vmm, serial = guest_vmm(vcpus=1, memory_mib=64)
    serial.wait_ready()
    widen_handback_window(vmm)
    client = api(vmm)
    dest = stalled()
    for i in range(3):
        seq = vmm.events.seq
        handle = vmm.send_migration(dest.url)
        dest.take()
        assert client.request("PUT", "vm.pause")[0] == 409
        dest.hang_up()  # the destination goes away: the migration fails
        handle._thread.join(30)
        assert not handle._thread.is_alive()
        wait_owned(vmm)
        vmm.wait_for_event("vm.migration-failed", 60, after=seq)
        with pytest.raises(MigrationError):
            handle.wait(3)
        assert vmm.migration_progress()["status"] == "failed"
        assert client.request("PUT", "vm.pause") == (204, None), i
        assert client.request("PUT", "vm.resume") == (204, None), i
        answers(serial, f"owned again after failed migration {i}")


def test_reboot_latched_during_a_failed_migration_is_replayed(guest_vmm, stalled):
    """A reboot the guest asks for while the worker owns the VM is latched, and replayed on the
    source when the migration fails (it was lost with the hand-back race above)."""
    vmm, serial = guest_vmm(vcpus=1, memory_mib=64)
    boot_id, _ = serial.wait_ready()
    widen_handback_window(vmm)
    seen = {boot_id}
    dest = stalled()
    for i in range(3):
        seq = vmm.events.seq
        vmm.send_migration(dest.url)
        dest.take()
        serial.command("reboot acpi", "REBOOTING acpi")
        latched = vmm.wait_for_event("vm.migration-lifecycle-latched", 60, after=seq)
        assert latched["properties"]["event"] == "VmReboot"
        assert not [e for e in vmm.events.events("vm.rebooting") if e["seq"] >= seq]  # not while migrating
        dest.hang_up()
        try:
            vmm.wait_for_event("vm.rebooted", 60, after=seq)
        except TimeoutError:
            raise AssertionError(
                f"round {i}: the latched reboot was not replayed; ownership {vmm.ownership}, "
                f"vCPUs {vmm._machine.vm.vcpu_states()}"
            ) from None
        new_id, _ = serial.wait_ready()
        assert new_id not in seen
        seen.add(new_id)
        assert vmm.ownership is Ownership.OWNED
        assert vmm.migration_progress()["lifecycle_replayed_on"] == "source"


def test_migration_outcome_survives_a_reboot(guest_vmm, stalled):
    """Regression: _destroy_vm used to reset the migration bookkeeping (lines copied from __init__),
    so a reboot made vm.migration-progress answer 'no migration has run on this VMM'."""
    vmm, serial = guest_vmm(vcpus=1, memory_mib=64)
    serial.wait_ready()
    dest = stalled()
    seq = vmm.events.seq
    handle = vmm.send_migration(dest.url)
    dest.take()
    dest.hang_up()
    handle._thread.join(30)
    vmm.wait_for_event("vm.migration-failed", 60, after=seq)
    wait_owned(vmm)
    assert vmm.migration_progress()["status"] == "failed"
    vmm.reboot()
    serial.wait_ready()
    assert vmm.migration_progress()["status"] == "failed"


def test_cancel_ends_a_migration_stuck_on_its_destination(guest_vmm, stalled):
    """Regression: cancel used to only set a flag, so a worker blocked on a destination that does not
    answer kept the VM (409 to everything) until the 30 s transport timeout."""
    vmm, serial = guest_vmm(vcpus=1, memory_mib=64)
    serial.wait_ready()
    dest = stalled()
    seq = vmm.events.seq
    handle = vmm.send_migration(dest.url)
    dest.take()
    vmm.cancel_migration()
    handle._thread.join(20)  # well under the 30 s transport timeout the cancel must not wait for
    assert not handle._thread.is_alive(), "the migration worker ignored the cancel for 20 s"
    wait_owned(vmm)
    vmm.wait_for_event("vm.migration-cancelled", 60, after=seq)
    assert vmm.migration_progress()["status"] == "cancelled"
    vmm.pause()
    vmm.resume()
    answers(serial, "kept running through the cancelled migration")
