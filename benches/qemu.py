"""QEMU microvm running the test guest, for the side-by-side benches: the process, its QMP monitor
and its serial console (a SerialClient on a Unix socket, as for vmmpy).

QEMU is Debian's qemu-system-x86 (benches/setup.sh). The guest boots through its PVH note with
one vCPU (it starts APs only under vmmpy) and idles with HLT and the LAPIC timer (guest/idle.c).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from helpers import SerialClient, connect_unix

QEMU = shutil.which("qemu-system-x86_64")


def microvm_command(guest: Path, vcpus: int, mib: int) -> list[str]:
    """QEMU's firmware-less microvm booting the test guest (PVH), no devices, no display."""
    return [
        QEMU,
        "-machine",
        "microvm",
        "-accel",
        "kvm",
        # kvm_pvm refuses IA32_ARCH_CAPABILITIES (MSR 0x10a), which QEMU's `host` model sets and
        # then aborts on (docs/host.md); the guest does not read it.
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        str(mib),
        "-smp",
        str(vcpus),
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-kernel",
        str(guest),
    ]


class Qmp:
    """A QMP client: one command at a time, asynchronous events kept apart."""

    def __init__(self, path: str, timeout: float = 60.0):
        self.sock = connect_unix(path, timeout)
        self.file = self.sock.makefile("rb")
        self.events: list[dict] = []
        self._read()  # the greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise AssertionError("QMP: QEMU closed the monitor")
        return json.loads(line)

    def command(self, name: str, **arguments) -> dict:
        msg = {"execute": name, "arguments": arguments} if arguments else {"execute": name}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise AssertionError(f"QMP {name}: {reply['error']}")
            return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class QemuGuest:
    """`qemu-system-x86_64 -machine microvm -kernel <test guest>` with QMP and a console socket.
    `incoming`: start as a migration destination (``-incoming defer``, then listen()). `mem_path`:
    back guest RAM with a shared file (``memory-backend-file,share=on``), for same-host migration.
    `args`: more QEMU options (devices, ``-no-shutdown``...)."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        guest: Path,
        mib: int,
        incoming: bool = False,
        mem_path: str | None = None,
        args: tuple[str, ...] = (),
    ):
        self.serial_path = str(tmp / f"{name}.qserial")
        self.qmp_path = str(tmp / f"{name}.qmp")
        for p in (self.serial_path, self.qmp_path):
            if os.path.exists(p):
                os.unlink(p)
        cmd = microvm_command(guest, 1, mib) + [
            "-serial",
            f"unix:{self.serial_path},server=on,wait=off",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if mem_path is not None:
            cmd += [
                "-object",
                f"memory-backend-file,id=ram,size={mib}M,mem-path={mem_path},share=on",
                "-machine",
                "memory-backend=ram",
            ]
        cmd += args
        # A booting guest starts stopped (-S) until its console has a client: QEMU drops serial
        # output nobody is connected to.
        cmd += ["-incoming", "defer"] if incoming else ["-S"]
        self.log_path = tmp / f"{name}.qemu.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.qmp = Qmp(self.qmp_path)
            self.serial = SerialClient(self.serial_path)
            if not incoming:
                self.qmp.command("cont")
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            self.log.close()
            raise

    def set_capabilities(self, capabilities: dict[str, bool]) -> None:
        caps = [{"capability": k, "state": v} for k, v in capabilities.items()]
        self.qmp.command("migrate-set-capabilities", capabilities=caps)

    def listen(self, uri: str, capabilities: dict[str, bool] | None = None) -> None:
        """The destination's side: capabilities that must match the source's (x-ignore-shared),
        then listen on `uri`."""
        if capabilities:
            self.set_capabilities(capabilities)
        self.qmp.command("migrate-incoming", uri=uri)

    def migrate(self, uri: str, capabilities: dict[str, bool] | None = None, **parameters) -> dict:
        """Migrates to `uri` and waits for the end; returns query-migrate's final answer."""
        if capabilities:
            self.set_capabilities(capabilities)
        if parameters:
            self.qmp.command("migrate-set-parameters", **{k.replace("_", "-"): v for k, v in parameters.items()})
        self.qmp.command("migrate", uri=uri)
        deadline = time.monotonic() + 300
        while True:
            info = self.qmp.command("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                assert info["status"] == "completed", info
                return info
            assert time.monotonic() < deadline, f"QEMU migration did not end: {info}"
            time.sleep(0.002)

    def close(self) -> None:
        self.serial.close()
        self.qmp.close()
        self.proc.kill()
        self.proc.wait()
        self.log.close()
