"""The REST API's HTTP side: routing, bodies, the exception → status table, wire format, the
server's lifecycle, the client and vmmpy-remote.

This is NOT a KVM test. The server runs against `RecordingVmm`, a stand-in with the `Vmm`
method names that records calls and raises whatever a test tells it to. The real VMM behind the
same API is exercised by the KVM tests (test_lifecycle.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from vmmpy import remote
from vmmpy.api import ENDPOINTS, ERROR_STATUS, MAX_BODY, ApiServer, status_for
from vmmpy.client import ApiClient, error_message
from vmmpy.config import MIB, SerialConfig, VmConfig
from vmmpy.errors import (
    InvalidConfig,
    InvalidState,
    KvmError,
    PauseTimeout,
    PayloadError,
    VmAlreadyCreated,
    VmMigrating,
    VmmError,
    VmmShutDown,
    VmNotCreated,
)

from helpers import raw_exchange


class RecordingVmm:
    """Stand-in for vmmpy.vmm.Vmm (no KVM): records calls, raises from `fail`, waits on `block`."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.fail: dict[str, BaseException] = {}
        self.block: dict[str, threading.Event] = {}
        self.config: VmConfig | None = None
        self._lock = threading.Lock()

    def _do(self, name: str, *args) -> None:
        with self._lock:
            self.calls.append((name, *args))
        gate = self.block.get(name)
        if gate is not None:
            gate.wait(10)
        exc = self.fail.get(name)
        if exc is not None:
            raise exc

    def names(self) -> list[str]:
        with self._lock:
            return [c[0] for c in self.calls]

    def ping(self) -> dict:
        self._do("ping")
        return {"build_version": "test", "version": "0.1.0", "pid": os.getpid(), "features": []}

    def create(self, config: VmConfig) -> None:
        self._do("create", config)
        self.config = config

    def info(self) -> dict:
        self._do("info")
        if self.config is None:
            raise VmNotCreated("VM is not created")
        return {
            "config": self.config,  # a VmConfig: the server turns it into CH's JSON shape
            "state": "Running",
            "vmmpy_state": "Error",
            "memory_actual_size": self.config.memory_mib * MIB,
            "error": {"reason": "KVM_EXIT_INTERNAL_ERROR suberror 1", "vcpu": 0, "regs": {"rip": 4096}},
        }

    def counters(self) -> dict:
        self._do("counters")
        return {}

    def boot(self):
        self._do("boot")

    def pause(self):
        self._do("pause")

    def resume(self):
        self._do("resume")

    def reboot(self):
        self._do("reboot")

    def shutdown(self):
        self._do("shutdown")

    def delete(self):
        self._do("delete")

    def power_button(self):
        self._do("power_button")

    def shutdown_vmm(self):
        self._do("shutdown_vmm")


