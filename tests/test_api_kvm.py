"""The REST API and `vmmpy-remote` against a real `vmmpy` process on real KVM.

Every endpoint is driven twice, once with raw REST requests and once through the `vmmpy-remote`
command (a subprocess per call), and each step is checked against what the guest shows on its
serial console, the VMM's event monitor file and the process itself. The HTTP side alone (with a
stand-in VMM) is covered by test_api_unit.py; here the VMM behind the socket is the real one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import vmmpy
from vmmpy.client import UnixHTTPConnection, error_message

from helpers import SerialClient, guest_answers

# helpers.BANNER has no line end, so it can match a number cut by a short read ("mem_mib=1" of 128).
BANNER_LINE = re.compile(rb"vmmpy-testguest boot_id=([0-9a-f]{16}) cpus=(\d+) mem_mib=(\d+)\r\n")
OPENAPI = Path(__file__).resolve().parents[1] / "openapi" / "vmmpy.yaml"
MIB128 = 128 << 20

# endpoint -> (HTTP method, vmmpy-remote subcommand)
ENDPOINTS = {
    "vmm.ping": ("GET", "ping"),
    "vm.info": ("GET", "info"),
    "vm.create": ("PUT", "create"),
    "vm.boot": ("PUT", "boot"),
    "vm.pause": ("PUT", "pause"),
    "vm.resume": ("PUT", "resume"),
    "vm.reboot": ("PUT", "reboot"),
    "vm.shutdown": ("PUT", "shutdown"),
    "vm.delete": ("PUT", "delete"),
    "vm.power-button": ("PUT", "power-button"),
    "vmm.shutdown": ("PUT", "shutdown-vmm"),
}


def documented_statuses(path: str) -> set[int]:
    """The response codes openapi/vmmpy.yaml lists for `path` (e.g. "/vm.power-button")."""
    statuses: set[int] = set()
    inside = False
    for line in OPENAPI.read_text().splitlines():
        if re.match(r"^  /\S+:\s*$", line) or re.match(r"^\S", line):
            inside = line.strip() == f"{path}:"
            continue
        if inside:
            m = re.match(r'^\s+"(\d{3})":', line)
            if m:
                statuses.add(int(m.group(1)))
    assert statuses, f"{path} not found in {OPENAPI}"
    return statuses


@dataclass
class Answer:
    status: int
    body: Any  # decoded JSON on success (None for 204)
    message: str  # the error chain in one line ("" on success)


class Rest:
    """Raw REST requests with vmmpy's client."""

    name = "rest"

    def __init__(self, p):
        self.p = p

    def __call__(self, endpoint: str, body: Any = None) -> Answer:
        method, _ = ENDPOINTS[endpoint]
        status, answer = self.p.api.request(method, endpoint, body)
        if status >= 300:
            assert isinstance(answer, list) and answer and all(isinstance(s, str) for s in answer), answer
            assert answer[0] in (f"{endpoint} failed", "Bad Request"), answer
            return Answer(status, answer, error_message(answer))
        assert status == (200 if method == "GET" else 204), (endpoint, status, answer)
        return Answer(status, answer, "")


class Cli:
    """`python -m vmmpy.remote --api-socket PATH <command>`, one process per call."""

    name = "cli"

    def __init__(self, p):
        self.p = p

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "vmmpy.remote", "--api-socket", self.p.api_path, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def __call__(self, endpoint: str, body: Any = None) -> Answer:
        method, command = ENDPOINTS[endpoint]
        if endpoint == "vm.create":
            r = self.run(command, "-", stdin=body if isinstance(body, str) else json.dumps(body))
        else:
            r = self.run(command)
        if r.returncode == 0:
            assert r.stderr == "", r.stderr
            out = json.loads(r.stdout) if r.stdout.strip() else None
            if method == "PUT":
                assert out is None, r.stdout
            return Answer(200 if method == "GET" else 204, out, "")
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert r.stdout == ""
        lines = r.stderr.splitlines()
        assert len(lines) == 1, f"vmmpy-remote error is not one line: {r.stderr!r}"
        m = re.fullmatch(r"error: (\d{3}) (.+)", lines[0])
        assert m, lines[0]
        return Answer(int(m.group(1)), None, m.group(2))


