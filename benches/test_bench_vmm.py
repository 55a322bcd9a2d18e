"""Foundation benchmarks: the PIO exit round trip against a plain C loop, and boot/reboot to READY."""

import statistics
import time

EXITS = 20000


def test_pio_exit_round_trip_vs_c_floor(benchmark, guest_vmm, pio_floor):
    vmm, serial = guest_vmm()
    serial.wait_ready()

    def guest_pio():
        return int(serial.command(f"pio {EXITS}", rb"PIO n=\d+ ns_per_exit=(\d+)\r\n").group(1))

    vmm_ns = benchmark.pedantic(guest_pio, rounds=5, iterations=1)
    samples_vmm = [guest_pio() for _ in range(5)]
    samples_c = [pio_floor(EXITS) for _ in range(5)]
    ratio = statistics.median(samples_vmm) / statistics.median(samples_c)
    benchmark.extra_info.update(
        vmm_ns_per_exit=statistics.median(samples_vmm),
        c_floor_ns_per_exit=statistics.median(samples_c),
        ratio=round(ratio, 3),
        target="<= 1.10",
    )
    print(
        f"\nPIO exit: vmmpy {statistics.median(samples_vmm):.0f} ns, C floor {statistics.median(samples_c):.0f} ns, "
        f"ratio {ratio:.3f} (target <= 1.10) last={vmm_ns}"
    )


def test_boot_to_ready(benchmark, tmp_path):
    from helpers import SerialClient
    from vmmpy import Vmm
    from vmmpy.config import SerialConfig, VmConfig

    def boot():
        path = str(tmp_path / f"b{time.monotonic_ns()}.sock")
        vmm = Vmm(serial=SerialConfig(mode="Socket", socket=path))
        serial = SerialClient(path)
        t0 = time.perf_counter()
        vmm.create(VmConfig(memory_mib=512, vcpus=2))
        vmm.boot()
        serial.wait_ready()
        elapsed = time.perf_counter() - t0
        serial.close()
        vmm.close()
        return elapsed

    benchmark.pedantic(boot, rounds=7, iterations=1)


def test_reboot_to_ready(benchmark, guest_vmm):
    vmm, serial = guest_vmm(vcpus=2, memory_mib=512)
    serial.wait_ready()

    def reboot():
        t0 = time.perf_counter()
        serial.send("reboot acpi")
        serial.wait_ready()
        return time.perf_counter() - t0

    benchmark.pedantic(reboot, rounds=7, iterations=1)
