"""virtio-vsock end to end: the test guest's polling driver (guest/vsock.c: an echo service and a
one-line client) against vmmpy's device and its host side, on real KVM with real Unix sockets.
Host to guest: a client connects to the VM's socket and writes ``CONNECT <port>``; guest to host:
the guest connects to host port P, which is the Unix socket ``<socket>_P`` a test listens on."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from migration_helpers import free_port, send, start_receive, url_for, wait_progress


ECHO_PORT = 5000
CID = 7
TIMEOUT = 60.0


def vsock_arg(path, cid=CID) -> str:
    return f"cid={cid},socket={path}"


def _boot(vmm_process, sock_path, name="src", hooks=""):
    vmm = vmm_process(
        "--cpus", "boot=1", "--memory", "size=128M", "--vsock", vsock_arg(sock_path), name=name, hooks=hooks
    )
    boot_id, _ = vmm.serial.wait_ready()
    listen(vmm.serial)
    return vmm, boot_id


def listen(serial):
    serial.command(f"vsock listen {ECHO_PORT}", rf"VSOCK LISTENING port={ECHO_PORT} cid={CID}\r\n")


def read_line(s: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Bytes up to and including the first newline (or what came before EOF)."""
    s.settimeout(timeout)
    out = b""
    while not out.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        out += chunk
    return out