@pytest.fixture
def sockdir():
    # Short path: AF_UNIX socket paths are limited to 107 bytes.
    path = tempfile.mkdtemp(prefix="vmmpy-api-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def served(sockdir):
    vmm = RecordingVmm()
    path = os.path.join(sockdir, "api.sock")
    server = ApiServer(vmm, path).start()
    yield vmm, path, ApiClient(path, timeout=10), server
    server.close()


CH_REMOTE_PREAMBLE = "{method} /api/v1/{cmd} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n"


def ch_remote_request(method: str, cmd: str, body: str | None = None) -> bytes:
    """Exactly the bytes ch-remote writes."""
    req = CH_REMOTE_PREAMBLE.format(method=method, cmd=cmd)
    if body is not None:
        req += f"Content-Length: {len(body)}\r\n"
    req += "\r\n"
    if body is not None:
        req += body
    return req.encode()


# ------------------------------------------------------------------------------ endpoints


def test_ping(served):
    vmm, _path, client, _server = served
    status, body = client.ping()
    assert status == 200
    assert body == {"build_version": "test", "version": "0.1.0", "pid": os.getpid(), "features": []}
    assert vmm.names() == ["ping"]


@pytest.mark.parametrize(
    "endpoint, call",
    [
        ("vm.boot", "boot"),
        ("vm.pause", "pause"),
        ("vm.resume", "resume"),
        ("vm.reboot", "reboot"),
        ("vm.shutdown", "shutdown"),
        ("vm.delete", "delete"),
        ("vm.power-button", "power_button"),
        ("vmm.shutdown", "shutdown_vmm"),
    ],
)
def test_put_actions_answer_204(served, endpoint, call):
    vmm, _path, client, _server = served
    assert client.request("PUT", endpoint) == (204, None)
    assert vmm.names() == [call]


def test_client_methods_hit_their_endpoints(served):
    vmm, _path, client, _server = served
    for method in ("boot", "pause", "resume", "reboot", "shutdown", "delete", "power_button", "shutdown_vmm"):
        assert getattr(client, method)() == (204, None)
    assert vmm.names() == ["boot", "pause", "resume", "reboot", "shutdown", "delete", "power_button", "shutdown_vmm"]


def test_create_then_info(served):
    vmm, _path, client, _server = served
    assert client.info()[0] == 404
    body = {
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 256 * MIB, "shared": True},
        "payload": {"cmdline": "console=ttyS0 quiet"},
        "serial": {"mode": "File", "file": "/tmp/x.log"},
    }
    assert client.create(body) == (204, None)
    ((name, config),) = [c for c in vmm.calls if c[0] == "create"]
    assert config == VmConfig(
        memory_mib=256,
        vcpus=2,
        cmdline="console=ttyS0 quiet",
        memory_shared=True,
        serial=SerialConfig("File", file="/tmp/x.log"),
    )
    status, info = client.info()
    assert status == 200
    assert info["state"] == "Running" and info["vmmpy_state"] == "Error"
    assert info["memory_actual_size"] == 256 * MIB
    assert info["error"] == {"reason": "KVM_EXIT_INTERNAL_ERROR suberror 1", "vcpu": 0, "regs": {"rip": 4096}}
    assert info["config"] == config.to_api()
    # what vm.info reports can be fed back to vm.create
    assert VmConfig.from_api(info["config"]) == config


def test_create_with_vmconfig_object(served):
    vmm, _path, client, _server = served
    assert client.create(VmConfig(vcpus=3)) == (204, None)
    assert vmm.config.vcpus == 3


# ------------------------------------------------------------------------------ error table


@pytest.mark.parametrize(
    "exc, status",
    [
        (VmNotCreated("VM is not created"), 404),
        (InvalidState("VM is not running"), 405),
        (VmAlreadyCreated("a VM exists"), 405),  # vm.pause's wrong state: 405 (CH's spec)
        (VmMigrating("VM is migrating"), 409),
        (InvalidConfig("bad"), 400),
        (PayloadError("kernel is not an ELF"), 400),
        (PauseTimeout("vCPU 1 did not stop"), 500),
        (KvmError("KVM_RUN failed", errno=14), 500),
        (VmmShutDown("the VMM has shut down"), 503),
        (VmmError("something else"), 500),
        (RuntimeError("a bug"), 500),
    ],
)
def test_error_statuses(served, exc, status):
    vmm, _path, client, _server = served
    vmm.fail["pause"] = exc
    got_status, body = client.pause()
    assert got_status == status == status_for(exc, ENDPOINTS["vm.pause"])
    assert isinstance(body, list) and all(isinstance(s, str) for s in body)
    assert body[0] == "vm.pause failed"
    assert str(exc) in body[-1]
    if not isinstance(exc, VmmError):
        assert body[-1].startswith("internal error: RuntimeError")


def test_error_table_is_ordered_specific_first():
    classes = [cls for cls, _ in ERROR_STATUS]
    for i, cls in enumerate(classes):
        for later in classes[i + 1 :]:
            assert not issubclass(later, cls) or later is cls, f"{later.__name__} is shadowed by {cls.__name__}"
    assert status_for(VmNotCreated("x")) == 404  # not InvalidState's 405
    assert status_for(KeyError("x")) == 500


def test_create_errors(served):
    vmm, _path, client, _server = served
    vmm.fail["create"] = VmAlreadyCreated("a VM already exists")
    status, body = client.create({})
    assert status == 500 and body == ["vm.create failed", "a VM already exists"]  # CH's server: 500


