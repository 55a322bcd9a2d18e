"""vmmpy's main demo: a guest reboots in the middle of its own live migration, and nothing is lost.

    python -m vmmpy.demo

Two VMM processes on this machine. The source boots the embedded test guest with 2 vCPUs and
starts a memory-dirtying workload; a migration to the second VMM starts, capped at 64 MiB/s
(``max_bandwidth``) with a 1 ms downtime target: at that rate 1 ms moves 64 KiB, less than the
guest dirties in any pass, so pre-copy keeps iterating by construction, however fast or busy the
machine is. In pre-copy the guest asks for an ACPI reboot. The source latches the request,
switches to the final phase, carries the request in the migration state, and the destination replays it: the guest reboots there, with a new boot id.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .client import ApiClient

BANNER = re.compile(rb"vmmpy-testguest boot_id=([0-9a-f]{16}) cpus=(\d+) mem_mib=(\d+)")


class Side:
    def __init__(self, tmp: Path, name: str, *args: str):
        self.name = name
        self.api_path = str(tmp / f"{name}.api")
        self.serial_path = str(tmp / f"{name}.console")
        self.events_path = tmp / f"{name}.events"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vmmpy.cli",
                "--api-socket",
                self.api_path,
                "--serial",
                f"socket={self.serial_path}",
                "--event-monitor",
                f"path={self.events_path}",
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / f"{name}.log", "wb"),
        )
        self.api = ApiClient(self.api_path)
        self._wait_for(lambda: os.path.exists(self.api_path), "API socket")
        self.console = socket.socket(socket.AF_UNIX)
        self._wait_for(self._connect, "console")
        self.out = b""

    def _connect(self) -> bool:
        try:
            self.console.connect(self.serial_path)
            return True
        except OSError:
            return False

    def _wait_for(self, cond, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: no {what}; see its log")
            time.sleep(0.02)

    def expect(self, pattern: bytes, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.out)
            if m:
                self.out = self.out[m.end() :]
                return m
            self.console.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.console.recv(65536)
            except socket.timeout:
                raise SystemExit(f"{self.name}: {pattern!r} not seen on the console") from None
            if not data:
                raise SystemExit(f"{self.name}: console closed")
            self.out += data

    def type(self, line: str) -> None:
        self.console.sendall(line.encode() + b"\n")

    def events(self) -> list[dict]:
        return [json.loads(x) for x in self.events_path.read_text().splitlines() if x.strip()]


def _stamp(event: dict) -> str:
    """An event's own time: seconds since its VMM started (the event monitor's clock)."""
    t = event["timestamp"]
    return f"[event at VMM+{t['secs'] + t['nanos'] / 1e9:.3f}s]"


CAP = 64 << 20  # bytes/s


def _progress(side: Side, cond, timeout: float = 60) -> dict:
    """vm.migration-progress, polled until `cond` holds."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = side.api.request("GET", "vm.migration-progress")
        if status != 200:
            raise SystemExit(f"{side.name}: vm.migration-progress answered {status} {body}")
        if cond(body):
            return body
        if body["status"] != "active" or time.monotonic() > deadline:
            raise SystemExit(f"{side.name}: the migration is {body['status']} ({body.get('error')})")
        time.sleep(0.01)


def say(side: str, text: str, t0: float) -> None:
    print(f"{time.monotonic() - t0:7.3f}s  {side:<12} {text}", flush=True)


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="vmmpy-demo-"))
    t0 = time.monotonic()
    src = Side(tmp, "source", "--cpus", "boot=2", "--memory", "size=512M")
    dst = Side(tmp, "destination")
    try:
        m = src.expect(BANNER)
        src.expect(rb"READY")
        boot_id = m.group(1).decode()
        say("source", f"guest booted: boot_id={boot_id} cpus={m.group(2).decode()}", t0)
        src.type("dirty 256")
        src.expect(rb"DIRTY STARTED[^\r]*")
        say("source", "guest rewrites 256 MiB of its RAM over and over (dirty 256)", t0)

        url = f"unix:{tmp}/migration.sock"
        receive = threading.Thread(
            target=lambda: dst.api.request("PUT", "vm.receive-migration", {"receiver_url": url}), daemon=True
        )
        receive.start()
        dst._wait_for(
            lambda: any(e["event"] == "migration-receive-ready" for e in dst.events()), "migration-receive-ready"
        )
        say("destination", f"listening on {url}", t0)
        status, body = src.api.request(
            "PUT",
            "vm.send-migration",
            {"destination_url": url, "max_bandwidth": CAP, "downtime_ms": 1, "auto_converge": False},
        )
        if status != 204:
            raise SystemExit(f"send-migration failed: {status} {body}")
        say("source", f"migration started: {CAP >> 20} MiB/s cap, 1 ms downtime target (pre-copy keeps iterating)", t0)
        p = _progress(src, lambda p: p["transferred"] > 0)
        say(
            "source",
            f"pre-copy iteration {p['iteration']}: {p['transferred'] / 2**20:.0f} MiB sent, "
            f"{p['mbps']:.0f} Mbit/s, dirty rate {p['dirty_pages_rate']:.0f} pages/s",
            t0,
        )
        src.type("reboot acpi")
        src.expect(rb"REBOOTING acpi")
        say("source", "guest: `reboot acpi` (writes 1 to the ACPI reset register, port 0x600)", t0)
        code = src.proc.wait(120)
        receive.join(30)
        for e in src.events():
            if e["event"].startswith("migration"):
                say("source", f"{_stamp(e)} vm.{e['event']} {json.dumps(e['properties'])}", t0)
        say("source", f"VMM exited with code {code}: the VM lives on the destination now", t0)
        for e in dst.events():
            if e["event"].startswith(("migration-receive", "reboot")):
                say("destination", f"{_stamp(e)} vm.{e['event']} {json.dumps(e['properties'])}", t0)
        m = dst.expect(BANNER)
        dst.expect(rb"READY")
        new_id = m.group(1).decode()
        say("destination", f"new boot banner: boot_id={new_id} (was {boot_id})", t0)
        dst.type("echo hello from the rebooted guest")
        dst.expect(rb"hello from the rebooted guest")
        say("destination", "guest answers on its console: the reboot was carried, not lost", t0)
        assert new_id != boot_id
        return 0
    finally:
        for side in (src, dst):
            if side.proc.poll() is None:
                side.proc.terminate()
                side.proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