def host_connect(path: str, port: int = ECHO_PORT) -> tuple[socket.socket, int]:
    """Firecracker's handshake: ``CONNECT <port>\\n`` answered ``OK <host port>\\n``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(path)
    s.sendall(f"CONNECT {port}\n".encode())
    answer = read_line(s)
    assert answer.startswith(b"OK ") and answer.endswith(b"\n"), answer
    return s, int(answer[3:])


def echo(s: socket.socket, text: bytes) -> None:
    s.sendall(text + b"\n")
    assert read_line(s) == text + b"\n"


def wait_closed(s: socket.socket, timeout: float = TIMEOUT) -> None:
    """The peer closed (EOF) or reset the connection; no data comes first."""
    s.settimeout(timeout)
    try:
        data = s.recv(4096)
    except ConnectionResetError:
        return
    assert data == b"", f"expected the connection closed, got {data!r}"


class HostListener:
    """A host service on vsock port P: the Unix socket `<vm socket>_P`; answers each line it gets
    with `prefix + line` and records what it saw."""

    def __init__(self, vm_socket: str, port: int, prefix: bytes = b"host got: "):
        self.path = f"{vm_socket}_{port}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(4)
        self.sock.settimeout(TIMEOUT)
        self.prefix = prefix
        self.lines: list[bytes] = []
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while True:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
                line = read_line(conn)
                self.lines.append(line)
                conn.sendall(self.prefix + line)
        except OSError:
            return

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()
        os.unlink(self.path)


@pytest.fixture
def sock_dir(tmp_path):
    # Unix socket paths are short (108 bytes); pytest's tmp_path can be long.
    d = f"/tmp/vmmpy-vsock-{os.getpid()}-{time.monotonic_ns()}"
    os.mkdir(d)
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


# ---------------------------------------------------------------- one VM


def test_host_to_guest_echo(vmm_process, sock_dir):
    path = f"{sock_dir}/vm.sock"
    vmm, _ = _boot(vmm_process, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    a, port_a = host_connect(path)
    b, port_b = host_connect(path)
    assert port_a != port_b
    echo(a, b"first line")
    echo(b, b"second connection")
    big = bytes(range(33, 127)) * 700  # more than one 4 KiB rx buffer and one tx slot
    a.sendall(big + b"\n")
    got = b""
    a.settimeout(TIMEOUT)
    while not got.endswith(b"\n"):
        chunk = a.recv(65536)
        assert chunk, "the echo connection closed early"
        got += chunk
    assert got == big + b"\n"
    m = vmm.serial.command("vsock status", rb"VSOCK STATUS cid=7 listen=5000 conns=(\d+) resets=0 echoed=(\d+)\r\n")
    assert int(m.group(1)) == 2 and int(m.group(2)) == len(big) + 1 + len(b"first line\n") + len(b"second connection\n")
    a.close()  # the guest gets SHUTDOWN, answers RST
    b.close()
    deadline = time.monotonic() + TIMEOUT
    while vmm.serial.command("vsock status", rb"VSOCK STATUS [^\r]* conns=(\d+)").group(1) != b"0":
        assert time.monotonic() < deadline, "the guest kept the closed connections"
        time.sleep(0.05)


def test_connect_to_a_port_nobody_listens_on_is_closed(vmm_process, sock_dir):
    path = f"{sock_dir}/vm.sock"
    _boot(vmm_process, path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(b"CONNECT 4242\n")  # the guest answers RST
    wait_closed(s)
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad.connect(path)
    bad.sendall(b"HELLO 5000\n")
    wait_closed(bad)
    echo(host_connect(path)[0], b"still serving")


def test_guest_to_host_connection(vmm_process, sock_dir):
    path = f"{sock_dir}/vm.sock"
    vmm, _ = _boot(vmm_process, path)
    svc = HostListener(path, 7000)
    try:
        vmm.serial.command("vsock connect 7000 ping from the guest", rb"VSOCK REPLY host got: ping from the guest\r\n")
        assert svc.lines == [b"ping from the guest\n"]
        # Nobody listens on host port 7001: the guest's REQUEST is answered RST.
        vmm.serial.command("vsock connect 7001", rb"VSOCK CONNECT RESET\r\n")
    finally:
        svc.close()


def test_bad_socket_path_is_a_clear_error_at_create(tmp_path):
    from vmmpy.config import VmConfig, VsockConfig
    from vmmpy.errors import InvalidConfig

    with pytest.raises(InvalidConfig, match="vsock.socket=.*no such directory"):
        VmConfig(vsock=VsockConfig(cid=3, socket=str(tmp_path / "missing" / "v.sock")))
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(InvalidConfig, match="exists and is not a socket"):
        VmConfig(vsock=VsockConfig(cid=3, socket=str(regular)))
    with pytest.raises(InvalidConfig, match="vsock.cid=2"):
        VmConfig(vsock=VsockConfig(cid=2, socket=str(tmp_path / "v.sock")))
    # The command line says so before any VM exists: one line, exit status 2.
    r = subprocess.run(
        [sys.executable, "-m", "vmmpy.cli", "--memory", "size=128M", "--vsock", f"cid=3,socket={tmp_path}/no/v.sock"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert r.returncode == 2 and "no such directory" in r.stderr, r.stderr


# ---------------------------------------------------------------- migration and reboot


def _migrate(vmm_process, tmp_path, src, transport, dst_args):
    dst = vmm_process(*dst_args, name="dst")
    url = url_for("unix" if transport == "local" else transport, tmp_path, free_port())
    receiver = start_receive(dst, url)
    send(src, url, local=(transport == "local"))
    return dst, receiver


@pytest.mark.parametrize("transport", ["tcp", "local"])
def test_connections_are_reset_across_a_migration_and_new_ones_work(vmm_process, tmp_path, sock_dir, transport):
    src_path, dst_path = f"{sock_dir}/src.sock", f"{sock_dir}/dst.sock"
    src, boot_id = _boot(vmm_process, src_path)
    a, _ = host_connect(src_path)
    echo(a, b"before the migration")
    src_svc, dst_svc = HostListener(src_path, 7000, b"source: "), HostListener(dst_path, 7000, b"destination: ")
    try:
        src.serial.command("vsock connect 7000 one", rb"VSOCK REPLY source: one\r\n")
        # The destination's own operator names its socket; the CID is the guest's.
        dst, receiver = _migrate(vmm_process, tmp_path, src, transport, ["--vsock", f"socket={dst_path}"])
        assert src.wait_exit(180) == 0
        receiver.join(60)
        assert receiver.result["answer"][0] == 204
        wait_closed(a)  # the source went, and its host sockets with it
        assert not os.path.exists(src_path), "the source left its socket behind"
        dst.serial.expect(rb"VSOCK TRANSPORT_RESET resets=1 dropped=1\r\n")
        m = dst.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16})")
        assert m.group(1).decode() == boot_id, "the guest rebooted: it should have moved"
        dst.serial.command("vsock status", rb"VSOCK STATUS cid=7 listen=5000 conns=0 resets=1 ")
        assert stat.S_IMODE(os.stat(dst_path).st_mode) == 0o600
        b, _ = host_connect(dst_path)
        echo(b, b"after the migration")
        dst.serial.command("vsock connect 7000 two", rb"VSOCK REPLY destination: two\r\n")
        assert src_svc.lines == [b"one\n"] and dst_svc.lines == [b"two\n"]
    finally:
        src_svc.close()
        dst_svc.close()


def test_destination_without_a_vsock_socket_is_refused_at_config(vmm_process, tmp_path, sock_dir):
    path = f"{sock_dir}/src.sock"
    src, _ = _boot(vmm_process, path)
    a, _ = host_connect(path)
    dst, receiver = _migrate(vmm_process, tmp_path, src, "tcp", [])
    p = wait_progress(src, lambda p: p["status"] != "active")
    assert p["status"] == "failed", p
    assert "vsock" in json.dumps(p) and "names no socket" in json.dumps(p), p
    dst.wait_event("vm.migration-receive-failed")
    assert dst.api.request("GET", "/api/v1/vm.info")[0] == 404, "the destination built no VM"
    assert src.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Running"
    echo(a, b"the source keeps running, connection and all")
    src.serial.command("vsock status", rb"VSOCK STATUS cid=7 listen=5000 conns=1 resets=0 ")


def test_connections_are_closed_across_a_guest_reboot(vmm_process, sock_dir):
    path = f"{sock_dir}/vm.sock"
    vmm, boot_id = _boot(vmm_process, path)
    a, _ = host_connect(path)
    echo(a, b"before the reboot")
    vmm.serial.send("reboot kbd")
    new_id, _ = vmm.serial.wait_ready()
    assert new_id != boot_id
    wait_closed(a)  # the old VM's device went with its connections
    # The new boot's driver starts with no connection on either side: there is nothing to reset.
    listen(vmm.serial)
    vmm.serial.command("vsock status", rb"VSOCK STATUS cid=7 listen=5000 conns=0 resets=0 ")
    b, _ = host_connect(path)
    echo(b, b"after the reboot")


def test_snapshot_restore_resets_connections_and_serves_on_the_restoring_hosts_socket(vmm_process, tmp_path, sock_dir):
    src_path, dst_path = f"{sock_dir}/src.sock", f"{sock_dir}/dst.sock"
    src, boot_id = _boot(vmm_process, src_path)
    a, _ = host_connect(src_path)
    echo(a, b"before the snapshot")
    snap = tmp_path / "snap"
    assert src.api.request("PUT", "/api/v1/vm.pause")[0] == 204
    assert src.api.request("PUT", "/api/v1/vm.snapshot", {"destination_url": f"file://{snap}"})[0] == 204
    dst = vmm_process(name="dst")
    status, body = dst.api.request("PUT", "/api/v1/vm.restore", {"source_url": f"file://{snap}", "resume": True})
    assert status == 400 and "names no socket" in json.dumps(body), (status, body)
    status, body = dst.api.request(
        "PUT", "/api/v1/vm.restore", {"source_url": f"file://{snap}", "vsock_socket": dst_path, "resume": True}
    )
    assert status == 204, (status, body)
    dst.serial.expect(rb"VSOCK TRANSPORT_RESET resets=1 dropped=1\r\n")
    dst.serial.command("status", rb"STATUS boot_id=" + boot_id.encode())
    info = dst.api.request("GET", "/api/v1/vm.info")[1]
    assert info["config"]["vsock"] == {"cid": CID, "socket": dst_path, "id": "_vsock0"}
    echo(host_connect(dst_path)[0], b"after the restore")
    # The source, resumed, still has its connection: a snapshot moves nothing away from it.
    assert src.api.request("PUT", "/api/v1/vm.resume")[0] == 204
    echo(a, b"the source resumed")


# ---------------------------------------------------------------- configuration


def test_vsock_config_through_the_api_and_the_command_line(tmp_path):
    from vmmpy.backings import HostBackings
    from vmmpy.config import REQUEST_BODIES, VmConfig, from_peer, parse_vsock, parse_vsock_socket, read_request_body
    from vmmpy.errors import InvalidConfig

    path = str(tmp_path / "v.sock")
    cfg = VmConfig.from_api({"vsock": {"cid": 9, "socket": path, "iommu": False, "pci_segment": 0}})
    assert (cfg.vsock.cid, cfg.vsock.socket, cfg.vsock.id) == (9, path, "_vsock0")
    assert VmConfig.from_api(cfg.to_api()).vsock == cfg.vsock
    with pytest.raises(InvalidConfig, match=r"unsupported VmConfig fields: vsock\.iommu"):
        VmConfig.from_api({"vsock": {"cid": 9, "socket": path, "iommu": True}})
    with pytest.raises(InvalidConfig, match="vsock: needs cid and socket"):
        VmConfig.from_api({"vsock": {"cid": 9}})
    with pytest.raises(InvalidConfig, match="vsock.id=.disk0.: used by another device"):
        img = tmp_path / "d.raw"
        img.write_bytes(bytes(512))
        VmConfig.from_api({"disks": [{"path": str(img)}], "vsock": {"cid": 9, "socket": path, "id": "disk0"}})
    assert parse_vsock(f"cid=3,socket={path},id=v0") == type(cfg.vsock)(cid=3, socket=path, id="v0")
    for bad in (f"socket={path}", "cid=3", f"cid=x,socket={path}", f"cid=3,socket={path},iommu=on"):
        with pytest.raises(InvalidConfig, match="--vsock"):
            parse_vsock(bad)
    assert parse_vsock_socket(f"socket={path}") == path
    with pytest.raises(InvalidConfig, match="keeps its own CID"):
        parse_vsock_socket(f"cid=3,socket={path}")
    # A peer's socket path is never used: the destination's own replaces it, or none is refused.
    peer = {**cfg.to_api(), "vsock": {"cid": 9, "socket": "/peer/path.sock", "id": "_vsock0"}}
    assert from_peer(peer, {}, vsock_socket=path).vsock.socket == path
    with pytest.raises(InvalidConfig, match="names no socket"):
        from_peer(peer, {})
    # The VMM's own socket (its command line) holds unless the receive or restore call names one.
    base = HostBackings(vsock_socket=path)
    assert base.overridden(disks={}, net={}).vsock_socket == path
    assert base.overridden(vsock_socket="/other.sock").vsock_socket == "/other.sock"
    with pytest.raises(InvalidConfig, match="vsock_socket=5"):
        base.overridden(vsock_socket=5)
    for name in ("ReceiveMigrationData", "RestoreConfig"):
        assert "vsock_socket" in REQUEST_BODIES[name].fields
    assert read_request_body("RestoreConfig", {"source_url": "file:///x", "vsock_socket": path})["vsock_socket"] == path
