"""max_bandwidth: a long migration over four connections moves RAM at the cap, within 10 %."""

from migration_helpers import free_port, send, start_receive, url_for

CAP = 32 << 20  # max_bandwidth=32M: 32 MiB/s, as QEMU reads it


def test_max_bandwidth_caps_the_rate_over_all_connections(vmm_process, tmp_path):
    src = vmm_process("--cpus", "boot=2", "--memory", "size=512M", name="src")
    boot_id, _ = src.serial.wait_ready()
    # 256 MiB of non-zero pages, written once: the first pass is ~8 s at the cap.
    src.serial.command("dirty 256", "DIRTY STARTED mib=256")
    src.serial.wait_dirty_pass()
    src.serial.command("stop", rb"DIRTY STOPPED gen=\d+")
    dst = vmm_process(name="dst")
    url = url_for("tcp", tmp_path, free_port())
    receiver = start_receive(dst, url)
    send(src, url, max_bandwidth="32M", connections=4)
    assert src.wait_exit(120) == 0
    receiver.join(30)
    assert receiver.result["answer"][0] == 204
    first = [e["properties"] for e in src.events() if e["event"] == "migration-memory-iteration"][0]
    assert first["bytes"] >= 256 << 20, first
    rate = first["bytes"] / (first["duration_ms"] / 1000)
    assert abs(rate - CAP) <= 0.10 * CAP, f"{rate / (1 << 20):.1f} MiB/s with max_bandwidth=32M"
    dst.serial.command("status", rb"STATUS boot_id=" + boot_id.encode())
    dst.serial.command("verify", rb"VERIFY OK \d+\r\n", timeout=60)
