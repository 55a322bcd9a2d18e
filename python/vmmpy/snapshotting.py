"""Taking a paused VM's snapshot and restoring one into an empty VMM (the directory's format and
its safe reading and writing are ``snapshot.py``'s)."""

from __future__ import annotations

from pathlib import Path

from .backings import HostBackings
from .config import from_peer
from .control_loop import ControlLoop
from .errors import InvalidState
from .events import EventMonitor
from .machine import PAUSE_TIMEOUT_S, Machine, VmState
from .payload import check_description
from .snapshot import (
    CONFIG_FILE,
    SnapshotDir,
    encode_state,
    read_memory,
    read_payload,
    state_head,
    write_snapshot,
)


def take_snapshot(machine: Machine, events: EventMonitor, directory: Path) -> None:
    """Writes the paused VM's config, state and memory into `directory` (loop thread)."""
    machine.require_owned()
    if machine.state is not VmState.PAUSED:
        raise InvalidState(f"snapshot needs a paused VM (state {machine.state.value})")
    if machine.pending_on_resume is not None or machine.vm.lifecycle_request() is not None:
        # The guest stands past its own reset/power-off request: a snapshot would lose it.
        raise InvalidState("the guest asked for reboot or power-off; resume to carry it out first")
    events.emit("vm", "snapshotting")
    state = encode_state(machine.vm.save_state(), state_head(payload=machine.payload.describe() or None))
    write_snapshot(directory, machine.config.to_api(), state, machine.vm, machine.payload)
    events.emit("vm", "snapshotted", {"path": str(directory)})


def restore_snapshot(
    loop: ControlLoop,
    machine: Machine,
    events: EventMonitor,
    snap: SnapshotDir,
    directory: Path,
    backings: HostBackings,
) -> None:
    """Restores `snap` into the empty VMM, paused. Everything is read and checked (version,
    config, payload digests) on the caller's thread before a VM is built on the loop; the
    snapshot's config chooses no host path here (its serial is this VMM's own)."""
    config_api, decoded = snap.read_json(CONFIG_FILE), snap.read_state()
    described = decoded.fields["payload"] or {}
    cfg = from_peer(
        config_api,
        described,
        backings.disks,
        backings.net,
        backings.vsock_socket,
        private_memory=decoded.private_memory,
    )
    payload = read_payload(snap, check_description(described, cfg.memory_bytes))
    cfg = machine.own_serial(cfg)

    def do():
        machine.require_empty("this VMM already has a VM")
        events.emit("vm", "restoring", {"path": str(directory)})
        vm = machine.new_native_vm(cfg, payload, restore=True)
        try:
            read_memory(snap, vm)
            vm.restore_state(decoded.native)
            vm.boot(paused=True)
            vm.pause(PAUSE_TIMEOUT_S)  # returns once every vCPU has parked
        except BaseException:
            vm.stop()
            raise
        machine.adopt(cfg, vm, payload, VmState.PAUSED)
        events.emit("vm", "restored", {"path": str(directory)})

    loop.call(do)
