"""A hostile migration peer, a hostile snapshot directory and another local user (issue 9's
findings 1-7), each against a real VMM, real sockets and real files (docs/security.md)."""

import array
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from vmmpy import Vmm, _native
from vmmpy.config import SerialConfig, VmConfig
from vmmpy.errors import InvalidConfig
from vmmpy.migration import transport
from vmmpy.migration.protocol import HEADER, Command, Status

from migration_helpers import read_response, trickled_start_answer

from helpers import SerialClient

FIXTURE = Path(__file__).parent / "fixtures" / "snapshot-1.0"
FIXTURE_STATE = json.loads((FIXTURE / "state.json").read_text())
MEMORY_64M = 64 << 20


def _config(**payload):
    api = VmConfig(memory_mib=64, vcpus=1).to_api()
    api["payload"].update(payload)
    return api


def _req(command, payload=b"", arg=0):
    return HEADER.pack(command, 0, arg, len(payload)) + payload


_resp = read_response


def _ok(s, command, payload=b"", arg=0, fds=None):
    if fds:
        s.sendmsg([_req(command, payload, arg)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        s.sendall(_req(command, payload, arg))
    status, body = _resp(s)
    assert status == Status.OK, body
    return body


def _error(s, command, payload=b"", arg=0, fds=None):
    if fds:
        s.sendmsg([_req(command, payload, arg)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        s.sendall(_req(command, payload, arg))
    status, body = _resp(s)
    assert status == Status.ERROR, (status, body)
    return body.decode()


def _start(s, capabilities=()):
    return json.loads(_ok(s, Command.START, json.dumps({"version": 1, "capabilities": list(capabilities)}).encode()))


def _connect(path, timeout=20):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    return s


def _fds_to(memfd_name: str) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if f"memfd:{memfd_name}" in os.readlink(f"/proc/self/fd/{fd}"):
                out.append(fd)
        except FileNotFoundError:
            pass
    return out


def _wait(pred, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"{what} not seen in {timeout}s"
        time.sleep(0.01)


@pytest.fixture
def receiver(tmp_path):
    """A receiving VMM started without --serial: nothing on its command line names a host file."""
    path = str(tmp_path / "rx.sock")
    vmm = Vmm()
    handle = vmm.receive_migration(f"unix:{path}")
    yield vmm, path
    handle.close()
    vmm.close()


# ---- 1: a peer's config or a snapshot's config.json chooses no host path ------------------------


def test_peer_serial_config_touches_no_host_file(receiver, tmp_path):
    vmm, path = receiver
    existing = tmp_path / "precious.txt"
    existing.write_text("keep me")
    appended = tmp_path / "created-by-peer.log"
    for serial in ({"mode": "Socket", "socket": str(existing)}, {"mode": "File", "file": str(appended)}):
        s = _connect(path)
        _start(s)
        cfg = _config()
        cfg["serial"] = serial
        s.sendall(_req(Command.CONFIG, json.dumps({"config": cfg, "memory_size": MEMORY_64M, "local": False}).encode()))
        _resp(s)  # accepted (the serial is the destination's own) or refused: the files tell
        s.sendall(_req(Command.ABANDON))
        _resp(s)
        s.close()
    assert stat.S_ISREG(existing.lstat().st_mode) and existing.read_text() == "keep me"
    assert not appended.exists()


def test_peer_device_ids_that_are_not_strings_get_a_clean_error(receiver):
    vmm, path = receiver
    for key, device in (("disks", {"path": "/peer.raw", "id": ["root"]}), ("net", {"tap": "t", "id": {"a": 1}})):
        s = _connect(path)
        _start(s)
        cfg = _config()
        cfg[key] = [device]
        body = json.dumps({"config": cfg, "memory_size": MEMORY_64M, "local": False}).encode()
        assert f"{key}[0].id=" in _error(s, Command.CONFIG, body)
        s.close()


def test_snapshot_config_serial_touches_no_host_file(guest_vmm, tmp_path):
    vmm, serial = guest_vmm(memory_mib=64)
    serial.wait_ready()
    vmm.pause()
    snap = tmp_path / "snap"
    vmm.snapshot(str(snap))
    existing = tmp_path / "another-vmms.sock"
    existing.write_text("not yours")
    config = json.loads((snap / "config.json").read_text())
    config["serial"] = {"mode": "Socket", "socket": str(existing)}
    (snap / "config.json").write_text(json.dumps(config))
    restored = Vmm.restore(str(snap))
    try:
        assert restored.info()["config"]["serial"]["mode"] == "Null"  # the restoring VMM's own
    finally:
        restored.close()
    assert stat.S_ISREG(existing.lstat().st_mode) and existing.read_text() == "not yours"


# ---- 2: kernel and initramfs travel as content ----------------------------------------------


def test_peer_payload_paths_are_never_opened(receiver, tmp_path):
    """A Config naming host files gets one answer whether or not they exist, and none is read."""
    vmm, path = receiver
    secret = tmp_path / "secret"
    secret.write_bytes(b"SECRET" * 1000)
    secret.chmod(0o600)
    answers = []
    for name in (str(secret), str(tmp_path / "no-such-file")):
        s = _connect(path)
        _start(s)
        body = json.dumps({"config": _config(initramfs=name), "memory_size": MEMORY_64M, "local": False}).encode()
        s.sendall(_req(Command.CONFIG, body))
        status, message = _resp(s)
        answers.append((status, message.decode().replace(name, "<path>")))
        s.close()
    assert answers[0] == answers[1], answers
    assert answers[0][0] == Status.ERROR and "content" in answers[0][1], answers


def _payload_desc(data):
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_peer_payload_over_the_bound_or_wrong_digest_is_refused(receiver):
    vmm, path = receiver
    kernel = _native.test_guest_elf()
    big = {"size": 300 << 20, "sha256": "0" * 64}
    cases = [  # (guest RAM in MiB, description, content sent, expected in the error)
        (1024, {"kernel": big, "initramfs": big}, None, "bound"),
        (64, {"kernel": {"size": MEMORY_64M + 4096, "sha256": "0" * 64}}, None, "RAM"),
        (64, {"kernel": _payload_desc(kernel)}, kernel[:-1] + b"X", "sha256"),
        (64, {"kernel": _payload_desc(kernel)}, kernel + b"X", "size"),
    ]
    for mib, desc, content, needle in cases:
        s = _connect(path)
        _start(s)
        cfg = VmConfig(memory_mib=mib).to_api()
        body = json.dumps({"config": cfg, "memory_size": mib << 20, "local": False, "payload": desc}).encode()
        if content is None:
            assert needle in _error(s, Command.CONFIG, body)
        else:
            _ok(s, Command.CONFIG, body)
            assert needle in _error(s, Command.PAYLOAD, content, arg=0)
        s.close()


def test_migrated_kernel_and_initramfs_are_content_a_reboot_uses(guest_vmm, tmp_path):
    """The source boots a kernel file and an initramfs; after the migration both files change on
    disk, and the destination's reboot still boots the bytes it received."""
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(_native.test_guest_elf())
    initramfs = tmp_path / "initramfs.img"
    marker = b"INITRAMFS-CONTENT-" + os.urandom(8).hex().encode()
    initramfs.write_bytes(marker * 256)
    src_serial_path = str(tmp_path / "src.sock")
    src = Vmm(serial=SerialConfig(mode="Socket", socket=src_serial_path))
    dst_serial_path = str(tmp_path / "dst.sock")
    dst = Vmm(serial=SerialConfig(mode="Socket", socket=dst_serial_path))
    try:
        src_serial = SerialClient(src_serial_path)
        src.create(VmConfig(memory_mib=64, kernel=str(kernel), initramfs=str(initramfs)))
        src.boot()
        src_serial.wait_ready()
        handle = dst.receive_migration(f"unix:{tmp_path}/mig.sock")
        src.send_migration(f"unix:{tmp_path}/mig.sock").wait(120)
        assert handle.wait(60)
        kernel.write_bytes(b"garbage, not a kernel")
        initramfs.write_bytes(b"OTHER" * 1000)
        dst_serial = SerialClient(dst_serial_path)
        dst_serial.command("echo migrated", rb"migrated\r\n")
        dst.reboot()
        dst_serial.wait_ready()
        assert any(marker in bytes(r) for r in dst.memory_regions()), "the received initramfs is not in RAM"
        dst_serial.close()
        src_serial.close()
    finally:
        src.close()
        dst.close()


# ---- 3: local migration maps only sealed memfds of the right size -----------------------------


def test_vmms_own_memfds_are_sealed(guest_vmm):
    import fcntl

    vmm, serial = guest_vmm(memory_mib=64)
    serial.wait_ready()
    for _, fd, size in vmm._machine.vm.memory_fds():
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW, seals
        assert os.fstat(fd).st_size == size


@pytest.mark.parametrize("seal", [False, True])
def test_unsealed_or_oversized_memfd_is_refused(receiver, seal):
    import fcntl

    vmm, path = receiver
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seal else 0)
    fd = os.memfd_create("peer-ram", flags)
    try:
        # Sealed but one page too big, or the right size but shrinkable.
        os.ftruncate(fd, MEMORY_64M + (4096 if seal else 0))
        if seal:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        s = _connect(path)
        _start(s, ["local"])
        _ok(s, Command.MEMORY_FD, arg=0, fds=[fd])
        body = json.dumps({"config": _config(), "memory_size": MEMORY_64M, "local": True}).encode()
        message = _error(s, Command.CONFIG, body)
        assert ("seal" in message) if not seal else ("bytes" in message), message
        s.close()
    finally:
        os.close(fd)


# ---- 4: MemoryFd frames are bounded ---------------------------------------------------------


def test_memory_fd_flood_is_bounded_and_leaves_no_fd(receiver):
    vmm, path = receiver
    name = f"peer-{os.getpid()}-{time.monotonic_ns()}"
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        s = _connect(path)
        _start(s, ["local"])
        _ok(s, Command.MEMORY_FD, arg=0, fds=[fd])
        assert "region" in _error(s, Command.MEMORY_FD, arg=2, fds=[fd])
        s.close()
        s = _connect(path)
        _start(s, ["local"])
        _ok(s, Command.MEMORY_FD, arg=0, fds=[fd])
        _error(s, Command.MEMORY_FD, arg=0, fds=[fd])  # a duplicate
        s.close()
        s = _connect(path)
        _start(s, ["local"])
        _error(s, Command.MEMORY_FD, arg=0, fds=[fd, fd, fd])  # more than one fd
        s.close()
    finally:
        os.close(fd)
    # Every copy the receiver got is closed: no fd of this process refers to the peer's memfd
    # (counted by name, so fds other tests' threads open or close meanwhile do not matter).
    _wait(lambda: not _fds_to(name), f"fds to the peer's memfd closed (still {_fds_to(name)})")


# ---- 5: one migration at a time; others hear "busy" at once ------------------------------------


def test_fifty_sources_hear_busy_and_the_first_migration_completes(tmp_path):
    port = _free_port()
    vmm = Vmm()
    try:
        vmm.receive_migration(f"tcp:127.0.0.1:{port}")
        first = socket.create_connection(("127.0.0.1", port), timeout=30)
        _start(first)
        _ok(
            first, Command.CONFIG, json.dumps({"config": _config(), "memory_size": MEMORY_64M, "local": False}).encode()
        )
        answers: list = [None] * 50

        def other(i):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=20)
                s.sendall(_req(Command.START, json.dumps({"version": 1, "capabilities": []}).encode()))
                answers[i] = _resp(s)
                s.close()
            except OSError as e:
                answers[i] = ("failed", repr(e))

        threads = [threading.Thread(target=other, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        refused = [a for a in answers if a is None or a[0] != Status.ERROR or b"busy" not in a[1]]
        assert not refused, refused[:5]
        _ok(first, Command.STATE, json.dumps(FIXTURE_STATE).encode())
        _ok(first, Command.COMPLETE)
        first.close()
        vmm.wait_for_event("vm.migration-receive-finished", 30)
        assert vmm.info()["state"] in ("Running", "Error")
    finally:
        vmm.close()


def test_an_idle_peer_is_dropped_after_the_short_handshake_timeout(receiver):
    vmm, path = receiver
    idle = _connect(path, timeout=transport.IO_TIMEOUT_S + 30)
    t0 = time.monotonic()
    status, body = _resp(idle)  # it sends nothing at all
    waited = time.monotonic() - t0
    idle.close()
    assert status == Status.ERROR and b"handshake" in body, (status, body)
    assert waited < transport.IO_TIMEOUT_S, f"dropped after {waited:.1f}s: not before the transfer timeout"
    s = _connect(path)
    _start(s)  # the next source is served
    s.close()


def test_a_trickling_peer_is_dropped_at_the_handshake_deadline(receiver):
    """A peer that sends its Start a byte a second never has a read time out, yet it is dropped
    once the handshake timeout has passed since it was taken, Start unfinished."""
    vmm, path = receiver
    s = _connect(path, timeout=transport.IO_TIMEOUT_S + 30)
    try:
        status, body = trickled_start_answer(s)
    finally:
        s.close()
    assert status == Status.ERROR and b"handshake timed out" in body, (status, body)
    s = _connect(path)
    _start(s)  # the next source is served
    s.close()


@pytest.mark.parametrize("stranger_kind", ["unparsable", "silent"])
def test_a_stranger_among_the_joins_holds_up_no_real_join(stranger_kind):
    """While a migration with connections=2 waits for its extra connection, a stranger connects:
    one whose Join is nested too deeply to parse is refused on its own connection, one that sends
    nothing holds up no real join (each joining connection is read apart) and is cut off once the
    joins are complete. Either way the real one joins and the migration completes."""
    port = _free_port()
    vmm = Vmm()
    stranger = None
    try:
        vmm.receive_migration(f"tcp:127.0.0.1:{port}")
        first = socket.create_connection(("127.0.0.1", port), timeout=30)
        start = {"version": 1, "capabilities": ["connections"], "connections": 2}
        token = json.loads(_ok(first, Command.START, json.dumps(start).encode()))["connection_token"]
        stranger = socket.create_connection(("127.0.0.1", port), timeout=30)
        if stranger_kind == "unparsable":
            assert "nested too deeply" in _error(stranger, Command.JOIN, b"[" * 60000)
        extra = socket.create_connection(("127.0.0.1", port), timeout=30)
        _ok(extra, Command.JOIN, json.dumps({"token": token, "index": 1}).encode())
        config = {"config": _config(), "memory_size": MEMORY_64M, "local": False}
        _ok(first, Command.CONFIG, json.dumps(config).encode())
        _ok(first, Command.STATE, json.dumps(FIXTURE_STATE).encode())
        _ok(first, Command.COMPLETE)
        first.close()
        extra.close()
        vmm.wait_for_event("vm.migration-receive-finished", 30)
        if stranger_kind == "silent":
            assert stranger.recv(16) == b"", "the silent stranger is cut off, with no answer"
    finally:
        if stranger is not None:
            stranger.close()
        vmm.close()


def test_closing_the_receiver_while_joins_are_awaited_ends_the_attempt_at_once():
    """A receiver closed while its migration waits for extra connections stops waiting: the
    attempt fails for that reason, not when the join timeout runs out."""
    port = _free_port()
    vmm = Vmm()
    try:
        handle = vmm.receive_migration(f"tcp:127.0.0.1:{port}")
        first = socket.create_connection(("127.0.0.1", port), timeout=30)
        start = {"version": 1, "capabilities": ["connections"], "connections": 2}
        _ok(first, Command.START, json.dumps(start).encode())
        handle.close()
        failed = vmm.wait_for_event("vm.migration-receive-failed", 30)
        assert "closed while extra connections were joining" in failed["properties"]["error"], failed
        first.close()
    finally:
        vmm.close()


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---- 6: sockets vmmpy creates are the owner's only ----------------------------------------------

NOBODY = 65534


def _connect_as_nobody(path):
    """connect() from another uid: '' on success, else the errno name."""
    code = (
        "import os, socket, errno, sys\n"
        f"os.setgid({NOBODY}); os.setgroups([]); os.setuid({NOBODY})\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"try:\n s.connect({path!r}); print('')\n"
        "except OSError as e:\n print(errno.errorcode[e.errno])\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()


def test_serial_and_migration_sockets_are_0600_under_umask_000():
    if os.getuid() != 0:
        pytest.skip("needs root to run a connect() as another uid (uid nobody)")
    base = tempfile.mkdtemp(prefix="vmmpy-modes-")
    os.chmod(base, 0o755)  # another uid may reach the sockets: only their own mode keeps it out
    old = os.umask(0)
    vmm = None
    try:
        serial = f"{base}/serial.sock"
        mig = f"{base}/mig.sock"
        vmm = Vmm(serial=SerialConfig(mode="Socket", socket=serial))
        handle = vmm.receive_migration(f"unix:{mig}")
        for path in (serial, mig):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, (path, oct(os.stat(path).st_mode))
            assert _connect_as_nobody(path) == "EACCES"
        os.chmod(serial, 0o666)  # the control: with a loose mode the other uid gets in
        assert _connect_as_nobody(serial) == ""
        handle.close()
    finally:
        os.umask(old)
        if vmm is not None:
            vmm.close()
        shutil.rmtree(base)


# ---- 7: snapshots write and read only their own regular files -------------------------------------


def _paused(guest_vmm):
    vmm, serial = guest_vmm(memory_mib=64)
    serial.wait_ready()
    vmm.pause()
    return vmm


def test_snapshot_does_not_follow_planted_symlinks(guest_vmm, tmp_path):
    vmm = _paused(guest_vmm)
    snap = tmp_path / "snap"
    snap.mkdir()
    targets = {}
    for name in (
        "memory-0.bin",
        "config.json",
        "state.json",
        "config.tmp",
        "state.tmp",
        "config.json.tmp",
        "state.json.tmp",
    ):
        target = tmp_path / f"victim-{name}"
        target.write_text("victim")
        (snap / name).symlink_to(target)
        targets[name] = target
    vmm.snapshot(f"file://{snap}")
    for name, target in targets.items():
        assert target.read_text() == "victim", name
    for name in ("memory-0.bin", "config.json", "state.json"):
        assert stat.S_ISREG((snap / name).lstat().st_mode), name
        assert stat.S_IMODE((snap / name).lstat().st_mode) == 0o600, name


@pytest.mark.parametrize("name", ["state.json", "config.json", "memory-0.bin"])
def test_restore_does_not_follow_symlinks_out_of_the_directory(guest_vmm, tmp_path, name):
    vmm = _paused(guest_vmm)
    real = tmp_path / "real"
    vmm.snapshot(str(real))
    snap = tmp_path / "snap"
    snap.mkdir()
    for entry in real.iterdir():
        if entry.name == name:
            (snap / name).symlink_to(entry)
        else:
            shutil.copy(entry, snap / entry.name)
    with pytest.raises(InvalidConfig, match="regular file"):
        Vmm.restore(str(snap)).close()


def test_restore_refuses_a_fifo_without_blocking(guest_vmm, tmp_path):
    vmm = _paused(guest_vmm)
    snap = tmp_path / "snap"
    vmm.snapshot(str(snap))
    (snap / "memory-0.bin").unlink()
    os.mkfifo(snap / "memory-0.bin")
    with pytest.raises(InvalidConfig, match="regular file"):
        Vmm.restore(str(snap)).close()


def test_an_empty_file_url_is_an_error(guest_vmm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    vmm = _paused(guest_vmm)
    with pytest.raises(InvalidConfig, match="empty"):
        vmm.snapshot("file://")
    with pytest.raises(InvalidConfig, match="empty"):
        Vmm.restore("file://").close()
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("memory-*"))


def test_snapshot_carries_the_payload_as_content_and_checks_it(tmp_path):
    """A snapshot of a VM booted from kernel and initramfs files holds their bytes; a restore
    reboots from those bytes after the files changed, and refuses tampered ones."""
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(_native.test_guest_elf())
    initramfs = tmp_path / "initramfs.img"
    marker = b"SNAPSHOT-INITRAMFS-" + os.urandom(8).hex().encode()
    initramfs.write_bytes(marker * 128)
    serial_path = str(tmp_path / "serial.sock")
    snap = tmp_path / "snap"
    with Vmm(serial=SerialConfig(mode="Socket", socket=serial_path)) as vmm:
        serial = SerialClient(serial_path)
        vmm.create(VmConfig(memory_mib=64, kernel=str(kernel), initramfs=str(initramfs)))
        vmm.boot()
        serial.wait_ready()
        vmm.pause()
        vmm.snapshot(str(snap))
        serial.close()
    for part in ("kernel", "initramfs"):
        assert stat.S_IMODE((snap / f"payload-{part}.bin").stat().st_mode) == 0o600
    kernel.write_bytes(b"not the kernel any more")
    initramfs.unlink()
    restored_serial = str(tmp_path / "restored.sock")
    restored = Vmm.restore(str(snap), serial=SerialConfig(mode="Socket", socket=restored_serial))
    try:
        serial = SerialClient(restored_serial)
        restored.resume()
        restored.reboot()
        serial.wait_ready()
        assert any(marker in bytes(r) for r in restored.memory_regions())
        serial.close()
    finally:
        restored.close()
    data = bytearray((snap / "payload-kernel.bin").read_bytes())
    data[100] ^= 0xFF
    (snap / "payload-kernel.bin").write_bytes(bytes(data))
    with pytest.raises(InvalidConfig, match="sha256"):
        Vmm.restore(str(snap)).close()
