"""The native VM's lock and the GIL are never taken in opposite orders.

A call that fails inside the VM lock turns its error into a Python exception; if that took the
GIL with the lock held, a thread holding the GIL and waiting for the lock (``stop()``) would
deadlock with it. Both paths are driven at once, in a child process so a deadlock is a timeout
with a message rather than a hung suite.
"""

from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import os, threading
from vmmpy import _native
from vmmpy.errors import InvalidConfig, InvalidState

for round in range(30):
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
    console = _native.Console(None)
    vm = _native.Vm(memory_size=64 << 20, vcpus=1, kernel=None, initramfs=None, cmdline="console=ttyS0",
                    console=console, reset_fd=fds[0], guest_exit_fd=fds[1], error_fd=fds[2])
    started = threading.Event()
    scratch = os.open("/tmp", os.O_TMPFILE | os.O_RDWR)

    def hammer():
        while True:
            try:
                vm.save_memory(9, scratch)  # fails inside the lock: no RAM region 9
            except InvalidConfig:
                started.set()
            except InvalidState:  # stopped: done
                return
            except BaseException:
                started.set()  # never leave the main thread waiting
                raise

    t = threading.Thread(target=hammer)
    t.start()
    started.wait()
    vm.stop()  # called holding the GIL while the other thread fails inside the lock
    t.join()
    console.close()
    for fd in (*fds, scratch):
        os.close(fd)
print("OK")
"""


def test_stop_while_another_thread_fails_inside_the_vm_lock():
    try:
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError("deadlock: stop() and an error raised inside the VM lock") from None
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr
