"""Live migration between two real VMM processes with the real test guest."""

import signal

import pytest

from helpers import SerialClient
from migration_helpers import free_port, send, start_receive, url_for, wait_progress


# A dirtying guest converges by itself on loopback (the link outruns its dirty rate), so the tests
# that need pre-copy to last until they act slow the link down: every Memory frame waits 100 ms.
SLOW_LINK = "frame-delay-ms=100"


def _pair(vmm_process, vcpus=2, memory="512M", src_hooks=""):
    src = vmm_process("--cpus", f"boot={vcpus}", "--memory", f"size={memory}", name="src", hooks=src_hooks)
    dst = vmm_process(name="dst")
    boot_id, _ = src.serial.wait_ready()
    return src, dst, boot_id


def _check_destination(dst, boot_id, dirty: bool):
    m = dst.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16}) cpus=2 dirty=(on|off)")
    assert m.group(1).decode() == boot_id, "the guest rebooted: it should have moved, not restarted"
    assert m.group(2) == (b"on" if dirty else b"off")
    dst.serial.command("echo on the destination", rb"on the destination\r\n")
    m = dst.serial.command("verify", rb"VERIFY OK (\d+)\r\n", timeout=60)
    if dirty:
        assert int(m.group(1)) > 0


@pytest.mark.parametrize("transport", ["tcp", "unix", "local"])
@pytest.mark.parametrize("workload", ["idle", "dirty"])
def test_migrate(vmm_process, tmp_path, transport, workload):
    src, dst, boot_id = _pair(vmm_process)
    if workload == "dirty":
        src.serial.command("dirty 256", "DIRTY STARTED mib=256")
        src.serial.wait_dirty_pass()
    url = url_for("unix" if transport == "local" else transport, tmp_path, free_port())
    receiver = start_receive(dst, url)
    send(src, url, local=(transport == "local"))
    assert src.wait_exit(120) == 0  # the source VMM ends after handing the VM over
    receiver.join(30)
    assert receiver.result["answer"][0] == 204
    names = src.event_names()
    assert "vm.migration-started" in names and "vm.migration-finished" in names
    finished = [e for e in src.events() if e["event"] == "migration-finished"][0]["properties"]
    assert finished["downtime_ms"] > 0
    # Its phases account for the whole migration; the last four are the downtime (the State
    # carries the Complete: one round trip, no phase of its own).
    phases = finished["phases_ms"]
    downtime = ["pause", "last_pass", "save_state", "complete"]
    if transport == "local":  # no pre-copy, no last pass: the memory stays where it is
        assert list(phases) == ["connect", "start", "memory_fds", "config", "pause", "save_state", "complete"]
        downtime.remove("last_pass")
    else:
        assert list(phases) == ["connect", "start", "config", "precopy", *downtime]
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) == pytest.approx(finished["total_time_ms"], abs=0.01)
    assert sum(phases[k] for k in downtime) == pytest.approx(finished["downtime_ms"], abs=0.01)
    assert "vm.migration-receive-finished" in dst.event_names()
    _check_destination(dst, boot_id, dirty=(workload == "dirty"))
    assert dst.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Running"


def test_cancel_during_precopy_keeps_the_source_running(vmm_process, tmp_path):
    src, dst, boot_id = _pair(vmm_process, src_hooks=SLOW_LINK)
    src.serial.command("dirty 256", "DIRTY STARTED")
    url = url_for("tcp", tmp_path, free_port())
    start_receive(dst, url)
    send(src, url, downtime_ms=1, auto_converge=False)
    wait_progress(src, lambda p: p["iteration"] >= 2)
    # From Config on the destination is reserved for the VM it receives into.
    config = {"cpus": {"boot_vcpus": 1}, "memory": {"size": 64 << 20}}
    status, body = dst.api.request("PUT", "/api/v1/vm.create", config)
    assert status == 500 and body == [
        "vm.create failed",
        "a migration is being received: this VMM is reserved for its VM",
    ]
    assert src.api.request("PUT", "/api/v1/vm.cancel-migration")[0] == 204
    p = wait_progress(src, lambda p: p["status"] != "active")
    assert p["status"] == "cancelled"
    src.wait_event("vm.migration-cancelled")
    assert src.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Running"
    src.serial.command("status", rb"STATUS boot_id=" + boot_id.encode() + rb" cpus=2 dirty=on")
    src.serial.command("verify", rb"VERIFY OK \d+\r\n", timeout=60)
    # The destination discarded its half-built VM and listens for the next attempt.
    dst.wait_event("vm.migration-receive-failed")
    assert dst.api.request("GET", "/api/v1/vm.info")[0] == 404
    # And it is free again: a VM can be created there.
    assert dst.api.request("PUT", "/api/v1/vm.create", config)[0] == 204


