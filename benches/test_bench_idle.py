"""Benchmark: an idle guest costs the host almost nothing (CPU shares are timing targets, so they
live here and not in the test suite, which must pass next to other load).

The test guest sleeps in the paravirtual idle port when it has nothing to do (BSP 100 ms, APs
50 ms at a time), so an idle 2-vCPU VM should cost a few VM exits per second. Measured on a real
`vmmpy` process from outside: utime + stime of all its threads (/proc/<pid>/stat) over a window of
wall-clock time after READY.

A second window with the guest's `dirty` workload running checks that guest CPU time does show up
in those counters on this host, so the idle figure cannot pass just because nothing is counted.
"""

from __future__ import annotations

import os
import time

IDLE_BUDGET = 0.05  # of one core
WINDOW_S = 3.0
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After "(comm)": field 3 is fields[0]; utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / TICK


def per_thread(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[f"{tid}:{name}"] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def measure(pid: int, seconds: float) -> tuple[float, dict[str, float]]:
    threads0 = per_thread(pid)
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)  # the measurement window, not an assertion
    c1, t1 = cpu_seconds(pid), time.monotonic()
    threads1 = per_thread(pid)
    diff = {k: round(v - threads0.get(k, 0.0), 3) for k, v in threads1.items()}
    return (c1 - c0) / (t1 - t0), diff


def test_idle_two_vcpu_guest_costs_under_5_percent_of_a_core(vmm_process):
    p = vmm_process("--cpus", "boot=2", "--memory", "size=128M")
    _, cpus = p.serial.wait_ready()
    assert cpus == 2
    p.serial.command("echo settle", rb"settle\r\n")  # boot work is over: the guest is in its command loop

    idle, threads = measure(p.proc.pid, WINDOW_S)
    print(f"\nidle 2-vCPU guest: {idle * 100:.2f} % of one core over {WINDOW_S:.0f} s; per thread (s): {threads}")

    # The guest is alive (idle, not hung) and the VMM still runs.
    p.serial.command("echo still here", rb"still here\r\n")
    assert p.proc.poll() is None

    # Control: with both vCPUs dirtying memory the same counters must show real CPU use.
    p.serial.command("dirty 16", rb"DIRTY STARTED mib=16")
    busy, busy_threads = measure(p.proc.pid, 1.0)
    p.serial.command("stop", rb"DIRTY STOPPED gen=\d+")
    print(f"busy 2-vCPU guest: {busy * 100:.1f} % of one core; per thread (s): {busy_threads}")

    assert busy > 0.5, f"a busy guest shows only {busy:.3f} cores: guest CPU time is not being counted"
    assert idle < IDLE_BUDGET, f"idle guest costs {idle * 100:.2f} % of a core (budget {IDLE_BUDGET * 100:.0f} %)"
