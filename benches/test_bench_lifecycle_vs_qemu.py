"""A guest reset or power-off during live migration: what QEMU does, next to what vmmpy does.

Run: python -m pytest benches/test_bench_lifecycle_vs_qemu.py -p no:cacheprovider -s
(the table of a run and what it says: docs/lifecycle-vs-qemu.md)

A report, not a test (tests/test_migration_lifecycle.py holds vmmpy to its own behaviour): each
cell boots the test guest (1 vCPU, 256 MiB, `dirty 16` running) in a source and a destination,
starts a TCP migration capped at 4 MiB/s so that pre-copy cannot converge, and once the migration
is active with 1 MiB of RAM sent types the event on the source's console. It then records what
the source guest did, how the migration ended, which process is left and in what state, and what
runs on the destination (a banner printed there, or the boot id `status` answers). Only that
every cell produced an observation is asserted.

QEMU is `-machine microvm -kernel <test guest>` with `-device i8042`, so that `reboot kbd`
(port 0x64 <- 0xfe) resets as `reboot triple` does. microvm has no ACPI register at port 0x600, so
the guest's `poweroff` is not honoured there; QEMU's handling of a guest shutdown request is what
a reset becomes under `-no-reboot`, hence the -no-reboot columns. vmmpy has no -no-reboot.
Once the source guest has acted (or ~10 s passed), QEMU's cap is raised to 1 GiB/s, so that a
guest still dirtying (the unhonoured power-off) does not keep the migration in pre-copy forever.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import BANNER
from migration_helpers import free_port, progress, send, start_receive
from qemu import QEMU, QemuGuest

from vmmpy import _native

MIB = 256
DIRTY = "dirty 16"
CAP = 4 << 20  # bytes/s: 16 MiB of dirty pages take 4 s a pass, longer than the downtime target
SENT = 1 << 20  # RAM bytes sent before the event: the migration is in pre-copy
EVENTS = {"reset (triple fault)": "reboot triple", "reset (i8042)": "reboot kbd", "power-off (ACPI)": "poweroff"}
QEMU_FLAGS = [(), ("-no-shutdown",), ("-no-reboot",), ("-no-reboot", "-no-shutdown")]
VMMPY_FLAGS = [(), ("--no-shutdown",)]
GUEST_REACTION = rb"vmmpy-testguest boot_id=([0-9a-f]{16})|ERR (?:reboot|poweroff) did not happen"
STATUS = rb"STATUS boot_id=([0-9a-f]{16})"


@dataclass
class Observation:
    event: str
    vmm: str
    source_guest: str = "?"
    migration: str = "?"
    source_vmm: str = "?"
    destination_vmm: str = "?"
    destination_guest: str = "?"


@pytest.fixture(scope="module")
def guest_elf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("guest") / "testguest.elf"
    path.write_bytes(bytes(_native.test_guest_elf()))
    return path


def reaction(serial, stopped, timeout: float = 10.0) -> tuple[str, str | None]:
    """What the source guest did after the event: a new banner (its new boot id), an ERR line, or
    nothing while `stopped()` says why it cannot answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            m = serial.expect(GUEST_REACTION, 0.2)
        except AssertionError:
            m = None
        if m and m.group(1):
            serial.expect(rb"READY\r?\n", 30)
            return "rebooted on the source", m.group(1).decode()
        if m:
            return f"not honoured ({m.group(0).decode()})", None
        why = stopped()
        if why:
            return why, None
        if time.monotonic() > deadline:
            return "no reaction within 10 s", None


def guest_on(serial, old: str, source_new: str | None) -> str:
    """Which boot answers `status` on a destination that runs."""
    try:
        banner = serial.expect(BANNER, 0.5)
    except AssertionError:
        banner = None
    try:
        boot = serial.command("status", STATUS, 15).group(1).decode()
    except AssertionError:
        return "no answer to `status`"
    if banner is not None:
        return "rebooted on the destination (banner)"
    if boot == old:
        return "the old boot (moved unchanged)"
    if boot == source_new:
        return "the boot the source rebooted into"
    return f"unknown boot {boot}"


