"""virtio-net end to end: the test guest's polling driver (guest/net.c) behind vmmpy's virtio-net
on real taps in a network namespace with a bridge, reached by the host's real `ping`. Frames the
guest sends are also read off its tap with a raw socket, so the guest's word is not taken for
what went out."""

from __future__ import annotations

import os
import sys

import pytest

from helpers import BANNER, SerialClient
from migration_helpers import free_port, send, start_receive, wait_progress
from net_helpers import (
    GUEST_IP,
    GUEST_MAC,
    NET_UP,
    agreed_counts,
    boot_guest,
    garp_seen,
    migrate_under_ping,
    net_stats,
    ping_answered,
)


def test_host_ping_reaches_the_guest_and_counts_match(vmm_process, network):
    tap = network.add_tap("tap0")
    vmm, _ = boot_guest(vmm_process, network, tap)
    before = net_stats(vmm.serial)
    sent = ping_answered(network, GUEST_IP, 50, 0.01)
    # The device saw what the guest saw: every frame it delivered, every frame the guest sent.
    after, dev = agreed_counts(vmm)
    # Exactly the host's requests were answered, and every frame the guest sent is an answer.
    assert after["echo"] - before["echo"] == sent, (sent, before, after)
    assert after["tx"] == after["arp_out"] + after["echo"] + after["garp"], after
    assert after["tx_full"] == 0 and after["garp"] == 0, after
    assert dev["rx_dropped"] == 0 and dev["tx_dropped"] == 0, dev


def test_a_tap_that_cannot_be_opened_is_an_error_at_create(vmm_process, network, tmp_path):
    # An interface that is not a tap: vm.create refuses it by name, and builds nothing.
    vmm = vmm_process(name="api", netns=network.ns)
    body = {"payload": {"cmdline": "console=ttyS0"}, "net": [{"tap": "br0", "id": "net0"}]}
    status, answer = vmm.api.request("PUT", "/api/v1/vm.create", body)
    assert status == 400 and "net[0].tap='br0'" in str(answer) and "not a tap" in str(answer), answer
    assert vmm.api.request("GET", "/api/v1/vm.info")[0] == 404
    # A tap another VMM holds: the command line's create-and-boot fails before any vCPU runs.
    tap = network.add_tap("tapbusy")
    holder, _ = boot_guest(vmm_process, network, tap, name="holder")
    events = tmp_path / "second.events"
    second = network.run(
        sys.executable,
        "-m",
        "vmmpy.cli",
        "--memory",
        "size=128M",
        "--net",
        f"tap={tap}",
        "--event-monitor",
        f"path={events}",
        timeout=90,
    )
    assert second.returncode != 0, second
    assert f"tap {tap}: in use by another process" in second.stderr, second.stderr
    assert '"booted"' not in events.read_text(), events.read_text()
    holder.serial.command("net info", rb"NET INFO mac=\S+ ip=10\.77\.0\.2 link=up")


def _tun_fds() -> set[int]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/net/tun":
                out.add(int(name))
        except FileNotFoundError:
            pass
    return out


def test_a_tap_fd_stays_the_callers_and_each_build_of_the_vm_takes_its_own_copy(network, tmp_path):
    from vmmpy import Vmm
    from vmmpy.config import NetConfig, SerialConfig, VmConfig

    fd = network.open_tap(network.add_tap("tapfd"))
    os.set_blocking(fd, True)
    path = str(tmp_path / "serial.sock")
    vmm = Vmm(serial=SerialConfig(mode="Socket", socket=path))
    serial = SerialClient(path)
    try:
        cfg = VmConfig(memory_mib=128, cmdline=f"console=ttyS0 ip={GUEST_IP}", net=[NetConfig(fd=fd, mac=GUEST_MAC)])
        vmm.create(cfg)
        vmm.boot()
        serial.expect(NET_UP, 60)
        serial.expect(rb"READY\r?\n", 60)
        ping_answered(network, GUEST_IP, 5)
        assert len(_tun_fds() - {fd}) == 1, "the VM holds a duplicate of its own"
        # The settings are on the shared open file description: the caller's fd has them too.
        assert not os.get_blocking(fd)
        vmm.reboot()
        serial.expect(BANNER, 90)
        serial.expect(NET_UP, 60)
        serial.expect(rb"READY\r?\n", 60)
        ping_answered(network, GUEST_IP, 5)
        assert len(_tun_fds() - {fd}) == 1, "the old instance's copy went with it"
        vmm.delete()
        assert _tun_fds() == {fd}, "vmmpy closes its copies, never the caller's fd"
        os.fstat(fd)
    finally:
        serial.close()
        vmm.close()
        os.close(fd)


