"""Guest reboot and power-off during live migration: latch, carry, replay (vmmpy's reason to be).

Each cell of the scenario table is one line: what happens (event), when (timing), and how the
migration ends (outcome). Every cell checks the end state on both sides: which process lives, the
VM state, console banners and boot ids, events and exit codes, and `verify` after a reboot.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import pytest

from helpers import BANNER
from migration_helpers import free_port, send, start_receive, wait_progress
from proxy import CuttableProxy

GUEST_EVENTS = {
    "acpi": "reboot acpi",
    "kbd": "reboot kbd",
    "cmos": "reboot cmos",
    "triple": "reboot triple",
    "poweroff": "poweroff",
}
FAILURES = ("cut", "dest-killed", "cancel", "no-capability")


@dataclass(frozen=True)
class Cell:
    event: str  # a GUEST_EVENTS key, "sigterm" or "vmm.shutdown"
    timing: str  # before-start | iter0 | later-iter | pause-window | after-state | after-complete
    outcome: str  # tcp | local | cut | dest-killed | cancel | no-capability

    def __str__(self):
        return f"{self.event}-{self.timing}-{self.outcome}"


SCENARIOS = [
    # every guest event source, latched in pre-copy and carried to the destination
    Cell("acpi", "iter0", "tcp"),
    Cell("kbd", "later-iter", "tcp"),
    Cell("cmos", "later-iter", "tcp"),
    Cell("triple", "iter0", "tcp"),
    Cell("poweroff", "later-iter", "tcp"),
    Cell("poweroff", "iter0", "tcp"),
    # the pause window (CH issue 8917): the request is made as the vCPUs stop; a same-host (local)
    # migration pauses right after Config, so this is the only window it has
    Cell("acpi", "pause-window", "tcp"),
    Cell("acpi", "pause-window", "local"),
    Cell("poweroff", "pause-window", "local"),
    Cell("kbd", "pause-window", "no-capability"),
    # failures after the event: the source replays it itself
    Cell("acpi", "later-iter", "cut"),
    Cell("kbd", "iter0", "dest-killed"),
    Cell("triple", "later-iter", "cancel"),
    Cell("cmos", "later-iter", "no-capability"),
    Cell("poweroff", "later-iter", "cancel"),
    Cell("poweroff", "iter0", "no-capability"),
    # host stop requests are never carried: they cancel the migration and stop the source
    Cell("sigterm", "later-iter", "tcp"),
    Cell("vmm.shutdown", "iter0", "tcp"),
    # outside the migration's window
    Cell("acpi", "before-start", "tcp"),
    Cell("kbd", "after-state", "tcp"),
    Cell("triple", "after-complete", "local"),
    Cell("poweroff", "after-complete", "tcp"),
]


def _hooks(cell: Cell) -> str:
    hooks = []
    if cell.timing in ("iter0", "later-iter"):
        hooks.append("frame-delay-ms=150")  # a slow link: pre-copy lasts long enough to hit
    if cell.timing == "pause-window":
        hooks.append(f"request-at-pause={'shutdown' if cell.event == 'poweroff' else 'reset'}")
    if cell.outcome in ("cut", "dest-killed", "cancel"):
        hooks.append("final-phase-delay-ms=1500")  # the window in which the failure strikes
    if cell.timing == "after-state":
        hooks.append("complete-delay-ms=1000")
    return ",".join(hooks)


def _settled(vmm) -> None:
    """A positive sign that the VMM has acted on everything already asked of it: its guest answers,
    and an API call made now is served after every control-loop job queued before it (a replayed
    guest request, a source's teardown after migration-finished)."""
    if vmm.api.request("GET", "/api/v1/vm.info")[0] == 200:
        vmm.serial.command("echo settled", rb"settled\r\n")
    vmm.api.request("GET", "/api/v1/vm.info")


def _boot_id(serial) -> str:
    return serial.wait_ready()[0]


def _new_banner(serial, old: str) -> str:
    m = serial.expect(BANNER, 30)
    serial.expect(rb"READY\r?\n", 30)
    new = m.group(1).decode()
    assert new != old, "a reboot must give a new boot id"
    return new


@pytest.mark.parametrize("cell", SCENARIOS, ids=str)
def test_lifecycle_during_migration(vmm_process, tmp_path, cell: Cell):
    local = cell.outcome == "local"
    src = vmm_process("--cpus", "boot=2", "--memory", "size=384M", name="src", hooks=_hooks(cell))
    dst_hooks = "no-lifecycle-capability=on" if cell.outcome == "no-capability" else ""
    dst = (
        vmm_process("--no-shutdown", name="dst", hooks=dst_hooks)
        if cell.event == "poweroff" and cell.timing == "after-complete"
        else vmm_process(name="dst", hooks=dst_hooks)
    )
    boot_id = _boot_id(src.serial)
    src.serial.command("dirty 192", "DIRTY STARTED")

    if local or cell.timing == "pause-window" and cell.event == "poweroff":
        url = f"unix:{tmp_path}/mig.sock"
    else:
        url = f"tcp:127.0.0.1:{free_port()}"
    proxy = None
    receive = start_receive(dst, url)
    if cell.outcome == "cut":
        proxy = CuttableProxy(int(url.rsplit(":", 1)[1]))
        send_url = f"tcp:127.0.0.1:{proxy.port}"
    else:
        send_url = url

    if cell.timing == "before-start":
        src.serial.command(GUEST_EVENTS[cell.event], "REBOOTING")
        boot_id = _new_banner(src.serial, boot_id)
        src.wait_event("vm.rebooted")

    options = {"local": local}
    if cell.timing in ("later-iter", "iter0") or cell.outcome in ("cancel", "cut", "dest-killed"):
        options.update(downtime_ms=1, auto_converge=False)  # stays in pre-copy until the event
    send(src, send_url, **options)

    # ---- the event, at its time
    if cell.timing in ("iter0", "later-iter"):
        if cell.timing == "iter0":
            wait_progress(src, lambda p: p["phase"] == "precopy")
        else:
            wait_progress(src, lambda p: p["iteration"] >= 1)
        if cell.event in GUEST_EVENTS:
            src.serial.send(GUEST_EVENTS[cell.event])
        elif cell.event == "sigterm":
            src.proc.send_signal(signal.SIGTERM)
        else:
            src.api.request("PUT", "/api/v1/vmm.shutdown")
    if cell.timing == "after-state":
        wait_progress(src, lambda p: p["phase"] == "state-sent")  # paused, state captured
        src.serial.send(GUEST_EVENTS[cell.event])

    if cell.event in ("sigterm", "vmm.shutdown"):
        assert src.wait_exit(30) == 0
        names = src.event_names()
        assert "vm.migration-cancelled" in names and "vm.migration-lifecycle-latched" not in names
        assert names[-1] == "vmm.shutdown"
        dst.wait_event("vm.migration-receive-failed")
        assert dst.api.request("GET", "/api/v1/vm.info")[0] == 404  # nothing runs on either side
        return

    latched = cell.event in GUEST_EVENTS and cell.timing in ("iter0", "later-iter", "pause-window")
    if latched:
        src.wait_event("vm.migration-lifecycle-latched")
        ev = [e for e in src.events() if e["event"] == "migration-lifecycle-latched"][0]["properties"]
        assert ev["event"] == ("VmShutdown" if cell.event == "poweroff" else "VmReboot")
        if cell.timing == "pause-window":
            assert ev["phase"] == "completing"
        else:
            assert ev["phase"] in ("precopy", "completing")
        try:
            status, p = src.api.request("GET", "/api/v1/vm.migration-progress")
        except OSError:  # the source finished and shut down meanwhile
            status = None
        if status == 200:
            assert p["lifecycle_event"] == ev["event"]

    # ---- the outcome
    if cell.outcome == "cut":
        wait_progress(src, lambda p: p["phase"] == "completing")
        proxy.cut()
    elif cell.outcome == "dest-killed":
        wait_progress(src, lambda p: p["phase"] == "completing")
        dst.proc.kill()
    elif cell.outcome == "cancel":
        wait_progress(src, lambda p: p["phase"] == "completing")
        assert src.api.request("PUT", "/api/v1/vm.cancel-migration")[0] == 204

    if cell.outcome in FAILURES and latched:
        _check_replayed_on_source(src, dst, cell, boot_id)
    else:
        _check_success(src, dst, receive, cell, boot_id, latched)


def _check_replayed_on_source(src, dst, cell, boot_id):
    kind = "vm.migration-cancelled" if cell.outcome == "cancel" else "vm.migration-failed"
    src.wait_event(kind)
    props = [e for e in src.events() if f"vm.{e['event']}" == kind][0]["properties"]
    assert props["lifecycle_replayed_on"] == "source"
    if cell.event == "poweroff":
        assert src.wait_exit(30) == 0
        assert "vm.shutdown" in src.event_names()
    else:
        src.wait_event("vm.rebooted")
        _new_banner(src.serial, boot_id)
        src.serial.command("verify", rb"VERIFY OK \d+\r\n")
        assert src.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Running"
        assert src.event_names().count("vm.rebooted") == 1
    if cell.outcome != "dest-killed":
        dst.wait_event("vm.migration-receive-failed")
        assert dst.api.request("GET", "/api/v1/vm.info")[0] == 404
        assert "vm.rebooted" not in dst.event_names()


def _check_success(src, dst, receive, cell, boot_id, latched):
    assert src.wait_exit(60) == 0
    receive.join(30)
    assert receive.result["answer"][0] == 204, f"destination's vm.receive-migration answered {receive.result}"
    fin = [e for e in src.events() if e["event"] == "migration-finished"][0]["properties"]
    names = dst.event_names()
    assert "vm.migration-receive-finished" in names
    if not latched:
        assert fin["lifecycle_event"] is None
        m = dst.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16})")
        assert m.group(1).decode() == boot_id  # moved, not rebooted
        if cell.timing == "after-complete":
            dst.serial.send(GUEST_EVENTS[cell.event])
            if cell.event == "poweroff":
                dst.wait_event("vm.shutdown")
                assert dst.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Shutdown"
            else:
                dst.wait_event("vm.rebooted")
                _new_banner(dst.serial, boot_id)
                dst.serial.command("verify", rb"VERIFY OK \d+\r\n")
        else:
            _settled(dst)
            assert "vm.rebooting" not in dst.event_names()
            # Only the reboot the guest did before the migration started, on the source.
            assert src.event_names().count("vm.rebooting") == (1 if cell.timing == "before-start" else 0)
        return
    assert fin["lifecycle_replayed_on"] == "destination"
    assert "vm.rebooting" not in src.event_names()  # the source never acted on it
    if cell.event == "poweroff":
        dst.wait_event("vm.shutdown")
        assert dst.wait_exit(30) == 0
        order = dst.event_names()
        assert order.index("vm.migration-receive-finished") < order.index("vm.shutdown")
    else:
        dst.wait_event("vm.rebooted")
        order = dst.event_names()
        assert order.index("vm.migration-receive-finished") < order.index("vm.rebooting")
        assert order.count("vm.rebooted") == 1
        _new_banner(dst.serial, boot_id)
        dst.serial.command("verify", rb"VERIFY OK \d+\r\n")
        assert dst.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Running"


