"""Private guest RAM (`--memory shared=off`, Cloud Hypervisor's option): anonymous memory instead of
memfds. It migrates over tcp (the first pass skips what was never touched, found through
/proc/self/pagemap) and survives a reboot; a same-host migration, which passes memfds, is refused
before anything starts. Snapshots of both kinds: tests/test_snapshot.py."""

from migration_helpers import free_port, send, start_receive, url_for

PRIVATE = ("--memory", "size=512M,shared=off")


def _memory_info(vmm) -> dict:
    status, info = vmm.api.request("GET", "/api/v1/vm.info")
    assert status == 200, info
    return info["config"]["memory"]


def test_private_ram_migrates_over_tcp_with_a_dirtying_guest(vmm_process, tmp_path):
    src = vmm_process("--cpus", "boot=2", *PRIVATE, name="src")
    dst = vmm_process(name="dst")
    boot_id, _ = src.serial.wait_ready()
    assert _memory_info(src)["shared"] is False and src.ram_memfds() == 0
    src.serial.command("dirty 64", "DIRTY STARTED mib=64")
    src.serial.wait_dirty_pass()
    url = url_for("tcp", tmp_path, free_port())
    receiver = start_receive(dst, url)
    send(src, url)
    assert src.wait_exit(120) == 0
    receiver.join(30)
    assert receiver.result["answer"][0] == 204
    first = [e["properties"] for e in src.events() if e["event"] == "migration-memory-iteration"][0]
    assert first["iteration"] == 0
    # Iteration 0 covered what the guest touched (the 64 MiB it dirties, its code and tables), not
    # all 512 MiB: pagemap told untouched memory apart (zero pages would be sent as zero ranges,
    # so the covered size is what shows it).
    assert 64 << 20 <= first["bytes"] <= first["table_bytes"] < 200 << 20, first
    # The destination built the same kind of RAM from the source's config, and the guest moved.
    assert _memory_info(dst)["shared"] is False and dst.ram_memfds() == 0
    m = dst.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16}) cpus=2 dirty=on")
    assert m.group(1).decode() == boot_id
    dst.serial.command("verify", rb"VERIFY OK [1-9]\d*\r\n", timeout=60)


def test_default_ram_is_shared_memfds(vmm_process):
    vmm = vmm_process("--memory", "size=256M", name="default")
    vmm.serial.wait_ready()
    assert _memory_info(vmm)["shared"] is True and vmm.ram_memfds() == 1


def test_a_reboot_rebuilds_private_ram(vmm_process):
    vmm = vmm_process(*PRIVATE, name="rebooting")
    boot_id, _ = vmm.serial.wait_ready()
    vmm.serial.command("reboot acpi", "REBOOTING")
    vmm.wait_event("vm.rebooted")
    new_id, _ = vmm.serial.wait_ready()
    assert new_id != boot_id
    assert _memory_info(vmm)["shared"] is False and vmm.ram_memfds() == 0


def test_same_host_migration_of_private_ram_is_refused_and_the_guest_runs_on(vmm_process, tmp_path):
    src = vmm_process(*PRIVATE, name="src")
    boot_id, _ = src.serial.wait_ready()
    status, body = src.api.request(
        "PUT",
        "/api/v1/vm.send-migration",
        {"destination_url": url_for("unix", tmp_path, 0), "local": True},
    )
    assert status == 400, (status, body)
    assert "shared=on" in str(body), body
    assert "vm.migration-started" not in src.event_names()
    src.serial.command("status", rb"STATUS boot_id=" + boot_id.encode())
    assert src.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Running"
