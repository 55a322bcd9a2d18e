"""Shared test fixtures: real KVM, the real test guest, real VMM processes. Nothing here mocks KVM.

If /dev/kvm is unusable the whole session fails at start, loudly.
"""

from __future__ import annotations

import os

import pytest

from vmmpy import _native

from helpers import SerialClient, VmmProcess, guest_vmm, vmm_process  # noqa: F401 (fixtures)
from net_helpers import network  # noqa: F401 (fixture)


def pytest_sessionstart(session):
    try:
        info = _native.kvm_check()
    except Exception as e:  # noqa: BLE001 - any failure here must stop the run
        pytest.exit(f"/dev/kvm is unusable, vmmpy's tests need real KVM: {e}", returncode=3)
    print(f"\nKVM: {info}; modules: {' '.join(m for m in os.listdir('/sys/module') if m.startswith('kvm'))}")
