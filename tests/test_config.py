"""VmConfig / SerialConfig validation, Cloud Hypervisor VmConfig bodies and CLI flag parsing.

No KVM needed.
"""

from __future__ import annotations

import copy
import os

import pytest

from vmmpy.config import (
    DEFAULT_CMDLINE,
    MIB,
    DiskConfig,
    SerialConfig,
    VmConfig,
    host_memory_mib,
    parse_console,
    parse_cpus,
    parse_memory,
    parse_serial,
    from_peer,
)
from vmmpy.errors import InvalidConfig, VmmError


@pytest.fixture
def kernel_file(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF" + bytes(60))
    return str(path)


# ------------------------------------------------------------------------------ dataclasses


def test_defaults():
    c = VmConfig()
    assert (c.memory_mib, c.vcpus, c.kernel, c.initramfs, c.cmdline) == (512, 1, None, None, None)
    assert c.memory_shared is True  # vmmpy's default (Cloud Hypervisor's is false), docs/cloud-hypervisor-compat.md
    assert c.serial == SerialConfig(mode="Null")
    assert c.effective_cmdline == DEFAULT_CMDLINE == "console=ttyS0"
    assert c.memory_bytes == 512 * MIB
    assert isinstance(InvalidConfig("x"), VmmError)


def test_default_serial_is_not_shared_between_configs():
    a, b = VmConfig(), VmConfig()
    assert a.serial is not b.serial


@pytest.mark.parametrize("vcpus", [0, 9, -1, "2", 2.0, True, None])
def test_bad_vcpus_named(vcpus):
    with pytest.raises(InvalidConfig) as e:
        VmConfig(vcpus=vcpus)
    assert f"vcpus={vcpus!r}" in str(e.value)


@pytest.mark.parametrize("vcpus", [1, 4, 8])
def test_good_vcpus(vcpus):
    assert VmConfig(vcpus=vcpus).vcpus == vcpus


def test_memory_bounds():
    assert VmConfig(memory_mib=64).memory_mib == 64
    with pytest.raises(InvalidConfig, match=r"memory_mib=63: must be at least 64 MiB"):
        VmConfig(memory_mib=63)
    too_big = host_memory_mib() + 1
    with pytest.raises(InvalidConfig, match=rf"memory_mib={too_big}: more than this host's memory"):
        VmConfig(memory_mib=too_big)
    with pytest.raises(InvalidConfig, match=r"memory_mib='512'"):
        VmConfig(memory_mib="512")


def test_every_bad_field_is_named_at_once():
    with pytest.raises(InvalidConfig) as e:
        VmConfig(vcpus=0, memory_mib=1, memory_shared="yes")
    msg = str(e.value)
    assert "vcpus=0" in msg and "memory_mib=1" in msg and "memory_shared='yes'" in msg


def test_kernel_and_initramfs_must_be_files(tmp_path, kernel_file):
    assert VmConfig(kernel=kernel_file, initramfs=kernel_file).kernel == kernel_file
    missing = str(tmp_path / "nope")
    with pytest.raises(InvalidConfig, match=rf"kernel='{missing}': no such file"):
        VmConfig(kernel=missing)
    with pytest.raises(InvalidConfig, match=rf"initramfs='{tmp_path}': not a regular file"):
        VmConfig(initramfs=str(tmp_path))
    with pytest.raises(InvalidConfig, match="kernel=''"):
        VmConfig(kernel="")


def test_cmdline_checked():
    assert VmConfig(cmdline="").effective_cmdline == ""
    assert VmConfig(cmdline="quiet").effective_cmdline == "quiet"
    with pytest.raises(InvalidConfig, match="cmdline="):
        VmConfig(cmdline="a\0b")
    with pytest.raises(InvalidConfig, match="cmdline=5"):
        VmConfig(cmdline=5)


def test_boot_protocol_checked_and_carried_by_the_api_shape():
    assert VmConfig().boot_protocol is None
    assert "boot_protocol" not in VmConfig().to_api()["payload"]  # CH's shape when unset
    c = VmConfig(boot_protocol="linux64")
    assert c.to_api()["payload"]["boot_protocol"] == "linux64"
    assert VmConfig.from_api(c.to_api()).boot_protocol == "linux64"
    with pytest.raises(InvalidConfig, match="payload.boot_protocol='bios': must be one of pvh, linux64"):
        VmConfig.from_api({"payload": {"boot_protocol": "bios"}})
    with pytest.raises(InvalidConfig, match="boot_protocol='x'"):
        VmConfig(boot_protocol="x")


def test_validate_after_mutation():
    c = VmConfig()
    c.vcpus = 99
    with pytest.raises(InvalidConfig, match="vcpus=99"):
        c.validate()


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"mode": "Pty"}, "serial.mode='Pty'"),
        ({"mode": "Bogus"}, "serial.mode='Bogus'"),
        ({"mode": "File"}, "serial.file=None: mode File needs a file path"),
        ({"mode": "Socket"}, "serial.socket=None: mode Socket needs a socket path"),
        ({"mode": "Null", "file": "/tmp/x"}, "serial.file='/tmp/x': only valid with mode File"),
        ({"mode": "Tty", "socket": "/tmp/s"}, "serial.socket='/tmp/s': only valid with mode Socket"),
        ({"mode": "File", "file": ""}, "serial.file=''"),
    ],
)
def test_bad_serial_named(kwargs, fragment):
    with pytest.raises(InvalidConfig) as e:
        SerialConfig(**kwargs)
    assert fragment in str(e.value)


