"""Disks across VMMs: a destination or a restoring VMM opens, for each disk id, the file its own
operator names (receive-migration's or restore's `disks`, or its own --disk list), never a path
from the peer; a disk id without a backing refuses the migration at Config while the source keeps
running. Also: the virtio device state travels (state format 1.3), and an image that cannot be
opened fails the native VM build before anything runs. Real KVM, real test guest, real files."""

from __future__ import annotations

import json
import os

import pytest

from vmmpy.snapshot import FORMAT_VERSION

from helpers import native_vm
from migration_helpers import free_port, send, start_receive, url_for, wait_progress


def _image(path, sectors=2048) -> str:
    path.write_bytes(bytes(sectors * 512))
    return str(path)


def test_destination_without_a_backing_refuses_at_config_and_the_source_keeps_running(vmm_process, tmp_path):
    disk = _image(tmp_path / "shared.raw")
    src = vmm_process("--memory", "size=256M", "--disk", f"path={disk},id=root", name="src")
    boot_id, _ = src.serial.wait_ready()
    # The destination names a file for another id only.
    other = _image(tmp_path / "other.raw")
    dst = vmm_process("--disk", f"path={other},id=data", name="dst")
    url = url_for("unix", tmp_path, free_port())
    receiver = start_receive(dst, url)
    send(src, url)
    p = wait_progress(src, lambda p: p["status"] != "active")
    assert p["status"] == "failed", p
    assert "disk 'root'" in json.dumps(p) and "no backing" in json.dumps(p), p
    dst.wait_event("vm.migration-receive-failed")
    assert dst.api.request("GET", "/api/v1/vm.info")[0] == 404, "the destination built no VM"
    assert receiver.is_alive(), "the destination listens for the next attempt"
    assert src.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Running"
    src.serial.command("status", rb"STATUS boot_id=" + boot_id.encode())


@pytest.mark.parametrize("transport", ["unix", "local"])
def test_migration_uses_the_destinations_own_backing_and_carries_device_state(vmm_process, tmp_path, transport):
    disk = _image(tmp_path / "shared.raw")
    src = vmm_process("--memory", "size=256M", "--disk", f"path={disk},id=root", name="src")
    boot_id, _ = src.serial.wait_ready()
    dst = vmm_process(name="dst")
    url = url_for("unix", tmp_path, free_port())
    # The call names the destination's file for the id (the same shared file, by its own path).
    link = tmp_path / "dst-view.raw"
    os.symlink(disk, link)
    receiver = start_receive(dst, url, disks={"root": str(link)})
    send(src, url, local=(transport == "local"))
    assert src.wait_exit(120) == 0
    receiver.join(60)
    assert receiver.result["answer"][0] == 204, receiver.result
    info = dst.api.request("GET", "/api/v1/vm.info")[1]
    assert info["state"] == "Running"
    assert info["config"]["disks"] == [{"path": str(link), "readonly": False, "direct": False, "id": "root"}]
    dst.serial.command("status", rb"STATUS boot_id=" + boot_id.encode())


def test_snapshot_carries_device_state_and_restore_takes_this_hosts_file(vmm_process, tmp_path):
    disk = _image(tmp_path / "disk.raw")
    src = vmm_process("--memory", "size=128M", "--disk", f"path={disk},readonly=on", name="src")
    boot_id, _ = src.serial.wait_ready()
    snap = tmp_path / "snap"
    assert src.api.request("PUT", "/api/v1/vm.pause")[0] == 204
    assert src.api.request("PUT", "/api/v1/vm.snapshot", {"destination_url": f"file://{snap}"})[0] == 204
    state = json.loads((snap / "state.json").read_text())
    assert state["format_version"] == FORMAT_VERSION  # 1.3 on carry virtio_devices
    (dev,) = state["virtio_devices"]
    assert dev["id"] == "disk0" and len(dev["queues"]) == 1 and dev["queues"][0]["max_size"] == 256
    assert dev["config_vector"] == 0xFFFF and len(dev["msix"]["table"]) == 2
    src.close()

    # Without a file for disk0 the restore is refused, before a VM exists.
    dst = vmm_process(name="dst")
    status, body = dst.api.request("PUT", "/api/v1/vm.restore", {"source_url": f"file://{snap}"})
    assert status == 400 and "disk 'disk0'" in json.dumps(body), (status, body)
    assert dst.api.request("GET", "/api/v1/vm.info")[0] == 404
    status, body = dst.api.request(
        "PUT", "/api/v1/vm.restore", {"source_url": f"file://{snap}", "disks": {"disk0": disk}, "resume": True}
    )
    assert status == 204, (status, body)
    dst.serial.command("status", rb"STATUS boot_id=" + boot_id.encode())


def test_native_vm_refuses_an_image_it_cannot_open(tmp_path):
    from vmmpy import _native
    from vmmpy.errors import InvalidConfig
    from vmmpy.control_loop import new_eventfd

    console = _native.Console()
    fds = [new_eventfd() for _ in range(3)]
    try:
        for path, text in [
            (str(tmp_path / "missing.raw"), "No such file"),
            (str(tmp_path), "Is a directory"),
            ("/dev/null", "not a regular file"),
        ]:
            with pytest.raises(InvalidConfig, match=text):
                native_vm(fds, console, memory_mib=128, disks=[("disk0", path, False, False)])
    finally:
        for fd in fds:
            os.close(fd)


def test_disk_maps_must_name_paths(tmp_path):
    from vmmpy import Vmm
    from vmmpy.errors import InvalidConfig

    vmm = Vmm()
    try:
        with pytest.raises(InvalidConfig, match="must map disk ids to paths"):
            vmm.receive_migration(f"unix:{tmp_path}/mig.sock", disks={"disk0": 7})
        with pytest.raises(InvalidConfig, match="must map disk ids to paths"):
            vmm.restore(f"file://{tmp_path}", disks=["disk0"])
    finally:
        vmm.close()
