"""vmmpy against QEMU microvm on the same guest (the test guest's PVH entry), interleaved in one run.

Run: python -m pytest benches/test_bench_vs_qemu.py -p no:cacheprovider -s

1. test_start_to_ready_vs_qemu_microvm  process start -> the guest's `READY`, 1 vCPU / 512 MiB and
   2 vCPUs / 1 GiB: the `vmmpy` command (the console script), an in-process `Vmm` of an
   already-imported vmmpy, `qemu-system-x86_64 -machine microvm -kernel testguest.elf`; with the
   command's breakdown (interpreter, imports, the rest) measured in the same rounds.
2. test_migration_vs_qemu  live migration over loopback TCP (idle 1 GiB and 4 GiB; a guest dirtying
   64 MiB at a fixed rate; RAM written once, 1 GiB and ~3 GiB of a 4 GiB guest) and same-host
   (vmmpy `local=on` vs QEMU's x-ignore-shared on a shared memory file, 1 GiB written): total and
   downtime as each VMM reports them, bytes on the wire; QEMU's max-bandwidth raised to 100 GiB/s
   so that its 128 MiB/s default does not decide; both with their default downtime target
   (300 ms). Where vmmpy misses a target its breakdown is printed: the median of each phase
   its migration-finished event reports (connect, start, config with the destination's VM build,
   precopy, then the downtime's pause, last_pass, save_state, complete). The cases with RAM
   written once over tcp also run vmmpy with connections=2 (opt-in: 1 is Cloud Hypervisor's
   default and vmmpy's) and the C floor of one loopback TCP connection moving the written RAM
   (benches/sock_floor.c, no page faults on either side), interleaved with the others, reported
   beside them.
3. test_reboot_vs_qemu  `reboot triple` -> `READY` again in one VMM.

QEMU comes from `benches/setup.sh`; the guest runs one vCPU there (it starts APs only under vmmpy)
and idles with HLT and its LAPIC timer (guest/idle.c). Targets (issue 13): the command's start
<= 0.5x QEMU's, the in-process Vmm <= 20 ms, every migration's total and downtime <= 0.5x QEMU's.
A missed target prints TARGET MISSED; it does not fail the benchmark.

Measured before optimising the full-RAM cases (both VMMs are bound by the destination's first touch
of fresh RAM pages here): on a 512 MiB memfd, MADV_POPULATE_WRITE then memcpy took as long as a
memcpy that faults its pages in (C, 3 interleaved runs each, 0.4-1.4 s either way on the loaded
host), and shmem THP is off on these hosts (transparent_hugepage/shmem_enabled: never), so the
receiver does neither.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import BANNER
from migration_helpers import free_port, progress, send, start_receive
from qemu import QEMU, QemuGuest, microvm_command

from vmmpy import Vmm, _native
from vmmpy.config import SerialConfig, VmConfig

ROUNDS = 7
SHAPES = [(1, 512), (2, 1024)]
HOST = "nested PVM host (kvm_pvm)"
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 missing: run benches/setup.sh")
# The installed console script, as a user runs it; `python -m vmmpy.cli` where there is none.
SCRIPT = Path(sys.executable).with_name("vmmpy")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "vmmpy.cli"]


def median(values):
    return statistics.median(values) if values else float("nan")


@pytest.fixture(scope="module")
def guest_elf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("guest") / "testguest.elf"
    path.write_bytes(bytes(_native.test_guest_elf()))
    return path


@pytest.fixture(scope="module")
def sock_floor(tmp_path_factory) -> str:
    exe = tmp_path_factory.mktemp("floor") / "sock_floor"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(Path(__file__).with_name("sock_floor.c"))], check=True)
    return str(exe)


def verdict(met: bool) -> str:
    return "target met" if met else "TARGET MISSED"


# ---- 1. start -> READY ---------------------------------------------------------------------------


def wait_for(path: Path, marker: bytes, deadline_s: float = 30.0) -> float:
    """Seconds on the monotonic clock when `marker` appears in the file (polled: a bench, not a test)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if marker in path.read_bytes():
                return time.monotonic()
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    raise AssertionError(f"no {marker!r} in {path} within {deadline_s} s: {path.read_bytes()[-300:]!r}")