def ready(serial: SerialClient, timeout: float = 30.0) -> tuple[str, int, int]:
    m = serial.expect(BANNER_LINE, timeout)
    serial.expect(rb"READY\r\n", timeout)
    return m.group(1).decode(), int(m.group(2)), int(m.group(3))


def assert_silent(serial: SerialClient, text: str, window: float = 0.5) -> None:
    """The guest does not answer `echo text` within `window` seconds."""
    serial.send(f"echo {text}")
    with pytest.raises(AssertionError, match="not seen"):
        serial.expect(text, timeout=window)


# ------------------------------------------------------------------------------------------
# The whole lifecycle, through REST and through vmmpy-remote
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", [Rest, Cli], ids=["rest", "cli"])
def test_every_endpoint_through_a_vm_lifecycle(vmm_process, tmp_path, driver):
    p = vmm_process(name=driver.name)  # --api-socket, --serial socket=..., --event-monitor; no VM yet
    call = driver(p)

    # vmm.ping
    r = call("vmm.ping")
    assert r.body["pid"] == p.proc.pid and r.body["version"] == vmmpy.__version__
    assert r.body["build_version"] and r.body["features"] == []

    # vm.info before vm.create
    r = call("vm.info")
    assert r.status == 404 and "vm.info failed" in r.message and "no VM" in r.message

    # vm.create, Cloud Hypervisor's shape. The VMM's own --serial wins over the body's.
    body_socket = str(tmp_path / "from-the-body.sock")
    config = {
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": MIB128},
        "serial": {"mode": "Socket", "socket": body_socket},
    }
    assert call("vm.create", config).status == 204
    r = call("vm.create", config)
    assert r.status == 500 and "already" in r.message  # CH's server: 500
    r = call("vm.info")
    assert r.body["state"] == "Created"
    assert r.body["config"]["cpus"] == {"boot_vcpus": 2, "max_vcpus": 2}
    assert r.body["config"]["memory"]["size"] == MIB128
    assert r.body["config"]["serial"] == {"mode": "Socket", "socket": body_socket}
    assert r.body["memory_actual_size"] == MIB128

    # vm.pause before boot
    r = call("vm.pause")
    assert r.status == 405 and "Created" in r.message

    # vm.boot → the guest's banner and READY on the VMM's own console socket
    assert call("vm.boot").status == 204
    boot_id, cpus, mem_mib = ready(p.serial)
    assert (cpus, mem_mib) == (2, 128)
    assert not os.path.exists(body_socket), "the body's serial socket was used, not the VMM's --serial"
    guest_answers(p.serial, "first boot")
    r = call("vm.boot")
    assert r.status == 500 and "Running" in r.message  # CH's server: 500

    # vm.info while running
    r = call("vm.info")
    assert r.body["state"] == "Running" and r.body["boot_count"] == 1
    assert r.body["config"]["cpus"] == {"boot_vcpus": 2, "max_vcpus": 2}
    assert r.body["config"]["memory"]["size"] == MIB128
    assert len(r.body["vcpu_states"]) == 2

    # vm.pause: the guest stops answering; input typed meanwhile is answered after vm.resume
    assert call("vm.pause").status == 204
    p.wait_event("vm.paused")
    assert call("vm.info").body["state"] == "Paused"
    assert_silent(p.serial, "typed while paused")
    r = call("vm.pause")
    assert r.status == 405 and "Paused" in r.message
    assert call("vm.resume").status == 204
    p.serial.expect(rb"typed while paused\r\n", timeout=10)
    p.wait_event("vm.resumed")
    assert call("vm.info").body["state"] == "Running"
    r = call("vm.resume")
    assert r.status == 405 and "Running" in r.message

    # vm.reboot: events, and a new guest (new boot id)
    assert call("vm.reboot").status == 204
    p.wait_event("vm.rebooting")
    p.wait_event("vm.rebooted")
    second_id, cpus, _ = ready(p.serial)
    assert second_id != boot_id and cpus == 2
    guest_answers(p.serial, "after reboot")
    assert call("vm.info").body["boot_count"] == 2

    # vm.shutdown, as CH: the VM instance is gone, its config kept (state Created), the VMM stays
    assert call("vm.shutdown").status == 204
    p.wait_event("vm.shutdown")
    r = call("vm.info")
    assert r.body["state"] == "Created" and "vcpu_states" not in r.body
    assert r.body["config"]["cpus"] == {"boot_vcpus": 2, "max_vcpus": 2}
    assert_silent(p.serial, "typed while shut down")
    for endpoint in ("vm.pause", "vm.resume", "vm.shutdown", "vm.reboot", "vm.power-button"):
        r = call(endpoint)
        assert r.status == 405 and "Created" in r.message, (endpoint, r)
    assert p.proc.poll() is None

    # vm.boot again, from the same config
    assert call("vm.boot").status == 204
    third_id, cpus, _ = ready(p.serial)
    assert third_id not in (boot_id, second_id) and cpus == 2
    guest_answers(p.serial, "booted again")
    assert call("vm.info").body["state"] == "Running"

    # vm.delete: the VM is gone (404), the guest is silent; deleting nothing is a no-op (as in CH)
    assert call("vm.delete").status == 204
    p.wait_event("vm.deleted")
    r = call("vm.info")
    assert r.status == 404 and "no VM" in r.message
    assert_silent(p.serial, "typed after delete")
    assert call("vm.delete").status == 204
    r = call("vm.boot")
    assert r.status == 404

    # vmm.shutdown: exit status 0, API socket removed, vmm.shutdown the last event
    assert call("vmm.shutdown").status == 204
    assert p.wait_exit(30) == 0
    assert not os.path.exists(p.api_path)
    names = p.event_names()
    assert names[0] == "vmm.starting" and names[-1] == "vmm.shutdown"
    assert names.count("vm.booted") == 2 and names.count("vm.rebooted") == 1
    assert names.count("vm.shutdown") == 2 and names.count("vm.deleted") == 1


