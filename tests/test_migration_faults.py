"""Failure injection on the source side: a destination that fails at each protocol step. The
source keeps a working VM (or, when only the answer to Complete is missing, a paused one: the
destination may be running the guest), and the next attempt succeeds. Both ways to complete are
covered: State then Complete, and (capability state-completes) a State that carries the Complete."""

import json
import socket
import struct
import threading

import pytest

from vmmpy import Vmm
from vmmpy.config import SerialConfig, VmConfig
from vmmpy.errors import MigrationError
from vmmpy.migration.protocol import HEADER, Command, Status

from helpers import SerialClient

STEPS = ["start", "config", "memory", "state", "complete"]
FAULTS = ["close", "error", "garbage"]
CAPABILITIES = ["zero-ranges", "lifecycle-event"]


class FaultyDestination:
    """Speaks the protocol until `step`, then closes, answers Error, or answers garbage."""

    def __init__(self, path: str, step: str, fault: str, capabilities=CAPABILITIES, final_phase=None):
        self.step, self.fault, self.capabilities = step, fault, capabilities
        # fault "final": only a Memory frame that comes once final_phase() holds fails (Error),
        # and the command that follows it is kept in `after_refusal`.
        self.final_phase = final_phase
        self.after_refusal = None
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _recv(self, conn, n):
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _serve(self):
        conn, _ = self.listener.accept()
        try:
            while True:
                command, _, _, length = HEADER.unpack(self._recv(conn, HEADER.size))
                payload = self._recv(conn, length) if length else b""
                if command == Command.MEMORY:
                    for i in range(0, len(payload), 16):
                        _, size, flags = struct.unpack_from("<QII", payload, i)
                        if not flags & 1:
                            self._recv(conn, size)
                name = Command(command).name.lower()
                if name == "abandon":
                    conn.sendall(HEADER.pack(Status.OK, 0, 0, 0))
                    return
                if name == self.step and self.fault == "final":
                    if self.final_phase():
                        msg = b"injected failure of the last pass"
                        conn.sendall(HEADER.pack(Status.ERROR, 0, 0, len(msg)) + msg)
                        self.after_refusal = HEADER.unpack(self._recv(conn, HEADER.size))
                        return
                elif name == self.step:
                    if self.fault == "close":
                        return
                    if self.fault == "deaf":  # answers Ok, then takes nothing more
                        conn.shutdown(socket.SHUT_RD)  # (on a unix socket the peer's sends fail)
                        conn.sendall(HEADER.pack(Status.OK, 0, 0, 0))
                        self._recv(conn, 1)  # EOF once the source hangs up
                        return
                    if self.fault == "error":
                        msg = b"injected failure"
                        conn.sendall(HEADER.pack(Status.ERROR, 0, 0, len(msg)) + msg)
                    else:
                        conn.sendall(HEADER.pack(7, 0, 0, 3) + b"???")
                    continue
                body = (
                    json.dumps({"version": 1, "capabilities": self.capabilities}).encode() if name == "start" else b""
                )
                conn.sendall(HEADER.pack(Status.OK, 0, 0, len(body)) + body)
        except (EOFError, OSError):
            pass
        finally:
            conn.close()
            self.listener.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    sock = str(tmp / "console.sock")
    vmm = Vmm(serial=SerialConfig(mode="Socket", socket=sock), no_shutdown=True)
    serial = SerialClient(sock)
    vmm.create(VmConfig(memory_mib=128, vcpus=2))
    vmm.boot()
    boot_id, _ = serial.wait_ready()
    serial.command("dirty 32", "DIRTY STARTED")
    yield vmm, serial, boot_id, tmp
    serial.close()
    vmm.close()


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("step,completes", [*((step, False) for step in STEPS), *((step, True) for step in STEPS[:-1])])
def test_destination_fails_at_each_step(source, step, completes, fault):
    vmm, serial, boot_id, tmp = source
    path = str(tmp / f"{step}-{fault}-{completes}.sock")
    dest = FaultyDestination(path, step, fault, CAPABILITIES + ["state-completes"] * completes)
    handle = vmm.send_migration(f"unix:{path}")
    with pytest.raises(MigrationError):
        handle.wait(60)
    dest.thread.join(10)
    info = vmm.info()
    if step == ("state" if completes else "complete") and fault != "error":
        # The answer to Complete never came: the destination may run the guest, so the source
        # must not. It stays paused until the operator decides.
        assert info["state"] == "Paused"
        assert vmm.events.events("vm.migration-failed")[-1]["properties"]["source_paused"] is True
        vmm.resume()
    else:
        assert info["state"] == "Running"
    m = serial.command("status", rb"STATUS boot_id=([0-9a-f]{16}) cpus=2 dirty=on")
    assert m.group(1).decode() == boot_id
    serial.command(f"echo after {step} {fault}", f"after {step} {fault}")


def test_a_refused_last_pass_resumes_the_source_though_the_state_followed_it(source):
    """The last pass's frame is followed by the State that completes before its answer is read:
    a refusal of that frame still means the destination never loaded the State (it ended the
    attempt there), so the source runs the guest again."""
    vmm, serial, boot_id, tmp = source
    path = str(tmp / "final.sock")
    final_phase = lambda: vmm.migration_progress()["phase"] not in ("starting", "precopy")  # noqa: E731
    dest = FaultyDestination(path, "memory", "final", CAPABILITIES + ["state-completes"], final_phase)
    handle = vmm.send_migration(f"unix:{path}")
    with pytest.raises(MigrationError, match="injected failure of the last pass"):
        handle.wait(60)
    dest.thread.join(10)
    command, _, arg, _ = dest.after_refusal  # the State had left before the refusal was read
    assert (command, arg) == (Command.STATE, 1)
    assert vmm.info()["state"] == "Running"
    assert vmm.events.events("vm.migration-failed")[-1]["properties"]["source_paused"] is False
    m = serial.command("status", rb"STATUS boot_id=([0-9a-f]{16}) cpus=2 dirty=on")
    assert m.group(1).decode() == boot_id


def test_a_complete_that_could_not_be_sent_resumes_the_source(source):
    """Complete never left (the destination stopped reading after its State answer): the
    destination cannot run the guest, so the source runs it again instead of waiting paused."""
    vmm, serial, boot_id, tmp = source
    path = str(tmp / "deaf.sock")
    dest = FaultyDestination(path, "state", "deaf")
    handle = vmm.send_migration(f"unix:{path}")
    with pytest.raises(MigrationError, match="connection failed"):
        handle.wait(60)
    dest.thread.join(10)
    assert vmm.info()["state"] == "Running"
    assert vmm.events.events("vm.migration-failed")[-1]["properties"]["source_paused"] is False
    m = serial.command("status", rb"STATUS boot_id=([0-9a-f]{16}) cpus=2 dirty=on")
    assert m.group(1).decode() == boot_id


def test_source_vm_is_intact_after_all_faults(source):
    vmm, serial, boot_id, tmp = source
    serial.command("verify", rb"VERIFY OK \d+\r\n", timeout=60)
    serial.command("dirty 32", "DIRTY STARTED")
    # And a real destination still takes it.
    dst = Vmm(serial=SerialConfig(mode="Null"))
    try:
        receive = dst.receive_migration(f"unix:{tmp}/good.sock")
        vmm.send_migration(f"unix:{tmp}/good.sock").wait(60)
        assert receive.wait(30)
        assert dst.info()["state"] == "Running"
    finally:
        dst.close()