def test_serial_modes_and_case():
    for mode in ("Off", "Null", "Tty"):
        assert SerialConfig(mode=mode).mode == mode
    assert SerialConfig(mode="tty").mode == "Tty"
    assert SerialConfig(mode="FILE", file="/tmp/out").mode == "File"
    assert SerialConfig(mode="Socket", socket="/tmp/s").socket == "/tmp/s"


# ------------------------------------------------------------------------------ CH bodies


def test_from_api_empty_body_is_defaults():
    assert VmConfig.from_api({}) == VmConfig()


def test_from_api_full(kernel_file):
    body = {
        "payload": {"kernel": kernel_file, "initramfs": kernel_file, "cmdline": "console=ttyS0 quiet"},
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 256 * MIB, "shared": True},
        "serial": {"mode": "File", "file": "/tmp/serial.log"},
        "console": {"mode": "Off"},
    }
    c = VmConfig.from_api(body)
    assert c == VmConfig(
        memory_mib=256,
        vcpus=2,
        kernel=kernel_file,
        initramfs=kernel_file,
        cmdline="console=ttyS0 quiet",
        memory_shared=True,
        serial=SerialConfig("File", file="/tmp/serial.log"),
    )


def test_from_api_libvirt_style_body(kernel_file):
    # What libvirt's CH driver sends for a domain with a kernel and no devices.
    body = {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 1073741824},
        "payload": {"kernel": kernel_file, "cmdline": "console=ttyS0"},
        "serial": {"mode": "Socket", "socket": "/run/serial.sock"},
    }
    c = VmConfig.from_api(body)
    assert (c.vcpus, c.memory_mib, c.serial.mode, c.serial.socket) == (
        1,
        1024,
        "Socket",
        "/run/serial.sock",
    )


def test_from_api_names_every_unsupported_field():
    body = {
        "payload": {"firmware": "/fw", "kernel": None},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "topology": {"packages": 1}, "kvm_hyperv": True},
        "memory": {"size": 512 * MIB, "hugepages": True, "zones": [{"id": "z", "size": 1}]},
        "disks": [{"path": "/img", "vhost_user": True}],
        "net": [{"tap": "tap0", "vhost_user": True}],
        "vsock": {"cid": 3, "socket": "/v", "iommu": True},
        "landlock_enable": True,
        "frobnicate": 1,
    }
    with pytest.raises(InvalidConfig) as e:
        VmConfig.from_api(body)
    assert str(e.value) == (
        "unsupported VmConfig fields: cpus.kvm_hyperv, cpus.topology, disks[0].vhost_user, frobnicate, "
        "landlock_enable, memory.hugepages, memory.zones, net[0].vhost_user, payload.firmware, vsock.iommu"
    )


def test_from_api_unsupported_example_from_brief():
    with pytest.raises(InvalidConfig, match=r"^unsupported VmConfig fields: fs, memory\.hugepages$"):
        VmConfig.from_api({"fs": [{"tag": "t0", "socket": "/s"}], "memory": {"size": 512 * MIB, "hugepages": True}})


