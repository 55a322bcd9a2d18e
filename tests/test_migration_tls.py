"""Migration between two "hosts" (network namespaces joined by a veth pair) over mutual TLS with
parallel connections; peers without a certificate of the right CA, plaintext peers and strangers
joining a migration are refused. Real KVM, the real test guest, real VMM processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess

import pytest

from migration_helpers import free_port, read_response, send, start_receive, trickled_start_answer, wait_progress
from tls_certs import make_ca, make_tls_dir
from vmmpy import Vmm
from vmmpy.config import SerialConfig
from vmmpy.migration import transport
from vmmpy.migration.protocol import HEADER, Command, Status

SRC_IP, DST_IP = "192.0.2.1", "192.0.2.2"  # TEST-NET-1, only inside our own namespaces


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def hosts():
    """Two network namespaces ("src", "dst") joined by a veth pair: 192.0.2.1 and 192.0.2.2."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2's ip command is not installed: cannot make network namespaces")
    tag = os.getpid() % 100000
    src, dst = f"vmmpy-src{tag}", f"vmmpy-dst{tag}"
    made = []
    try:
        for ns in (src, dst):
            r = _ip("netns", "add", ns)
            if r.returncode != 0:
                pytest.skip(f"ip netns is not permitted here: {r.stderr.strip()}")
            made.append(ns)
        va, vb = f"vms{tag}", f"vmd{tag}"
        for args in (
            ("link", "add", va, "type", "veth", "peer", "name", vb),
            ("link", "set", va, "netns", src),
            ("link", "set", vb, "netns", dst),
            ("-n", src, "addr", "add", f"{SRC_IP}/24", "dev", va),
            ("-n", dst, "addr", "add", f"{DST_IP}/24", "dev", vb),
            ("-n", src, "link", "set", va, "up"),
            ("-n", dst, "link", "set", vb, "up"),
            ("-n", src, "link", "set", "lo", "up"),
            ("-n", dst, "link", "set", "lo", "up"),
        ):
            r = _ip(*args)
            assert r.returncode == 0, f"ip {' '.join(args)}: {r.stderr}"
        yield {"src": src, "dst": dst}
    finally:
        for ns in made:
            _ip("netns", "del", ns)  # takes the veth pair with it


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """tls_dirs: source and destination of one CA, and a source and a destination of another."""
    d = tmp_path_factory.mktemp("tls")
    ca, other = make_ca(d, "ca"), make_ca(d, "other-ca")
    return {
        "src": str(make_tls_dir(ca, d / "src", "client", SRC_IP)),
        "dst": str(make_tls_dir(ca, d / "dst", "server", DST_IP)),
        "rogue-src": str(make_tls_dir(other, d / "rogue-src", "client", SRC_IP)),
        "rogue-dst": str(make_tls_dir(other, d / "rogue-dst", "server", DST_IP)),
        "lo-src": str(make_tls_dir(ca, d / "lo-src", "client", "127.0.0.1")),
        "lo-dst": str(make_tls_dir(ca, d / "lo-dst", "server", "127.0.0.1")),
    }


def _source(vmm_process, hosts, memory="512M"):
    src = vmm_process("--cpus", "boot=2", "--memory", f"size={memory}", name="src", netns=hosts["src"])
    boot_id, _ = src.serial.wait_ready()
    return src, boot_id


def _still_runs(src, boot_id):
    """The migration failed and the source's guest runs on, unharmed."""
    p = wait_progress(src, lambda p: p["status"] != "active")
    assert p["status"] == "failed", p
    assert src.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Running"
    src.serial.command("status", rb"STATUS boot_id=" + boot_id.encode())
    src.serial.command("verify", rb"VERIFY OK \d+\r\n", timeout=60)
    return p


def _refused_before_start(dst):
    """The destination refused the peer without reading a request: no Start, no VM."""
    dst.wait_event("vm.migration-receive-failed")
    assert "vm.migration-receive-started" not in dst.event_names()
    assert dst.api.request("GET", "/api/v1/vm.info")[0] == 404


def test_tls_migration_with_four_connections_between_hosts(vmm_process, hosts, tls):
    src, boot_id = _source(vmm_process, hosts)
    src.serial.command("dirty 256", "DIRTY STARTED mib=256")
    src.serial.wait_dirty_pass()
    dst = vmm_process(name="dst", netns=hosts["dst"])
    url = f"tcp:{DST_IP}:{free_port()}"
    receiver = start_receive(dst, url, tls_dir=tls["dst"])
    send(src, url, tls_dir=tls["src"], connections=4)
    assert src.wait_exit(120) == 0
    receiver.join(30)
    assert receiver.result["answer"][0] == 204
    started = [e for e in dst.events() if e["event"] == "migration-receive-started"]
    assert [(e["properties"]["connections"], e["properties"]["tls"]) for e in started] == [(4, True)]
    m = dst.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16}) cpus=2 dirty=on")
    assert m.group(1).decode() == boot_id, "the guest rebooted: it should have moved"
    m = dst.serial.command("verify", rb"VERIFY OK (\d+)\r\n", timeout=60)
    assert int(m.group(1)) > 0


