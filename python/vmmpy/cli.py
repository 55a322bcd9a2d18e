"""The ``vmmpy`` command: Cloud Hypervisor's command line, for what vmmpy implements.

* ``--kernel``/``--initramfs``/``--cmdline``, ``--memory`` or ``--cpus`` → create and boot a VM
  (the embedded test guest when there is no ``--kernel``);
* ``--api-socket`` → serve the REST API (alone: boot nothing and wait for API calls);
* neither → usage error.

SIGTERM and SIGINT ask the VMM to exit; the exit code is the VMM's. Bad arguments print one line
on stderr naming the bad value and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading


from vmmpy.config import (
    DEFAULT_CMDLINE,
    SerialConfig,
    VmConfig,
    parse_console,
    parse_cpus,
    parse_disk,
    parse_net,
    parse_net_backing,
    parse_memory,
    parse_serial,
    parse_vsock,
    parse_vsock_socket,
    read_request_body,
    request_body_from_options,
)
from vmmpy.errors import InvalidConfig, VmmError
from vmmpy.events import EventMonitor, parse_event_monitor
from vmmpy.options import parse_path_or_fd
from vmmpy.testhooks import NO_HOOKS, TestHooks

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2 ms of start-up): annotations only
if TYPE_CHECKING:
    from typing import Any, NoReturn, Sequence

PROG = "vmmpy"
log = logging.getLogger("vmmpy.cli")

#: The Cloud Hypervisor release whose API (paths, bodies, status codes) vmmpy follows.
CH_COMPAT_VERSION = "54.0.0"


def version() -> str:
    package = sys.modules.get("vmmpy")
    found = getattr(package, "__version__", None)
    if found:
        return str(found)
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        return dist_version("vmmpy")
    except (ImportError, PackageNotFoundError):
        return "unknown"


def version_line(invoked_as: str | None = None) -> str:
    """What ``--version`` prints.

    Run under the name ``cloud-hypervisor`` (a symlink), vmmpy answers like Cloud Hypervisor,
    ``cloud-hypervisor v54.0.0 (vmmpy 0.1.0)``: libvirt's CH driver runs ``cloud-hypervisor
    --version``, refuses any other first word, and picks its API dialect from that number.
    """
    name = os.path.basename(invoked_as if invoked_as is not None else (sys.argv[0] or PROG))
    if name == "cloud-hypervisor":
        return f"cloud-hypervisor v{CH_COMPAT_VERSION} ({PROG} {version()})"
    return f"{PROG} {version()}"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog=PROG,
        description="A KVM virtual machine monitor (Cloud Hypervisor-compatible command line).",
    )
    p.add_argument(
        "--api-socket",
        metavar="path=PATH|fd=N",
        help="serve the REST API on this Unix socket (a path, or an inherited listening fd)",
    )
    p.add_argument("--kernel", metavar="PATH", help="ELF vmlinux or bzImage (default: test guest)")
    p.add_argument("--initramfs", metavar="PATH", help="initramfs image")
    p.add_argument(
        "--boot-protocol",
        choices=("pvh", "linux64"),
        help="enter an ELF kernel through its PVH note (pvh, the default when it has one) "
        "or Linux's 64-bit entry (linux64)",
    )
    p.add_argument("--cmdline", metavar="STRING", help=f'kernel command line (default "{DEFAULT_CMDLINE}")')
    p.add_argument(
        "--memory",
        metavar="size=SIZE[,shared=on|off]",
        help="guest RAM, e.g. size=512M; shared=on (default): memfds, which a local=on migration passes; "
        "shared=off: private memory with huge pages, faster to fault in",
    )
    p.add_argument("--cpus", metavar="boot=N", help="vCPU count, e.g. boot=2 (1 to 8)")
    p.add_argument(
        "--disk",
        action="append",
        metavar="path=FILE[,readonly=on][,id=NAME][,direct=on]",
        help="a virtio-blk disk on a raw image (repeatable); without a VM to boot, this host's file "
        "for that disk id when a VM is restored or received",
    )
    p.add_argument(
        "--net",
        action="append",
        metavar="tap=NAME|fd=N[,mac=MAC][,ip=IPV4,mask=IPV4][,id=NAME]",
        help="a virtio-net NIC on a host tap (repeatable; created, with ip/mask (default "
        "255.255.255.0), when absent); without a VM to boot, tap=NAME[,id=NAME] alone names this "
        "host's tap for that net id when a VM is restored or received (its MAC comes with it)",
    )
    p.add_argument(
        "--vsock",
        metavar="cid=N,socket=PATH[,id=NAME]",
        help="a virtio-vsock device: host processes reach guest port P by writing 'CONNECT P' on "
        "PATH, guest connections to host port P go to PATH_P; without a VM to boot, socket=PATH "
        "alone names this host's socket for a restored or received VM's vsock",
    )
    p.add_argument(
        "--serial",
        metavar="off|null|tty|file=PATH|socket=PATH",
        help="where COM1 goes (default null)",
    )
    p.add_argument("--console", metavar="off|null", help="accepted for compatibility: vmmpy has no virtio console")
    p.add_argument("--event-monitor", metavar="path=PATH|fd=N", help="write lifecycle events as JSON lines here")
    p.add_argument(
        "--restore",
        metavar="source_url=file:///DIR[,resume=on]",
        help="restore a snapshot (paused unless resume=on)",
    )
    p.add_argument(
        "--no-shutdown",
        action="store_true",
        help="keep the VMM running when the guest powers off",
    )
    p.add_argument(
        "--test-hooks",
        metavar="NAME=VALUE,...",
        help="timing windows for vmmpy's own test suite (see vmmpy.testhooks); never in production",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeatable)")
    p.add_argument("--version", action="version", version=version_line())
    return p


def parse_api_socket(text: str) -> tuple[str | None, int | None]:
    """``--api-socket path=PATH | fd=N | PATH`` → ``(path, fd)``."""
    return parse_path_or_fd(text, "--api-socket")


def parse_restore(text: str) -> dict[str, Any]:
    """``--restore source_url=file:///DIR[,resume=on]`` (or a bare URL) → keyword arguments of
    ``Vmm.restore``: Cloud Hypervisor's RestoreConfig, read as the API reads it."""
    body = request_body_from_options("RestoreConfig", text, "--restore", "source_url")
    try:
        return read_request_body("RestoreConfig", body)
    except InvalidConfig as e:
        raise InvalidConfig(f"--restore {text!r}: {e}") from None


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="vmmpy: %(levelname)s %(name)s: %(message)s",
    )