def test_from_api_accepts_ch_defaults_nulls_and_empty_lists():
    # Shaped like the `config` Cloud Hypervisor prints in vm.info (defaults spelled out).
    body = {
        "cpus": {
            "boot_vcpus": 2,
            "max_vcpus": 2,
            "topology": None,
            "kvm_hyperv": False,
            "max_phys_bits": 46,
            "affinity": None,
            "features": {},
            "nested": True,
            "core_scheduling": "Vm",
            "profile": "Host",
        },
        "memory": {
            "size": 536870912,
            "mergeable": False,
            "hotplug_method": "Acpi",
            "hotplug_size": None,
            "hotplugged_size": None,
            "shared": False,
            "hugepages": False,
            "hugepage_size": None,
            "prefault": False,
            "reserve": False,
            "zones": None,
            "thp": True,
        },
        "payload": {"kernel": None, "cmdline": "console=ttyS0", "firmware": None, "initramfs": None},
        "rate_limit_groups": None,
        "disks": None,
        "net": [],
        "rng": {"src": "/dev/urandom", "iommu": False, "pci_segment": 0, "id": None},
        "balloon": None,
        "fs": None,
        "pmem": None,
        "serial": {"file": None, "mode": "Null", "socket": None, "iommu": False},
        "console": {"file": None, "mode": "Off", "iommu": False, "socket": None, "pci_segment": 0},
        "debug_console": {"file": None, "mode": "Off", "iobase": 233},
        "devices": None,
        "user_devices": None,
        "vdpa": None,
        "vsock": None,
        "pvpanic": False,
        "iommu": False,
        "numa": None,
        "watchdog": False,
        "pci_segments": None,
        "platform": None,
        "tpm": None,
        "landlock_enable": False,
        "landlock_rules": None,
    }
    c = VmConfig.from_api(body)
    assert (c.vcpus, c.memory_mib, c.cmdline) == (2, 512, "console=ttyS0")
    # The same defaults with a non-default value are refused, by name.
    for mutate, name in [
        (lambda b: b["cpus"].update(max_phys_bits=40), "cpus.max_phys_bits"),
        (lambda b: b["cpus"].update(features={"amx": True}), "cpus.features"),
        (lambda b: b["memory"].update(thp=False), "memory.thp"),
        (lambda b: b.update(rng={"src": "/dev/random"}), "rng"),
        (lambda b: b.update(iommu=True), "iommu"),
        (lambda b: b["debug_console"].update(mode="Tty"), "debug_console"),
        (lambda b: b["console"].update(iommu=True), "console.iommu"),
        (lambda b: b["serial"].update(iommu=True), "serial.iommu"),
        (lambda b: b["memory"].update(mergeable=0), "memory.mergeable"),  # 0 is not false
    ]:
        changed = copy.deepcopy(body)
        mutate(changed)
        with pytest.raises(InvalidConfig, match=rf"unsupported VmConfig fields: .*\b{name}\b"):
            VmConfig.from_api(changed)


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"memory": {"size": 512 * MIB + 1}}, f"memory.size={512 * MIB + 1}: must be a multiple of 1 MiB"),
        ({"memory": {"size": 32 * MIB}}, f"memory.size={32 * MIB}: must be at least 64 MiB"),
        ({"memory": {"size": "1G"}}, "memory.size='1G'"),
        ({"memory": {"size": 0}}, "memory.size=0"),
        ({"memory": {"size": 512 * MIB, "shared": "on"}}, "memory.shared='on'"),
        ({"cpus": {"boot_vcpus": 2, "max_vcpus": 4}}, "cpus.max_vcpus=4: vCPU hotplug is not supported"),
        ({"cpus": {"boot_vcpus": 9, "max_vcpus": 9}}, "cpus.boot_vcpus=9: must be an integer from 1 to 8"),
        ({"cpus": {"boot_vcpus": 0, "max_vcpus": 0}}, "cpus.boot_vcpus=0"),
        ({"cpus": {"boot_vcpus": True, "max_vcpus": 1}}, "cpus.boot_vcpus=True"),
        ({"cpus": 2}, "cpus=2: must be an object"),
        ({"payload": {"kernel": 5}}, "payload.kernel=5: must be a string"),
        ({"payload": {"kernel": "/nonexistent/vmlinux"}}, "payload.kernel='/nonexistent/vmlinux': no such file"),
        ({"payload": {"initramfs": "/nonexistent/initrd"}}, "payload.initramfs='/nonexistent/initrd'"),
        ({"payload": {"cmdline": ["a"]}}, "payload.cmdline=['a']"),
        ({"serial": {"mode": "Pty"}}, "serial.mode='Pty': not supported by vmmpy"),
        ({"serial": {"mode": "off"}}, "serial.mode='off': unknown mode"),
        ({"serial": {"file": "/tmp/x"}}, "serial.mode=None: required"),
        ({"serial": {"mode": "File"}}, "serial.file=None: mode File needs a file path"),
        ({"serial": {"mode": "Socket"}}, "serial.socket=None: mode Socket needs a socket path"),
        ({"console": {"mode": "Tty"}}, "console.mode='Tty': vmmpy has no virtio console"),
        ({"console": {"mode": "Pty"}}, "console.mode='Pty'"),
    ],
)
def test_from_api_bad_values_named(body, fragment):
    with pytest.raises(InvalidConfig) as e:
        VmConfig.from_api(body)
    assert fragment in str(e.value)


def test_from_api_reports_unsupported_and_bad_values_together():
    with pytest.raises(InvalidConfig) as e:
        VmConfig.from_api({"fs": [{}], "cpus": {"boot_vcpus": 2, "max_vcpus": 3}})
    msg = str(e.value)
    assert msg.startswith("unsupported VmConfig fields: fs; ")
    assert "cpus.max_vcpus=3" in msg


@pytest.mark.parametrize("body", [None, [], "x", 5])
def test_from_api_body_must_be_object(body):
    with pytest.raises(InvalidConfig, match="must be a JSON object"):
        VmConfig.from_api(body)


def test_from_api_console_off_and_null_accepted():
    assert VmConfig.from_api({"console": {"mode": "Off"}}) == VmConfig()
    assert VmConfig.from_api({"console": {"mode": "Null"}}) == VmConfig()


def test_from_api_boot_vcpus_defaults():
    assert VmConfig.from_api({"cpus": {"max_vcpus": 3}}).vcpus == 3
    assert VmConfig.from_api({"cpus": {}}).vcpus == 1


def test_to_api_shape_and_round_trip(kernel_file):
    c = VmConfig(
        memory_mib=128,
        vcpus=3,
        kernel=kernel_file,
        cmdline="quiet",
        memory_shared=True,
        serial=SerialConfig("Socket", socket="/tmp/s.sock"),
    )
    api = c.to_api()
    assert api == {
        "cpus": {"boot_vcpus": 3, "max_vcpus": 3},
        "memory": {"size": 128 * MIB, "shared": True},
        "payload": {"kernel": kernel_file, "cmdline": "quiet"},
        "serial": {"mode": "Socket", "socket": "/tmp/s.sock"},
        "console": {"mode": "Off"},
    }
    assert VmConfig.from_api(api) == c
    # The test guest: no kernel key, the default command line is reported.
    default = VmConfig().to_api()
    assert "kernel" not in default["payload"]
    assert default["payload"]["cmdline"] == "console=ttyS0"
    assert VmConfig.from_api(default).to_api() == default


# ------------------------------------------------------------------------------ CLI flags


def test_parse_memory():
    assert parse_memory("size=512M") == {"memory_mib": 512}
    assert parse_memory("size=1G,shared=on") == {"memory_mib": 1024, "memory_shared": True}
    assert parse_memory("shared=off") == {"memory_shared": False}
    assert VmConfig(**parse_memory("size=256M,shared=true")).memory_mib == 256


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("size=1000", "--memory size='1000': must be a multiple of 1 MiB"),
        ("size=32M", "--memory size='32M': must be at least 64 MiB"),
        ("size=abc", "size='abc'"),
        ("size=512M,hugepages=on", "unsupported option 'hugepages'"),
        ("512M", "'512M'"),
        ("size=512M,shared=maybe", "shared='maybe'"),
        ("size=512M,size=1G", "option 'size' given twice"),
        ("", "empty value"),
        ("size=512M,", "empty option"),
    ],
)
def test_parse_memory_bad(text, fragment):
    with pytest.raises(InvalidConfig) as e:
        parse_memory(text)
    assert fragment in str(e.value)


def test_parse_memory_over_host():
    text = f"size={host_memory_mib() + 1024}M"
    with pytest.raises(InvalidConfig, match="more than this host's memory"):
        parse_memory(text)


def test_parse_cpus():
    assert parse_cpus("boot=2") == {"vcpus": 2}
    assert parse_cpus("boot=8,max=8") == {"vcpus": 8}
    assert parse_cpus("max=3") == {"vcpus": 3}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("boot=0", "--cpus boot='0': must be an integer from 1 to 8"),
        ("boot=9", "boot='9'"),
        ("boot=two", "boot='two'"),
        ("boot=2,max=4", "--cpus max='4': vCPU hotplug is not supported"),
        ("boot=2,topology=1:1:1:2", "unsupported option 'topology'"),
        ("2", "'2'"),
    ],
)
def test_parse_cpus_bad(text, fragment):
    with pytest.raises(InvalidConfig) as e:
        parse_cpus(text)
    assert fragment in str(e.value)


def test_parse_serial():
    assert parse_serial("off") == SerialConfig("Off")
    assert parse_serial("null") == SerialConfig("Null")
    assert parse_serial("tty") == SerialConfig("Tty")
    assert parse_serial("TTY") == SerialConfig("Tty")
    assert parse_serial("file=/tmp/serial.log") == SerialConfig("File", file="/tmp/serial.log")
    assert parse_serial("socket=/tmp/serial.sock") == SerialConfig("Socket", socket="/tmp/serial.sock")
    assert parse_serial('file="/tmp/a,b.log"') == SerialConfig("File", file="/tmp/a,b.log")


@pytest.mark.parametrize("text", ["pty", "bogus", "file=", "socket=", "tty,file=/x", "path=/x", ""])
def test_parse_serial_bad(text):
    with pytest.raises(InvalidConfig) as e:
        parse_serial(text)
    assert repr(text) in str(e.value)


def test_parse_console():
    assert parse_console("off") == "Off"
    assert parse_console("null") == "Null"
    for bad in ("tty", "pty", "file=/x", ""):
        with pytest.raises(InvalidConfig, match="no virtio console"):
            parse_console(bad)


def test_host_memory_is_positive():
    assert host_memory_mib() > 0
    assert os.sysconf("SC_PHYS_PAGES") > 0


# --------------------------------------------------------------------------------------------
# Cloud Hypervisor's other request bodies (send/receive-migration, snapshot, restore)
# --------------------------------------------------------------------------------------------

# As ch-remote 54 sends them (recorded), defaults spelled out.
CH_SEND = {
    "destination_url": "tcp:127.0.0.1:6000",
    "local": False,
    "preserve_source": False,
    "downtime_ms": 300,
    "timeout_s": 3600,
    "timeout_strategy": "Cancel",
    "connections": 1,
    "tls_dir": None,
    "memory_mode": "Precopy",
}
CH_RECEIVE = {
    "receiver_url": "unix:/tmp/m.sock",
    "tls_dir": None,
    "memory_mode": "Precopy",
    "vfio_fds": None,
    "iommufd_fd": None,
    "zone_updates": [],
}
CH_RESTORE = {
    "source_url": "file:///tmp/snap",
    "prefault": False,
    "memory_restore_mode": "Copy",
    "net_fds": None,
    "vfio_fds": None,
    "iommufd_fd": None,
    "resume": False,
    "zone_updates": [],
}


def test_ch_request_bodies_at_their_defaults_are_read():
    from vmmpy.config import read_request_body

    assert read_request_body("SendMigrationData", CH_SEND) == {
        "destination_url": "tcp:127.0.0.1:6000",
        "local": False,
        "downtime_ms": 300,
        "timeout_s": 3600,
        "timeout_strategy": "cancel",
        "connections": 1,
    }  # tls_dir null: not set
    assert read_request_body("ReceiveMigrationData", CH_RECEIVE) == {"receiver_url": "unix:/tmp/m.sock"}
    assert read_request_body("RestoreConfig", CH_RESTORE) == {"source_url": "file:///tmp/snap", "resume": False}
    assert read_request_body("RestoreConfig", {**CH_RESTORE, "prefault": True})["source_url"]  # what vmmpy does
    assert read_request_body("VmSnapshotConfig", {"destination_url": "file:///x"}) == {"destination_url": "file:///x"}