def run_vmmpy_command(tmp: Path, vcpus: int, mib: int) -> float:
    log = tmp / f"vmmpy-{time.monotonic_ns()}.log"
    t0 = time.monotonic()
    p = subprocess.Popen(
        [*COMMAND, "--memory", f"size={mib}M", "--cpus", f"boot={vcpus}", "--serial", f"file={log}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return wait_for(log, b"READY") - t0
    finally:
        p.kill()
        p.wait()


def run_python(code: str) -> float:
    """Seconds for `python -c code` (the interpreter the console script runs) to exit."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.monotonic() - t0


def run_in_process(tmp: Path, vcpus: int, mib: int) -> float:
    log = tmp / f"inproc-{time.monotonic_ns()}.log"
    t0 = time.monotonic()
    vmm = Vmm(serial=SerialConfig(mode="File", file=str(log)))
    try:
        vmm.create(VmConfig(memory_mib=mib, vcpus=vcpus))
        vmm.boot()
        return wait_for(log, b"READY") - t0
    finally:
        vmm.close()


def run_qemu(tmp: Path, guest: Path, vcpus: int, mib: int) -> float:
    log = tmp / f"qemu-{time.monotonic_ns()}.log"
    t0 = time.monotonic()
    p = subprocess.Popen(
        microvm_command(guest, vcpus, mib) + ["-no-reboot", "-serial", f"file:{log}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return wait_for(log, b"READY") - t0
    finally:
        p.kill()
        p.wait()


# What the command imports before its VM boots (the rest of the VMM loads while the guest runs).
IMPORTS = "import vmmpy.cli, vmmpy.native_vm"


@needs_qemu
@pytest.mark.parametrize("vcpus,mib", SHAPES)
def test_start_to_ready_vs_qemu_microvm(benchmark, tmp_path, guest_elf, vcpus, mib):
    samples: dict[str, list[float]] = {
        "vmmpy command": [],
        "in-process Vmm": [],
        "QEMU microvm": [],
        "python -c pass": [],
        "python + imports": [],
    }

    def one_round() -> None:  # interleaved: every round runs all of them
        samples["vmmpy command"].append(run_vmmpy_command(tmp_path, vcpus, mib))
        samples["in-process Vmm"].append(run_in_process(tmp_path, vcpus, mib))
        samples["QEMU microvm"].append(run_qemu(tmp_path, guest_elf, vcpus, mib))
        samples["python -c pass"].append(run_python("pass"))
        samples["python + imports"].append(run_python(IMPORTS))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    med = {k: median(v) * 1000 for k, v in samples.items()}
    ratio = med["vmmpy command"] / med["QEMU microvm"]
    imports = med["python + imports"] - med["python -c pass"]
    rest = med["vmmpy command"] - med["python + imports"] - med["in-process Vmm"]
    benchmark.extra_info.update({f"{k} ms": round(v, 1) for k, v in med.items()}, command_vs_qemu=round(ratio, 2))
    met = ratio <= 0.5 and med["in-process Vmm"] <= 20
    print(
        f"\n[start -> READY, {vcpus} vCPU / {mib} MiB, medians of {ROUNDS}] "
        + ", ".join(f"{k} {v:.1f} ms" for k in ("vmmpy command", "in-process Vmm", "QEMU microvm") for v in [med[k]])
        + f"; vmmpy command / QEMU = {ratio:.2f} (target <= 0.5), in-process {med['in-process Vmm']:.1f} ms "
        f"(target <= 20 ms): {verdict(met)}"
        + (
            ""
            if ratio <= 0.5
            else f" | the command's breakdown: interpreter {med['python -c pass']:.1f} ms, imports {imports:.1f} ms "
            f"({IMPORTS}), Vmm + VM build + guest to READY (in-process) {med['in-process Vmm']:.1f} ms, the rest "
            f"(the command's own steps before the boot: arguments, config checks, console) {rest:.1f} ms | {HOST}"
        )
    )


# ---- 2. migration --------------------------------------------------------------------------------

OPT_IN = "vmmpy connections=2"
FLOOR = "one TCP stream's floor (sock_floor.c send to drain)"
QEMU_PARAMETERS = {"max_bandwidth": 100 << 30}  # bytes/s: QEMU's 128 MiB/s default must not decide
DIRTY_RATE = 16384  # pages/s, 64 MiB/s: the 64 MiB area rewritten once a second
# name: (guest MiB, what the guest does before the rounds, same-host, rounds)
CASES = {
    "idle 1 GiB tcp": (1024, None, False, 7),
    "idle 4 GiB tcp": (4096, None, False, 5),
    "dirtying 64 MiB at 64 MiB/s, 1 GiB tcp": (1024, f"dirty 64 {DIRTY_RATE}", False, 5),
    "1 GiB written once tcp": (1024, "written 960", False, 5),
    "4 GiB guest, 2.9 GiB written once tcp": (4096, "written 2944", False, 3),
    "same host, 1 GiB written": (1024, "written 960", True, 7),
}


def guest_workload(serial, what: str | None) -> None:
    """`written <MiB>`: every page of the dirty area written once, then stopped; `dirty <MiB> <rate>`:
    dirtying at that rate from now on."""
    if what is None:
        return
    word, args = what.split(" ", 1)
    serial.command(f"dirty {args}", rb"DIRTY STARTED mib=\d+ rate=\d+\r\n")
    if word == "written":
        serial.wait_dirty_pass(timeout=600)
        serial.command("stop", rb"DIRTY STOPPED gen=\d+\r\n")


class VmmpySide:
    """Two vmmpy processes the guest moves between, round after round."""

    def __init__(self, vmm_process, tmp: Path, mib: int, what: str | None, local: bool, connections: int = 1):
        self.tmp = tmp
        self.local = local
        self.connections = connections
        self.name = "v" if connections == 1 else f"v{connections}c"
        # Over tcp vmmpy's RAM is private (shared=off), as QEMU's is: anonymous memory with
        # transparent huge pages; a same-host migration passes memfds, so that RAM is shared.
        shared = "on" if local else "off"
        a = vmm_process("--no-shutdown", "--memory", f"size={mib}M,shared={shared}", name=f"{self.name}a")
        b = vmm_process("--no-shutdown", name=f"{self.name}b")
        self.boot_id, _ = a.serial.wait_ready()
        guest_workload(a.serial, what)
        self.sides = [a, b]
        self.n = 0

    def migrate(self) -> dict:
        src, dst = self.sides
        self.n += 1
        url = f"unix:{self.tmp}/{self.name}mig{self.n}.sock" if self.local else f"tcp:127.0.0.1:{free_port()}"
        seen = src.event_names().count("vm.migration-finished")
        receive = start_receive(dst, url)
        options = {"connections": self.connections} if self.connections > 1 else {}
        send(src, url, local=self.local, **options)
        receive.join(600)
        assert receive.result["answer"][0] == 204, receive.result
        src.wait_event("vm.migration-finished", count=seen + 1, timeout=600)
        p = progress(src)
        events = src.events()
        start = [i for i, e in enumerate(events) if e["event"] == "migration-started"][-1]
        events = events[start:]
        self.sides.reverse()
        fin = next(e for e in events if e["event"] == "migration-finished")["properties"]
        return {
            "total_ms": fin["total_time_ms"],
            "downtime_ms": fin["downtime_ms"],
            "wire_bytes": p["transferred"],
            "phases_ms": fin["phases_ms"],
            "iterations": sum(e["event"] == "migration-memory-iteration" for e in events),
        }

    def check(self) -> None:
        m = self.sides[0].serial.command("status", rb"STATUS boot_id=([0-9a-f]{16})")
        assert m.group(1).decode() == self.boot_id, "the guest must have moved, not rebooted"


def breakdown(runs: list[dict]) -> str:
    """vmmpy's migration in phases, medians over `runs` of the phases_ms its migration-finished
    event carries: set-up (connect, start, memory_fds, config with the destination's VM build,
    payload), pre-copy (its iterations), then the downtime (pause, last_pass, save_state,
    complete: the State carries the Complete; the destination restores the vCPUs and starts them
    before it answers, and its control loop takes the VM over after that answer)."""
    names = list(dict.fromkeys(name for r in runs for name in r["phases_ms"]))
    parts = [f"{name} {median([r['phases_ms'].get(name, 0.0) for r in runs]):.2f}" for name in names]
    iterations = median([r["iterations"] for r in runs])
    return "phases (ms, medians): " + ", ".join(parts) + f"; pre-copy iterations {iterations:g}"


def source_side(runs: list[dict]) -> str:
    """What of vmmpy's downtime its source spends before it sends the State: about the span QEMU's
    own downtime figure covers (QEMU stops counting once its source wrote the last byte, its
    final write included; vmmpy's downtime ends when the destination's vCPUs run)."""
    spans = [sum(r["phases_ms"].get(k, 0.0) for k in ("pause", "last_pass", "save_state")) for r in runs]
    return f"source side before it sends the State (about the span QEMU's downtime counts) {median(spans):.2f} ms"


class StreamFloor:
    """What one loopback TCP connection moves at best: benches/sock_floor.c writing the written RAM
    from a resident buffer (4 MiB writes) to its drain, which reads it into one 4 MiB buffer (no
    page faults on either side), once per round."""

    def __init__(self, exe: str, mib: int):
        self.exe, self.bytes = exe, int(mib) << 20
        self.drain = subprocess.Popen([exe, "drain", "tcp"], stdout=subprocess.PIPE, text=True)
        self.port = self.drain.stdout.readline().split()[1]

    def migrate(self) -> dict:
        cmd = [self.exe, "send", "tcp", self.port, str(self.bytes), str(self.bytes), str(4 << 20)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout.split()
        return {"total_ms": float(out[3]) * 1000, "downtime_ms": 0.0, "wire_bytes": int(out[1])}

    def check(self) -> None:
        pass

    def close(self) -> None:
        self.drain.kill()
        self.drain.wait()


class QemuSide:
    """QEMU migrating the guest to a fresh destination process each round."""

    def __init__(self, tmp: Path, guest: Path, mib: int, what: str | None, local: bool):
        self.tmp, self.guest, self.mib, self.local = tmp, guest, mib, local
        # QEMU's same-host migration: both processes map one shared RAM file, and x-ignore-shared
        # leaves that RAM out of the stream.
        self.mem_path = f"/dev/shm/vmmpy-bench-qemu-{os.getpid()}" if local else None
        self.caps = {"x-ignore-shared": True} if local else {}
        self.n = 0
        self.src = QemuGuest(tmp, "qa0", guest, mib, mem_path=self.mem_path)
        try:
            self.boot_id, _ = self.src.serial.wait_ready()
            guest_workload(self.src.serial, what)
        except BaseException:
            self.close()
            raise

    def migrate(self) -> dict:
        self.n += 1
        dst = QemuGuest(self.tmp, f"qa{self.n}", self.guest, self.mib, incoming=True, mem_path=self.mem_path)
        uri = f"unix:{self.tmp}/qmig{self.n}.sock" if self.local else f"tcp:127.0.0.1:{free_port()}"
        try:
            dst.listen(uri, self.caps)
            info = self.src.migrate(uri, self.caps, **QEMU_PARAMETERS)
        except BaseException:
            dst.close()
            raise
        self.src.close()
        self.src = dst
        return {
            "total_ms": info["total-time"],
            "downtime_ms": info["downtime"],
            "wire_bytes": info["ram"]["transferred"],
        }

    def check(self) -> None:
        m = self.src.serial.command("status", rb"STATUS boot_id=([0-9a-f]{16})")
        assert m.group(1).decode() == self.boot_id, "the guest must have moved, not rebooted"

    def close(self) -> None:
        self.src.close()
        if self.mem_path is not None and os.path.exists(self.mem_path):
            os.unlink(self.mem_path)


@needs_qemu
@pytest.mark.parametrize("case", list(CASES))
def test_migration_vs_qemu(benchmark, vmm_process, tmp_path, guest_elf, sock_floor, case):
    mib, what, local, rounds = CASES[case]
    sides = {"vmmpy": VmmpySide(vmm_process, tmp_path, mib, what, local)}
    if what is not None and what.startswith("written") and not local:
        # Where the stream's bytes decide: the opt-in (CH's default, and vmmpy's, is 1 connection),
        # and what one connection can do at all.
        sides[OPT_IN] = VmmpySide(vmm_process, tmp_path, mib, what, local, connections=2)
        sides[FLOOR] = StreamFloor(sock_floor, int(what.split()[1]))
    sides["QEMU"] = theirs = QemuSide(tmp_path, guest_elf, mib, what, local)
    runs: dict[str, list[dict]] = {side: [] for side in sides}

    def one_round() -> None:  # interleaved
        for side, vmm in sides.items():
            runs[side].append(vmm.migrate())

    try:
        benchmark.pedantic(one_round, rounds=rounds, iterations=1)
        for vmm in sides.values():
            vmm.check()
    finally:
        theirs.close()
        if FLOOR in sides:
            sides[FLOOR].close()
    med = {
        side: {k: median([r[k] for r in rs]) for k in ("total_ms", "downtime_ms", "wire_bytes")}
        for side, rs in runs.items()
    }
    total_ratio = med["vmmpy"]["total_ms"] / med["QEMU"]["total_ms"]
    # QEMU reports downtime in whole milliseconds (0 when under 1 ms): compare with at least 1 ms.
    down_ratio = med["vmmpy"]["downtime_ms"] / max(med["QEMU"]["downtime_ms"], 1)
    met = total_ratio <= 0.5 and down_ratio <= 0.5
    benchmark.extra_info.update(
        {f"{side} {k}": round(v, 3) for side, m in med.items() for k, v in m.items()},
        total_ratio=round(total_ratio, 3),
        downtime_ratio=round(down_ratio, 3),
        vmmpy_total_samples_ms=[round(r["total_ms"], 2) for r in runs["vmmpy"]],
        qemu_total_samples_ms=[r["total_ms"] for r in runs["QEMU"]],
        target_met=met,
    )
    line = (
        f"\n[migration {case}, medians of {rounds}] vmmpy total {med['vmmpy']['total_ms']:.1f} ms / downtime "
        f"{med['vmmpy']['downtime_ms']:.2f} ms / {med['vmmpy']['wire_bytes'] / (1 << 20):.1f} MiB on the wire; QEMU "
        f"{med['QEMU']['total_ms']:.0f} ms / {med['QEMU']['downtime_ms']:.0f} ms / "
        f"{med['QEMU']['wire_bytes'] / (1 << 20):.1f} MiB | total ratio {total_ratio:.2f}, downtime ratio "
        f"{down_ratio:.2f} (targets <= 0.5): {verdict(met)}"
    )
    if OPT_IN in med:
        opt = med[OPT_IN]
        line += (
            f" | {OPT_IN}: total {opt['total_ms']:.1f} ms / downtime {opt['downtime_ms']:.2f} ms, total ratio "
            f"{opt['total_ms'] / med['QEMU']['total_ms']:.2f}"
        )
    if FLOOR in med:
        floor = med[FLOOR]["total_ms"]
        line += f" | {FLOOR}: {floor:.1f} ms, {floor / med['QEMU']['total_ms']:.2f} of QEMU's total"
    if not met:
        line += f" | vmmpy {breakdown(runs['vmmpy'])}; {source_side(runs['vmmpy'])}"
    print(line + f" | {HOST}")


# ---- 3. reboot -> READY --------------------------------------------------------------------------

REBOOT_ROUNDS = 7


def reboot_to_ready(serial) -> float:
    """Seconds from the guest's REBOOTING line to READY from the new boot."""
    serial.send("reboot triple")
    serial.expect(rb"REBOOTING triple\r\n", 30)
    t0 = time.monotonic()
    serial.expect(BANNER, 60)
    serial.expect(rb"READY\r?\n", 60)
    return time.monotonic() - t0


@needs_qemu
def test_reboot_vs_qemu(benchmark, vmm_process, tmp_path, guest_elf):
    ours = vmm_process("--memory", "size=1G", name="reboot")
    ours.serial.wait_ready()
    theirs = QemuGuest(tmp_path, "qreboot", guest_elf, 1024)
    samples: dict[str, list[float]] = {"vmmpy": [], "QEMU": []}

    def one_round() -> None:
        samples["vmmpy"].append(reboot_to_ready(ours.serial))
        samples["QEMU"].append(reboot_to_ready(theirs.serial))

    try:
        theirs.serial.wait_ready()
        benchmark.pedantic(one_round, rounds=REBOOT_ROUNDS, iterations=1)
    finally:
        theirs.close()
    med = {k: median(v) * 1000 for k, v in samples.items()}
    ratio = med["vmmpy"] / med["QEMU"]
    benchmark.extra_info.update({f"{k} ms": round(v, 2) for k, v in med.items()}, ratio=round(ratio, 3))
    print(
        f"\n[reboot triple -> READY, 1 GiB, medians of {REBOOT_ROUNDS}] vmmpy {med['vmmpy']:.1f} ms, QEMU "
        f"{med['QEMU']:.1f} ms: ratio {ratio:.2f} | {HOST}"
    )