def test_timeout_cancels_without_auto_converge_and_completes_with_it(vmm_process, tmp_path):
    # Loopback outruns a guest whose writes fault under dirty logging, so the link is slowed down
    # (each Memory frame waits 100 ms): now the guest dirties faster than the link moves pages.
    src, dst, boot_id = _pair(vmm_process, src_hooks="frame-delay-ms=100")
    src.serial.command("dirty 256", "DIRTY STARTED")
    url = url_for("tcp", tmp_path, free_port())
    start_receive(dst, url)
    send(src, url, downtime_ms=50, auto_converge=False, timeout_s=3, timeout_strategy="cancel")
    p = wait_progress(src, lambda p: p["status"] != "active")
    assert p["status"] == "cancelled" and "timeout_s=3" in p["error"]
    assert p["cpu_throttle_percentage"] == 0
    src.serial.command("verify", rb"VERIFY OK \d+\r\n", timeout=60)
    src.serial.command("dirty 256", "DIRTY STARTED")
    # Same guest, same target, auto-converge on: the throttle brings the dirty rate down.
    send(src, url, downtime_ms=50, auto_converge=True, timeout_s=120)
    assert src.wait_exit(150) == 0
    final = [e for e in src.events() if e["event"] == "migration-finished"]
    assert final
    _check_destination(dst, boot_id, dirty=True)


def test_destination_killed_during_precopy(vmm_process, tmp_path):
    src, dst, boot_id = _pair(vmm_process, src_hooks=SLOW_LINK)
    src.serial.command("dirty 256", "DIRTY STARTED")
    url = url_for("tcp", tmp_path, free_port())
    start_receive(dst, url)
    send(src, url, downtime_ms=1, auto_converge=False)
    wait_progress(src, lambda p: p["iteration"] >= 1)
    dst.proc.kill()
    p = wait_progress(src, lambda p: p["status"] != "active")
    assert p["status"] == "failed"
    src.wait_event("vm.migration-failed")
    assert src.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Running"
    src.serial.command("verify", rb"VERIFY OK \d+\r\n", timeout=60)
    # A new destination: the next attempt succeeds.
    dst2 = vmm_process(name="dst2")
    url2 = url_for("tcp", tmp_path, free_port())
    start_receive(dst2, url2)
    send(src, url2)
    assert src.wait_exit(120) == 0
    m = dst2.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16})")
    assert m.group(1).decode() == boot_id
    dst2.serial.command("verify", rb"VERIFY OK \d+\r\n", timeout=60)


def test_source_killed_during_precopy_leaves_a_clean_destination(vmm_process, tmp_path):
    src, dst, _ = _pair(vmm_process, src_hooks=SLOW_LINK)
    src.serial.command("dirty 256", "DIRTY STARTED")
    url = url_for("unix", tmp_path, 0)
    receiver = start_receive(dst, url)
    send(src, url, downtime_ms=1, auto_converge=False)
    wait_progress(src, lambda p: p["iteration"] >= 1)
    src.proc.send_signal(signal.SIGKILL)
    dst.wait_event("vm.migration-receive-failed")
    assert dst.api.request("GET", "/api/v1/vm.info")[0] == 404  # no VM runs on both sides
    # Still listening: a fresh source migrates into it.
    src2 = vmm_process("--cpus", "boot=2", "--memory", "size=256M", name="src2")
    boot_id2, _ = src2.serial.wait_ready()
    send(src2, url)
    assert src2.wait_exit(120) == 0
    receiver.join(30)
    assert receiver.result["answer"][0] == 204
    m = dst.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16})")
    assert m.group(1).decode() == boot_id2