def test_reboot_then_poweroff_in_one_migration_first_wins(vmm_process, tmp_path):
    src = vmm_process(
        "--cpus", "boot=2", "--memory", "size=384M", name="src", hooks="frame-delay-ms=150,request-at-pause=shutdown"
    )
    dst = vmm_process(name="dst")
    boot_id = _boot_id(src.serial)
    src.serial.command("dirty 192", "DIRTY STARTED")
    url = f"tcp:127.0.0.1:{free_port()}"
    start_receive(dst, url)
    send(src, url, downtime_ms=1, auto_converge=False)
    wait_progress(src, lambda p: p["iteration"] >= 1)
    src.serial.send("reboot acpi")
    assert src.wait_exit(60) == 0
    latched = [e for e in src.events() if e["event"] == "migration-lifecycle-latched"]
    assert [e["properties"]["event"] for e in latched] == ["VmReboot"]
    dst.wait_event("vm.rebooted")
    _new_banner(dst.serial, boot_id)
    assert "vm.shutdown" not in dst.event_names()


def test_failed_migration_with_latch_then_clean_migration(vmm_process, tmp_path):
    """No stale latch: the second migration carries nothing."""
    src = vmm_process("--cpus", "boot=2", "--memory", "size=384M", name="src", hooks="frame-delay-ms=150")
    bad = vmm_process(name="bad", hooks="no-lifecycle-capability=on")
    boot_id = _boot_id(src.serial)
    src.serial.command("dirty 192", "DIRTY STARTED")
    url = f"tcp:127.0.0.1:{free_port()}"
    start_receive(bad, url)
    send(src, url, downtime_ms=1, auto_converge=False)
    wait_progress(src, lambda p: p["iteration"] >= 1)
    src.serial.send("reboot kbd")
    src.wait_event("vm.migration-failed")
    src.wait_event("vm.rebooted")
    new_id = _new_banner(src.serial, boot_id)
    good = vmm_process(name="good")
    url2 = f"tcp:127.0.0.1:{free_port()}"
    start_receive(good, url2)
    send(src, url2)
    assert src.wait_exit(60) == 0
    fin = [e for e in src.events() if e["event"] == "migration-finished"][0]["properties"]
    assert fin["lifecycle_event"] is None
    m = good.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16})")
    assert m.group(1).decode() == new_id
    _settled(good)
    assert "vm.rebooting" not in good.event_names()


