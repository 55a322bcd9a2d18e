"""The receiver against malformed streams: every bad frame gets an error response (or a closed
connection), the half-built VM is discarded, nothing crashes, and a good migration still works."""

import json
import socket
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmmpy import Vmm
from vmmpy.config import SerialConfig, VmConfig
from vmmpy.errors import MigrationError
from vmmpy.migration.protocol import HEADER, Command, Status

from migration_helpers import read_response

CONFIG = {"config": VmConfig(memory_mib=64, vcpus=1).to_api(), "memory_size": 64 << 20, "local": False}


@pytest.fixture(scope="module")
def receiver(tmp_path_factory):
    """One receiving VMM for the module: it must survive everything thrown at it."""
    path = str(tmp_path_factory.mktemp("rx") / "rx.sock")
    vmm = Vmm(serial=SerialConfig(mode="Null"))
    handle = vmm.receive_migration(f"unix:{path}")
    yield vmm, path
    handle.close()
    vmm.close()


def _connect(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    return s


def _req(command, payload=b"", arg=0, length=None):
    return HEADER.pack(command, 0, arg, len(payload) if length is None else length) + payload


_resp = read_response


def _send_start(s):
    s.sendall(_req(Command.START, json.dumps({"version": 1, "capabilities": []}).encode()))
    return _resp(s)


def _start(s):
    status, body = _send_start(s)
    assert status == Status.OK and json.loads(body)["version"] == 1


def _configure(s):
    _start(s)
    s.sendall(_req(Command.CONFIG, json.dumps(CONFIG).encode()))
    assert _resp(s)[0] == Status.OK


def _expect_error(s, needle=""):
    status, body = _resp(s)
    assert status == Status.ERROR, (status, body)
    assert needle.encode() in body, body


def _configure_when_free(path):
    """A new source's Start and Config, once the receiver has finished with the one before
    (until then a new source is answered busy)."""
    deadline = time.monotonic() + 30
    while True:
        s = _connect(path)
        status, body = _send_start(s)
        if status == Status.OK:
            break
        s.close()
        assert b"busy" in body and time.monotonic() < deadline, (status, body)
        time.sleep(0.01)
    s.sendall(_req(Command.CONFIG, json.dumps(CONFIG).encode()))
    assert _resp(s)[0] == Status.OK, "the receiver must be free for the next source"
    return s


def _abandon(s):
    s.sendall(_req(Command.ABANDON))
    assert _resp(s)[0] == Status.OK
    s.close()


def _fixture_state() -> dict:
    """The state document of the 1.0 snapshot fixture: one vCPU, as CONFIG builds."""
    return json.loads((Path(__file__).parent / "fixtures" / "snapshot-1.0" / "state.json").read_text())


def _no_vm(vmm):
    deadline = time.monotonic() + 5
    while True:
        try:
            vmm.info()
        except Exception:  # noqa: BLE001 - VmNotCreated is the expected answer
            return
        assert time.monotonic() < deadline, "a half-built VM was left behind"
        time.sleep(0.01)


CASES = {
    "unknown command": lambda s: (s.sendall(_req(99)), "unknown command"),
    "memory before start": lambda s: (s.sendall(_req(Command.MEMORY, length=16)), "not allowed"),
    "state before config": lambda s: (_start(s), s.sendall(_req(Command.STATE, b"{}")), "not allowed"),
    "complete before state": lambda s: (_configure(s), s.sendall(_req(Command.COMPLETE)), "not allowed"),
    "bad protocol version": lambda s: (s.sendall(_req(Command.START, b'{"version": 7}')), "protocol"),
    "start not json": lambda s: (s.sendall(_req(Command.START, b"\xff{")), "malformed JSON"),
    "oversized config": lambda s: (_start(s), s.sendall(_req(Command.CONFIG, length=1 << 40)), "over the bound"),
    "config with bad vm": lambda s: (
        _start(s),
        s.sendall(_req(Command.CONFIG, json.dumps({"config": {"cpus": {"boot_vcpus": 0}}}).encode())),
        "vcpus",
    ),
    "range outside RAM": lambda s: (
        _configure(s),
        s.sendall(_req(Command.MEMORY, struct.pack("<QII", 1 << 40, 4096, 0)) + b"\0" * 4096),
        "",
    ),
    "unaligned range": lambda s: (
        _configure(s),
        s.sendall(_req(Command.MEMORY, struct.pack("<QII", 0x1001, 4096, 0)) + b"\0" * 4096),
        "",
    ),
    "table not a multiple of 16": lambda s: (_configure(s), s.sendall(_req(Command.MEMORY, b"\0" * 15)), ""),
    "state with an unknown arg": lambda s: (
        _configure(s),
        s.sendall(_req(Command.STATE, json.dumps(_fixture_state()).encode(), arg=2)),
        "State with arg 2",
    ),
    "bad state document": lambda s: (
        _configure(s),
        s.sendall(_req(Command.STATE, b'{"format_version": "9.0"}')),
        "not supported",
    ),
    "completing state that does not parse": lambda s: (  # its vCPUs stood by: the discard ends them
        _configure(s),
        s.sendall(_req(Command.STATE, b'{"format_version": "9.0"}', arg=1)),
        "not supported",
    ),
    "state version a number": lambda s: (
        _configure(s),
        s.sendall(_req(Command.STATE, json.dumps({**_fixture_state(), "format_version": 1.4}).encode())),
        "no valid format_version",
    ),
    "unknown lifecycle event at state": lambda s: (
        _configure(s),
        s.sendall(
            _req(Command.STATE, json.dumps({**_fixture_state(), "post_migration_lifecycle_event": "Bogus"}).encode())
        ),
        "post_migration_lifecycle_event 'Bogus'",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_stream_gets_an_error_and_the_receiver_survives(receiver, case):
    vmm, path = receiver
    s = _connect(path)
    try:
        needle = CASES[case](s)[-1]
        _expect_error(s, needle)
    finally:
        s.close()
    _no_vm(vmm)
    assert vmm.ping()["pid"]


def test_a_state_that_does_not_fit_the_vm_is_refused(receiver):
    """A well-formed state for another VM (two vCPUs, where Config built one) is refused at State,
    a clear refusal, and the half-built VM is discarded."""
    vmm, path = receiver
    state = _fixture_state()
    state["vcpus"] = state["vcpus"] * 2
    s = _connect(path)
    try:
        _configure(s)
        s.sendall(_req(Command.STATE, json.dumps(state).encode()))
        _expect_error(s, "state has 2 vCPUs, the VM 1")
    finally:
        s.close()
    _no_vm(vmm)
    _abandon(_configure_when_free(path))  # the VM it built is gone, and the VMM free again


def test_a_source_gone_before_the_config_answer_leaves_the_receiver_free(receiver):
    """The destination builds its VM at Config; a source that hangs up before the Ok makes the
    answer fail. That VM must still be discarded, and the VMM freed for the next source."""
    vmm, path = receiver
    s = _connect(path)
    _start(s)
    s.sendall(_req(Command.CONFIG, json.dumps(CONFIG).encode()))
    s.close()  # before the VM is built and the answer written
    _abandon(_configure_when_free(path))
    _no_vm(vmm)


def test_truncated_memory_frame(receiver):
    vmm, path = receiver
    s = _connect(path)
    _configure(s)
    # A table announcing one 64 KiB range, then only part of its bytes, then the end of the stream.
    s.sendall(_req(Command.MEMORY, struct.pack("<QII", 0x200000, 0x10000, 0)) + b"\1" * 1000)
    s.shutdown(socket.SHUT_WR)
    status, _ = _resp(s)
    assert status in (None, Status.ERROR)
    s.close()
    _no_vm(vmm)


def test_abandon_is_acknowledged(receiver):
    vmm, path = receiver
    s = _connect(path)
    _configure(s)
    s.sendall(_req(Command.ABANDON))
    assert _resp(s)[0] == Status.OK
    s.close()
    _no_vm(vmm)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 2**32 - 1), st.binary(max_size=64)), min_size=1, max_size=4),
    st.booleans(),
)
def test_fuzzed_frames_never_crash_the_receiver(receiver, frames, configure_first):
    vmm, path = receiver
    s = _connect(path)
    try:
        if configure_first:
            _configure(s)
        for command, arg, payload in frames:
            s.sendall(HEADER.pack(command, 0, arg, len(payload)) + payload)
        s.shutdown(socket.SHUT_WR)
        while _resp(s)[0] is not None:
            pass
    except (ConnectionResetError, BrokenPipeError, socket.timeout):
        pass
    finally:
        s.close()
    _no_vm(vmm)
    assert vmm.ping()["pid"]