@pytest.mark.parametrize("transport", ["tcp", "local"])
def test_ping_through_a_live_migration(vmm_process, network, tmp_path, transport, record_property):
    report = migrate_under_ping(vmm_process, network, tmp_path, transport)
    record_property("ping_gap", report)


def test_ping_answered_after_a_reboot_in_the_middle_of_a_migration(vmm_process, network, tmp_path):
    src_tap, dst_tap = network.add_tap("tapsrc"), network.add_tap("tapdst")
    src, boot_id = boot_guest(vmm_process, network, src_tap, hooks="frame-delay-ms=150")
    dst = vmm_process("--net", f"tap={dst_tap},id=net0", name="dst", netns=network.ns)
    src.serial.command("dirty 32", "DIRTY STARTED")  # keeps the migration in pre-copy
    url = f"tcp:127.0.0.1:{free_port()}"
    receiver = start_receive(dst, url)
    send(src, url, downtime_ms=1, auto_converge=False)
    wait_progress(src, lambda p: p["iteration"] >= 1)
    src.serial.send("reboot kbd")
    src.wait_event("vm.migration-lifecycle-latched")
    assert src.wait_exit(180) == 0
    receiver.join(60)
    assert receiver.result["answer"][0] == 204
    dst.wait_event("vm.rebooted")
    m = dst.serial.expect(BANNER, 60)
    assert m.group(1).decode() != boot_id
    dst.serial.expect(NET_UP, 60)  # the reset device took a new driver
    dst.serial.expect(rb"READY\r?\n", 60)
    sent = ping_answered(network, GUEST_IP, 10)
    stats = net_stats(dst.serial)
    assert stats["echo"] == sent and stats["garp"] == 0, stats  # a fresh boot: nothing to announce


def test_destination_without_a_tap_for_a_net_id_is_refused_at_config(vmm_process, network, tmp_path):
    src, boot_id = boot_guest(vmm_process, network, network.add_tap("tapsrc"))
    dst = vmm_process(name="dst", netns=network.ns)  # its operator names no tap
    url = f"unix:{tmp_path}/mig.sock"
    start_receive(dst, url)
    send(src, url)
    p = wait_progress(src, lambda p: p["status"] != "active")
    assert p["status"] == "failed" and "net 'net0'" in p["error"] and "tap" in p["error"], p
    assert p["phase"] == "starting", p  # refused at Config: no memory was ever sent
    dst.wait_event("vm.migration-receive-failed")
    src.wait_event("vm.migration-failed")
    assert dst.api.request("GET", "/api/v1/vm.info")[0] == 404
    assert src.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Running"
    m = src.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16})")
    assert m.group(1).decode() == boot_id
    ping_answered(network, GUEST_IP, 5)


# ---- configuration (no KVM, no taps needed) ------------------------------------------------


def test_parse_net_reads_ch_syntax():
    from vmmpy.config import parse_net

    n = parse_net("tap=tap7,mac=52:54:00:00:00:07,ip=192.168.7.1,mask=255.255.255.0,id=eth0")
    assert (n.tap, n.mac, n.ip, n.mask, n.id, n.fd) == (
        "tap7",
        "52:54:00:00:00:07",
        "192.168.7.1",
        "255.255.255.0",
        "eth0",
        None,
    )
    assert parse_net("fd=[3]").fd == 3 and parse_net("fd=4").fd == 4
    for bad in ("tap=a,vhost_user=on", "fd=[3,4]", "tap"):
        with pytest.raises(Exception, match="--net"):
            parse_net(bad)


