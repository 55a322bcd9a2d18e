"""The ``vmmpy`` command: Cloud Hypervisor's command line, for what vmmpy implements.

* ``--kernel``/``--initramfs``/``--cmdline``, ``--memory`` or ``--cpus`` → create and boot a VM
  (the embedded test guest when there is no ``--kernel``);
* ``--api-socket`` → serve the REST API (alone: boot nothing and wait for API calls);
* neither → usage error.

SIGTERM and SIGINT ask the VMM to exit; the exit code is the VMM's. Bad arguments print one line
on stderr naming the bad value and exit with status 2.
"""

from __future__ import annotations

import os
import sys

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
from vmmpy.event_output import open_event_output, parse_event_monitor
from vmmpy.options import parse_path_or_fd

# Up to the guest's boot this module loads only what the boot needs: argparse, logging, json,
# dataclasses and threading each import `re` or more, and together cost the command ~45 ms of
# start-up here (README, "Where these numbers come from"). They load after the VM is running.
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2 ms of start-up): annotations only
if TYPE_CHECKING:
    import argparse
    from typing import Any, NoReturn, Sequence

PROG = "vmmpy"

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


def usage_error(message: str, prog: str = PROG) -> NoReturn:
    """A usage error: one line (``prog: error: ...``) on stderr, exit status 2."""
    sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
    raise SystemExit(2)


# How each flag takes its value: the next item or after "=" (VALUE), repeatable (APPEND), none
# (FLAG), or counted (COUNT, -v/--verbose).
VALUE, APPEND, FLAG, COUNT = "value", "append", "flag", "count"

#: The command's flags: (flag, how, metavar, help, choices). argparse is built from this table;
#: so is the plain-command-line reader (`read_plain_arguments`).
OPTIONS: tuple[tuple[str, str, str | None, str, tuple[str, ...] | None], ...] = (
    (
        "--api-socket",
        VALUE,
        "path=PATH|fd=N",
        "serve the REST API on this Unix socket (a path, or an inherited listening fd)",
        None,
    ),
    ("--kernel", VALUE, "PATH", "ELF vmlinux or bzImage (default: test guest)", None),
    ("--initramfs", VALUE, "PATH", "initramfs image", None),
    (
        "--boot-protocol",
        VALUE,
        None,
        "enter an ELF kernel through its PVH note (pvh, the default when it has one) or Linux's 64-bit entry (linux64)",
        ("pvh", "linux64"),
    ),
    ("--cmdline", VALUE, "STRING", f'kernel command line (default "{DEFAULT_CMDLINE}")', None),
    (
        "--memory",
        VALUE,
        "size=SIZE[,shared=on|off]",
        "guest RAM, e.g. size=512M; shared=on (default): memfds, which a local=on migration passes; "
        "shared=off: private memory with huge pages, faster to fault in",
        None,
    ),
    ("--cpus", VALUE, "boot=N", "vCPU count, e.g. boot=2 (1 to 8)", None),
    (
        "--disk",
        APPEND,
        "path=FILE[,readonly=on][,id=NAME][,direct=on]",
        "a virtio-blk disk on a raw image (repeatable); without a VM to boot, this host's file "
        "for that disk id when a VM is restored or received",
        None,
    ),
    (
        "--net",
        APPEND,
        "tap=NAME|fd=N[,mac=MAC][,ip=IPV4,mask=IPV4][,id=NAME]",
        "a virtio-net NIC on a host tap (repeatable; created, with ip/mask (default "
        "255.255.255.0), when absent); without a VM to boot, tap=NAME[,id=NAME] alone names this "
        "host's tap for that net id when a VM is restored or received (its MAC comes with it)",
        None,
    ),
    (
        "--vsock",
        VALUE,
        "cid=N,socket=PATH[,id=NAME]",
        "a virtio-vsock device: host processes reach guest port P by writing 'CONNECT P' on "
        "PATH, guest connections to host port P go to PATH_P; without a VM to boot, socket=PATH "
        "alone names this host's socket for a restored or received VM's vsock",
        None,
    ),
    ("--serial", VALUE, "off|null|tty|file=PATH|socket=PATH", "where COM1 goes (default null)", None),
    ("--console", VALUE, "off|null", "accepted for compatibility: vmmpy has no virtio console", None),
    ("--event-monitor", VALUE, "path=PATH|fd=N", "write lifecycle events as JSON lines here", None),
    (
        "--restore",
        VALUE,
        "source_url=file:///DIR[,resume=on]",
        "restore a snapshot (paused unless resume=on)",
        None,
    ),
    ("--no-shutdown", FLAG, None, "keep the VMM running when the guest powers off", None),
    (
        "--test-hooks",
        VALUE,
        "NAME=VALUE,...",
        "timing windows for vmmpy's own test suite (see vmmpy.testhooks); never in production",
        None,
    ),
    ("--verbose", COUNT, None, "more logging (repeatable)", None),
)
_SHORT = {"-v": "--verbose"}


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def one_line_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """argparse, but a usage error is one line (:func:`usage_error`)."""
    import argparse

    class OneLineParser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            usage_error(message, self.prog)

    return OneLineParser(prog=prog, description=description)