@pytest.mark.parametrize("completes", [False, True], ids=["state-then-complete", "state-completes"])
def test_a_source_gone_before_the_complete_reply_leaves_the_vm_running_here(tmp_path, completes):
    """Once the destination took the VM over, losing the connection before its Ok reply must not
    stop the guest it now runs (the source stays paused: see test_migration_faults). The same
    for a State that carries the Complete (arg 1)."""
    state = _fixture_state()
    path = str(tmp_path / "rx.sock")
    vmm = Vmm(serial=SerialConfig(mode="Null"))
    try:
        handle = vmm.receive_migration(f"unix:{path}")
        s = _connect(path)
        _configure(s)
        if completes:
            s.sendall(_req(Command.STATE, json.dumps(state).encode(), arg=1))
        else:
            s.sendall(_req(Command.STATE, json.dumps(state).encode()))
            assert _resp(s)[0] == Status.OK
            s.sendall(_req(Command.COMPLETE))
        s.close()  # gone before the answer
        vmm.wait_for_event("vm.migration-receive-finished", 60)
        assert handle.wait(60)  # the receiver is done with the connection
        assert not vmm.events.events("vm.migration-receive-failed")
        assert vmm.info()["state"] in ("Running", "Error")  # it is ours now; nothing stopped it
    finally:
        vmm.close()


def test_an_answer_carries_when_it_arrived_on_tcp_and_nothing_on_unix():
    """The downtime ends when the last answer reached the source (the kernel's receive stamp),
    not when the source's thread got to read it; a Unix socket has no stamps."""
    from vmmpy.migration.protocol import OK_ANSWER, Connection

    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as near:
        far, _ = listener.accept()
        with far:
            conn = Connection(near)
            conn.stamp_arrivals()
            # The kernel may switch its receive stamps on a moment later (deferred work, when no
            # socket on the host had them): until then an answer has none, and its read time counts.
            for _ in range(1000):
                before = time.time()
                far.sendall(OK_ANSWER)
                payload, arrived = conn.read_response_arrival()
                assert payload == b""
                if arrived is not None:
                    break
            assert arrived is not None, "no answer got a receive stamp"
            assert before <= arrived <= time.time()
            far.sendall(HEADER.pack(Status.ERROR, 0, 0, 4) + b"nope")
            with pytest.raises(MigrationError, match="nope"):
                conn.read_response_arrival()
    near, far = socket.socketpair()
    with near, far:
        conn = Connection(near)
        conn.stamp_arrivals()
        far.sendall(OK_ANSWER)
        assert conn.read_response_arrival() == (b"", None)