def _unix_socket_paths() -> dict[str, str]:
    """socket inode -> bound path, for every Unix socket on the host (accepted ones carry their
    listener's path)."""
    out = {}
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8:
                out[parts[6]] = parts[7]
    return out


def _fds(vmm) -> list[str]:
    """What the process's fds point at (sockets and anon inodes by kind only). Connections to the
    API socket are left out: the test's own API calls come and go, and the server closes its end
    asynchronously after answering."""
    paths = _unix_socket_paths()
    out = []
    for fd in os.listdir(f"/proc/{vmm.proc.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{vmm.proc.pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        # (bound under a temporary name beside the path, then renamed: /proc shows the first name)
        if target.startswith("socket:[") and paths.get(target[8:-1], "").startswith(vmm.api_path):
            continue
        out.append(target.split(":")[0] if target.startswith(("socket:", "anon_inode:")) else target)
    return sorted(out)


def test_ping_pong_20_migrations_reboot_every_third(vmm_process, tmp_path):
    a = vmm_process("--cpus", "boot=2", "--memory", "size=256M", "--no-shutdown", name="a", hooks="frame-delay-ms=100")
    b = vmm_process("--no-shutdown", name="b", hooks="frame-delay-ms=100")
    boot_id = _boot_id(a.serial)
    a.serial.command("dirty 64", "DIRTY STARTED")
    sides = [a, b]
    fds_before = None
    reboots = 0
    for i in range(20):
        src, dst = sides[i % 2], sides[(i + 1) % 2]
        url = f"unix:{tmp_path}/pp{i}.sock"
        receive = start_receive(dst, url)
        reboot = i % 3 == 2
        rebooted_before = dst.event_names().count("vm.rebooted")
        send(src, url, **({"downtime_ms": 1, "auto_converge": False} if reboot else {}))
        if reboot:
            wait_progress(src, lambda p: p["phase"] == "precopy")
            src.serial.send("reboot acpi")
        receive.join(60)
        assert receive.result["answer"][0] == 204, receive.result
        src.wait_event("vm.migration-finished", count=i // 2 + 1)
        if reboot:
            reboots += 1
            dst.wait_event("vm.rebooted", count=rebooted_before + 1)
            boot_id = _new_banner(dst.serial, boot_id)
            dst.serial.command("dirty 64", "DIRTY STARTED")
        m = dst.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16}) .*dirty=on")
        assert m.group(1).decode() == boot_id
        if i == 1:
            _settled(src)  # the source's teardown follows its migration-finished event
            fds_before = (_fds(a), _fds(b))
    assert reboots == 6
    total = sum(s.event_names().count("vm.rebooted") for s in sides)
    assert total == reboots  # every reboot happened exactly once
    _settled(src)
    after = (_fds(a), _fds(b))
    assert after == fds_before, f"fds before {fds_before}\nafter {after}"
    sides[0].serial.command("verify", rb"VERIFY OK \d+\r\n", timeout=60)