def build_parser() -> argparse.ArgumentParser:
    """argparse over :data:`OPTIONS`."""
    p = one_line_parser(PROG, "A KVM virtual machine monitor (Cloud Hypervisor-compatible command line).")
    actions = {VALUE: "store", APPEND: "append", FLAG: "store_true", COUNT: "count"}
    for flag, how, metavar, text, choices in OPTIONS:
        names = [short for short, long in _SHORT.items() if long == flag] + [flag]
        extra: dict[str, Any] = {"default": 0} if how == COUNT else {}
        if metavar is not None:
            extra["metavar"] = metavar
        if choices is not None:
            extra["choices"] = choices
        p.add_argument(*names, action=actions[how], help=text, **extra)
    p.add_argument("--version", action="version", version=version_line())
    return p


class Arguments:
    """The parsed command line: one attribute per flag of :data:`OPTIONS`."""

    def __init__(self, **values: Any):
        self.__dict__.update(values)


def read_plain_arguments(argv: Sequence[str]) -> Arguments | None:
    """`argv` read without argparse when it is plain: every item an exact flag of :data:`OPTIONS`
    (or ``-v``) with its value after ``=`` or as the next item (not one that starts with ``-``),
    and every value one of its flag's choices. Anything else (``--help``, ``--version``, a
    shortened or unknown flag, a missing value) is None: argparse reads it, and prints the help,
    the version or the usage error. Read either way, the same line gives the same arguments."""
    specs = {flag: (how, choices) for flag, how, _metavar, _text, choices in OPTIONS}
    defaults = {FLAG: False, COUNT: 0}
    values: dict[str, Any] = {_dest(flag): defaults.get(how) for flag, (how, _c) in specs.items()}
    items = iter(argv)
    for item in items:
        flag, eq, inline = item.partition("=")
        flag = _SHORT.get(flag, flag)
        if flag not in specs:
            return None
        how, choices = specs[flag]
        dest = _dest(flag)
        if how in (FLAG, COUNT):
            if eq:
                return None
            values[dest] = True if how == FLAG else values[dest] + 1
            continue
        value = inline if eq else next(items, None)
        if value is None or (not eq and value.startswith("-")) or (choices is not None and value not in choices):
            return None
        if how == APPEND:
            values[dest] = [*(values[dest] or []), value]
        else:
            values[dest] = value
    return Arguments(**values)


def parse_arguments(argv: Sequence[str] | None) -> Arguments:
    argv = sys.argv[1:] if argv is None else list(argv)
    plain = read_plain_arguments(argv)
    if plain is not None:
        return plain
    return Arguments(**vars(build_parser().parse_args(argv)))


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
    import logging

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


class Plan:
    """What the command line asks for, every value checked."""

    def __init__(self, args: Arguments):
        self.args = args
        self.api_path: str | None = None
        self.api_fd: int | None = None
        if args.api_socket is not None:
            self.api_path, self.api_fd = parse_api_socket(args.api_socket)
        want_vm = any(
            value is not None
            for value in (args.kernel, args.initramfs, args.cmdline, args.boot_protocol, args.memory, args.cpus)
        )
        self.restore = parse_restore(args.restore) if args.restore is not None else None
        if self.restore is not None and want_vm:
            usage_error("--restore takes the VM from the snapshot: drop --kernel/--boot-protocol/--memory/--cpus")
        if not want_vm and self.restore is None and args.api_socket is None:
            usage_error(
                "nothing to do: give --kernel, --memory or --cpus to boot a VM, or --api-socket to serve the API"
            )
        self.serial: SerialConfig | None = parse_serial(args.serial) if args.serial is not None else None
        if args.console is not None:
            parse_console(args.console)  # only checked: both accepted modes mean "no console"
        vm_args: dict[str, Any] = {}
        if args.memory is not None:
            vm_args.update(parse_memory(args.memory))
        if args.cpus is not None:
            vm_args.update(parse_cpus(args.cpus))
        disks = [parse_disk(text) for text in args.disk or []]
        self.config: VmConfig | None = None
        self.disk_backings: dict[str, str] = {}
        self.net_backings: dict[str, str] = {}
        self.vsock_socket: str | None = None
        if want_vm:
            self.config = VmConfig(
                kernel=args.kernel,
                initramfs=args.initramfs,
                cmdline=args.cmdline,
                boot_protocol=args.boot_protocol,
                serial=self.serial if self.serial is not None else SerialConfig(),
                disks=disks,
                net=[parse_net(text) for text in args.net or []],
                vsock=parse_vsock(args.vsock) if args.vsock is not None else None,
                **vm_args,
            )
        else:
            if args.vsock is not None:
                self.vsock_socket = parse_vsock_socket(args.vsock)
            # The operator's own files for the disks of a VM this VMM restores or receives.
            for i, d in enumerate(disks):
                disk_id = d.id if d.id is not None else f"disk{i}"
                if disk_id in self.disk_backings:
                    raise InvalidConfig(f"--disk id={disk_id}: given twice")
                self.disk_backings[disk_id] = d.path
            for i, text in enumerate(args.net or []):
                net_id, tap = parse_net_backing(text)
                net_id = net_id if net_id is not None else f"net{i}"
                if net_id in self.net_backings:
                    raise InvalidConfig(f"--net id={net_id}: given twice")
                self.net_backings[net_id] = tap
        self.test_hooks: Any = None
        if args.test_hooks:
            from vmmpy.testhooks import TestHooks

            self.test_hooks = TestHooks.parse(args.test_hooks)
        self.monitor_args = parse_event_monitor(args.event_monitor) if args.event_monitor else None

    def vmm_options(self) -> dict[str, Any]:
        """Keyword arguments of Vmm (the event monitor and a booted VM apart)."""
        options: dict[str, Any] = {
            "serial": self.serial,
            "no_shutdown": self.args.no_shutdown,
            "disk_backings": self.disk_backings,
            "net_backings": self.net_backings,
            "vsock_socket": self.vsock_socket,
        }
        if self.test_hooks is not None:
            options["test_hooks"] = self.test_hooks
        return options