# ------------------------------------------------------------------------------------------
# Error paths
# ------------------------------------------------------------------------------------------


def _raw(p, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, Any]:
    conn = UnixHTTPConnection(p.api_path, timeout=30)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(data) if data else None
    finally:
        conn.close()


def test_error_statuses_from_a_real_vmm(vmm_process):
    p = vmm_process()
    call = Rest(p)

    # Nothing created yet: 404 for the VM endpoints.
    for endpoint in ("vm.info", "vm.boot", "vm.pause", "vm.resume", "vm.reboot", "vm.shutdown"):
        r = call(endpoint)
        assert r.status == 404 and r.body == [f"{endpoint} failed", "no VM has been created"], r

    # Bad JSON → 400 with a message; empty body → 400.
    status, body = p.api.request("PUT", "vm.create", '{"cpus": {"boot_vcpus": 2')
    assert status == 400 and body[0] == "Bad Request" and "not valid JSON" in body[1]
    status, body = p.api.request("PUT", "vm.create")
    assert status == 400 and "needs a JSON request body" in body[1]

    # Unknown VmConfig fields → 400 naming every one.
    status, body = p.api.request(
        "PUT",
        "vm.create",
        {
            "memory": {"size": MIB128, "hugepages": True},
            "pmem": [{"file": "/p"}],
            "fs": [{"tag": "t0", "socket": "/s"}],
            "cpus": {"boot_vcpus": 1, "topology": {"threads_per_core": 1}},
        },
    )
    assert status == 400 and body[0] == "vm.create failed"
    for field in ("pmem", "fs", "memory.hugepages", "cpus.topology"):
        assert field in body[1], (field, body)
    # A bad value → 400 naming field and value.
    status, body = p.api.request("PUT", "vm.create", {"cpus": {"boot_vcpus": 99}})
    assert status == 400 and "cpus.boot_vcpus" in body[1] and "99" in body[1]

    # None of that created a VM.
    assert call("vm.info").status == 404

    # Unknown path → 404; wrong method → 405 with Allow.
    for path in ("/api/v1/vm.nothing", "/api/v1/", "/api/v2/vm.info", "/"):
        status, _, body = _raw(p, "GET", path)
        assert status == 404 and body[0] == "Not Found", (path, status, body)
    for method, path, allow in [
        ("POST", "/api/v1/vm.info", "GET"),
        ("GET", "/api/v1/vm.boot", "PUT"),
        ("DELETE", "/api/v1/vm.delete", "PUT"),
        ("PUT", "/api/v1/vmm.ping", "GET"),
    ]:
        status, headers, body = _raw(p, method, path)
        assert status == 405 and headers.get("allow") == allow and body[0] == "Method Not Allowed", (
            method,
            path,
            status,
            headers,
            body,
        )

    # A real VM: create twice → 500, boot twice → 500 (CH's server), pause when not running → 405
    # (CH's spec).
    assert call("vm.create", {"cpus": {"boot_vcpus": 1}, "memory": {"size": 64 << 20}}).status == 204
    r = call("vm.create", {"cpus": {"boot_vcpus": 1}, "memory": {"size": 64 << 20}})
    assert r.status == 500 and r.body == ["vm.create failed", "a VM has already been created"]
    for endpoint in ("vm.pause", "vm.resume", "vm.reboot", "vm.shutdown"):
        r = call(endpoint)
        assert r.status == 405 and "state Created" in r.body[1], r
    assert call("vm.boot").status == 204
    ready(p.serial)
    r = call("vm.boot")
    assert r.status == 500 and r.body == ["vm.boot failed", "cannot boot a VM in state Running"]
    guest_answers(p.serial, "still fine")  # none of the refused requests disturbed the guest

    # Statuses used above are all ones the OpenAPI document lists for their endpoint.
    assert {404, 405} <= documented_statuses("/vm.pause")
    assert {400, 500} <= documented_statuses("/vm.create")
    assert 500 in documented_statuses("/vm.boot")
    assert 404 in documented_statuses("/vm.info")