@pytest.mark.parametrize(
    "spelling, value",
    [("Cancel", "cancel"), ("Ignore", "ignore"), ("cancel", "cancel"), ("ignore", "ignore"), ("IGNORE", "ignore")],
)
def test_timeout_strategy_takes_chs_enum_and_lower_case(spelling, value):
    from vmmpy.config import read_request_body

    assert (
        read_request_body("SendMigrationData", {**CH_SEND, "timeout_strategy": spelling})["timeout_strategy"] == value
    )


@pytest.mark.parametrize(
    "name, body, message",
    [
        (
            "SendMigrationData",
            {**CH_SEND, "preserve_source": True, "memory_mode": "Postcopy"},
            "unsupported SendMigrationData fields: memory_mode, preserve_source (vmmpy accepts them only at Cloud "
            "Hypervisor's default value)",
        ),
        ("SendMigrationData", {**CH_SEND, "connections": "4"}, 'connections="4": must be an integer'),
        (
            "SendMigrationData",
            {**CH_SEND, "timeout_strategy": "Retry"},
            'timeout_strategy="Retry": expected one of Cancel, Ignore',
        ),
        ("SendMigrationData", {**CH_SEND, "local": "on"}, 'local="on": must be a boolean'),
        ("SendMigrationData", {**CH_SEND, "downtime_ms": True}, "downtime_ms=true: must be an integer"),
        ("SendMigrationData", {"local": True}, "SendMigrationData needs destination_url"),
        (
            "ReceiveMigrationData",
            {**CH_RECEIVE, "zone_updates": [{"id": "z", "host_numa_node": 1}]},
            "unsupported ReceiveMigrationData fields: zone_updates",
        ),
        (
            "ReceiveMigrationData",
            {**CH_RECEIVE, "memory_mode": "Postcopy", "extra": 1},
            "unsupported ReceiveMigrationData fields: extra, memory_mode",
        ),
        (
            "RestoreConfig",
            {**CH_RESTORE, "memory_restore_mode": "OnDemand"},
            "unsupported RestoreConfig fields: memory_restore_mode",
        ),
        (
            "RestoreConfig",
            {**CH_RESTORE, "net_fds": [{"id": "net0", "fds": [3]}]},
            "unsupported RestoreConfig fields: net_fds",
        ),
        ("RestoreConfig", {**CH_RESTORE, "source_url": {"a": 1}}, 'source_url={"a": 1}: must be a string'),
        ("VmSnapshotConfig", ["file:///x"], "VmSnapshotConfig must be a JSON object, not an array"),
        ("VmSnapshotConfig", None, "VmSnapshotConfig must be a JSON object, not null"),
    ],
)
def test_ch_request_bodies_asking_for_more_are_refused_by_name(name, body, message):
    from vmmpy.config import read_request_body

    with pytest.raises(InvalidConfig) as excinfo:
        read_request_body(name, body)
    assert message in str(excinfo.value)


# ---- disks ----------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path):
    paths = []
    for name in ("a.raw", "b.raw"):
        p = tmp_path / name
        p.write_bytes(bytes(8192))
        paths.append(str(p))
    return paths


def test_disks_get_default_ids_in_order_and_round_trip_through_the_api(images):
    cfg = VmConfig(disks=[DiskConfig(path=images[0]), DiskConfig(path=images[1], readonly=True, direct=True)])
    assert [d.id for d in cfg.disks] == ["disk0", "disk1"]
    api = cfg.to_api()
    assert api["disks"] == [
        {"path": images[0], "readonly": False, "direct": False, "id": "disk0"},
        {"path": images[1], "readonly": True, "direct": True, "id": "disk1"},
    ]
    assert VmConfig.from_api(api).disks == cfg.disks