def test_peers_of_another_ca_are_refused(vmm_process, hosts, tls):
    src, boot_id = _source(vmm_process, hosts, memory="256M")
    dst = vmm_process(name="dst", netns=hosts["dst"])
    url = f"tcp:{DST_IP}:{free_port()}"
    receiver = start_receive(dst, url, tls_dir=tls["dst"])
    # A source whose certificate another CA signed: the destination refuses it in the handshake.
    send(src, url, tls_dir=tls["rogue-src"], connections=4)
    p = _still_runs(src, boot_id)
    assert "TLS" in p["error"] or "certificate" in p["error"], p["error"]
    _refused_before_start(dst)
    # A destination whose certificate another CA signed: the source refuses it.
    rogue = vmm_process(name="rogue-dst", netns=hosts["dst"])
    rogue_url = f"tcp:{DST_IP}:{free_port()}"
    start_receive(rogue, rogue_url, tls_dir=tls["rogue-dst"])
    send(src, rogue_url, tls_dir=tls["src"])
    p = _still_runs(src, boot_id)
    assert "certificate" in p["error"] or "TLS" in p["error"], p["error"]
    assert rogue.api.request("GET", "/api/v1/vm.info")[0] == 404
    # The refusals left the real destination listening: the right source gets through.
    send(src, url, tls_dir=tls["src"], connections=2)
    assert src.wait_exit(120) == 0
    receiver.join(30)
    assert receiver.result["answer"][0] == 204
    dst.serial.command("status", rb"STATUS boot_id=" + boot_id.encode())


def test_plaintext_and_tls_peers_are_refused(vmm_process, hosts, tls):
    src, boot_id = _source(vmm_process, hosts, memory="256M")
    # A plaintext source to a TLS destination.
    dst = vmm_process(name="dst", netns=hosts["dst"])
    url = f"tcp:{DST_IP}:{free_port()}"
    start_receive(dst, url, tls_dir=tls["dst"])
    send(src, url)
    _still_runs(src, boot_id)
    _refused_before_start(dst)
    # A TLS source to a plaintext destination: its answer is no TLS, so the source gives up.
    plain = vmm_process(name="plain-dst", netns=hosts["dst"])
    plain_url = f"tcp:{DST_IP}:{free_port()}"
    start_receive(plain, plain_url)
    send(src, plain_url, tls_dir=tls["src"])
    _still_runs(src, boot_id)
    plain.wait_event("vm.migration-receive-failed")
    assert "vm.migration-receive-started" not in plain.event_names()
    assert plain.api.request("GET", "/api/v1/vm.info")[0] == 404


def test_migration_options_are_checked(vmm_process, tmp_path, tls):
    src = vmm_process("--memory", "size=128M", name="src")

    def refused(**body):
        status, answer = src.api.request("PUT", "/api/v1/vm.send-migration", body)
        assert status == 400, (body, status, answer)
        return answer[-1] if isinstance(answer, list) else str(answer)

    unix = f"unix:{tmp_path}/m.sock"
    assert "tcp" in refused(destination_url=unix, connections=2)
    assert "tcp" in refused(destination_url=unix, local=True, connections=2)
    assert "1..128" in refused(destination_url="tcp:127.0.0.1:1", connections=129)
    assert "1..128" in refused(destination_url="tcp:127.0.0.1:1", connections=0)
    assert "tcp" in refused(destination_url=unix, tls_dir=tls["src"])
    assert "client-cert.pem" in refused(destination_url="tcp:127.0.0.1:1", tls_dir=tls["dst"])
    assert "max_bandwidth" in refused(destination_url="tcp:127.0.0.1:1", max_bandwidth="fast")
    status, answer = src.api.request(
        "PUT", "/api/v1/vm.receive-migration", {"receiver_url": "tcp:127.0.0.1:1", "tls_dir": str(tmp_path / "none")}
    )
    assert status == 400, answer
    assert src.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Running"


# ---- joining a migration: the protocol seen from a hand-written source -------------------------


def _request(s: socket.socket, command: int, doc: dict | None = None) -> tuple[int, bytes]:
    payload = json.dumps(doc).encode() if doc is not None else b""
    s.sendall(HEADER.pack(command, 0, 0, len(payload)) + payload)
    status, body = read_response(s)
    assert status is not None, "the destination closed the connection without an answer"
    return status, body