def _fail(message: Any) -> int:
    """A runtime failure (not a usage error): one line on stderr, exit status 1."""
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)

    # Everything the arguments say is checked before anything starts.
    try:
        api_path: str | None = None
        api_fd: int | None = None
        if args.api_socket is not None:
            api_path, api_fd = parse_api_socket(args.api_socket)
        want_vm = any(
            value is not None
            for value in (args.kernel, args.initramfs, args.cmdline, args.boot_protocol, args.memory, args.cpus)
        )
        restore = parse_restore(args.restore) if args.restore is not None else None
        if restore is not None and want_vm:
            parser.error("--restore takes the VM from the snapshot: drop --kernel/--boot-protocol/--memory/--cpus")
        if not want_vm and restore is None and args.api_socket is None:
            parser.error(
                "nothing to do: give --kernel, --memory or --cpus to boot a VM, or --api-socket to serve the API"
            )
        serial: SerialConfig | None = parse_serial(args.serial) if args.serial is not None else None
        if args.console is not None:
            parse_console(args.console)  # only checked: both accepted modes mean "no console"
        vm_args: dict[str, Any] = {}
        if args.memory is not None:
            vm_args.update(parse_memory(args.memory))
        if args.cpus is not None:
            vm_args.update(parse_cpus(args.cpus))
        disks = [parse_disk(text) for text in args.disk or []]
        nets = [parse_net(text) for text in args.net or []] if want_vm else []
        config = None
        disk_backings: dict[str, str] = {}
        net_backings: dict[str, str] = {}
        vsock_socket = None
        if want_vm:
            config = VmConfig(
                kernel=args.kernel,
                initramfs=args.initramfs,
                cmdline=args.cmdline,
                boot_protocol=args.boot_protocol,
                serial=serial if serial is not None else SerialConfig(),
                disks=disks,
                net=nets,
                vsock=parse_vsock(args.vsock) if args.vsock is not None else None,
                **vm_args,
            )
        else:
            if args.vsock is not None:
                vsock_socket = parse_vsock_socket(args.vsock)
            # The operator's own files for the disks of a VM this VMM restores or receives.
            for i, d in enumerate(disks):
                disk_id = d.id if d.id is not None else f"disk{i}"
                if disk_id in disk_backings:
                    raise InvalidConfig(f"--disk id={disk_id}: given twice")
                disk_backings[disk_id] = d.path
            for i, text in enumerate(args.net or []):
                net_id, tap = parse_net_backing(text)
                net_id = net_id if net_id is not None else f"net{i}"
                if net_id in net_backings:
                    raise InvalidConfig(f"--net id={net_id}: given twice")
                net_backings[net_id] = tap
        test_hooks = TestHooks.parse(args.test_hooks) if args.test_hooks else NO_HOOKS
        monitor_args = parse_event_monitor(args.event_monitor) if args.event_monitor else None
        # Opened here, so a bad path is a usage error (a FIFO blocks until its reader opens).
        monitor = EventMonitor(**monitor_args) if monitor_args is not None else None
    except InvalidConfig as e:
        parser.error(str(e))

    try:
        from vmmpy.vmm import Vmm  # the native core is needed from here on
    except ImportError as e:
        if monitor is not None:
            monitor.close()
        return _fail(f"cannot load the VMM core: {e}")

    try:
        vmm = Vmm(
            serial=serial,
            event_monitor=monitor,
            no_shutdown=args.no_shutdown,
            test_hooks=test_hooks,
            disk_backings=disk_backings,
            net_backings=net_backings,
            vsock_socket=vsock_socket,
        )
    except VmmError as e:
        if monitor is not None:
            monitor.close()
        return _fail(e)

    previous_handlers: dict[int, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        # Python runs this in the main thread between bytecodes, possibly while the main thread
        # holds a lock inside a Vmm call (create/boot). request_exit() may take such a lock, so
        # it is made from a thread of its own, which cannot deadlock with the interrupted code.
        threading.Thread(target=vmm.request_exit, name="vmmpy-signal", daemon=True).start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            previous_handlers[signum] = signal.signal(signum, on_signal)
        except ValueError:  # not the main thread (main() called from a test thread)
            break

    api = None
    try:
        try:
            if args.api_socket is not None:
                api = _start_api(vmm, api_path, api_fd)
            if config is not None:
                vmm.create(config)
                vmm.boot()
                if args.kernel is not None:
                    _say_kernel_kind(vmm, args.kernel)
            if restore is not None:
                vmm.restore(**restore)
        except VmmError as e:
            rc = _fail(e)
            _stop(vmm)
            return rc
        return vmm.wait()
    finally:
        if api is not None:
            api.close()
        if monitor is not None:
            monitor.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def _say_kernel_kind(vmm: Any, path: str) -> None:
    """One line on stderr: which kind of kernel the VMM found and booted (vm.info payload_kind)."""
    from vmmpy.kernel import describe

    try:
        info = vmm.info()
        kind, protocol = info.get("payload_kind", "unknown"), info.get("boot_protocol", "unknown")
    except Exception:  # noqa: BLE001 - an informative line must never fail the boot
        kind = protocol = "unknown"
    print(
        f"{PROG}: kernel {path}: payload_kind={kind} boot_protocol={protocol}: {describe(path)}",
        file=sys.stderr,
        flush=True,
    )


def _start_api(vmm: Any, path: str | None, fd: int | None) -> Any:
    from vmmpy.api import ApiServer

    return ApiServer(vmm, path, fd=fd).start()


def _stop(vmm: Any) -> None:
    try:
        vmm.shutdown_vmm()
    except VmmError as e:
        log.debug("shutting the VMM down after a failure: %s", e)
    try:
        vmm.wait(timeout=10.0)
    except VmmError as e:
        log.debug("waiting for the VMM after a failure: %s", e)


if __name__ == "__main__":
    sys.exit(main())