class Held:
    """What the command opens before its VMM exists (the event monitor's output, the API's
    listening socket, the booted VM), each held until a part of the VMM takes it over. `release`,
    at the command's end, closes what is still held: all of it when the start failed."""

    def __init__(self) -> None:
        self.monitor_fd: int | None = None
        self.monitor: Any = None
        self.api_listener: Any = None
        self.api_path: str | None = None
        self.booted: Any = None

    def release(self) -> None:
        if self.booted is not None:
            self.booted.discard()
            self.booted = None
        if self.api_listener is not None:
            self.api_listener.close()
            self.api_listener = None
            if self.api_path is not None:
                try:
                    os.unlink(self.api_path)
                except OSError:
                    pass
        if self.monitor_fd is not None:
            os.close(self.monitor_fd)
            self.monitor_fd = None
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None


def main(argv: Sequence[str] | None = None) -> int:
    import time  # a built-in module: the event monitor's timestamps count from here

    started_ns = time.monotonic_ns()
    args = parse_arguments(argv)
    held = Held()
    # Everything the arguments say is checked before anything starts.
    try:
        plan = Plan(args)
        # Opened here, so a bad path is a usage error (a FIFO blocks until its reader opens).
        if plan.monitor_args is not None:
            held.monitor_fd = open_event_output(**plan.monitor_args)
    except InvalidConfig as e:
        usage_error(str(e))
    try:
        return _run(plan, held, started_ns)
    finally:
        held.release()


def _run(plan: Plan, held: Held, started_ns: int) -> int:
    """The API socket is bound and the VM boots first; then the rest of the VMM loads, adopts
    the VM and serves the socket."""
    try:
        if plan.args.api_socket is not None:
            from vmmpy import unix_socket

            held.api_listener = unix_socket.listen_at(plan.api_path, plan.api_fd, "API socket")
            held.api_path = plan.api_path
        if plan.config is not None:
            from vmmpy.native_vm import boot_first

            held.booted = boot_first(plan.config, plan.serial)
        _setup_logging(plan.args.verbose)
        from vmmpy.events import EventMonitor
        from vmmpy.vmm import Vmm

        if held.monitor_fd is not None:
            held.monitor = EventMonitor(fd=held.monitor_fd, started_ns=started_ns)
            held.monitor_fd = None
        vmm = Vmm(event_monitor=held.monitor, booted=held.booted, **plan.vmm_options())
        booted, held.booted = held.booted is not None, None
    except (ImportError, VmmError) as e:
        return _fail(f"cannot load the VMM core: {e}" if isinstance(e, ImportError) else e)
    return _serve(vmm, plan, booted, held)


def _serve(vmm: Any, plan: Plan, booted: bool, held: Held) -> int:
    """Signals, the API and a snapshot to restore; then the VMM runs until it exits."""
    import signal
    import threading

    previous_handlers: dict[int, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        # Python runs this in the main thread between bytecodes, possibly while the main thread
        # holds a lock inside a Vmm call (restore). request_exit() may take such a lock, so it
        # is made from a thread of its own, which cannot deadlock with the interrupted code.
        threading.Thread(target=vmm.request_exit, name="vmmpy-signal", daemon=True).start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            previous_handlers[signum] = signal.signal(signum, on_signal)
        except ValueError:  # not the main thread (main() called from a test thread)
            break

    api = None
    try:
        try:
            if held.api_listener is not None:
                api = _start_api(vmm, plan, held.api_listener)
                held.api_listener = None
            if booted and plan.args.kernel is not None:
                _say_kernel_kind(vmm, plan.args.kernel)
            if plan.restore is not None:
                vmm.restore(**plan.restore)
        except VmmError as e:
            rc = _fail(e)
            _stop(vmm)
            return rc
        return vmm.wait()
    finally:
        if api is not None:
            api.close()
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


def _start_api(vmm: Any, plan: Plan, listener: Any) -> Any:
    from vmmpy.api import ApiServer

    return ApiServer(vmm, plan.api_path, fd=plan.api_fd, listener=listener).start()


def _stop(vmm: Any) -> None:
    import logging

    log = logging.getLogger("vmmpy.cli")
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
