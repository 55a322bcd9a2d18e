"""The `vmmpy` command line: bad arguments exit 2 with one line naming the value; good ones
build the right Vmm calls. No KVM needed: the flow tests put `FakeVmm` (a stand-in recording
calls, not a VMM) where `vmmpy.vmm` would be imported from, and `fake_boot_first` (recording the
VM the command would boot before its VMM) where `vmmpy.native_vm` would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmmpy import cli
from vmmpy.client import ApiClient
from vmmpy.config import DiskConfig, SerialConfig, VmConfig
from vmmpy.errors import InvalidConfig, KvmError

PYTHON_DIR = str(Path(cli.__file__).resolve().parents[1])


def run_main(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(
    "argv, value",
    [
        (["--memory", "size=12X"], "12X"),
        (["--memory", "size=1000"], "1000"),
        (["--memory", "size=32M"], "32M"),
        (["--memory", "size=512M,hugepages=on"], "hugepages"),
        (["--memory", "1G"], "1G"),
        (["--cpus", "boot=99"], "99"),
        (["--cpus", "boot=0"], "'0'"),
        (["--cpus", "boot=two"], "two"),
        (["--cpus", "boot=2,max=4"], "'4'"),
        (["--cpus", "boot=1,topology=1:1:1:1"], "topology"),
        (["--cpus", "boot=1", "--serial", "bogus"], "bogus"),
        (["--cpus", "boot=1", "--serial", "pty"], "pty"),
        (["--cpus", "boot=1", "--serial", "file="], "file="),
        (["--cpus", "boot=1", "--console", "tty"], "tty"),
        (["--cpus", "boot=1", "--event-monitor", "fd=x"], "fd='x'"),
        (["--cpus", "boot=1", "--event-monitor", "path=/nonexistent-dir/ev.json"], "/nonexistent-dir/ev.json"),
        (["--api-socket", "fd=abc"], "abc"),
        (["--api-socket", ""], "''"),
        (["--kernel", "/nonexistent/vmlinux"], "/nonexistent/vmlinux"),
        (["--initramfs", "/nonexistent/initrd"], "/nonexistent/initrd"),
        (["--frobnicate"], "--frobnicate"),
        (["--cpus"], "--cpus"),
        (["stray-argument"], "stray-argument"),
    ],
)
def test_bad_argument_exits_2_with_one_line(argv, value, capsys):
    rc, out, err = run_main(argv, capsys)
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("vmmpy: error: ")
    assert value in err


def test_nothing_to_do_exits_2(capsys):
    rc, _out, err = run_main([], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and "nothing to do" in err


def test_only_a_console_or_serial_is_nothing_to_do(capsys):
    rc, _out, err = run_main(["--serial", "tty", "--console", "off"], capsys)
    assert rc == 2 and "nothing to do" in err


def test_version(capsys):
    rc, out, _err = run_main(["--version"], capsys)
    assert rc == 0
    assert out.startswith("vmmpy ")


def test_version_as_cloud_hypervisor():
    # libvirt's CH driver insists on "cloud-hypervisor v<major>.<minor>.<micro>" first.
    line = cli.version_line("/usr/local/bin/cloud-hypervisor")
    assert re.match(r"^cloud-hypervisor v\d+\.\d+\.\d+ ", line), line
    assert cli.version_line("/usr/bin/vmmpy").startswith("vmmpy ")


def test_help(capsys):
    rc, out, _err = run_main(["--help"], capsys)
    assert rc == 0
    for flag in ("--api-socket", "--kernel", "--memory", "--cpus", "--serial", "--event-monitor", "--no-shutdown"):
        assert flag in out


def test_as_a_module_subprocess():
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "vmmpy.cli", "--cpus", "boot=99"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "99" in proc.stderr


def test_parse_api_socket():
    assert cli.parse_api_socket("/run/vmm.sock") == ("/run/vmm.sock", None)
    assert cli.parse_api_socket("path=/run/vmm.sock") == ("/run/vmm.sock", None)
    assert cli.parse_api_socket("fd=7") == (None, 7)
    for bad in ("fd=", "fd=x", "path=", ""):
        with pytest.raises(InvalidConfig):
            cli.parse_api_socket(bad)


# ------------------------------------------------------------------------------ the flow


class FakeBooted:
    """What fake_boot_first returns in place of a booted VM."""

    def __init__(self, config, serial):
        self.config, self.serial = config, serial
        self.discarded = False

    def discard(self):
        self.discarded = True


def fake_boot_first(config, serial):
    exc = FakeVmm.fail.get("boot")
    if exc is not None:
        raise exc
    booted = FakeBooted(config, serial)
    FakeVmm.booted.append(booted)
    return booted


class FakeVmm:
    """Stand-in for vmmpy.vmm.Vmm (no KVM): records what the CLI does with it."""

    instances: list["FakeVmm"] = []
    booted: list[FakeBooted] = []
    on_wait = None  # callable(fake) -> exit code, run inside wait()
    fail: dict = {}

    def __init__(
        self,
        *,
        serial=None,
        event_monitor=None,
        no_shutdown=False,
        test_hooks=None,
        disk_backings=None,
        net_backings=None,
        vsock_socket=None,
        booted=None,
    ):
        self.kwargs = {"serial": serial, "event_monitor": event_monitor, "no_shutdown": no_shutdown}
        if disk_backings:
            self.kwargs["disk_backings"] = disk_backings
        if net_backings:
            self.kwargs["net_backings"] = net_backings
        if vsock_socket:
            self.kwargs["vsock_socket"] = vsock_socket
        self.calls: list[tuple] = [("booted", booted.config)] if booted is not None else []
        self.events = event_monitor
        FakeVmm.instances.append(self)

    def _record(self, name, *args):
        self.calls.append((name, *args))
        exc = FakeVmm.fail.get(name)
        if exc is not None:
            raise exc

    def ping(self):
        self._record("ping")
        return {"version": "fake", "pid": os.getpid(), "build_version": "fake", "features": []}

    def create(self, config):
        self._record("create", config)

    def boot(self):
        self._record("boot")

    def request_exit(self):
        self._record("request_exit")

    def shutdown_vmm(self):
        self._record("shutdown_vmm")

    def wait(self, timeout=None):
        self._record("wait")
        return FakeVmm.on_wait(self) if FakeVmm.on_wait else 0


@pytest.fixture
def fake_vmm(monkeypatch):
    module = types.ModuleType("vmmpy.vmm")
    module.Vmm = FakeVmm
    monkeypatch.setitem(sys.modules, "vmmpy.vmm", module)
    native_vm = types.ModuleType("vmmpy.native_vm")
    native_vm.boot_first = fake_boot_first
    monkeypatch.setitem(sys.modules, "vmmpy.native_vm", native_vm)
    FakeVmm.instances = []
    FakeVmm.booted = []
    FakeVmm.on_wait = None
    FakeVmm.fail = {}
    yield FakeVmm


@pytest.fixture
def sockdir():
    path = tempfile.mkdtemp(prefix="vmmpy-cli-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_vm_from_flags_is_created_and_booted(fake_vmm, capsys):
    fake_vmm.on_wait = lambda vmm: 7
    rc, _out, err = run_main(
        [
            "--cpus",
            "boot=2",
            "--memory",
            "size=256M,shared=on",
            "--serial",
            "tty",
            "--cmdline",
            "quiet",
            "--no-shutdown",
        ],
        capsys,
    )
    assert rc == 7, err
    (vmm,) = fake_vmm.instances
    assert vmm.kwargs == {"serial": SerialConfig("Tty"), "event_monitor": None, "no_shutdown": True}
    # The VM boots before the VMM exists (on the command line's serial), which then adopts it.
    assert [c[0] for c in vmm.calls] == ["booted", "wait"]
    assert fake_vmm.booted[0].serial == SerialConfig("Tty")
    config = vmm.calls[0][1]
    assert config == VmConfig(memory_mib=256, vcpus=2, cmdline="quiet", memory_shared=True, serial=SerialConfig("Tty"))


def test_memory_alone_boots_the_test_guest_with_null_serial(fake_vmm, capsys):
    rc, _out, err = run_main(["--memory", "size=128M"], capsys)
    assert rc == 0, err
    (vmm,) = fake_vmm.instances
    assert vmm.kwargs["serial"] is None  # no --serial: the VM config's (Null) applies
    config = vmm.calls[0][1]
    assert config.kernel is None and config.serial == SerialConfig("Null") and config.memory_mib == 128


def test_kernel_flag(fake_vmm, capsys, tmp_path):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    rc, _out, err = run_main(["--kernel", str(kernel), "--console", "off"], capsys)
    assert rc == 0, err
    config = fake_vmm.instances[0].calls[0][1]
    assert config.kernel == str(kernel) and config.vcpus == 1


def test_api_socket_only_serves_and_boots_nothing(fake_vmm, capsys, sockdir):
    path = os.path.join(sockdir, "api.sock")
    seen = []

    def on_wait(vmm):
        # The API is up while the VMM runs: talk to it as a client would.
        seen.append(ApiClient(path, timeout=10).ping())
        return 0

    fake_vmm.on_wait = on_wait
    rc, _out, err = run_main(["--api-socket", f"path={path}"], capsys)
    assert rc == 0, err
    assert seen[0][0] == 200 and seen[0][1]["version"] == "fake"
    (vmm,) = fake_vmm.instances
    assert [c[0] for c in vmm.calls] == ["wait", "ping"]
    assert not os.path.exists(path)  # the server was closed on the way out


def test_event_monitor_is_passed_and_closed(fake_vmm, capsys, sockdir):
    events_path = os.path.join(sockdir, "events.json")

    def on_wait(vmm):
        vmm.events.emit("vmm", "shutdown")
        return 0

    fake_vmm.on_wait = on_wait
    rc, _out, err = run_main(["--cpus", "boot=1", "--event-monitor", f"path={events_path}"], capsys)
    assert rc == 0, err
    monitor = fake_vmm.instances[0].kwargs["event_monitor"]
    assert monitor is not None and monitor._fd is None  # closed by the CLI
    lines = Path(events_path).read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["shutdown"]


def test_sigterm_and_sigint_request_exit(fake_vmm, capsys):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    def on_wait(vmm):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 5  # request_exit() is called from a helper thread
        while [c[0] for c in vmm.calls].count("request_exit") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        return 0

    fake_vmm.on_wait = on_wait
    rc, _out, err = run_main(["--cpus", "boot=1"], capsys)
    assert rc == 0, err
    names = [c[0] for c in fake_vmm.instances[0].calls]
    assert names.count("request_exit") == 2
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # restored


def test_boot_failure_exits_1_before_any_vmm(fake_vmm, capsys, sockdir):
    fake_vmm.fail = {"boot": KvmError("KVM_CREATE_VM failed", errno=12)}
    events = os.path.join(sockdir, "events.json")
    rc, _out, err = run_main(["--cpus", "boot=1", "--event-monitor", f"path={events}"], capsys)
    assert rc == 1
    assert err.count("\n") == 1 and "KVM_CREATE_VM failed" in err
    assert fake_vmm.instances == [] and fake_vmm.booted == []
    assert Path(events).read_text() == ""  # opened (checked) before the boot, nothing written


@pytest.mark.parametrize("vm", [[], ["--memory", "size=128M"]])
def test_api_socket_in_use_exits_1_before_anything_starts(fake_vmm, capsys, sockdir, vm):
    from vmmpy.api import ApiServer

    path = os.path.join(sockdir, "api.sock")
    with ApiServer(FakeVmm(), path):
        fake_vmm.instances.clear()
        rc, _out, err = run_main(["--api-socket", path, *vm], capsys)
        assert os.path.exists(path)  # the live server's socket is left alone
    assert rc == 1
    assert err.count("\n") == 1 and "in use" in err
    # Bound before the boot: no guest ran on a command line that cannot be served.
    assert fake_vmm.instances == [] and fake_vmm.booted == []


def test_what_the_command_held_is_released_when_its_vmm_cannot_start(fake_vmm, monkeypatch, capsys, sockdir):
    from vmmpy.errors import VmmError

    def refuse(**kwargs):
        raise VmmError("no control loop")

    monkeypatch.setattr(sys.modules["vmmpy.vmm"], "Vmm", refuse)
    api = os.path.join(sockdir, "api.sock")
    events = os.path.join(sockdir, "events.json")
    rc, _out, err = run_main(["--cpus", "boot=1", "--api-socket", api, "--event-monitor", f"path={events}"], capsys)
    assert rc == 1 and "no control loop" in err
    assert [b.discarded for b in fake_vmm.booted] == [True]
    assert not os.path.exists(api)  # the listening socket was closed and its path removed


def test_disk_flags_become_the_vms_disks(fake_vmm, capsys, tmp_path):
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(bytes(4096))
    b.write_bytes(bytes(4096))
    rc, _out, err = run_main(
        ["--memory", "size=128M", "--disk", f"path={a}", "--disk", f"path={b},readonly=on,id=data,direct=on"], capsys
    )
    assert rc == 0, err
    config = fake_vmm.instances[0].calls[0][1]
    assert config.disks == [
        DiskConfig(path=str(a), id="disk0"),
        DiskConfig(path=str(b), readonly=True, id="data", direct=True),
    ]
    assert "disk_backings" not in fake_vmm.instances[0].kwargs


@pytest.mark.parametrize(
    "disk, message",
    [
        ("path=/nonexistent/x.raw", "disks[0].path='/nonexistent/x.raw': no such file"),
        ("path=/dev/null", "not a regular file"),
        ("readonly=on", "expected path=<file>"),
        ("path=/x,cache=on", "unsupported option 'cache'"),
        ("path=/x,readonly=maybe", "expected on or off"),
    ],
)
def test_bad_disk_is_a_usage_error_before_any_vmm(fake_vmm, capsys, disk, message):
    rc, _out, err = run_main(["--memory", "size=128M", "--disk", disk], capsys)
    assert rc == 2 and message in err, err
    assert fake_vmm.instances == []  # nothing was built, no vCPU ran


def test_disk_flags_without_a_vm_are_this_hosts_backings(fake_vmm, capsys, sockdir, tmp_path):
    image = tmp_path / "shared.raw"
    image.write_bytes(bytes(4096))
    fake_vmm.on_wait = lambda vmm: 0
    rc, _out, err = run_main(
        [
            "--api-socket",
            f"path={os.path.join(sockdir, 'api.sock')}",
            "--disk",
            f"path={image},id=root",
            "--disk",
            "path=/elsewhere.raw",
        ],
        capsys,
    )
    assert rc == 0, err
    assert fake_vmm.instances[0].kwargs["disk_backings"] == {"root": str(image), "disk1": "/elsewhere.raw"}


def test_net_flags_without_a_vm_are_this_hosts_taps_and_take_nothing_else(fake_vmm, capsys, sockdir):
    fake_vmm.on_wait = lambda vmm: 0
    api = f"path={os.path.join(sockdir, 'api.sock')}"
    rc, _out, err = run_main(["--api-socket", api, "--net", "tap=tap7,id=eth0", "--net", "tap=tap8"], capsys)
    assert rc == 0, err
    assert fake_vmm.instances[0].kwargs["net_backings"] == {"eth0": "tap7", "net1": "tap8"}
    # What a destination cannot use is refused by name, not ignored: the MAC comes with the VM.
    for net, message in (
        ("tap=t,mac=52:54:00:00:00:07", "--net mac=52:54:00:00:00:07: not for a VM this VMM restores or receives"),
        ("tap=t,ip=10.0.0.1", "--net ip=10.0.0.1: not for a VM"),
        ("tap=t,mask=255.0.0.0", "--net mask=255.0.0.0: not for a VM"),
        ("fd=3", "a destination's tap is named"),
        ("id=eth0", "a destination's tap is named"),
        ("tap=t,queue_size=64", "unsupported option 'queue_size'"),
    ):
        rc, _out, err = run_main(["--api-socket", api, "--net", net], capsys)
        assert rc == 2 and message in err, (net, err)
    assert len(fake_vmm.instances) == 1


def test_vsock_flag_becomes_the_vms_vsock_or_without_a_vm_this_hosts_socket(fake_vmm, capsys, sockdir):
    from vmmpy.config import VsockConfig

    path = os.path.join(sockdir, "v.sock")
    rc, _out, err = run_main(["--memory", "size=128M", "--vsock", f"cid=5,socket={path}"], capsys)
    assert rc == 0, err
    assert fake_vmm.instances[0].calls[0][1].vsock == VsockConfig(cid=5, socket=path, id="_vsock0")
    fake_vmm.on_wait = lambda vmm: 0
    api = f"path={os.path.join(sockdir, 'api.sock')}"
    rc, _out, err = run_main(["--api-socket", api, "--vsock", f"socket={path}"], capsys)
    assert rc == 0, err
    assert fake_vmm.instances[1].kwargs["vsock_socket"] == path
    rc, _out, err = run_main(["--api-socket", api, "--vsock", f"cid=5,socket={path}"], capsys)
    assert rc == 2 and "keeps its own CID" in err, err


# ------------------------------------------------------------------------------ the plain reader

PLAIN_ITEMS = [
    "--memory", "size=1G", "--memory=size=2G", "--cpus", "boot=2", "--kernel", "/k", "--kernel=", "-v",
    "--verbose", "--no-shutdown", "--disk", "path=/a", "--disk=path=/b", "--boot-protocol", "pvh",
    "--boot-protocol=linux64", "--boot-protocol", "elf", "--cmdline", "-quiet", "--cmdline=-quiet",
    "--mem", "size=1G", "--help", "-h", "--version", "--", "stray", "", "-vv", "--no-shutdown=on",
    "--serial", "tty", "--net", "tap=t0",
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PLAIN_ITEMS), max_size=8))
def test_the_plain_reader_reads_what_argparse_reads(argv):
    """Where the command line is plain the reader's arguments are argparse's; anything else goes
    to argparse (help, version, abbreviations, errors)."""
    plain = cli.read_plain_arguments(argv)
    if plain is None:
        return
    assert vars(plain) == vars(cli.build_parser().parse_args(argv))


def test_the_plain_reader_leaves_the_rest_to_argparse():
    for argv in (["--help"], ["--version"], ["--mem", "size=1G"], ["--cpus"], ["--kernel", "-x"], ["-vv"], ["x"]):
        assert cli.read_plain_arguments(argv) is None, argv
    plain = cli.read_plain_arguments(["--memory=size=1G", "-v", "--verbose", "--disk", "path=/a", "--disk=path=/b"])
    assert (plain.memory, plain.verbose, plain.disk, plain.no_shutdown) == ("size=1G", 2, ["path=/a", "path=/b"], False)


def test_the_boot_path_loads_nothing_heavy():
    """Up to the guest's boot the command loads only what booting needs: none of these (each
    imports `re` or more; together ~45 ms of every start here, README "Where these numbers come
    from")."""
    heavy = ("re", "json", "logging", "dataclasses", "threading", "argparse", "socket", "selectors", "enum")
    code = (
        "import sys\n"
        "from vmmpy import cli, native_vm\n"
        "cli.Plan(cli.parse_arguments(sys.argv[1:]))\n"
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules))\n"
    )
    argv = ["--memory", "size=512M,shared=off", "--cpus", "boot=2", "--serial", "file=/tmp/x", "--cmdline", "quiet"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60, cwd=tempfile.gettempdir()
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