def test_net_config_checks_name_mac_addresses_and_ids():
    from vmmpy.config import InvalidConfig, NetConfig, VmConfig

    with pytest.raises(InvalidConfig) as e:
        VmConfig(
            net=[
                NetConfig(tap="lo", mac="01:00:00:00:00:01"),
                NetConfig(tap="x" * 16, ip="1.2.3", mask="255.0.255.0"),
                NetConfig(),
                NetConfig(tap="t1", id="net0"),
            ]
        )
    msg = str(e.value)
    for part in (
        "net[0].tap='lo': an interface that is not a tap",
        "net[0].mac='01:00:00:00:00:01': must be a unicast MAC",
        "net[1].tap='xxxxxxxxxxxxxxxx': must be an interface name of 1 to 15 bytes",
        "net[1].ip='1.2.3': must be an IPv4 address",
        "net[2]: needs exactly one of tap (a name) and fd",
        "net[3].id='net0': used by another device",
    ):
        assert part in msg, msg
    # A NIC without a MAC gets a random, locally administered unicast one, and keeps it.
    cfg = VmConfig(net=[NetConfig(fd=0)])
    mac = bytes.fromhex(cfg.net[0].mac.replace(":", ""))
    assert mac[0] & 3 == 2 and cfg.net[0].id == "net0"
    assert VmConfig(net=[NetConfig(fd=0, mac=cfg.net[0].mac)]).to_api()["net"][0]["mac"] == cfg.net[0].mac


def test_from_api_reads_ch_net_config_and_round_trips():
    from vmmpy.config import InvalidConfig, VmConfig

    body = {
        "net": [
            {
                "tap": "tapx",
                "mac": "52:54:00:aa:bb:cc",
                "ip": "192.168.249.1",
                "mask": "255.255.255.0",
                "num_queues": 2,
                "queue_size": 256,
                "offload_tso": True,
                "offload_ufo": True,
                "offload_csum": True,
                "iommu": False,
            }
        ]
    }
    cfg = VmConfig.from_api(body)
    (n,) = cfg.net
    assert (n.tap, n.mac, n.ip, n.id) == ("tapx", "52:54:00:aa:bb:cc", "192.168.249.1", "net0")
    assert VmConfig.from_api(cfg.to_api()).net == cfg.net
    with pytest.raises(InvalidConfig, match=r"net\[0\]\.num_queues, net\[0\]\.vhost_user"):
        VmConfig.from_api({"net": [{"tap": "t", "num_queues": 4, "vhost_user": True}]})
    with pytest.raises(InvalidConfig, match=r"net\[0\]\.tap: required"):
        VmConfig.from_api({"net": [{"mac": "52:54:00:aa:bb:cc"}]})


def test_from_peer_takes_this_hosts_tap_and_keeps_the_mac():
    from vmmpy.config import InvalidConfig, from_peer

    peer = {"net": [{"tap": "peer-tap", "mac": "52:54:00:aa:bb:cc", "ip": "10.9.9.9", "id": "net0"}]}
    cfg = from_peer(peer, {}, {}, {"net0": "own-tap"})
    (n,) = cfg.net
    assert (n.tap, n.mac, n.ip) == ("own-tap", "52:54:00:aa:bb:cc", None)
    with pytest.raises(InvalidConfig, match="net 'net0': this host names no tap for it"):
        from_peer(peer, {}, {}, {"other": "own-tap"})


def test_snapshot_restored_on_another_tap_announces_and_answers(vmm_process, network, tmp_path):
    src, boot_id = boot_guest(vmm_process, network, network.add_tap("tapsrc"))
    assert src.api.request("PUT", "/api/v1/vm.pause")[0] == 204
    snap = tmp_path / "snap"
    status, body = src.api.request("PUT", "/api/v1/vm.snapshot", {"destination_url": f"file://{snap}"})
    assert status == 204, body
    src.api.request("PUT", "/api/v1/vmm.shutdown")
    assert src.wait_exit() == 0
    dst_tap = network.add_tap("tapdst")
    capture = network.arp_capture(dst_tap)
    try:
        dst = vmm_process(
            "--restore",
            f"source_url=file://{snap},resume=on",
            "--net",
            f"tap={dst_tap},id=net0",
            name="dst",
            netns=network.ns,
        )
        dst.wait_event("vm.restored")
        assert garp_seen(capture, GUEST_IP, GUEST_MAC, 30) is not None, "no gratuitous ARP after the restore"
    finally:
        capture.close()
    m = dst.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16})")
    assert m.group(1).decode() == boot_id
    ping_answered(network, GUEST_IP, 5)
