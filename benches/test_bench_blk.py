"""virtio-blk benchmarks: the test guest's reads against fio on the same image from the host, and
the migration of a guest with `blk load` running against the same guest without a disk.

Run: bash scripts/bench-setup.sh (Debian's fio), then
     python -m pytest benches/test_bench_blk.py -p no:cacheprovider -s

1. test_guest_reads_vs_host_fio   4 KiB random and 1 MiB sequential reads, queue depth 1 and 32:
                                  `blk bench` in the guest vs `fio --ioengine=io_uring` on the
                                  same image file, same block size, depth, duration and caching.
                                  Targets: >= 0.8x host throughput sequential, >= 0.5x host IOPS
                                  at depth 32. Also the guest's cost of one kick (the notify
                                  write: the per-request exit, through ioeventfd; it includes the
                                  vCPU losing its core to the device thread), kicks per I/O, and
                                  the plain PIO exit round trip in the same VM for comparison.
2. test_migration_with_blk_load   total time and downtime of a tcp migration, 2 vCPUs, 512 MiB,
                                  `blk load 8` running vs the same guest without a disk.

Fairness: the image is written in full first (no sparse holes: a hole reads as zeros without
touching storage on either side), and both sides read it the same way. Each case runs three
times: `direct` (the guest's disk opened with direct=on, fio --direct=1: both bypass the host page
cache, so this compares the request paths to storage), `cold` (both buffered, the file's pages
dropped from the host page cache before each fio run and each guest run: both go through the page
cache's misses and read-ahead) and `cached` (both buffered, all of the file in the page cache
first: this isolates the VMM's request path from the storage). A missed target prints TARGET
MISSED.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest
from migration_helpers import free_port, send, start_receive
from sector_format import make_image

HOST = "nested PVM host (kvm_pvm)"
IMAGE_MIB = 1024
RUN_MS = 3000
BENCH = re.compile(rb"BLK BENCH mode=(\w+) qd=(\d+) bs=(\d+) ios=(\d+) us=(\d+) kicks=(\d+) kick_ns=(\d+)\r\n")
CASES = [
    (mode, depth, cache)
    for cache in ("direct", "cold", "cached")
    for mode, depth in (("rand", 1), ("rand", 32), ("seq", 1), ("seq", 32))
]


def report(benchmark, name, line, ratio, target, met, **figures):
    benchmark.extra_info.update(figures)
    benchmark.extra_info.update(ratio=round(ratio, 4), target=target, target_met=met, host=HOST)
    verdict = "target met" if met else ("TARGET MISSED" if target else "no target")
    print(f"\n[{name}] {line} | ratio {ratio:.3f} (target {target or '-'}): {verdict} | {HOST}")


def set_cache(path, cache):
    """The file's pages dropped from the host page cache; for `cached`, all of it read in again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if cache == "cached":
            while os.read(fd, 1 << 24):
                pass
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("blkbench") / "bench.raw"
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(IMAGE_MIB):
            f.write(block)
    return path


