"""``vmmpy-remote``: drive a running vmmpy (or Cloud Hypervisor) through its API socket.

Subcommands mirror ``ch-remote``'s. Exit status: 0 on a 2xx answer, 1 on any other answer or
when the socket cannot be reached, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from vmmpy.cli import one_line_parser
from vmmpy.client import ApiClient, error_message
from vmmpy.config import request_body_from_options
from vmmpy.errors import InvalidConfig
from vmmpy.options import parse_path_or_fd

PROG = "vmmpy-remote"

# subcommand → (method, endpoint, help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "ping": ("GET", "vmm.ping", "show the VMM's version and pid"),
    "info": ("GET", "vm.info", "show the VM's config and state"),
    "counters": ("GET", "vm.counters", "show the VM's device counters"),
    "create": ("PUT", "vm.create", "create a VM from a Cloud Hypervisor VmConfig JSON file"),
    "boot": ("PUT", "vm.boot", "boot the created VM"),
    "pause": ("PUT", "vm.pause", "pause the running VM"),
    "resume": ("PUT", "vm.resume", "resume the paused VM"),
    "reboot": ("PUT", "vm.reboot", "reboot the VM"),
    "shutdown": ("PUT", "vm.shutdown", "shut the VM down (it can be booted again)"),
    "delete": ("PUT", "vm.delete", "delete the VM"),
    "power-button": ("PUT", "vm.power-button", "press the VM's ACPI power button"),
    "shutdown-vmm": ("PUT", "vmm.shutdown", "end the VMM process"),
    "send-migration": (
        "PUT",
        "vm.send-migration",
        "migrate the VM: destination_url=tcp:H:P|unix:PATH[,local=on][,downtime_ms=N][,timeout_s=N]"
        "[,timeout_strategy=cancel|ignore][,auto_converge=on|off][,tls_dir=DIR][,connections=N]"
        "[,max_bandwidth=BYTES_PER_S|NK|NM|NG]",
    ),
    "receive-migration": (
        "PUT",
        "vm.receive-migration",
        "receive a migration: tcp:H:P or unix:PATH[,tls_dir=DIR] (blocks)",
    ),
    "migration-progress": ("GET", "vm.migration-progress", "show the running or last migration's progress"),
    "cancel-migration": ("PUT", "vm.cancel-migration", "cancel the running migration"),
    "snapshot": ("PUT", "vm.snapshot", "snapshot the paused VM into file:///DIR"),
    "restore": ("PUT", "vm.restore", "restore a snapshot: source_url=file:///DIR[,resume=on]"),
}

# Subcommands taking one option string → (the Cloud Hypervisor request body it becomes, the key a
# bare first item sets).
OPTION_COMMANDS = {
    "send-migration": ("SendMigrationData", "destination_url"),
    "receive-migration": ("ReceiveMigrationData", "receiver_url"),
    "snapshot": ("VmSnapshotConfig", "destination_url"),
    "restore": ("RestoreConfig", "source_url"),
}


def _show_progress(client: ApiClient) -> int:
    """A progress bar on the terminal until the migration ends; the exit code follows its outcome."""
    import time

    while True:
        status, p = client.request("GET", "vm.migration-progress", None)
        if status != 200:
            print(file=sys.stderr)
            return 0 if status in (404, 503) else 1  # the source VMM ended after success
        total = max(p.get("total") or 1, 1)
        done = min(p.get("transferred", 0), total)
        width = 30
        bar = "#" * int(width * done / total)
        sys.stderr.write(
            f"\r[{bar:<{width}}] {p['status']:<9} {p['phase']:<10} iter {p['iteration']:>3} "
            f"{done / 2**20:8.1f} MiB {p['mbps']:8.0f} Mbit/s throttle {p['cpu_throttle_percentage']}%"
        )
        sys.stderr.flush()
        if p["status"] in ("completed", "failed", "cancelled"):
            sys.stderr.write("\n")
            if p["status"] != "completed":
                print(f"error: migration {p['status']}: {p.get('error')}", file=sys.stderr)
                return 1
            print(f"downtime {p['downtime_ms']:.1f} ms, total {p['total_time_ms']:.0f} ms", file=sys.stderr)
            return 0
        time.sleep(0.2)


def build_parser() -> argparse.ArgumentParser:
    p = one_line_parser(PROG, "Control a vmmpy VMM through its REST API socket.")
    p.add_argument("--api-socket", required=True, metavar="PATH", help="the VMM's API socket")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="per-request timeout")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_method, _endpoint, text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=text, description=text)
        if name == "create":
            cmd.add_argument("config", metavar="FILE", help="VmConfig JSON file, or - for stdin")
        if name in OPTION_COMMANDS:
            cmd.add_argument("options", metavar="OPTIONS")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    method, endpoint, _ = COMMANDS[args.command]
    body: Any = None
    try:
        socket_path, fd = parse_path_or_fd(args.api_socket, "--api-socket")
        if socket_path is None:
            raise InvalidConfig(f"--api-socket fd={fd}: {PROG} connects to a path")
        if args.command in OPTION_COMMANDS:
            name, bare = OPTION_COMMANDS[args.command]
            body = json.dumps(request_body_from_options(name, args.options, args.command, bare))
    except InvalidConfig as e:
        parser.error(str(e))

    if args.command == "create":
        try:
            if args.config == "-":
                body = sys.stdin.read()
            else:
                with open(args.config, encoding="utf-8") as f:
                    body = f.read()
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            parser.error(f"cannot read VmConfig file {args.config!r}: {reason}")

    # receive-migration answers only when a migration has arrived.
    timeout = None if args.command == "receive-migration" else args.timeout
    client = ApiClient(socket_path, timeout=timeout)
    try:
        status, answer = client.request(method, endpoint, body)
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        print(f"{PROG}: error: cannot reach {socket_path}: {reason}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a malformed answer, reported in one line
        print(f"{PROG}: error: bad answer from {socket_path}: {e}", file=sys.stderr)
        return 1

    if not 200 <= status < 300:
        message = error_message(answer)
        print(f"error: {status} {message}".rstrip(), file=sys.stderr)
        return 1
    if args.command == "send-migration" and sys.stderr.isatty():
        return _show_progress(client)
    if answer is not None:
        if isinstance(answer, str):
            print(answer)
        else:
            print(json.dumps(answer, indent=2, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