def log_tail(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return f": {lines[-1][-70:]}" if lines else ""


# ---- QEMU ----------------------------------------------------------------------------------------


def qemu_state(g: QemuGuest) -> str:
    """'exited N: <last log line>' or the run state QMP reports."""
    if g.proc.poll() is not None:
        return f"exited {g.proc.returncode}{log_tail(g.log_path)}"
    try:
        return g.qmp.command("query-status")["status"]
    except (AssertionError, OSError):  # the monitor closed: the process is ending
        g.proc.wait(30)
        return f"exited {g.proc.returncode}{log_tail(g.log_path)}"


def alive(state: str) -> str:
    return state if state.startswith("exited") else f"alive, {state}"


def qemu_cell(tmp: Path, elf: Path, name: str, command: str, flags: tuple[str, ...]) -> Observation:
    obs = Observation(command, "QEMU " + (" ".join(flags) or "default"))
    args = ("-device", "i8042", *flags)
    src = QemuGuest(tmp, f"{name}-src", elf, MIB, args=args)
    dst = QemuGuest(tmp, f"{name}-dst", elf, MIB, incoming=True, args=args)
    try:
        old, _ = src.serial.wait_ready(60)
        src.serial.command(DIRTY, "DIRTY STARTED")
        uri = f"tcp:127.0.0.1:{free_port()}"
        dst.listen(uri)
        src.qmp.command("migrate-set-parameters", **{"max-bandwidth": CAP})
        src.qmp.command("migrate", uri=uri)
        deadline = time.monotonic() + 120
        while True:
            info = src.qmp.command("query-migrate")
            if info.get("status") == "active" and info.get("ram", {}).get("transferred", 0) >= SENT:
                break
            assert info.get("status") in ("setup", "active"), f"QEMU migration ended before the event: {info}"
            assert time.monotonic() < deadline, f"QEMU migration never active: {info}"
            time.sleep(0.01)
        src.serial.send(command)

        def stopped():
            st = qemu_state(src)
            return None if st in ("running", "finish-migrate", "postmigrate") else f"stopped ({st})"

        obs.source_guest, source_new = reaction(src.serial, stopped)
        if src.proc.poll() is None:
            try:
                src.qmp.command("migrate-set-parameters", **{"max-bandwidth": 1 << 30})
            except (AssertionError, OSError):
                pass  # the source QEMU is ending: the loop below records it
        end = None
        deadline = time.monotonic() + 120
        while end is None:
            try:
                status = src.qmp.command("query-migrate").get("status")
                if status in ("completed", "failed", "cancelled"):
                    end = status
            except (AssertionError, OSError):
                src.proc.wait(30)
                end = "none: the source QEMU is gone"
            assert time.monotonic() < deadline, "QEMU migration did not end"
            time.sleep(0.01)
        obs.migration = end
        obs.source_vmm = alive(qemu_state(src))

        deadline = time.monotonic() + 60
        while (st := qemu_state(dst)) == "inmigrate":
            assert time.monotonic() < deadline, "the QEMU destination stays in inmigrate"
            time.sleep(0.01)
        obs.destination_vmm = alive(st)
        obs.destination_guest = guest_on(dst.serial, old, source_new) if st == "running" else "not running"
    finally:
        src.close()
        dst.close()
    return obs


# ---- vmmpy ---------------------------------------------------------------------------------------


def vmmpy_state(v) -> str:
    """'exited N' or the VM's state. vm.info is served after the control-loop jobs queued before it
    (a source's teardown after migration-finished); a VMM left without a VM is given 5 s to exit,
    as it does unless --no-shutdown."""
    if v.proc.poll() is None:
        try:
            status, body = v.api.request("GET", "/api/v1/vm.info")
        except OSError:  # the API socket closed: the process is ending
            return f"exited {v.wait_exit(30)}"
        if status == 200:
            return f"alive, VM {body['state']}"
        try:
            return f"exited {v.wait_exit(5)}"
        except subprocess.TimeoutExpired:
            return "alive, no VM"
    return f"exited {v.wait_exit(30)}"


MIGRATION_ENDS = {"vm.migration-finished": "completed", "vm.migration-failed": "failed"}
MIGRATION_ENDS["vm.migration-cancelled"] = "cancelled"


def vmmpy_cell(vmm_process, name: str, command: str, flags: tuple[str, ...]) -> Observation:
    obs = Observation(command, "vmmpy " + (" ".join(flags) or "default"))
    src = vmm_process("--memory", f"size={MIB}M", *flags, name=f"{name}-src")
    dst = vmm_process(*flags, name=f"{name}-dst")
    try:
        return vmmpy_observe(obs, src, dst, command)
    finally:
        src.close()
        dst.close()


def vmmpy_observe(obs: Observation, src, dst, command: str) -> Observation:
    old, _ = src.serial.wait_ready(60)
    src.serial.command(DIRTY, "DIRTY STARTED")
    url = f"tcp:127.0.0.1:{free_port()}"
    receive = start_receive(dst, url)
    send(src, url, max_bandwidth=CAP, auto_converge=False)
    deadline = time.monotonic() + 120
    while True:
        p = progress(src)
        if p["status"] == "active" and p["transferred"] >= SENT:
            break
        assert p["status"] in ("setup", "active"), f"vmmpy migration ended before the event: {p}"
        assert time.monotonic() < deadline, f"vmmpy migration never active: {p}"
        time.sleep(0.01)
    src.serial.send(command)

    def stopped():
        if src.proc.poll() is not None:
            return f"stopped (exited {src.proc.returncode})"
        latched = [e for e in src.events() if e["event"] == "migration-lifecycle-latched"]
        if latched:
            return f"latched ({latched[0]['properties']['event']}), not acted on there"
        return None

    obs.source_guest, source_new = reaction(src.serial, stopped)
    deadline = time.monotonic() + 120
    while not (ends := [MIGRATION_ENDS[n] for n in src.event_names() if n in MIGRATION_ENDS]):
        assert src.proc.poll() is None, f"the vmmpy source exited without ending its migration: {src.event_names()}"
        assert time.monotonic() < deadline, f"vmmpy migration did not end: {src.event_names()}"
        time.sleep(0.01)
    fin = [e for e in src.events() if f"vm.{e['event']}" in MIGRATION_ENDS][0]["properties"]
    replayed = fin.get("lifecycle_replayed_on")
    obs.migration = ends[0] + (f", replayed on the {replayed}" if replayed else "")
    obs.source_vmm = vmmpy_state(src)
    receive.join(60)
    # A carried reboot or power-off is replayed once the destination runs the VM: wait for its end.
    deadline = time.monotonic() + 60
    while "vm.rebooting" in dst.event_names() and "vm.rebooted" not in dst.event_names():
        assert time.monotonic() < deadline, f"the destination's reboot did not end: {dst.event_names()}"
        time.sleep(0.01)
    if replayed == "destination" and fin.get("lifecycle_event") == "VmShutdown":
        dst.wait_event("vm.shutdown", timeout=60)
    obs.destination_vmm = vmmpy_state(dst)
    running = obs.destination_vmm.endswith("VM Running")
    obs.destination_guest = guest_on(dst.serial, old, source_new) if running else "not running"
    return obs


# ---- the report ----------------------------------------------------------------------------------

COLUMNS = ("event", "vmm", "source_guest", "migration", "source_vmm", "destination_vmm", "destination_guest")


def print_table(rows: list[Observation]) -> None:
    cells = [[getattr(r, c) for c in COLUMNS] for r in rows]
    print("\n| " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in cells:
        print("| " + " | ".join(row) + " |")


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 missing: run benches/setup.sh")
def test_lifecycle_during_migration_vs_qemu(vmm_process, tmp_path, guest_elf):
    rows = []
    for i, (event, command) in enumerate(EVENTS.items()):
        for j, flags in enumerate(QEMU_FLAGS):
            obs = qemu_cell(tmp_path, guest_elf, f"q{i}{j}", command, flags)
            obs.event = event
            print(obs, flush=True)
            rows.append(obs)
        for j, flags in enumerate(VMMPY_FLAGS):
            obs = vmmpy_cell(vmm_process, f"v{i}{j}", command, flags)
            obs.event = event
            print(obs, flush=True)
            rows.append(obs)
    print_table(rows)
    for r in rows:
        assert "?" not in (r.source_guest, r.migration, r.source_vmm, r.destination_vmm, r.destination_guest), r
