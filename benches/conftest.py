"""Benchmarks run on real KVM like the tests; they reuse the tests' helpers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import SerialClient, guest_vmm, vmm_process  # noqa: E402,F401  (fixtures)
from net_helpers import network  # noqa: E402,F401  (fixture)


def pytest_report_header(config):
    modules = [m for m in os.listdir("/sys/module") if m.startswith("kvm")]
    return (
        f"KVM modules: {' '.join(modules)} — on kvm_pvm (a nested, pagetable-based host) absolute times "
        "are not those of bare-metal KVM; compare the ratios"
    )


@pytest.fixture(scope="session")
def pio_floor(tmp_path_factory):
    """Builds benches/pio_floor.c; returns a function giving the C loop's ns per PIO exit."""
    exe = tmp_path_factory.mktemp("floor") / "pio_floor"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(Path(__file__).parent / "pio_floor.c")], check=True)
    return lambda n: float(subprocess.run([str(exe), str(n)], check=True, capture_output=True, text=True).stdout)