def test_remote_error_answers_are_one_line(vmm_process, tmp_path):
    p = vmm_process()
    cli = Cli(p)
    r = cli.run("info")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "error: 404 vm.info failed: no VM has been created\n"

    bad = tmp_path / "bad.json"
    bad.write_text('{"memory": ')
    r = cli.run("create", str(bad))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("error: 400 Bad Request: request body is not valid JSON")

    unknown = tmp_path / "unknown.json"
    unknown.write_text(
        json.dumps({"memory": {"size": MIB128}, "fs": [{"tag": "t0", "socket": "/s"}], "rng": {"src": "/x"}})
    )
    r = cli.run("create", str(unknown))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("error: 400 vm.create failed: unsupported VmConfig fields:")
    assert r.stderr.rstrip().endswith("fields: fs, rng")

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"cpus": {"boot_vcpus": 1}, "memory": {"size": 64 << 20}}))
    r = cli.run("create", str(good))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = cli.run("pause")
    assert (r.returncode, r.stderr) == (1, "error: 405 vm.pause failed: cannot pause a VM in state Created\n")
    r = cli.run("info")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "Created"


# ------------------------------------------------------------------------------------------
# The commands' own failures
# ------------------------------------------------------------------------------------------


def _vmmpy_commands() -> list[list[str]]:
    commands = [[sys.executable, "-m", "vmmpy.cli"]]
    script = Path(sys.executable).parent / "vmmpy"
    if script.exists():
        commands.append([str(script)])
    return commands


@pytest.mark.parametrize("command", _vmmpy_commands(), ids=lambda c: "script" if len(c) == 1 else "module")
def test_vmmpy_bad_memory_size_exits_2_with_one_line(tmp_path, command):
    api = tmp_path / "api.sock"
    r = subprocess.run(
        [*command, "--api-socket", str(api), "--memory", "size=abc"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmmpy: error: ") and "abc" in lines[0], r.stderr
    assert not api.exists(), "the API socket was created before the arguments were checked"


def test_vmmpy_remote_missing_socket_exits_1_with_one_line(tmp_path):
    missing = tmp_path / "nobody-listens.sock"
    for args in (["ping"], ["info"], ["shutdown-vmm"]):
        r = subprocess.run(
            [sys.executable, "-m", "vmmpy.remote", "--api-socket", str(missing), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 1 and r.stdout == ""
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and str(missing) in lines[0] and "vmmpy-remote: error:" in lines[0], r.stderr


def test_vmmpy_remote_after_vmm_shutdown_exits_1(vmm_process):
    p = vmm_process("--cpus", "boot=1", "--memory", "size=64M")
    ready(p.serial)
    cli = Cli(p)
    r = cli.run("shutdown-vmm")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert p.wait_exit(30) == 0
    assert not os.path.exists(p.api_path)
    r = cli.run("ping")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "cannot reach" in r.stderr
