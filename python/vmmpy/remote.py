"""``vmmpy-remote``: drive a running vmmpy (or Cloud Hypervisor) through its API socket.

Subcommands mirror ``ch-remote``'s. Exit status: 0 on a 2xx answer, 1 on any other answer or
when the socket cannot be reached, 2 on bad usage.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

from vmmpy.cli import OneLineParser
from vmmpy.client import ApiClient, error_message

PROG = "vmmpy-remote"

# subcommand → (method, endpoint, help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "ping": ("GET", "vmm.ping", "show the VMM's version and pid"),
    "info": ("GET", "vm.info", "show the VM's config and state"),
    "create": ("PUT", "vm.create", "create a VM from a Cloud Hypervisor VmConfig JSON file"),
    "boot": ("PUT", "vm.boot", "boot the created VM"),
    "pause": ("PUT", "vm.pause", "pause the running VM"),
    "resume": ("PUT", "vm.resume", "resume the paused VM"),
    "reboot": ("PUT", "vm.reboot", "reboot the VM"),
    "shutdown": ("PUT", "vm.shutdown", "shut the VM down (it can be booted again)"),
    "delete": ("PUT", "vm.delete", "delete the VM"),
    "power-button": ("PUT", "vm.power-button", "press the VM's ACPI power button"),
    "shutdown-vmm": ("PUT", "vmm.shutdown", "end the VMM process"),
}


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Control a vmmpy VMM through its REST API socket.")
    p.add_argument("--api-socket", required=True, metavar="PATH", help="the VMM's API socket")
    p.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="per-request timeout"
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_method, _endpoint, text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=text, description=text)
        if name == "create":
            cmd.add_argument("config", metavar="FILE", help="VmConfig JSON file, or - for stdin")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    socket_path = args.api_socket[5:] if args.api_socket.startswith("path=") else args.api_socket
    if not socket_path:
        parser.error(f"--api-socket {args.api_socket!r}: empty path")
    method, endpoint, _ = COMMANDS[args.command]

    body: Any = None
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

    client = ApiClient(socket_path, timeout=args.timeout)
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
    if answer is not None:
        if isinstance(answer, str):
            print(answer)
        else:
            print(json.dumps(answer, indent=2, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