def test_destination_memory_equals_the_source(tmp_path):
    """With the source kept paused after success and the destination completed paused, every byte
    of guest RAM on both sides is equal (test hooks)."""
    from vmmpy import Vmm
    from vmmpy.config import SerialConfig, VmConfig
    from vmmpy.testhooks import TestHooks

    sock = str(tmp_path / "src.sock")
    src = Vmm(serial=SerialConfig(mode="Socket", socket=sock), no_shutdown=True, test_hooks=TestHooks(keep_source=True))
    dst = Vmm(serial=SerialConfig(mode="Null"), test_hooks=TestHooks(complete_paused=True))
    serial = SerialClient(sock)
    try:
        src.create(VmConfig(memory_mib=256, vcpus=2))
        src.boot()
        serial.wait_ready()
        serial.command("dirty 128", "DIRTY STARTED")
        serial.wait_dirty_pass()
        url = f"unix:{tmp_path}/m.sock"
        receive = dst.receive_migration(url)
        src.send_migration(url).wait(120)
        assert receive.wait(30)
        assert src.info()["state"] == "Paused" and dst.info()["state"] == "Paused"
        (a,), (b,) = src.memory_regions(), dst.memory_regions()
        va, vb = memoryview(a), memoryview(b)
        assert len(va) == len(vb) == 256 << 20
        chunk = 1 << 20
        bad = [i for i in range(0, len(va), chunk) if va[i : i + chunk] != vb[i : i + chunk]]
        assert not bad, f"{len(bad)} MiB differ, first at {bad[0]:#x}"
        va.release()
        vb.release()
    finally:
        serial.close()
        dst.close()
        src.close()


def test_timeout_with_strategy_ignore_forces_the_final_phase(vmm_process, tmp_path):
    src, dst, boot_id = _pair(vmm_process, src_hooks="frame-delay-ms=100")
    src.serial.command("dirty 256", "DIRTY STARTED")
    url = url_for("tcp", tmp_path, free_port())
    start_receive(dst, url)
    send(src, url, downtime_ms=1, auto_converge=False, timeout_s=2, timeout_strategy="ignore")
    assert src.wait_exit(60) == 0
    fin = [e for e in src.events() if e["event"] == "migration-finished"][0]["properties"]
    assert fin["total_time_ms"] >= 2000
    _check_destination(dst, boot_id, dirty=True)


def test_unknown_migration_option_is_refused_by_name(vmm_process):
    src = vmm_process("--memory", "size=128M", name="src")
    status, body = src.api.request(
        "PUT", "/api/v1/vm.send-migration", {"destination_url": "tcp:127.0.0.1:1", "warp_speed": 9}
    )
    assert status == 400 and "warp_speed" in body[-1]
    assert src.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Running"


@pytest.mark.parametrize(
    "left, last_sent, expected_ms, go_on, why",
    [
        (0, 64 << 20, 0.0, False, "nothing dirty"),
        (512 << 20, 64 << 20, 900.0, True, "over the budget"),
        (4 << 20, 64 << 20, 2.0, True, "within it, and another pass shrinks the final one"),
        (128 << 10, 64 << 20, 0.1, False, "within it, the final pass already small"),
        (40 << 20, 64 << 20, 30.0, False, "within it, the guest dirties faster than half the link"),
    ],
)
def test_precopy_chases_a_final_pass_only_while_it_shrinks(left, last_sent, expected_ms, go_on, why):
    from vmmpy.migration.source import EXTRA_PASSES, another_pass

    assert another_pass(left, last_sent, expected_ms, 300, 0) is go_on, why
    # However well it shrinks, the passes beyond the budget are bounded.
    assert another_pass(left, last_sent, expected_ms, 300, EXTRA_PASSES) is (go_on and expected_ms > 300)