def test_only_connections_with_the_token_join(tmp_path):
    vmm = Vmm(serial=SerialConfig(mode="Null"))
    port = free_port()
    handle = vmm.receive_migration(f"tcp:127.0.0.1:{port}")
    first = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        status, body = _request(first, Command.START, {"version": 1, "capabilities": [], "connections": 3})
        assert status == Status.OK
        token = json.loads(body)["connection_token"]
        assert len(token) == 32
        strangers = [
            ({"token": "0" * 32, "index": 1}, Command.JOIN),
            ({"token": token, "index": 7}, Command.JOIN),
            ({"version": 1, "capabilities": []}, Command.START),
        ]
        for doc, command in strangers:
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                status, body = _request(s, command, doc)
                assert status == Status.ERROR and b"not a connection of the migration" in body, body
        joined = []
        for index in (1, 2):
            s = socket.create_connection(("127.0.0.1", port), timeout=20)
            joined.append(s)
            assert _request(s, Command.JOIN, {"token": token, "index": index})[0] == Status.OK
        assert _request(first, Command.ABANDON)[0] == Status.OK
        for s in joined:
            s.close()
    finally:
        first.close()
        handle.close()
        vmm.close()


def test_parallel_connections_need_tcp(tmp_path):
    vmm = Vmm(serial=SerialConfig(mode="Null"))
    path = str(tmp_path / "rx.sock")
    handle = vmm.receive_migration(f"unix:{path}")
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(path)
    try:
        status, body = _request(s, Command.START, {"version": 1, "capabilities": [], "connections": 2})
        assert status == Status.ERROR and b"needs tcp" in body, body
    finally:
        s.close()
        handle.close()
        vmm.close()


def test_progress_shows_the_options(vmm_process, tls):
    """connections, tls and max_bandwidth appear in migration-progress while it runs."""
    src = vmm_process("--cpus", "boot=2", "--memory", "size=256M", name="src")
    src.serial.wait_ready()
    src.serial.command("dirty 64", "DIRTY STARTED")
    dst = vmm_process(name="dst")
    url = f"tcp:127.0.0.1:{free_port()}"
    start_receive(dst, url, tls_dir=tls["lo-dst"])
    send(src, url, tls_dir=tls["lo-src"], connections=2, max_bandwidth="16M", downtime_ms=1, auto_converge=False)
    p = wait_progress(src, lambda p: p["status"] == "active" and p["current_rate"] > 0)
    assert (p["connections"], p["tls"], p["max_bandwidth"]) == (2, True, 16 << 20), p
    assert p["current_rate"] < 1.5 * (16 << 20), p
    assert src.api.request("PUT", "/api/v1/vm.cancel-migration")[0] == 204
    assert wait_progress(src, lambda p: p["status"] != "active")["status"] == "cancelled"
    assert src.api.request("GET", "/api/v1/vm.info")[1]["state"] == "Running"


def test_cancel_cuts_a_tls_handshake(vmm_process, tls):
    """A destination that accepts but never answers the ClientHello: cancel-migration ends the
    handshake at once (the socket is shut down), not at the handshake's 10 s timeout."""
    src = vmm_process("--memory", "size=64M", name="src")
    boot_id, _ = src.serial.wait_ready()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)
    try:
        url = f"tcp:127.0.0.1:{listener.getsockname()[1]}"
        send(src, url, tls_dir=tls["lo-src"])
        peer, _ = listener.accept()
        with peer:
            peer.settimeout(60)
            assert peer.recv(1) == b"\x16", "the source starts its TLS handshake"  # a handshake record
            assert src.api.request("PUT", "/api/v1/vm.cancel-migration")[0] == 204
            peer.settimeout(6)  # well under the 10 s handshake timeout
            while peer.recv(65536):  # the rest of the ClientHello, then the end of the connection
                pass
        assert wait_progress(src, lambda p: p["status"] != "active")["status"] == "cancelled"
        src.serial.command("status", rb"STATUS boot_id=" + boot_id.encode())
    finally:
        listener.close()


def test_a_certified_peer_trickling_its_start_is_dropped_at_the_handshake_deadline(tls):
    """Over TLS too the handshake timeout bounds Start in all: a peer with a good certificate
    that sends its Start a byte (one record) a second is dropped once it has passed."""
    port = free_port()
    vmm = Vmm()
    try:
        vmm.receive_migration(f"tcp:127.0.0.1:{port}", tls_dir=tls["lo-dst"])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(f"{tls['lo-src']}/ca-cert.pem")
        ctx.load_cert_chain(f"{tls['lo-src']}/client-cert.pem", f"{tls['lo-src']}/client-key.pem")
        raw = socket.create_connection(("127.0.0.1", port), timeout=transport.IO_TIMEOUT_S + 30)
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        try:
            status, body = trickled_start_answer(s)
        finally:
            s.close()
        assert status == Status.ERROR and b"handshake timed out" in body, (status, body)
    finally:
        vmm.close()