def test_api_disks_take_ch_defaults_only(images):
    ch_defaults = {
        "iommu": False,
        "num_queues": 1,
        "queue_size": 128,
        "vhost_user": False,
        "pci_segment": 0,
        "backing_files": False,
        "sparse": True,
        "image_type": "Raw",
        "vhost_socket": None,
        "rate_limiter_config": None,
        "serial": None,
        "queue_affinity": None,
    }
    cfg = VmConfig.from_api({"disks": [{"path": images[0], **ch_defaults}]})
    assert cfg.disks == [DiskConfig(path=images[0], id="disk0")]
    with pytest.raises(InvalidConfig, match=r"unsupported VmConfig fields: disks\[0\]\.num_queues, disks\[0\]\.sparse"):
        VmConfig.from_api({"disks": [{"path": images[0], "num_queues": 4, "sparse": False}]})


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda imgs: [DiskConfig(path="/nonexistent.raw")], "disks[0].path='/nonexistent.raw': no such file"),
        (lambda imgs: [DiskConfig(path="/dev")], "not a regular file"),
        (lambda imgs: [DiskConfig(path=imgs[0], id="x"), DiskConfig(path=imgs[1], id="x")], "disks[1].id='x': used by"),
        (lambda imgs: [DiskConfig(path=imgs[0], readonly="yes")], "disks[0].readonly='yes': must be a boolean"),
    ],
)
def test_bad_disks_are_refused_at_create(images, make, fragment):
    with pytest.raises(InvalidConfig) as e:
        VmConfig(disks=make(images))
    assert fragment in str(e.value)


def test_disk_count_is_bounded(images):
    with pytest.raises(InvalidConfig, match="17 disks, at most 16"):
        VmConfig(disks=[DiskConfig(path=images[0], id=f"d{i}", readonly=True) for i in range(17)])


def test_native_disk_limit_matches():
    from vmmpy import _native
    from vmmpy.config import MAX_DISKS

    assert _native.MAX_DISKS == MAX_DISKS


def test_unreadable_disk_is_refused(images):
    if os.geteuid() == 0:
        pytest.skip("root reads any file: an unreadable image cannot be made (host capability: non-root user)")
    os.chmod(images[0], 0)
    with pytest.raises(InvalidConfig, match="not readable"):
        VmConfig(disks=[DiskConfig(path=images[0], readonly=True)])


def test_peer_device_ids_must_be_strings():
    # An unhashable id could not even be looked up in this host's backings: refused by name.
    for body, field in (
        ({"disks": [{"path": "/peer.raw", "id": ["root"]}]}, r"disks\[0\]\.id=\[\"root\"\]"),
        ({"net": [{"tap": "peer-tap", "id": {"a": 1}}]}, r"net\[0\]\.id=\{\"a\": 1\}"),
        ({"net": [{"tap": "peer-tap", "id": 7}]}, r"net\[0\]\.id=7"),
    ):
        with pytest.raises(InvalidConfig, match=field + ": must be a string"):
            from_peer(body, {}, {"root": "/own.raw"}, {"net0": "own-tap"})


def test_peer_disk_paths_are_replaced_by_this_hosts_backings(images):
    peer = VmConfig(disks=[DiskConfig(path=images[0], id="root", readonly=True)]).to_api()
    peer["disks"][0]["path"] = "/peer/chose/this.raw"
    cfg = from_peer(peer, {}, {"root": images[1]})
    assert cfg.disks == [DiskConfig(path=images[1], id="root", readonly=True)]
    # A disk id this host names no file for is refused, and the message shows no peer path.
    with pytest.raises(InvalidConfig, match="disk 'root': this host names no backing") as e:
        from_peer(peer, {}, {"other": images[1]})
    assert "/peer/chose" not in str(e.value)
    with pytest.raises(InvalidConfig, match="disk 'root'"):
        from_peer(peer, {})


def test_a_peers_memory_shared_false_means_private_only_when_it_says_so():
    body = {"cpus": {"boot_vcpus": 1, "max_vcpus": 1}, "memory": {"size": 256 * MIB, "shared": False}}
    assert from_peer(body, {}).memory_shared is False
    # A source without the private-memory capability (or a local=on migration, or a snapshot
    # older than 1.4) wrote false for memfd RAM: shared.
    assert from_peer(body, {}, private_memory=False).memory_shared is True
    assert body["memory"]["shared"] is False  # the peer's document is left as it came