def test_create_unsupported_fields_400(served):
    vmm, _path, client, _server = served
    status, body = client.create(
        {"fs": [{"tag": "t0", "socket": "/s"}], "memory": {"size": 512 * MIB, "hugepages": True}}
    )
    assert status == 400
    assert body == ["vm.create failed", "unsupported VmConfig fields: fs, memory.hugepages"]
    assert vmm.calls == []  # never reached the VMM


def test_create_bad_bodies(served):
    vmm, path, client, _server = served
    status, body = client.request("PUT", "vm.create", "{not json")
    assert status == 400 and "not valid JSON" in error_message(body)
    status, body = client.request("PUT", "vm.create")
    assert status == 400 and "needs a JSON request body" in error_message(body)
    status, body = client.request("PUT", "vm.create", "[1, 2]")
    assert status == 400 and "must be a JSON object" in error_message(body)
    status, body = client.request("PUT", "vm.create", b"\xff\xfe")
    assert status == 400
    status, body = client.request("PUT", "vm.create", {"memory": {"size": 100}})
    assert status == 400 and "memory.size=100" in error_message(body)
    assert vmm.calls == []


def test_body_on_bodyless_endpoint_400(served):
    vmm, _path, client, _server = served
    status, body = client.request("PUT", "vm.pause", {"x": 1})
    assert status == 400 and body == ["Bad Request", "vm.pause takes no request body"]
    assert vmm.calls == []
    # An empty body (curl's "Content-Length: 0" PUT, as libvirt sends) is no body.
    assert client.request("PUT", "vm.pause", b"") == (204, None)


def test_body_too_large_413(served):
    _vmm, _path, client, _server = served
    status, body = client.request("PUT", "vm.create", b" " * (MAX_BODY + 1))
    assert status == 413


def test_unknown_paths_404(served):
    vmm, _path, client, _server = served
    for path in ("/api/v1/vm.frobnicate", "/api/v1/", "/", "/api/v2/vm.info", "/vm.info", "/api/v1/vm.info/x"):
        status, body = client.request("GET", path)
        assert status == 404, path
        assert body[0] == "Not Found"
    # CH endpoints vmmpy does not implement are unknown too
    status, _ = client.request("PUT", "vm.add-disk", {"path": "/img"})
    assert status == 404
    assert vmm.calls == []


def test_query_string_ignored(served):
    _vmm, _path, client, _server = served
    assert client.request("GET", "/api/v1/vmm.ping?x=1")[0] == 200


@pytest.mark.parametrize(
    "method, endpoint, allow",
    [
        ("PUT", "vm.info", "GET"),
        ("PUT", "vmm.ping", "GET"),
        ("GET", "vm.pause", "PUT"),
        ("GET", "vm.create", "PUT"),
        ("POST", "vm.boot", "PUT"),
        ("DELETE", "vm.delete", "PUT"),
        ("PATCH", "vm.info", "GET"),
    ],
)
def test_wrong_method_405(served, method, endpoint, allow):
    vmm, path, _client, _server = served
    status, headers, body = raw_exchange(
        path, f"{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n".encode()
    )
    assert status == 405
    assert headers["Allow"] == allow
    assert json.loads(body)[0] == "Method Not Allowed"
    assert vmm.calls == []


def test_malformed_request_gets_json_error(served):
    _vmm, path, _client, _server = served
    status, headers, body = raw_exchange(path, b"GARBAGE\r\n\r\n")
    assert status == 400
    assert isinstance(json.loads(body), list)