def test_poweroff_replayed_on_destination_ends_it_before_complete_is_answered(vmm_process):
    """The destination replays a latched power-off right after taking the VM over, so its VMM
    ends (and closes the receiver) while Complete is being answered; the hook holds the answer
    until then. The source must still hear Ok, and the receive call must still answer 204."""
    cell = Cell("poweroff", "iter0", "tcp")
    src = vmm_process("--cpus", "boot=2", "--memory", "size=384M", name="src", hooks=_hooks(cell))
    dst = vmm_process(name="dst", hooks="answer-complete-after-close=on")
    boot_id = _boot_id(src.serial)
    src.serial.command("dirty 192", "DIRTY STARTED")
    url = f"tcp:127.0.0.1:{free_port()}"
    receive = start_receive(dst, url)
    send(src, url, downtime_ms=1, auto_converge=False)
    wait_progress(src, lambda p: p["phase"] == "precopy")
    src.serial.send(GUEST_EVENTS[cell.event])
    src.wait_event("vm.migration-lifecycle-latched")
    _check_success(src, dst, receive, cell, boot_id, latched=True)


@pytest.mark.parametrize("request_kind", ["reset", "shutdown"])
def test_request_made_as_the_guest_arrives_is_carried_out_once(vmm_process, request_kind):
    """The destination runs the received vCPUs, and answers Complete, before its control loop
    takes the VM over (so that hand-off stays out of the downtime). A request the guest makes in
    between (the hook makes one right then) finds no VM on the loop yet and must still be acted on,
    once."""
    src = vmm_process("--memory", "size=256M", name="src")
    dst = vmm_process("--no-shutdown", name="dst", hooks=f"request-on-arrival={request_kind}")
    boot_id = _boot_id(src.serial)
    url = f"tcp:127.0.0.1:{free_port()}"
    receive = start_receive(dst, url)
    send(src, url)
    assert src.wait_exit(60) == 0
    receive.join(30)
    assert receive.result["answer"][0] == 204, receive.result
    if request_kind == "shutdown":
        dst.wait_event("vm.shutdown")
        assert dst.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Shutdown"
        acted = "vm.shutdown"
    else:
        dst.wait_event("vm.rebooted")
        _new_banner(dst.serial, boot_id)
        dst.serial.command("verify", rb"VERIFY OK \d+\r\n")
        acted = "vm.rebooting"
        _settled(dst)
    order = dst.event_names()
    assert order.count(acted) == 1
    assert order.index("vm.migration-receive-finished") < order.index(acted)