def fio(path, mode, depth, cache) -> dict:
    exe = shutil.which("fio")
    if exe is None:
        pytest.skip("fio is not installed (bash scripts/bench-setup.sh installs Debian's fio)")
    set_cache(path, cache)
    out = subprocess.run(
        [
            exe,
            "--name=host",
            f"--filename={path}",
            "--readonly",
            f"--direct={int(cache == 'direct')}",
            "--ioengine=io_uring",
            f"--rw={'randread' if mode == 'rand' else 'read'}",
            f"--bs={'4k' if mode == 'rand' else '1m'}",
            f"--iodepth={depth}",
            "--time_based",
            f"--runtime={RUN_MS}ms",
            "--output-format=json",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    read = json.loads(out)["jobs"][0]["read"]
    return {"iops": read["iops"], "bytes_per_s": read["bw_bytes"]}


def guest_run(serial, path, mode, depth, cache) -> dict:
    set_cache(path, cache)
    m = serial.command(f"blk bench {mode} {depth} {RUN_MS}", BENCH, timeout=RUN_MS / 1000 + 120)
    bs, ios, us, kicks, kick_ns = (int(m.group(i)) for i in range(3, 8))
    return {
        "iops": ios * 1e6 / us,
        "bytes_per_s": ios * bs * 1e6 / us,
        "kicks_per_io": kicks / ios,
        "kick_us": kick_ns / 1000,
        "bs": bs,
    }


@pytest.mark.parametrize("mode,depth,cache", CASES, ids=[f"{m}-qd{d}-{c}" for m, d, c in CASES])
def test_guest_reads_vs_host_fio(benchmark, vmm_process, image, mode, depth, cache):
    direct = ",direct=on" if cache == "direct" else ""
    disk = f"path={image},id=bench{direct}"
    vmm = vmm_process("--cpus", "boot=1", "--memory", "size=256M", "--disk", disk, name="bench")
    vmm.serial.wait_ready()
    vmm.serial.command("blk info", rb"BLK info disks=1 ")
    # the plain exit round trip (a PIO write to an unclaimed port), to set the kick's cost against
    pio_us = int(vmm.serial.command("pio 2000", rb"PIO n=2000 ns_per_exit=(\d+)\r\n").group(1)) / 1000
    host = fio(image, mode, depth, cache)
    guest = benchmark.pedantic(guest_run, args=(vmm.serial, image, mode, depth, cache), rounds=1, iterations=1)
    key = "bytes_per_s" if mode == "seq" else "iops"
    ratio = guest[key] / host[key]
    target = {("seq", 1): 0.8, ("seq", 32): 0.8, ("rand", 32): 0.5}.get((mode, depth))
    unit = (lambda v: f"{v / 1e6:.0f} MB/s") if mode == "seq" else (lambda v: f"{v:.0f} IOPS")
    report(
        benchmark,
        f"blk {mode} qd{depth} {cache}",
        f"guest {unit(guest[key])} ({guest['bs']} B), host fio {unit(host[key])}; "
        f"{guest['kicks_per_io']:.2f} kicks/IO at {guest['kick_us']:.1f} us each (PIO exit {pio_us:.1f} us)",
        ratio,
        f">= {target}" if target else "",
        target is None or ratio >= target,
        guest=guest,
        host=host,
        pio_exit_us=pio_us,
    )


def _migrate(vmm_process, tmp_path, with_disk: bool) -> dict:
    name = "disk" if with_disk else "nodisk"
    image = make_image(tmp_path / f"{name}.raw", 64)  # zeros: `blk load` reads only its own format
    disk = ["--disk", f"path={image},id=disk0"] if with_disk else []
    src = vmm_process("--cpus", "boot=2", "--memory", "size=512M", *disk, name=f"src-{name}")
    dst = vmm_process(*disk, name=f"dst-{name}")
    src.serial.wait_ready()
    if with_disk:
        src.serial.command("blk load 8", rb"BLK LOAD STARTED ")
        deadline = time.monotonic() + 60
        while int(src.serial.command("blk status", rb"BLK STATUS load=on reads=(\d+) ").group(1)) < 100:
            assert time.monotonic() < deadline, "the disk load makes no progress"
            time.sleep(0.05)
    url = f"tcp:127.0.0.1:{free_port()}"
    receiver = start_receive(dst, url)
    send(src, url)
    assert src.wait_exit(120) == 0
    receiver.join(60)
    assert receiver.result["answer"][0] == 204
    fin = [e for e in src.events() if e["event"] == "migration-finished"][0]["properties"]
    if with_disk:
        dst.serial.command(f"blk verify 0 {8 * 2048}", rb"BLK VERIFY OK \d+ ", timeout=120)
    src.close()
    dst.close()
    return {"total_ms": fin["total_time_ms"], "downtime_ms": fin["downtime_ms"]}


def test_migration_with_blk_load(benchmark, vmm_process, tmp_path):
    plain = _migrate(vmm_process, tmp_path, False)
    loaded = benchmark.pedantic(_migrate, args=(vmm_process, tmp_path, True), rounds=1, iterations=1)
    ratio = loaded["downtime_ms"] / max(plain["downtime_ms"], 0.001)
    report(
        benchmark,
        "migration with blk load",
        f"with blk load: total {loaded['total_ms']:.1f} ms, downtime {loaded['downtime_ms']:.1f} ms; "
        f"no disk: total {plain['total_ms']:.1f} ms, downtime {plain['downtime_ms']:.1f} ms (downtime ratio)",
        ratio,
        "",
        True,
        loaded=loaded,
        plain=plain,
    )