def _raw_answer(path: str, request: bytes) -> bytes:
    """Everything the server writes for `request` until it closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_conflicting_content_length_is_refused_and_nothing_runs(served):
    vmm, path, _client, _server = served
    answer = _raw_answer(
        path, b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\nhello"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 \r\n") and b"Connection: close" in head
    assert json.loads(body) == ["Bad Request", "conflicting Content-Length headers"]
    assert vmm.names() == []


@pytest.mark.parametrize("chunk_size", [b"-5", b"zz", b"1" * 40])
def test_bad_chunk_size_is_refused(served, chunk_size):
    vmm, path, _client, _server = served
    answer = _raw_answer(
        path,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n" + chunk_size + b"\r\nabc\r\n0\r\n\r\n",
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 \r\n"), answer
    assert json.loads(body)[0] == "Bad Request" and "chunk" in json.loads(body)[1]
    assert vmm.names() == []


def test_oversized_head_is_refused(served):
    vmm, path, _client, _server = served
    answer = _raw_answer(path, b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nX: " + b"a" * 70000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 \r\n"), answer[:100]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])[0] == "Request Header Fields Too Large"
    assert vmm.names() == []


def test_unknown_transfer_coding_is_501(served):
    vmm, path, _client, _server = served
    answer = _raw_answer(path, b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501 \r\n") and json.loads(body)[0] == "Not Implemented", answer
    assert vmm.names() == []


@pytest.mark.parametrize(
    "body, message",
    [
        ("[" * 100000 + "]" * 100000, "request body nests deeper than 32 levels"),
        ('{"a":' * 50000 + "1" + "}" * 50000, "request body nests deeper than 32 levels"),
        ('{"memory": {"size": ' + "9" * 5000 + "}}", "request body is not valid JSON: Exceeds the limit"),
        ('{"memory": {"size": NaN}}', "request body is not valid JSON: NaN is not JSON"),
    ],
)
def test_hostile_json_is_400(served, body, message):
    vmm, path, client, _server = served
    status, answer = client.create(body)
    assert status == 400 and answer[0] == "Bad Request" and answer[1].startswith(message), answer
    assert vmm.names() == []
    assert client.ping()[0] == 200


def test_json_depth_check_ignores_brackets_in_strings():
    from vmmpy.api import json_depth_exceeds

    assert not json_depth_exceeds(b'{"a": "[[[[[[[[[[", "b": "\\"[[[["}', 3)
    assert json_depth_exceeds(b"[[[[", 3) and not json_depth_exceeds(b"[[[]]]", 3)


def test_socket_appears_only_when_listening_and_nothing_else_is_left(sockdir):
    path = os.path.join(sockdir, "staged.sock")
    server = ApiServer(RecordingVmm(), path).start()
    try:
        assert os.listdir(sockdir) == ["staged.sock"]  # bound under another name, renamed once listening
        assert ApiClient(path).ping()[0] == 200
    finally:
        server.close()
    assert os.listdir(sockdir) == []


def test_api_socket_is_owner_only_whatever_the_umask(sockdir):
    path = os.path.join(sockdir, "umask.sock")
    old = os.umask(0)
    try:
        server = ApiServer(RecordingVmm(), path).start()
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert ApiClient(path).ping()[0] == 200
    finally:
        server.close()


def test_connections_past_the_limit_get_503_and_the_server_keeps_answering(sockdir):
    from vmmpy.httpserver import Limits

    path = os.path.join(sockdir, "limits.sock")
    server = ApiServer(
        RecordingVmm(), path, limits=Limits(max_connections=4, max_refusing=2, evict_idle_s=60, refuse_wait_s=30)
    ).start()
    held = []
    try:
        for _ in range(4):  # the served connections, each kept alive after one answer
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(path)
            assert raw_exchange(path, ch_remote_request("GET", "vmm.ping"), sock=s)[0] == 200
            held.append(s)
        status, headers, body = raw_exchange(path, ch_remote_request("GET", "vmm.ping"))
        assert status == 503 and headers["Connection"] == "close"
        assert json.loads(body) == [
            "Service Unavailable",
            "the API server is serving its limit of 4 connections; retry later",
        ]
        # A served connection ends: the next client is served again.
        held.pop().close()
        deadline = time.monotonic() + 10
        while (status := raw_exchange(path, ch_remote_request("GET", "vmm.ping"))[0]) != 200:
            assert status == 503 and time.monotonic() < deadline
        # The kept-alive ones were served all along.
        assert all(raw_exchange(path, ch_remote_request("GET", "vmm.ping"), sock=s)[0] == 200 for s in held)
    finally:
        for s in held:
            s.close()
        server.close()


def test_idle_connection_makes_room_for_a_new_one(sockdir):
    from vmmpy.httpserver import Limits

    path = os.path.join(sockdir, "evict.sock")
    server = ApiServer(RecordingVmm(), path, limits=Limits(max_connections=2, evict_idle_s=0.2)).start()
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for s in idle:
            s.settimeout(10)
            s.connect(path)
        deadline = time.monotonic() + 10
        while raw_exchange(path, ch_remote_request("GET", "vmm.ping"))[0] != 200:
            assert time.monotonic() < deadline
        assert idle[0].recv(10) == b""  # the longest idle one was closed to make room
    finally:
        for s in idle:
            s.close()
        server.close()


def test_pipelined_requests_are_answered_in_order(served):
    vmm, path, _client, _server = served
    two = ch_remote_request("PUT", "vm.pause") + ch_remote_request("GET", "vmm.ping")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(two)
        out = b""
        while out.count(b"HTTP/1.1 ") < 2 or not out.endswith(b"}"):
            out += s.recv(65536)
    assert out.startswith(b"HTTP/1.1 204 \r\n") and b"HTTP/1.1 200 \r\n" in out
    assert vmm.names() == ["pause", "ping"]


# ------------------------------------------------------------------------------ wire format


def test_ch_remote_wire_format(served):
    vmm, path, _client, _server = served
    # 204: no body and no Content-Length, so ch-remote stops reading after the headers.
    status, headers, body = raw_exchange(path, ch_remote_request("PUT", "vm.boot"))
    assert (status, body) == (204, b"")
    assert "Content-Length" not in headers
    # 200 with a JSON body and an exact Content-Length.
    status, headers, body = raw_exchange(path, ch_remote_request("GET", "vmm.ping"))
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(body)
    assert json.loads(body)["version"] == "0.1.0"
    # create with a body, as `ch-remote create cfg.json` sends it.
    status, headers, body = raw_exchange(
        path, ch_remote_request("PUT", "vm.create", json.dumps({"cpus": {"boot_vcpus": 2, "max_vcpus": 2}}))
    )
    assert status == 204
    # An error: a JSON array of strings, like Cloud Hypervisor's.
    vmm.fail["pause"] = InvalidState("VM is not running")
    status, headers, body = raw_exchange(path, ch_remote_request("PUT", "vm.pause"))
    assert status == 405
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == ["vm.pause failed", "VM is not running"]
    assert vmm.names() == ["boot", "ping", "create", "pause"]


def test_keep_alive_connection_serves_several_requests(served):
    vmm, path, _client, _server = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        for _ in range(3):
            assert raw_exchange(path, ch_remote_request("PUT", "vm.pause"), sock=s)[0] == 204
        assert raw_exchange(path, ch_remote_request("GET", "vmm.ping"), sock=s)[0] == 200
        # a rejected body is still consumed, the connection stays in step
        assert raw_exchange(path, ch_remote_request("PUT", "vm.resume", "{}"), sock=s)[0] == 400
        assert raw_exchange(path, ch_remote_request("GET", "vm.nothing", "abc"), sock=s)[0] == 404
        assert raw_exchange(path, ch_remote_request("PUT", "vm.resume"), sock=s)[0] == 204
    assert vmm.names() == ["pause", "pause", "pause", "ping", "resume"]


def test_chunked_request_body(served):
    vmm, path, _client, _server = served
    doc = json.dumps({"cpus": {"boot_vcpus": 4, "max_vcpus": 4}}).encode()
    half = len(doc) // 2
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, doc[:half], len(doc) - half, doc[half:])
    req = (
        b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\n" + chunked
    )
    assert raw_exchange(path, req)[0] == 204
    assert vmm.config.vcpus == 4


curl = shutil.which("curl")


@pytest.mark.skipif(curl is None, reason="curl is not installed")
def test_curl_like_libvirt(served, sockdir):
    vmm, path, _client, _server = served

    def run(*args: str) -> tuple[int, str]:
        out = subprocess.run(
            [curl, "-sS", "--unix-socket", path, "-o", "-", "-w", "\n%{http_code}", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        body, _, code = out.stdout.rpartition("\n")
        return int(code), body

    # libvirt's PUTs without a body: CURLOPT_UPLOAD with a zero size.
    empty = os.path.join(sockdir, "empty")
    open(empty, "w").close()
    assert run("-T", empty, "http://localhost/api/v1/vm.boot") == (204, "")
    # vm.create with a body, and a big one that makes curl ask for "100 Continue".
    config = {"cpus": {"boot_vcpus": 2, "max_vcpus": 2}, "payload": {"cmdline": "x" * 3000}}
    code, body = run(
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "-H",
        "Expect: 100-continue",
        "-d",
        json.dumps(config),
        "http://localhost/api/v1/vm.create",
    )
    assert (code, body) == (204, "")
    code, body = run("http://localhost/api/v1/vm.info")
    assert code == 200 and json.loads(body)["config"]["cpus"]["boot_vcpus"] == 2
    vmm.fail["pause"] = VmNotCreated("VM is not created")
    code, body = run("-X", "PUT", "http://localhost/api/v1/vm.pause")
    assert code == 404 and json.loads(body) == ["vm.pause failed", "VM is not created"]


# ------------------------------------------------------------------------------ lifecycle


def test_close_unlinks_and_is_idempotent(sockdir):
    path = os.path.join(sockdir, "api.sock")
    server = ApiServer(RecordingVmm(), path).start()
    assert os.path.exists(path)
    server.close()
    assert not os.path.exists(path)
    server.close()
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        ApiClient(path).ping()


def test_stale_socket_is_replaced(sockdir):
    path = os.path.join(sockdir, "api.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    assert os.path.exists(path)
    with ApiServer(RecordingVmm(), path):
        assert ApiClient(path).ping()[0] == 200


def test_live_server_is_not_replaced(served):
    vmm, path, client, _server = served
    with pytest.raises(VmmError, match="in use by another server"):
        ApiServer(RecordingVmm(), path).start()
    assert client.ping()[0] == 200  # the first one still answers
    assert vmm.names() == ["ping"]


def test_non_socket_file_is_not_replaced(sockdir):
    path = os.path.join(sockdir, "precious.txt")
    Path(path).write_text("keep me")
    with pytest.raises(VmmError, match="not a socket"):
        ApiServer(RecordingVmm(), path).start()
    assert Path(path).read_text() == "keep me"


def test_missing_directory_is_an_error(sockdir):
    with pytest.raises(VmmError, match="api.sock"):
        ApiServer(RecordingVmm(), os.path.join(sockdir, "no", "api.sock")).start()


def test_needs_exactly_one_address():
    with pytest.raises(InvalidConfig):
        ApiServer(RecordingVmm())
    with pytest.raises(InvalidConfig):
        ApiServer(RecordingVmm(), "/tmp/x.sock", fd=3)


def test_listening_fd_like_libvirt(sockdir):
    path = os.path.join(sockdir, "passed.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    vmm = RecordingVmm()
    server = ApiServer(vmm, fd=listener.detach()).start()
    try:
        assert ApiClient(path).ping()[0] == 200
        assert ApiClient(path).boot()[0] == 204
    finally:
        server.close()
    assert vmm.names() == ["ping", "boot"]
    assert os.path.exists(path)  # whoever made the socket removes it (libvirt does)


def test_fd_that_is_not_a_unix_socket(sockdir):
    r, w = os.pipe()
    try:
        with pytest.raises(VmmError, match=f"fd={r}"):
            ApiServer(RecordingVmm(), fd=r).start()
    finally:
        os.close(r)
        os.close(w)


def test_close_lets_a_request_in_progress_finish(served):
    vmm, path, client, server = served
    gate = threading.Event()
    vmm.block["shutdown_vmm"] = gate
    answers = []
    t = threading.Thread(target=lambda: answers.append(client.shutdown_vmm()))
    t.start()
    deadline = time.monotonic() + 5
    while "shutdown_vmm" not in vmm.names():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server_closed = threading.Event()
    closer = threading.Thread(target=lambda: (server.close(), server_closed.set()))
    closer.start()
    time.sleep(0.3)
    assert not server_closed.is_set()  # close() waits for the answer to go out
    gate.set()
    t.join(5)
    closer.join(5)
    assert server_closed.is_set()
    assert answers == [(204, None)]
    assert not os.path.exists(path)


def test_close_drops_idle_keep_alive_connections(served):
    _vmm, path, _client, server = served
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.settimeout(10)
    idle.connect(path)
    assert raw_exchange(path, ch_remote_request("GET", "vmm.ping"), sock=idle)[0] == 200
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 3
    assert idle.recv(100) == b""  # the server hung up
    idle.close()


def test_concurrent_requests(served):
    vmm, _path, client, _server = served
    results = []

    def work():
        for _ in range(20):
            results.append(client.ping()[0])

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 160
    assert vmm.names().count("ping") == 160


# ------------------------------------------------------------------------------ OpenAPI file


def test_openapi_file_describes_exactly_the_served_endpoints():
    spec = Path(__file__).resolve().parents[1] / "openapi" / "vmmpy.yaml"
    text = spec.read_text()
    described: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  /([\w.-]+):\s*$", line)
        if m:
            current = m.group(1)
            continue
        m = re.match(r"^    (get|put|post|delete|patch):\s*$", line)
        if m and current:
            described[current] = m.group(1).upper()
        if re.match(r"^\S", line):
            current = None
    assert described == {name: ep.method for name, ep in ENDPOINTS.items()}


# ------------------------------------------------------------------------------ vmmpy-remote


def test_remote_ping_and_info(served, capsys):
    vmm, path, _client, _server = served
    assert remote.main(["--api-socket", path, "ping"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["pid"] == os.getpid()
    assert "\n  " in out  # pretty-printed
    vmm.config = VmConfig(vcpus=2)
    assert remote.main(["--api-socket", path, "info"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["cpus"]["boot_vcpus"] == 2


@pytest.mark.parametrize(
    "command, call",
    [
        ("boot", "boot"),
        ("pause", "pause"),
        ("resume", "resume"),
        ("reboot", "reboot"),
        ("shutdown", "shutdown"),
        ("delete", "delete"),
        ("power-button", "power_button"),
        ("shutdown-vmm", "shutdown_vmm"),
    ],
)
def test_remote_actions(served, capsys, command, call):
    vmm, path, _client, _server = served
    assert remote.main(["--api-socket", path, command]) == 0
    assert vmm.names() == [call]
    assert capsys.readouterr().out == ""


def test_remote_counters(served, capsys):
    vmm, path, _client, _server = served
    assert remote.main(["--api-socket", path, "counters"]) == 0
    assert json.loads(capsys.readouterr().out) == {}
    assert vmm.names() == ["counters"]


def test_remote_error_answer(served, capsys):
    vmm, path, _client, _server = served
    vmm.fail["pause"] = InvalidState("VM is not running")
    assert remote.main(["--api-socket", path, "pause"]) == 1
    err = capsys.readouterr().err
    assert err == "error: 405 vm.pause failed: VM is not running\n"


def test_remote_create_from_file_and_stdin(served, capsys, sockdir, monkeypatch):
    vmm, path, _client, _server = served
    cfg = os.path.join(sockdir, "vm.json")
    Path(cfg).write_text(json.dumps({"cpus": {"boot_vcpus": 2, "max_vcpus": 2}}))
    assert remote.main(["--api-socket", path, "create", cfg]) == 0
    assert vmm.config.vcpus == 2
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"memory": {"size": 128 * MIB}})))
    assert remote.main(["--api-socket", path, "create", "-"]) == 0
    assert vmm.config.memory_mib == 128
    Path(cfg).write_text(json.dumps({"fs": [{"tag": "t0", "socket": "/s"}]}))
    assert remote.main(["--api-socket", path, "create", cfg]) == 1
    assert capsys.readouterr().err == "error: 400 vm.create failed: unsupported VmConfig fields: fs\n"


def test_remote_no_server(sockdir, capsys):
    path = os.path.join(sockdir, "nobody.sock")
    assert remote.main(["--api-socket", path, "ping"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and path in err and "cannot reach" in err


def test_remote_bad_usage(sockdir, capsys):
    path = os.path.join(sockdir, "x.sock")
    for argv in (
        ["ping"],
        ["--api-socket", path],
        ["--api-socket", path, "frobnicate"],
        ["--api-socket", path, "create"],
    ):
        with pytest.raises(SystemExit) as e:
            remote.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("vmmpy-remote") and ": error: " in err, err
    with pytest.raises(SystemExit) as e:
        remote.main(["--api-socket", path, "create", os.path.join(sockdir, "missing.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "missing.json" in err and err.count("\n") == 1


def test_error_message():
    assert error_message(["a", "b"]) == "a: b"
    assert error_message("plain\ntext") == "plain text"
    assert error_message(None) == ""
    assert error_message({"k": 1}) == '{"k": 1}'
